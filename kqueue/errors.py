"""The errors kqueue reports to its users, each readable as one line."""

from __future__ import annotations

import re

__all__ = [
    "BrokerUnavailable",
    "KQueueError",
    "PublishFailed",
    "QueueMismatch",
    "describe",
    "is_ack_timeout",
    "queue_mismatch",
]

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for queue '(?P<queue>[^']+)'"
    r" in vhost '[^']*': received (?P<received>.+?) but current is (?P<current>.+?)\s*$"
)
_VALUE = re.compile(r"^(?:the value )?'(?P<value>[^']*)'")
_ACK_TIMEOUT = re.compile(r"delivery acknowledgement on channel \d+ timed out", re.IGNORECASE)


class KQueueError(Exception):
    """An error whose message is one line a user can act on."""


class BrokerUnavailable(KQueueError):
    """The broker could not be reached, or refused the connection."""


class QueueMismatch(KQueueError):
    """The queue exists on the broker with other arguments than kqueue's.

    Fatal: declaring it again can only fail the same way.
    """


class PublishFailed(KQueueError):
    """Not every message was confirmed by the broker.

    Attributes:
        confirmed: how many messages the broker did confirm, in order.
    """

    def __init__(self, message: str, confirmed: int) -> None:
        super().__init__(message)
        self.confirmed = confirmed


def describe(exc: BaseException) -> str:
    """An error's message, or its class name where the message is empty (``str(TimeoutError())`` is '')."""
    return str(exc) or type(exc).__name__


def _value(text: str) -> str | None:
    match = _VALUE.match(text)
    return match.group("value") if match else None


def queue_mismatch(exc: BaseException) -> QueueMismatch | None:
    """Translate RabbitMQ's "inequivalent arg" refusal into a `QueueMismatch`.

    Returns None for any other error, including the consumer ack timeout,
    which RabbitMQ reports with the same code 406.
    """
    match = _INEQUIVALENT.search(str(exc))
    if match is None:
        return None
    arg, queue = match.group("arg"), match.group("queue")
    current = _value(match.group("current"))
    if arg == "durable" and current == "false":
        return QueueMismatch(
            f"queue {queue!r} already exists and is not durable, but kqueue keeps tasks in "
            f"durable queues: choose another --queue, or delete it "
            f"(rabbitmqctl delete_queue {queue})"
        )
    if arg == "x-queue-type":
        kind = {"quorum": "a quorum", "classic": "a classic", None: "a classic"}.get(current, f"an {current}")
        option = {"quorum": "--queue-type quorum", None: "--queue-type classic"}.get(current)
        hint = f"use {option}" if option else "choose another --queue"
        shown = current or "none"
        return QueueMismatch(f"queue {queue!r} already exists as {kind} queue (x-queue-type={shown}): {hint}")
    shown = current if current is not None else "none"
    return QueueMismatch(
        f"queue {queue!r} already exists with argument {arg}={shown}, which kqueue does not "
        f"declare: choose another --queue, or set that argument with a server-side policy"
    )


def is_ack_timeout(exc: BaseException) -> bool:
    """Whether RabbitMQ closed the channel because a delivery stayed unacked too long."""
    return bool(_ACK_TIMEOUT.search(str(exc)))
