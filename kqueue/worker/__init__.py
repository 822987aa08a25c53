"""The consuming side: a connection thread that owns every broker call, and handler threads that run tasks.

How the parts fit, by thread:

- connection thread: `loop.Worker` runs the loop and Kombu's ConsumerMixin
  glue; `dispatch.Dispatcher` keeps the book of tasks and decides, through
  `policy`'s plain functions, what happens to each delivery and failure;
  `acks` holds one ledger per channel; `qos` sets and raises prefetch;
  `retries` holds early retries; `outbox` publishes retries and dead letters
  on a connection of their own; `waiting` waits on the broker and the
  mailbox at once; `lifecycle` says when to stop; `reconnect` reports a loss
  and backs off.
- handler threads (`pool.Pool`): run the handler and hand each finished task
  back through the `mailbox`, the one object both threads share; a task that
  succeeded may be acked at once through its ledger when the connection is idle.
- `hooks.Hooks`: what a subclass may override, each hook with its thread.
"""

from __future__ import annotations

from kqueue.worker.loop import Worker
from kqueue.worker.settings import WorkerSettings
from kqueue.worker.task import Task, TaskState

__all__ = ["Task", "TaskState", "Worker", "WorkerSettings"]
