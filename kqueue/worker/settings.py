"""How a worker runs: one immutable settings object, validated once where it is built."""

from __future__ import annotations

from dataclasses import dataclass

from kqueue.errors import KQueueError

__all__ = ["WorkerSettings"]


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker runs.

    Attributes:
        concurrency: tasks run at once, each on a thread.
        prefetch: unacknowledged messages the broker may hand this worker;
            None for the same as `concurrency` (fair dispatch).
        max_tasks: stop after running this many tasks.
        burst: stop once the queue is empty and nothing is in flight.
        grace: seconds running tasks get to finish after a stop is asked.
        max_retries: how often a failing task is tried again before it is dead-lettered.
        retry_delay: seconds before the first retry; each next one waits twice as long.
        delivery_limit: deliveries without an ack (a worker killed mid-task)
            after which a task is dead-lettered instead of run again.
    """

    concurrency: int = 1
    prefetch: int | None = None
    max_tasks: int | None = None
    burst: bool = False
    grace: float = 30.0
    max_retries: int = 3
    retry_delay: float = 1.0
    delivery_limit: int = 5

    def validate(self) -> WorkerSettings:
        """Return self, or raise `KQueueError` naming the first setting out of range."""
        checks = [
            ("concurrency", self.concurrency, 1),
            ("prefetch", self.prefetch, 1),
            ("max_tasks", self.max_tasks, 1),
            ("grace", self.grace, 0),
            ("max_retries", self.max_retries, 0),
            ("retry_delay", self.retry_delay, 0),
            ("delivery_limit", self.delivery_limit, 1),
        ]
        for name, value, least in checks:
            if value is not None and value < least:
                raise KQueueError(f"{name} must be at least {least}, not {value}")
        return self

    @property
    def prefetch_count(self) -> int:
        """The prefetch asked of the broker: `prefetch`, or `concurrency` when it is None."""
        return self.prefetch if self.prefetch is not None else self.concurrency

    def retry_delay_after(self, attempt: int) -> float:
        """Seconds before the run after `attempt`: `retry_delay`, then twice as long each time."""
        return self.retry_delay * 2.0 ** (attempt - 1)
