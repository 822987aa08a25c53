"""Looking after queues: what they hold, and moving dead letters back once their cause is fixed."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from kombu import Connection, Queue
from kombu.message import Message

from kqueue import message as wire
from kqueue.brokers import is_amqp, mask
from kqueue.errors import KQueueError
from kqueue.producer import Sender
from kqueue.queues import dead_letter_queue, declare, messages_ready

__all__ = [
    "DeadLetter",
    "Management",
    "QueueStats",
    "dead_letters",
    "delete_dead",
    "management_url_for",
    "purge",
    "queue_stats",
    "retry_dead",
]

#: kqueue's own headers, dropped when a dead letter goes back to its queue for a fresh start.
_KQUEUE_HEADERS = (
    wire.ATTEMPT,
    wire.DELIVERIES,
    wire.REDELIVERED,
    wire.RETRY_AT,
    wire.NOT_BEFORE,
    wire.REASON,
    wire.ERROR,
    wire.ORIGIN,
    wire.DIED_AT,
)


@dataclass(frozen=True)
class QueueStats:
    """What a queue holds, as `kqueue stat` prints it. None where the broker cannot tell.

    Attributes:
        name: the queue's name.
        ready: messages waiting to be handed out.
        unacked: messages handed to consumers and not yet acknowledged.
        consumers: consumers of the queue.
        delayed: messages the broker keeps until they are due (see `kqueue.delays`); on
            RabbitMQ, those of every queue of the virtual host, which share one chain.
    """

    name: str
    ready: int
    unacked: int | None
    consumers: int | None
    delayed: int | None = 0


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter, as `kqueue dead list` prints it.

    Attributes:
        text: the task's text (the repr of its bytes when it does not decode); a function task's call.
        reason: why it died: ``failed``, ``undecodable``, ``delivery-limit`` or ``unknown-task`` (``?`` if unknown).
        error: the last error, ``Type: message``.
        attempts: the runs of its handler.
        origin: the queue it came from.
        task: a function task's name; None for a text task.
        died_at: the Unix time it was dead-lettered; None if not recorded (dead-lettered by an earlier kqueue).
        key: tells it from the other dead letters (`retry_dead`, `delete_dead`); equal letters share it.
    """

    text: str
    reason: str
    error: str
    attempts: int
    origin: str
    task: str | None = None
    died_at: float | None = None
    key: str = ""


def management_url_for(broker_url: str) -> str:
    """RabbitMQ's management API on the broker's host, default port (HTTPS for ``amqps://``), same credentials."""
    parts = urlsplit(broker_url)
    user, password = parts.username or "guest", parts.password or "guest"
    scheme, port = ("https", 15671) if parts.scheme == "amqps" else ("http", 15672)
    return f"{scheme}://{quote(user)}:{quote(password)}@{parts.hostname or 'localhost'}:{port}"


def queue_stats(conn: Connection, queue: Queue, management_url: str | None = None) -> list[QueueStats]:
    """Ready, unacknowledged and consumers for `queue` and its dead-letter queue.

    On RabbitMQ the unacknowledged count comes from the management API when it
    answers (`management_url`, by default the broker's host on port 15672);
    without it that count is unknown. On Redis it is counted from Kombu's
    record of unacknowledged deliveries; consumers are unknown there. On
    ``sqlite://`` all three are exact.
    """
    queues = [queue, dead_letter_queue(queue)]
    if conn.transport.driver_type == "sqlite":
        from kqueue.sqlite import queue_stats as sqlite_stats

        rows = [QueueStats(q.name, *sqlite_stats(conn, q.name)) for q in queues]
    elif is_amqp(conn):
        api = Management(management_url or management_url_for(conn.as_uri(include_password=True)), conn)
        rows = [_amqp_stats(conn, q, api) for q in queues]
    else:
        rows = [_virtual_stats(conn, q) for q in queues]
    rows[0] = dataclasses.replace(rows[0], delayed=_delayed(conn, queue))
    return rows


def _delayed(conn: Connection, queue: Queue) -> int | None:
    """The delayed messages of `queue`, as its broker keeps them (None: a transport that keeps none)."""
    transport = type(conn.transport).__module__
    if transport.startswith("kqueue.sqlite"):
        from kqueue.sqlite import delayed_count

        return delayed_count(conn, queue.name)
    if transport == "kqueue.delays.redis":
        from kqueue.delays import redis

        return redis.delayed_count(conn.default_channel, queue.name)
    if transport == "kqueue.delays.memory":
        from kqueue.delays import memory

        return memory.delayed_count(queue.name)
    if is_amqp(conn):
        from kqueue.delays import amqp

        return amqp.count(conn, queue)
    return None


