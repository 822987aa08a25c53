"""The Kombu glue: a virtual transport whose channels keep their queues in the store."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from itertools import count
from queue import Empty
from typing import Any

from amqp.protocol import queue_declare_ok_t
from kombu.transport import virtual

from kqueue.delays import not_before_of
from kqueue.errors import KQueueError
from kqueue.sqlite.failures import FileReplaced, StoreUnavailable
from kqueue.sqlite.options import Options, path_of
from kqueue.sqlite.store import REAP_INTERVAL, Store

__all__ = [
    "Channel",
    "Transport",
    "consumer_labels",
    "delayed_count",
    "due_in",
    "published_count",
    "queue_names",
    "queue_stats",
    "wake_fd",
]

log = logging.getLogger("kqueue.sqlite")

#: Rows claimed at once by a consumer whose prefetch is unlimited.
CLAIM_BATCH = 100
#: The header RabbitMQ's quorum queues use for earlier deliveries of a message.
DELIVERY_COUNT = "x-delivery-count"
#: Where the row id of a delivered message is kept in its properties.
ROW = "sqlite_row"


def _row_of(message: Any) -> int:
    return int(message.properties[ROW])


class QoS(virtual.QoS):  # type: ignore[misc]
    """Prefetch as Kombu counts it, with the rows themselves as the record of what is unacked.

    Kombu's QoS restores unacked messages by publishing copies of them; here an
    ack deletes the row, and a requeue or a close clears its owner, so the
    message keeps its place and is never duplicated.
    """

    channel: Channel

    def ack(self, delivery_tag: Any) -> None:
        self.ack_many([delivery_tag])

    def ack_many(self, tags: Sequence[Any]) -> None:
        rows = [_row_of(self._delivered[tag]) for tag in tags if tag in self._delivered]
        self.channel.store.delete(rows, lazy=bool(self.channel._consumers))
        for tag in tags:
            self._quick_ack(tag)
        self.channel.slot_freed()

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        message = self._delivered.get(delivery_tag)
        if message is not None:
            if requeue:
                self.channel.store.give_back([_row_of(message)])
            else:
                self.channel.store.delete([_row_of(message)], lazy=bool(self.channel._consumers))
        self._quick_ack(delivery_tag)
        self.channel.slot_freed()

    def restore_unacked(self) -> list[Any]:
        self._flush()
        rows = [_row_of(message) for message in self._delivered.values()]
        self._delivered.clear()
        try:
            self.channel.store.give_back(rows)
        except (KQueueError, sqlite3.Error) as exc:
            # The rows stay this connection's until it closes or its process exits.
            log.warning("could not requeue %d unacknowledged messages: %s", len(rows), exc)
        return []

    def unacked_tags(self, upto: int) -> list[Any]:
        return [tag for tag in self._delivered if tag <= upto and tag not in self._dirty]


class Channel(virtual.Channel):  # type: ignore[misc]
    """A channel whose queues are tables in the database file.

    Confirm mode (`confirm_select`) works like AMQP publisher confirms: each
    publish gets the next delivery tag, and the ``basic_ack`` callbacks in
    `events` are called with ``(last_tag, True)`` once the messages are on
    disk, every `Options.confirm_batch` messages and whenever `flush` or the
    connection's ``drain_events`` is called. A commit that fails breaks the
    channel, as a closed AMQP channel: nothing after the last confirm is ever
    confirmed on it.
    """

    QoS = QoS
    supports_fanout = True

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.store: Store = connection.store
        self.events: dict[str, set[Callable[..., Any]]] = defaultdict(set)
        for event in ("basic_ack", "basic_nack", "basic_return"):
            self.events[event] = set()
        self._tags = count(1)
        self._claimed: dict[str, deque[tuple[int, str, int]]] = defaultdict(deque)
        self._confirming = False
        self._pending: list[tuple[str, str]] = []
        self._pending_delayed: list[tuple[str, str, float]] = []
        self._published = 0
        self._confirmed = 0
        self._broken: KQueueError | None = None

    # -- publishing ------------------------------------------------------------------

    def confirm_select(self, nowait: bool = False) -> None:
        """Confirm each publish once it is committed (see the class docstring)."""
        self._confirming = True

    def basic_publish(self, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> Any:
        self._check_broken()
        if self._confirming:
            self._published += 1
        result = super().basic_publish(message, exchange, routing_key, **kwargs)
        if self._confirming and len(self._pending) + len(self._pending_delayed) >= self.store.options.confirm_batch:
            self.flush()
        return result

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        payload = json.dumps(message)
        not_before = not_before_of(message)
        if not_before is not None and not_before > time.time():
            delayed = (queue, payload, not_before)
            if self._confirming:
                self._pending_delayed.append(delayed)
            else:
                self.store.insert((), [delayed])
        elif self._confirming:
            self._pending.append((queue, payload))
        else:
            self.store.insert([(queue, payload)])

    def _put_fanout(self, exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
        for queue in {queue for _, _, queue in self.get_table(exchange)}:
            self._put(queue, message)

    def flush(self) -> bool:
        """Commit the messages published in confirm mode, then confirm them; True if any were.

        Raises:
            StoreUnavailable: the commit failed; those messages are not stored
                and not confirmed, and the channel takes no more publishes.
            FileReplaced: they went to a file no longer at the queue's path; not confirmed either.
        """
        self._check_broken()
        if self._confirmed == self._published:
            return False
        last = self._published
        if self._pending or self._pending_delayed:
            try:
                self.store.insert(self._pending, self._pending_delayed)
            except KQueueError as exc:
                self._broken = exc
                raise
            self._pending = []
            self._pending_delayed = []
        self._confirmed = last
        for callback in list(self.events["basic_ack"]):
            callback(last, True)
        return True

    def _check_broken(self) -> None:
        if self._broken is not None:
            raise type(self._broken)(str(self._broken))

    # -- consuming -------------------------------------------------------------------

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any) -> Any:
        self.store.add_consumer(consumer_tag, queue)
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        self.store.remove_consumer(consumer_tag)
        if queue is not None:
            self._give_back_claimed(queue)
        return result

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        claimed = self._claimed[queue]
        if not claimed:
            room = self.qos.can_consume_max_estimate()
            limit = CLAIM_BATCH if room is None else room - sum(len(rows) for rows in self._claimed.values())
            if limit <= 0:
                raise Empty()
            claimed.extend(self.store.claim(queue, limit, by_turn=queue in self._active_queues))
            if not claimed:
                raise Empty()
        return self._delivery(*claimed.popleft())

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        claimed = self._claimed[queue] or deque(self.store.claim(queue, 1))
        if not claimed:
            return None
        message = self.Message(self._delivery(*claimed.popleft()), channel=self)
        if no_ack:
            self.store.delete([_row_of(message)])
        else:
            self.qos.append(message, message.delivery_tag)
        return message

    def _delivery(self, row: int, payload: str, deliveries: int) -> Any:
        message = json.loads(payload)
        properties = message["properties"]
        properties["delivery_tag"] = next(self._tags)
        properties[ROW] = row
        earlier = deliveries - 1
        properties["delivery_info"]["redelivered"] = earlier > 0
        if earlier:
            message["headers"] = {**(message.get("headers") or {}), DELIVERY_COUNT: earlier}
        return message

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        if multiple:
            self.qos.ack_many(self.qos.unacked_tags(delivery_tag))
        else:
            self.qos.ack(delivery_tag)

    def slot_freed(self) -> None:
        if self._consumers:
            self.store.poke()

    def _give_back_claimed(self, queue: str) -> None:
        claimed = self._claimed.pop(queue, None)
        if claimed:
            self.store.give_back([row for row, _, _ in claimed])

    def _restore(self, message: Any) -> None:
        self.store.give_back([_row_of(message)])

    # -- queues ------------------------------------------------------------------------

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        # A read first: declaring a queue that exists takes no write lock, so it never waits on a writer.
        if not self.store.query("SELECT 1 FROM queues WHERE name = ?", (queue,)):
            self.store.write("INSERT OR IGNORE INTO queues (name) VALUES (?)", (queue,))

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return bool(
            self.store.query(
                "SELECT 1 FROM queues WHERE name = ? UNION ALL SELECT 1 FROM messages WHERE queue = ? LIMIT 1",
                (queue, queue),
            )
        )

    def _size(self, queue: str) -> int:
        rows = self.store.query("SELECT COUNT(*) FROM messages WHERE queue = ? AND owner IS NULL", (queue,))
        return int(rows[0][0])

    def _purge(self, queue: str) -> int:
        with self.store.transaction(doing="purge") as db:
            purged = int(db.execute("DELETE FROM messages WHERE queue = ? AND owner IS NULL", (queue,)).rowcount)
        with contextlib.suppress(StoreUnavailable):  # the space comes back later, when a consumer idles
            self.store.vacuum()
        return purged

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        with self.store.transaction(doing="delete") as db:
            tables = (("messages", "queue"), ("delayed", "queue"), ("queues", "name"), ("bindings", "queue"))
            for table, column in tables:
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (queue,))

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        ok = super().queue_declare(queue, passive, **kwargs)
        return queue_declare_ok_t(ok.queue, ok.message_count, self.store.live_consumers(ok.queue))

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any) -> None:
        if if_empty and self._size(queue):
            return
        self._delete(queue)
        self.state.queue_bindings_delete(queue)

    # -- bindings, shared through the file so that every process routes alike ---------

    def queue_bind(self, queue: str, exchange: str | None = None, routing_key: str = "", **kwargs: Any) -> None:
        super().queue_bind(queue, exchange, routing_key, **kwargs)
        exchange = exchange or "amq.direct"
        kind = self.typeof(exchange)
        _, pattern, _ = kind.prepare_bind(queue, exchange, routing_key, kwargs.get("arguments"))
        self.store.write(
            "INSERT OR IGNORE INTO bindings (exchange, routing_key, pattern, queue, type) VALUES (?, ?, ?, ?, ?)",
            (exchange, routing_key, pattern, queue, kind.type),
        )

    def queue_unbind(self, queue: str, exchange: str | None = None, routing_key: str = "", **kwargs: Any) -> None:
        super().queue_unbind(queue, exchange, routing_key, **kwargs)
        self.store.write(
            "DELETE FROM bindings WHERE exchange = ? AND routing_key = ? AND queue = ?",
            (exchange or "amq.direct", routing_key, queue),
        )

    def get_table(self, exchange: str) -> list[tuple[str, str | None, str]]:
        rows = self.store.query("SELECT routing_key, pattern, queue FROM bindings WHERE exchange = ?", (exchange,))
        return [tuple(row) for row in rows]

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        if exchange in self.state.exchanges:
            return super().typeof(exchange, default)
        rows = self.store.query("SELECT type FROM bindings WHERE exchange = ? LIMIT 1", (exchange,))
        return self.exchange_types[rows[0][0] if rows else default]

    def _queue_bind(self, *args: Any) -> None:
        """Bindings of every kind are stored by `queue_bind`."""

    # -- the end -------------------------------------------------------------------------

    def close(self) -> None:
        if not self.closed:
            try:
                if self._broken is None:
                    self.flush()
                self.store.write_pending()
            finally:
                for queue in list(self._claimed):
                    self._give_back_claimed(queue)
                super().close()


class Transport(virtual.Transport):  # type: ignore[misc]
    """Kombu's virtual transport over one SQLite file (see `kqueue.sqlite`)."""

    Channel = Channel

    can_parse_url = True
    default_port = 0
    driver_type = "sqlite"
    driver_name = "sqlite3"
    #: What makes a publisher or a worker open the file again: a write that failed for now, a file
    #: no longer at its name. A consumer's own claims and acks wait out the first kind instead.
    connection_errors = (StoreUnavailable, FileReplaced)
    #: Seconds an idle consumer sleeps at most between looks; wake-ups come sooner.
    polling_interval = REAP_INTERVAL

    implements = virtual.Transport.implements.extend(
        asynchronous=False,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.path = path_of(client.hostname or "")
        self.options = Options.parse(client.hostname or "", client.transport_options)
        self.store: Store | None = None

    def driver_version(self) -> str:
        return sqlite3.sqlite_version

    def establish_connection(self) -> Any:
        if self.store is None:
            named = self.client.transport_options.get("client_properties") or {}
            self.store = Store(self.path, self.options, str(named.get("connection_name", "")))
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        try:
            super().close_connection(connection)
        finally:
            store, self.store = self.store, None
            if store is not None:
                store.close()

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """Deliver one message, or commit pending confirms; wait on the wake socket, not in a sleep loop.

        Raises:
            TimeoutError: nothing happened within `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        store = self.store
        if store is None:
            raise StoreUnavailable("the sqlite connection is closed")  # pragma: no cover - Kombu reconnects first
        while True:
            if any([channel.flush() for channel in list(self.channels)]):
                return
            store.clear_wake()  # before looking, so that a commit after the look still wakes the wait
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                pass
            if any(channel._consumers for channel in self.channels):
                store.ensure_owner()
                store.idle()
            else:
                store.write_pending()
            remaining = self.polling_interval if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            store.wait(
                min(
                    remaining,
                    self.polling_interval,
                    store.retry_in() or self.polling_interval,
                    max(0.01, store.due_in()),
                )
            )


# -- for kqueue's worker and `kqueue stat` -------------------------------------------


def _store_of(conn: Any) -> Store:
    transport = conn.transport
    if not isinstance(transport, Transport):
        raise KQueueError(f"not a sqlite:// connection: {conn.as_uri()}")
    conn.ensure_connection(max_retries=1)
    assert transport.store is not None
    return transport.store


def wake_fd(conn: Any) -> int:
    """A descriptor that turns readable when a message may be ready for `conn`'s consumers.

    Select on it together with your own descriptors, then call
    ``conn.drain_events(timeout=0)``, which clears it. It also turns readable
    when an ack on another thread frees a prefetch slot.

    Raises:
        KQueueError: `conn` is not a ``sqlite://`` connection.
    """
    return int(_store_of(conn).wake_socket().fileno())


def due_in(conn: Any) -> float:
    """Seconds until a delayed message of a queue `conn` consumes from is due, as far as it knows (inf: none)."""
    store = conn.transport.store
    return math.inf if store is None else store.due_in()


def delayed_count(conn: Any, queue_name: str) -> int:
    """Delayed messages of `queue_name`, not due yet or not yet moved into the queue."""
    ((count,),) = _store_of(conn).query("SELECT COUNT(*) FROM delayed WHERE queue = ?", (queue_name,))
    return int(count)


def queue_stats(conn: Any, queue_name: str) -> tuple[int, int, int]:
    """Messages ready, messages unacknowledged and consumers of `queue_name`, exactly.

    The rows and consumers of owners that died are given back first, so they count as ready.

    Raises:
        KQueueError: `conn` is not a ``sqlite://`` connection, or the database cannot be read.
    """
    store = _store_of(conn)
    store.write_pending(strict=True)
    store.reap()
    ((ready, unacked),) = store.query(
        "SELECT COUNT(*) - COUNT(owner), COUNT(owner) FROM messages WHERE queue = ?", (queue_name,)
    )
    return int(ready), int(unacked), store.live_consumers(queue_name)


def published_count(conn: Any, queue_name: str) -> int:
    """Messages published to `queue_name` in this file since it has tallies, delayed ones included."""
    found = _store_of(conn).query("SELECT published FROM tallies WHERE queue = ?", (queue_name,))
    return int(found[0][0]) if found else 0


def queue_names(conn: Any) -> list[str]:
    """Every queue declared in the file, by name."""
    return [str(name) for (name,) in _store_of(conn).query("SELECT name FROM queues ORDER BY name")]


def consumer_labels(conn: Any, queue_name: str) -> list[str]:
    """The labels (connection names) of the live owners consuming `queue_name`, one per consumer."""
    from kqueue.sqlite.owners import label_of

    store = _store_of(conn)
    rows = store.query("SELECT owner FROM consumers WHERE queue = ? ORDER BY owner, tag", (queue_name,))
    return [label_of(store.owners_dir, owner) for (owner,) in rows if store.is_alive(owner)]
