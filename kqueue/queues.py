"""The task queue's one definition, which the producer and the worker both declare."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

from kombu import Connection, Exchange, Queue

from kqueue.errors import queue_mismatch

__all__ = [
    "DEFAULT_QUEUE",
    "QueueType",
    "dead_letter_queue",
    "declare",
    "declaring",
    "is_quorum",
    "messages_ready",
    "task_queue",
]

DEFAULT_QUEUE = "task_queue"
"""The tutorial's queue, used when no name is given."""
DEAD_SUFFIX = ".dead"
"""Appended to a task queue's name to name its dead-letter queue."""


class QueueType(str, Enum):
    """RabbitMQ queue types kqueue declares.

    ``classic`` is the tutorial's queue and carries no arguments, so a queue
    declared by the tutorial's own code is the same queue. ``quorum`` is
    replicated, what a RabbitMQ cluster needs; other brokers ignore the type.
    """

    CLASSIC = "classic"
    QUORUM = "quorum"

    def arguments(self) -> dict[str, Any]:
        """The queue arguments this type is declared with: none for classic, ``x-queue-type`` for quorum."""
        return {"x-queue-type": "quorum"} if self is QueueType.QUORUM else {}


def task_queue(name: str = DEFAULT_QUEUE, queue_type: QueueType = QueueType.CLASSIC) -> Queue:
    """The durable queue named `name` on the default exchange, routing key = name.

    It is only a definition: `declare` makes it on the broker (the `Sender` and
    the `Worker` declare it themselves before using it).

    Parameters:
        name: the queue's name.
        queue_type: classic (the tutorial's queue, no arguments) or quorum.
    """
    return _durable(name, queue_type.arguments() or None)


def is_quorum(queue: Queue) -> bool:
    """Whether `queue` is declared as a RabbitMQ quorum queue."""
    return (queue.queue_arguments or {}).get("x-queue-type") == QueueType.QUORUM.value


def dead_letter_queue(queue: Queue) -> Queue:
    """Where tasks of `queue` go when they cannot be done: same type, ``<name>.dead``."""
    return _durable(f"{queue.name}{DEAD_SUFFIX}", queue.queue_arguments)


def _durable(name: str, arguments: dict[str, Any] | None) -> Queue:
    return Queue(
        name,
        exchange=Exchange(""),
        routing_key=name,
        durable=True,
        auto_delete=False,
        queue_arguments=arguments,
    )


def declare(conn: Connection, queue: Queue) -> None:
    """Declare `queue` on a channel of its own.

    Raises:
        QueueMismatch: the queue exists with other arguments (RabbitMQ refuses
            the declaration and closes the channel).
    """
    with declaring(conn) as channel:
        queue(channel).declare()


@contextmanager
def declaring(conn: Connection) -> Iterator[Any]:
    """A channel of its own for declarations, closed after; a refusal for other arguments becomes `QueueMismatch`."""
    channel = conn.channel()
    try:
        yield channel
    except conn.channel_errors as exc:
        mismatch = queue_mismatch(exc)
        if mismatch is not None:
            raise mismatch from None
        raise
    finally:
        _close_quietly(channel)


def messages_ready(channel: Any, queue: Queue) -> int:
    """Messages waiting in `queue`, not counting those handed to consumers.

    Kombu's virtual transports (Redis, memory) delete an empty queue's key, so
    their passive declare fails where RabbitMQ's says 0: ask them for the size.
    """
    if hasattr(channel, "_size"):
        return int(channel._size(queue.name))
    return int(queue(channel).queue_declare(passive=True).message_count)


def _close_quietly(channel: Any) -> None:
    try:
        channel.close()
    except Exception:  # noqa: BLE001 - the channel may already be closed by the broker
        pass
