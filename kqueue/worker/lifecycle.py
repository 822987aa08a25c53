"""When a worker stops: a stop asked (with its grace), a hard stop, its quota, or an empty queue in burst mode."""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

from kqueue.worker.settings import WorkerSettings

__all__ = ["DrainCheck", "Lifecycle", "Phase"]


class Phase(Enum):
    """RUNNING -> STOPPING (no new tasks; running ones get the grace) -> ABORTING (give everything back)."""

    RUNNING = 0
    STOPPING = 1
    ABORTING = 2


class Lifecycle:
    """The worker's phase and the rules for when it is done.

    `ask` may be called from a signal handler: it only stores a number.
    Python runs a signal handler between any two bytecodes of the main thread,
    which may be holding a lock or be halfway through a log write; so the
    connection thread, not the handler, notices the request (`advance`), logs
    it and acts on it.
    """

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.phase = Phase.RUNNING
        self.started = 0  # tasks handed to a handler thread
        self.reason = ""
        self._asked = Phase.RUNNING
        self._deadline = math.inf

    def ask(self, *, now: bool = False, reason: str = "") -> None:
        """Ask for a stop (`now`: without the grace). Signal-safe; call `advance` to act on it."""
        self.reason = reason
        if now or self._asked is Phase.RUNNING:
            self._asked = Phase.ABORTING if now else Phase.STOPPING

    def advance(self, clock: float) -> Phase | None:
        """Move to the phase asked for, if it is a later one; return it, or None when nothing changed."""
        asked = self._asked
        if asked.value <= self.phase.value:
            return None
        if self.phase is Phase.RUNNING:
            self._deadline = clock + self.settings.grace
        self.phase = asked
        return asked

    @property
    def asked(self) -> bool:
        """Whether a stop was asked that `advance` has not acted on yet: one comparison, for every step."""
        return self._asked is not self.phase

    @property
    def may_end(self) -> bool:
        """Whether `done` can be true at all: stopping, a quota, or burst mode; else no need to ask it."""
        return self.phase is not Phase.RUNNING or self.settings.burst or self.settings.max_tasks is not None

    @property
    def stopping(self) -> bool:
        return self.phase is not Phase.RUNNING

    @property
    def aborted(self) -> bool:
        """Whether a stop without the grace (a second signal) was acted on."""
        return self.phase is Phase.ABORTING

    @property
    def quota_reached(self) -> bool:
        limit = self.settings.max_tasks
        return limit is not None and self.started >= limit

    @property
    def taking(self) -> bool:
        """Whether a new task may start: not stopping, and under the quota."""
        return self.phase is Phase.RUNNING and not self.quota_reached

    def seconds_left(self, clock: float) -> float:
        """Of the grace; infinite while running."""
        return max(0.0, self._deadline - clock)

    def done(self, *, running: int, busy: bool, clock: float, drained: Callable[[], bool]) -> bool:
        """Whether the worker should stop now.

        Parameters:
            running: tasks delivered and handed to handler threads, not yet settled.
            busy: anything running, waiting to run or waiting for its retry.
            clock: monotonic now.
            drained: asked only in burst mode: the queue is empty.
        """
        if self.phase is Phase.ABORTING:
            return True
        if self.phase is Phase.STOPPING:
            return running == 0 or clock >= self._deadline
        if self.quota_reached and not busy:
            return True
        return self.settings.burst and not busy and drained()


class DrainCheck:
    """Burst mode's question, whether the queue is empty: twice in a row, each after a wait in which nothing happened.

    Once is not enough: the broker's count leaves out messages on their way to us.
    """

    def __init__(self) -> None:
        self.readings = 0

    def forget(self) -> None:
        """Work happened: an earlier reading is stale."""
        self.readings = 0

    def drained(self, *, idle: bool, empty: Callable[[], bool]) -> bool:
        """Whether the queue is drained, asking `empty` (the broker) only after an idle wait."""
        if not idle:
            self.readings = 0
            return False
        self.readings = self.readings + 1 if empty() else 0
        return self.readings >= 2
