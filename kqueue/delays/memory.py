"""``memory://`` with delays: Kombu's in-memory transport, with a heap per queue for the messages not due yet.

The heaps are shared by the whole process, as the transport's queues are. A
delayed message moves into its queue when a consumer looks for the next
message and finds it due on the queue's clock: the real time, moved ahead
by `advance`, so a test sees a task delayed by an hour run without waiting
an hour (`kqueue.testing.MemoryQueue.advance`). The delay header is removed
as the message moves, since a worker compares it with the real time.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Any, ClassVar

from kombu.transport import memory

from kqueue.delays import NOT_BEFORE, not_before_of

__all__ = ["Channel", "Transport", "advance", "delayed_count", "now"]

_lock = threading.Lock()
_order = itertools.count()
_ahead: dict[str, float] = {}


def now(queue: str) -> float:
    """The time on `queue`'s clock: Unix time, plus what `advance` added."""
    return time.time() + _ahead.get(queue, 0.0)


def advance(queue: str, seconds: float) -> None:
    """Move `queue`'s clock `seconds` ahead: delayed messages due by then are handed out at once."""
    with _lock:
        _ahead[queue] = _ahead.get(queue, 0.0) + seconds


class Channel(memory.Channel):  # type: ignore[misc]
    """Kombu's memory channel; a message whose `NOT_BEFORE` is ahead on its queue's clock waits in a heap."""

    delayed: ClassVar[dict[str, list[tuple[float, int, Any]]]] = {}

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        not_before = not_before_of(message)
        wait = 0.0 if not_before is None else not_before - time.time()
        if wait > 0:
            # Due that long from now on the queue's clock, however far `advance` moved it already.
            with _lock:
                heapq.heappush(self.delayed.setdefault(queue, []), (now(queue) + wait, next(_order), message))
            return
        super()._put(queue, message, **kwargs)

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        if self.delayed.get(queue):
            self._move_due(queue)
        return super()._get(queue, timeout)

    def _move_due(self, queue: str) -> None:
        clock = now(queue)
        due = []
        with _lock:
            heap = self.delayed.get(queue) or []
            while heap and heap[0][0] <= clock:
                due.append(heapq.heappop(heap)[2])
        for message in due:
            message["headers"].pop(NOT_BEFORE, None)
            super()._put(queue, message)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        super()._delete(queue, *args, **kwargs)
        with _lock:
            self.delayed.pop(queue, None)


class Transport(memory.Transport):  # type: ignore[misc]
    """Kombu's memory transport, with delays (see the module); its queues are the same as Kombu's."""

    Channel = Channel
    #: What URLs and log lines call it.
    scheme = "memory"


def delayed_count(queue: str) -> int:
    """Delayed messages of `queue`, due ones not yet moved included."""
    with _lock:
        return len(Channel.delayed.get(queue) or [])
