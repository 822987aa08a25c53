"""The worker's hooks: override them in a subclass to watch or extend it (printing, metrics, health)."""

from __future__ import annotations

from kqueue.worker.task import Task

__all__ = ["Hooks"]


class Hooks:
    """Every hook of `Worker`, each a no-op here, with the thread it runs on.

    Hooks on the handler's thread may take their time (they delay that task
    only); those on the connection thread must be quick, since heartbeats and
    acks wait for them. One task at a time (concurrency 1, prefetch 1), the
    handler's thread is the connection thread, and the connection thread's
    hooks run on the keeper's thread while a task runs long
    (`kqueue.worker.inline`).
    """

    def on_task_start(self, task: Task) -> None:
        """Called on the handler's thread just before the handler runs."""

    def on_task_done(self, task: Task) -> None:
        """Called on the handler's thread once the handler returned or raised (`task.error`)."""

    def on_consuming(self, broker: str) -> None:
        """Called on the connection thread once it consumes, after each (re)connect; `broker` masked."""

    def on_connection_lost(self, error: BaseException) -> None:
        """Called on the connection thread when the broker went away; a reconnect follows."""

    def on_retry(self, task: Task, delay: float) -> None:
        """Called on the connection thread when a failed task is sent back for another attempt."""

    def on_dead_letter(self, task: Task, reason: str) -> None:
        """Called on the connection thread when a task goes to ``<queue>.dead`` (`reason`: failed, ...)."""

    def on_turn(self) -> None:
        """Called on the connection thread at every turn of its loop (at least once a second): it is alive."""