def _amqp_stats(conn: Connection, queue: Queue, api: Management) -> QueueStats:
    # Ready and consumers are exact from a passive declare, this very moment;
    # the management API's figures lag by up to 5 s, so only the count the
    # declare cannot give, unacknowledged, comes from there.
    with _channel(conn) as channel:
        try:
            declared = channel.queue_declare(queue.name, passive=True)
        except conn.channel_errors:
            return QueueStats(queue.name, 0, 0, 0)
    from_api = api.queue(queue.name)
    unacked = None if from_api is None else int(from_api.get("messages_unacknowledged", 0))
    return QueueStats(queue.name, declared.message_count, unacked, declared.consumer_count)


def _virtual_stats(conn: Connection, queue: Queue) -> QueueStats:
    channel = conn.default_channel
    unacked = None
    client = getattr(channel, "client", None)
    if client is not None:  # Redis: Kombu keeps unacked deliveries in one hash for all queues
        unacked = 0
        for raw in client.hvals(channel.unacked_key):
            _, _, routing_key = json.loads(raw)
            unacked += routing_key == queue.name
    return QueueStats(queue.name, messages_ready(channel, queue), unacked, None)


class Management:
    """The few reads kqueue makes of RabbitMQ's management API, on `conn`'s virtual host.

    After a first failure (no plugin, refused, a bad reply) it answers None without asking again.
    """

    def __init__(self, url: str, conn: Connection) -> None:
        parts = urlsplit(url)
        self.base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}"
        token = base64.b64encode(f"{parts.username or 'guest'}:{parts.password or 'guest'}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}"}
        self.vhost = conn.virtual_host or "/"
        self.available = True

    def queue(self, name: str) -> dict[str, Any] | None:
        """The queue's object ({} if there is no such queue), consumers' details included; None: no answer."""
        found = self._get(f"queues/{quote(self.vhost, safe='')}/{quote(name, safe='')}")
        return found if isinstance(found, dict) else None

    def queue_types(self) -> dict[str, str] | None:
        """The virtual host's queues, by name: their types (``classic``, ``quorum``, ...); None: no answer."""
        found = self._get(f"queues/{quote(self.vhost, safe='')}?columns=name,type")
        return (
            {str(entry["name"]): str(entry.get("type", "classic")) for entry in found}
            if isinstance(found, list)
            else None
        )

    def messages_by_prefix(self, prefix: str) -> int | None:
        """Messages in all the queues whose names start with `prefix`, in one call; None: no answer."""
        pattern = quote("^" + prefix.replace(".", "\\."), safe="")
        found = self._get(f"queues/{quote(self.vhost, safe='')}?use_regex=true&name={pattern}&columns=name,messages")
        if not isinstance(found, list):
            return None
        return sum(int(entry.get("messages", 0)) for entry in found if str(entry["name"]).startswith(prefix))

    def connection_names(self) -> dict[str, str]:
        """The names clients gave their connections (`connection_name`), by RabbitMQ's own; {} if no answer."""
        found = self._get("connections?columns=name,user_provided_name")
        if not isinstance(found, list):
            return {}
        return {
            str(entry["name"]): str(entry["user_provided_name"]) for entry in found if entry.get("user_provided_name")
        }

    def _get(self, path: str) -> Any:
        if not self.available:
            return None
        request = urllib.request.Request(f"{self.base}/api/{path}", headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return {}
            self.available = False
        except (urllib.error.URLError, OSError, ValueError):
            self.available = False
        return None


@contextmanager
def _channel(conn: Connection) -> Iterator[Any]:
    channel = conn.channel()
    try:
        yield channel
    finally:
        try:
            channel.close()
        except Exception:  # noqa: BLE001 - a channel the broker closed is closed
            pass


def _drain(conn: Connection, queue: Queue, limit: int | None) -> Iterator[Message]:
    """Fetch messages one by one (unacknowledged) until the queue is empty or `limit`."""
    declare(conn, queue)
    bound = queue(conn.default_channel)
    taken = 0
    while limit is None or taken < limit:
        message = bound.get(no_ack=False, accept=wire.ACCEPT)
        if message is None:
            return
        taken += 1
        yield message


def dead_letters(conn: Connection, queue: Queue, limit: int | None = None) -> list[DeadLetter]:
    """The dead letters of `queue`, oldest first, at most `limit`; they stay where they are."""
    held: list[Message] = []
    try:
        for message in _drain(conn, dead_letter_queue(queue), limit):
            held.append(message)
        return [_letter(message, queue) for message in held]
    finally:
        for message in held:
            message.requeue()


def _letter(message: Message, queue: Queue) -> DeadLetter:
    headers = wire.headers_of(message)
    name = headers.get(wire.TASK)
    try:
        text = wire.decode_task(message) if name is None else wire.describe_call(name, *wire.decode_call(message))
    except Exception:  # noqa: BLE001 - undecodable letters are listed by their bytes
        text = repr(message.body)
    died_at = headers.get(wire.DIED_AT)
    attempts = headers.get(wire.ATTEMPT, 1)
    return DeadLetter(
        text,
        str(headers.get(wire.REASON, "?")),
        str(headers.get(wire.ERROR, "")),
        attempts if isinstance(attempts, int) else 0,
        str(headers.get(wire.ORIGIN, queue.name)),
        None if name is None else str(name),
        float(died_at) if isinstance(died_at, (int, float)) and 0 < died_at < 1e11 else None,
        _key(message),
    )


def _key(message: Message) -> str:
    """What tells a dead letter from the others: a digest of its body and kqueue's headers (equal letters share it).

    Only kqueue's own headers: brokers add and change theirs at each reading (delivery
    and acquisition counts on RabbitMQ, ``redelivered`` on Redis).
    """
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    kept = {k: v for k, v in wire.headers_of(message).items() if str(k).startswith(wire.KQUEUE_PREFIX)}
    headers = json.dumps(kept, sort_keys=True, default=str).encode()
    return hashlib.sha256(body + b"\0" + headers).hexdigest()[:16]


def retry_dead(
    conn: Connection,
    queue: Queue,
    limit: int | None = None,
    on_moved: Callable[[int], None] | None = None,
    key: str | None = None,
) -> int:
    """Move dead letters back to the queue they came from, each confirmed before it leaves; return how many.

    They start afresh: kqueue's attempt and delivery counts are dropped.

    Parameters:
        conn: the broker.
        queue: the task queue whose ``<name>.dead`` is emptied.
        limit: move at most this many; None for all.
        on_moved: called with the count so far after each one moved.
        key: move only the first dead letter of this `DeadLetter.key` (0 if none has it).

    Raises:
        KQueueError: a dead letter came from another queue (it stays where it was).
    """
    moved = 0
    with Sender(conn, queue, reconnect_for=0) as sender:

        def move(message: Message) -> None:
            nonlocal moved
            origin = str(wire.headers_of(message).get(wire.ORIGIN, queue.name))
            if origin != queue.name:
                raise KQueueError(f"dead letter came from {origin!r}, not {queue.name!r}: use --queue {origin}")
            sender.publish([wire.copy_of(message, queue.name, dict.fromkeys(_KQUEUE_HEADERS))])
            message.ack()
            moved += 1
            if on_moved is not None:
                on_moved(moved)

        if key is not None:
            return _take(conn, queue, key, move)
        for message in _drain(conn, dead_letter_queue(queue), limit):
            _or_back(message, move)
    return moved


def delete_dead(conn: Connection, queue: Queue, key: str) -> int:
    """Delete the first dead letter of `queue` whose `DeadLetter.key` is `key`; return 1, or 0 if none has it."""
    return _take(conn, queue, key, lambda message: message.ack())


def _take(conn: Connection, queue: Queue, key: str, act: Callable[[Message], None], within: int = 1000) -> int:
    """`act` on the first dead letter of this key, among the first `within`; those before it go back."""
    passed: list[Message] = []
    try:
        for message in _drain(conn, dead_letter_queue(queue), within):
            if _key(message) == key:
                _or_back(message, act)
                return 1
            passed.append(message)
        return 0
    finally:
        for message in passed:
            message.requeue()


def _or_back(message: Message, act: Callable[[Message], None]) -> None:
    """`act` on `message`; if that fails, the message goes back where it was (if the broker is still there)."""
    try:
        act(message)
    except BaseException:
        with contextlib.suppress(Exception):
            message.requeue()
        raise


def purge(conn: Connection, queue: Queue) -> int:
    """Delete every ready message of `queue`; return how many.

    Messages handed to consumers and not yet acknowledged are not ready, and stay.

    Raises:
        KQueueError: the broker refused the purge.
    """
    try:
        return int(queue(conn.default_channel).purge() or 0)
    except conn.channel_errors as exc:
        raise KQueueError(f"cannot purge {queue.name!r} on {mask(conn.as_uri(include_password=True))}: {exc}") from None
