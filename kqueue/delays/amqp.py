"""RabbitMQ's delays with no plugin: a fixed chain of queues whose messages expire after 1, 2, 4 ... ms.

A message delayed by D milliseconds carries a routing key of 32 words, the
bits of D from 2^31 down to 2^0, then the task queue's name:
``0.0. ... .1.0.1.task_queue`` (in its ``CC`` header: see `route`), and starts
in queue H, H its highest 1 bit. Exchange L of the chain routes a message whose
bit L is 1 to queue L, where every message lives 2^L ms (``x-message-ttl``)
and then dead-letters, routing key kept, into exchange L-1; a 0 bit passes
straight on to exchange L-1. After exchange 0 comes `READY`, which routes by
the name at the end of the key to the task queue itself. A message waits only
in queues where all messages live equally long, so each expires at the head,
in order: a short delay never waits behind a longer one.

The chain is shared by every queue of a virtual host: 32 queues and 32
exchanges for classic queues (``kqueue.delay.classic.00`` to ``.31``), the
same again for quorum queues if any are used, the exchange `READY` and the
exchange and queue `UNROUTABLE`, and one binding per task queue. Quorum
task queues get a chain of quorum queues that dead-letter at least once
(``x-dead-letter-strategy``), so a delayed task is replicated while it
waits, as the queue it is bound for. A task whose queue was deleted
while it waited goes to `UNROUTABLE`, a queue of its own, rather than nowhere.
"""

from __future__ import annotations

import math
from typing import Any

from kombu import Connection, Queue

from kqueue.errors import KQueueError
from kqueue.queues import declaring, is_quorum

__all__ = ["LEVELS", "READY", "UNROUTABLE", "chain_of", "count", "declare", "level_name", "route"]

#: Queues in a chain: delays up to 2^32 - 1 ms.
LEVELS = 32
#: The exchange at the end of every chain, which routes a due message to its task queue.
READY = "kqueue.delay.ready"
#: Where `READY` sends a due message whose queue is gone (deleted while it waited), rather than drop it:
#: an exchange and a classic queue of that name.
UNROUTABLE = "kqueue.delay.unroutable"


def chain_of(queue: Queue) -> str:
    """The chain a delayed task of `queue` goes through: ``classic`` or ``quorum``, as the queue."""
    return "quorum" if is_quorum(queue) else "classic"


def level_name(kind: str, level: int) -> str:
    """The name of queue `level` of a chain, and of the exchange in front of it."""
    return f"kqueue.delay.{kind}.{level:02d}"


def route(queue: Queue, seconds: float) -> tuple[str, str]:
    """Where a message goes to reach `queue` in `seconds` (> 0, rounded up to the ms): a queue of the chain,
    and the routing key the chain routes it by.

    Publish it to the default exchange with the queue as routing key and the key in its ``CC``
    header (RabbitMQ's sender-selected routing): the default exchange puts it in the queue at
    once, where a topic exchange matching a key of 32 words would take three times as long,
    and the chain's exchanges route it by the ``CC`` key, which dead-lettering keeps.

    Raises:
        KQueueError: a word of the queue's name is ``*`` or ``#``, which the chain's topic
            exchanges would take for a wildcard.
    """
    millis = max(1, math.ceil(seconds * 1000))
    if "*" in queue.name or "#" in queue.name:
        words = queue.name.split(".")
        if "*" in words or "#" in words:
            raise KQueueError(
                f"queue {queue.name!r} cannot take delayed tasks on RabbitMQ: a word of its name is * or #"
            )
    bits = _BITS[millis >> 24 & 255] + _BITS[millis >> 16 & 255] + _BITS[millis >> 8 & 255] + _BITS[millis & 255]
    return level_name(chain_of(queue), millis.bit_length() - 1), f"{bits}{queue.name}"


#: The 8 bits of each byte as routing-key words, highest first, each followed by a dot.
_BITS = ["".join("1." if byte >> bit & 1 else "0." for bit in range(7, -1, -1)) for byte in range(256)]


def declare(conn: Connection, queue: Queue) -> None:
    """Declare the chain `queue` needs, unless its last queue is there already, and bind `queue` at its end.

    Each on a channel of its own; idempotent.

    Raises:
        QueueMismatch: a queue of the chain exists with other arguments.
    """
    kind = chain_of(queue)
    if not _made(conn, kind):
        with declaring(conn) as channel:
            channel.exchange_declare(UNROUTABLE, "fanout", durable=True, auto_delete=False)
            channel.queue_declare(UNROUTABLE, durable=True, auto_delete=False)
            channel.queue_bind(UNROUTABLE, UNROUTABLE, "")
            ready = {"alternate-exchange": UNROUTABLE}
            channel.exchange_declare(READY, "topic", durable=True, auto_delete=False, arguments=ready)
            for level in range(LEVELS):
                _declare_level(channel, kind, level)
    with declaring(conn) as channel:
        channel.queue_bind(queue.name, READY, "*." * LEVELS + queue.name)


def _made(conn: Connection, kind: str) -> bool:
    """Whether the chain is there: it is made from the bottom up, so its last queue means the whole of it."""
    return _messages(conn, level_name(kind, LEVELS - 1)) is not None


def _messages(conn: Connection, name: str) -> int | None:
    """Messages in the queue `name`, or None if there is no such queue."""
    try:
        with declaring(conn) as channel:
            return int(channel.queue_declare(name, passive=True).message_count)
    except conn.channel_errors:
        return None


def _declare_level(channel: Any, kind: str, level: int) -> None:
    name = level_name(kind, level)
    after = level_name(kind, level - 1) if level else READY
    arguments: dict[str, Any] = {"x-message-ttl": 2**level, "x-dead-letter-exchange": after}
    if kind == "quorum":
        arguments.update(
            {"x-queue-type": "quorum", "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        )
    channel.exchange_declare(name, "topic", durable=True, auto_delete=False)
    channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
    skip = "*." * (LEVELS - 1 - level)
    channel.queue_bind(name, name, f"{skip}1.#")
    channel.exchange_bind(after, name, f"{skip}0.#")


def count(conn: Connection, queue: Queue) -> int:
    """Delayed messages in the chain `queue` uses: those of every queue of its type on the virtual host."""
    kind = chain_of(queue)
    return sum(_messages(conn, level_name(kind, level)) or 0 for level in range(LEVELS))
