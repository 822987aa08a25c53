"""Delayed tasks, kept by the broker until they are due, never by a worker.

A delayed message carries `kqueue.message.NOT_BEFORE`, the Unix time before
which it must not run. Each kind of broker keeps it its own way, with no
plugin, and hands it out within moments of that time:

- RabbitMQ (`kqueue.delays.amqp`): the sender routes it through a fixed
  chain of queues whose messages expire after 1, 2, 4 ... ms and dead-letter
  into the next, then into the task queue.
- ``sqlite://`` (`kqueue.sqlite`): a table of delayed rows, moved into the
  queue by the consumers as they come due.
- Redis (`kqueue.delays.redis`): a sorted set per queue, moved by the consumers.
- ``memory://`` (`kqueue.delays.memory`): a heap per queue, on a clock that a
  test can move (`kqueue.testing.MemoryQueue.advance`).

A worker handed a task before its time (a broker that keeps no delays, a
clock that differs between machines) holds it a moment, or sends it back
to wait.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kqueue.errors import KQueueError

__all__ = ["LONGEST", "check_delay", "kept_by", "not_before_of"]

#: The longest delay, in seconds: RabbitMQ's chain counts milliseconds in 32 bits (49.7 days).
LONGEST = (2**32 - 1) / 1000
#: The header itself, repeated here so that the transports need not import the wire format.
NOT_BEFORE = "x-kqueue-not-before"


def check_delay(seconds: float) -> float:
    """`seconds`, or `KQueueError` if it is not a delay kqueue can keep."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds):
        raise KQueueError(f"a delay is a number of seconds, not {seconds!r}")
    if seconds < 0:
        raise KQueueError(f"a delay cannot be negative ({seconds:g}s)")
    if seconds > LONGEST:
        raise KQueueError(f"a delay of {seconds:g}s is longer than the longest kqueue keeps ({LONGEST:g}s, 49.7 days)")
    return float(seconds)


def not_before_of(message: Mapping[str, Any]) -> float | None:
    """The `NOT_BEFORE` of a message as Kombu's virtual transports hold it (a dict), or None."""
    headers = message.get("headers")
    if not headers:
        return None
    value = headers.get(NOT_BEFORE)
    return None if value is None else float(value)


def kept_by(conn: Any) -> bool:
    """Whether `conn`'s broker keeps delays: RabbitMQ, and kqueue's own transports (not Kombu's stock ones)."""
    transport = conn.transport
    return transport.driver_type in ("amqp", "sqlite") or type(transport).__module__.startswith("kqueue.")
