"""The worker's decisions, as plain functions: what to do with a delivery, and with a failure.

No broker, no threads, no clock of their own: each takes what it decides on
and returns what to do, so a unit test can call it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from kombu.exceptions import ContentDisallowed, DecodeError

from kqueue import message as wire
from kqueue.worker.settings import WorkerSettings

__all__ = ["DeadLetter", "GiveBack", "Hold", "Recount", "Retry", "Run", "on_failure", "route"]


class Received(Protocol):
    """What `route` reads of a Kombu message."""

    headers: Any
    delivery_info: Any

    def decode(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class Run:
    """Hand the task to a handler thread now."""

    text: str
    delivery: wire.Delivery


@dataclass(frozen=True, slots=True)
class Hold:
    """A retry that came early: keep it, unacked, until `due_in` seconds from now."""

    text: str
    delivery: wire.Delivery
    due_in: float


@dataclass(frozen=True, slots=True)
class Recount:
    """Redelivered by a queue that does not count deliveries: republish with the count, then ack."""

    changes: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Move it to ``<queue>.dead`` with why, then ack."""

    reason: str
    error: str
    attempt: int

    def changes(self, origin: str) -> dict[str, Any]:
        return {
            wire.REASON: self.reason,
            wire.ERROR: self.error[:2000],
            wire.ORIGIN: origin,
            wire.ATTEMPT: self.attempt,
            wire.RETRY_AT: None,
        }


@dataclass(frozen=True, slots=True)
class GiveBack:
    """The worker takes no more tasks (stopping, or its quota is reached): requeue it."""


@dataclass(frozen=True, slots=True)
class Retry:
    """Republish for another attempt, not to run before `delay` seconds from now, then ack."""

    delay: float
    error: str
    changes: dict[str, Any]


Decision = Run | Hold | Recount | DeadLetter | GiveBack


def route(message: Received, settings: WorkerSettings, *, now: float, taking: bool) -> Decision:
    """What to do with a message just delivered.

    Parameters:
        message: the delivery.
        settings: the worker's delivery limit.
        now: Unix time, to compare with a retry's time.
        taking: whether the worker still takes tasks.
    """
    if not taking:
        return GiveBack()
    delivery = wire.Delivery.of(message)  # type: ignore[arg-type]
    if delivery.number > settings.delivery_limit:
        error = f"delivered {delivery.number} times without an ack: its handler may be killing the worker"
        return DeadLetter("delivery-limit", error, delivery.attempt)
    if delivery.uncounted:
        return Recount({wire.DELIVERIES: delivery.number - 1, wire.REDELIVERED: True})
    try:
        text = wire.decode_task(message)  # type: ignore[arg-type]
    except (ContentDisallowed, DecodeError, UnicodeDecodeError) as exc:
        return DeadLetter("undecodable", f"{type(exc).__name__}: {exc}", delivery.attempt)
    if delivery.retry_at is not None and delivery.retry_at > now:
        return Hold(text, delivery, delivery.retry_at - now)
    return Run(text, delivery)


def on_failure(attempt: int, error: BaseException, settings: WorkerSettings, *, now: float) -> Retry | DeadLetter:
    """What to do with a task whose handler raised on its `attempt`-th run."""
    described = f"{type(error).__name__}: {error}"
    if attempt > settings.max_retries:
        return DeadLetter("failed", described, attempt)
    delay = settings.retry_delay_after(attempt)
    changes = {
        wire.ATTEMPT: attempt + 1,
        wire.RETRY_AT: now + delay,
        wire.DELIVERIES: None,
        wire.REDELIVERED: None,
    }
    return Retry(delay, described, changes)
