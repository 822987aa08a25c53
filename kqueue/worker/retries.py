"""Retries that arrived before their time, held by the worker without taking a prefetch slot."""

from __future__ import annotations

import heapq
import itertools

from kqueue.worker.task import Task

__all__ = ["HeldRetries"]


class HeldRetries:
    """Tasks waiting for their retry time, soonest first (Celery's ETA approach).

    A held task is unacked, so it counts against prefetch; the worker raises
    prefetch by `len(held)` so that it blocks no task that could run now.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Task]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def hold(self, task: Task, due: float) -> None:
        """Keep `task` until the monotonic time `due`."""
        heapq.heappush(self._heap, (due, next(self._order), task))

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[Task]:
        """Take out the tasks whose time has come, soonest first."""
        ready = []
        while self._heap and self._heap[0][0] <= now:
            ready.append(heapq.heappop(self._heap)[2])
        return ready

    def take_all(self) -> list[Task]:
        """Take out every held task: to give them back, or because their channel is gone."""
        tasks = [entry[2] for entry in sorted(self._heap)]
        self._heap.clear()
        return tasks
