"""The consuming side: a connection thread that owns every broker call, and handler threads that run tasks.

How the parts fit, by thread:

- connection thread (`loop.Worker`): consumes, decides what to do with each
  delivery and failure (`policy`), holds early retries (`retries`), acks
  through the channel's ledger (`acks`), publishes retries and dead letters
  on a connection of their own (`outbox`), stops when `lifecycle` says so,
  and reconnects.
- handler threads (`pool.Pool`): run the handler and hand each finished task
  back through the `mailbox`, the one object both threads share; a task that
  succeeded may be acked at once through its ledger when the connection is idle.
"""

from __future__ import annotations

from kqueue.worker.loop import Worker
from kqueue.worker.settings import WorkerSettings
from kqueue.worker.task import Task, TaskState

__all__ = ["Task", "TaskState", "Worker", "WorkerSettings"]
