"""The worker's decisions, as plain functions: what to do with a delivery, and with a failure.

No broker, no threads, no clock of their own: each takes what it decides on
and returns what to do, so a unit test can call it directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from kombu.exceptions import ContentDisallowed, DecodeError

from kqueue import message as wire
from kqueue.worker.settings import WorkerSettings
from kqueue.worker.task import Call, Registered

__all__ = ["DeadLetter", "GiveBack", "Hold", "Postpone", "Recount", "Retry", "Run", "on_failure", "route"]

#: Seconds early at most that a worker holds a task handed to it before its time; earlier
#: than that, it sends it back to the broker to wait (a held task is an unacked delivery).
HOLD_AT_MOST = 1.0


class Received(Protocol):
    """What `route` reads of a Kombu message."""

    headers: Any
    delivery_info: Any
    body: Any

    def decode(self) -> Any: ...


class Run(NamedTuple):
    """Run the task now (a tuple: one per task, made quickly)."""

    text: str
    delivery: wire.Delivery
    call: Call | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    """A task that came a moment early: keep it, unacked, until `due_in` seconds from now."""

    text: str
    delivery: wire.Delivery
    due_in: float
    call: Call | None = None


@dataclass(frozen=True, slots=True)
class Postpone:
    """A task that came long before its time (a broker that keeps no delays): send it back to wait, then ack."""

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
            wire.NOT_BEFORE: None,
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


Decision = Run | Hold | Postpone | Recount | DeadLetter | GiveBack

_NONE: Mapping[str, Registered] = {}


def route(
    message: Received,
    settings: WorkerSettings,
    *,
    now: float,
    taking: bool,
    tasks: Mapping[str, Registered] = _NONE,
    can_delay: bool = False,
) -> Decision:
    """What to do with a message just delivered.

    Parameters:
        message: the delivery.
        settings: the worker's delivery limit.
        now: Unix time, to compare with the time before which it must not run.
        taking: whether the worker still takes tasks.
        tasks: the function tasks this worker runs, by name.
        can_delay: whether the broker keeps delays (`kqueue.delays`), so that a
            task handed out long before its time can be sent back to wait.
    """
    if not taking:
        return GiveBack()
    delivery = wire.Delivery.of(message)  # type: ignore[arg-type]
    if delivery.number > settings.delivery_limit:
        error = f"delivered {delivery.number} times without an ack: its handler may be killing the worker"
        return DeadLetter("delivery-limit", error, delivery.attempt)
    if delivery.uncounted:
        return Recount({wire.DELIVERIES: delivery.number - 1, wire.REDELIVERED: True})
    call = None
    try:
        name = message.headers.get(wire.TASK) if message.headers else None
        if name is None:
            text = wire.decode_task(message)  # type: ignore[arg-type]
        else:
            task = tasks.get(name)
            if task is None:
                error = f"unknown task {name!r}: this worker registers no task of that name"
                return DeadLetter("unknown-task", error, delivery.attempt)
            args, kwargs = wire.decode_call(message)  # type: ignore[arg-type]
            call = Call(task, args, kwargs)
            text = call.describe()
    except (ContentDisallowed, DecodeError, UnicodeDecodeError, ValueError) as exc:
        return DeadLetter("undecodable", f"{type(exc).__name__}: {exc}", delivery.attempt)
    if delivery.retry_at is not None and delivery.retry_at > now:
        due_in = delivery.retry_at - now
        if can_delay and due_in > HOLD_AT_MOST:
            return Postpone(due_in)
        return Hold(text, delivery, due_in, call)
    return Run(text, delivery, call)


def on_failure(attempt: int, error: BaseException, settings: WorkerSettings, *, now: float) -> Retry | DeadLetter:
    """What to do with a task whose handler raised on its `attempt`-th run."""
    described = f"{type(error).__name__}: {error}"
    if attempt > settings.max_retries:
        return DeadLetter("failed", described, attempt)
    delay = settings.retry_delay_after(attempt)
    changes = {
        wire.ATTEMPT: attempt + 1,
        wire.NOT_BEFORE: now + delay,
        wire.RETRY_AT: None,
        wire.DELIVERIES: None,
        wire.REDELIVERED: None,
    }
    return Retry(delay, described, changes)
