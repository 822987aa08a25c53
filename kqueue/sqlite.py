"""A Kombu transport on one SQLite file: tasks stay in the file until acked, shared by the processes of one machine.

``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` (SQLAlchemy's slashes);
``?busy_timeout=SECONDS`` (default 10) and ``?confirm_batch=N`` (default 500) in
the query string. Importing this module registers the ``sqlite`` scheme with Kombu.

How it keeps its promises:

- A delivery is a claim: one ``UPDATE ... RETURNING`` sets the row's owner and
  counts the delivery; nothing is deleted until the ack. Reject with requeue,
  a closed channel or connection give the row back at once, in its place.
- Each connection that claims rows is an owner: it holds an exclusive
  ``flock`` on ``<db>.owners/<owner>.lock``. The kernel drops the lock when the
  process dies, however it dies; an idle consumer looks for owners whose lock
  it can take (at most every 0.5 s) and gives their rows back, flagged
  redelivered. A slow owner that is alive keeps its lock, so it is never robbed.
- Publishes commit with ``synchronous=FULL`` (fsync) in WAL mode. In confirm
  mode (`Channel.confirm_select`) they are committed in batches and confirmed
  like AMQP publisher confirms, only once on disk.
- Every commit that makes rows ready sends a byte to each owner's datagram
  socket, which an idle consumer waits on: a task reaches it in a millisecond
  or so, and waiting costs nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import select
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from queue import Empty
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from amqp.protocol import queue_declare_ok_t
from kombu.transport import TRANSPORT_ALIASES, virtual

from kqueue.errors import KQueueError

__all__ = [
    "Channel",
    "DatabaseBusy",
    "Options",
    "Transport",
    "path_of",
    "queue_stats",
    "wake_fd",
]

TRANSPORT_ALIASES["sqlite"] = "kqueue.sqlite:Transport"

log = logging.getLogger("kqueue.sqlite")

#: Seconds between looks for dead owners while a consumer finds nothing ready;
#: also the longest an idle consumer sleeps without looking at the queue.
REAP_INTERVAL = 0.5
#: Rows claimed at once by a consumer whose prefetch is unlimited.
CLAIM_BATCH = 100
#: Seconds after which a consumer that has not looked at its queue loses its turn: it is stuck, or gone.
#: Live consumers look at least once a second (kqueue's worker does).
TURN_TIMEOUT = 2.0
#: A consumer's acks written together at most; fewer are written with its next fetch or before it waits.
ACK_BATCH = 100
#: The header RabbitMQ's quorum queues use for earlier deliveries of a message.
DELIVERY_COUNT = "x-delivery-count"
#: Where the row id of a delivered message is kept in its properties.
ROW = "sqlite_row"

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    payload TEXT NOT NULL,
    owner TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, id) WHERE owner IS NULL;
CREATE INDEX IF NOT EXISTS messages_owned ON messages (owner) WHERE owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS consumers (
    owner TEXT NOT NULL,
    tag TEXT NOT NULL,
    queue TEXT NOT NULL,
    turn INTEGER NOT NULL DEFAULT 0,
    waiting INTEGER NOT NULL DEFAULT 0,
    looked REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, tag)
);
CREATE TABLE IF NOT EXISTS bindings (
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    pattern TEXT,
    queue TEXT NOT NULL,
    type TEXT NOT NULL,
    PRIMARY KEY (exchange, routing_key, queue)
);
"""

_NOT_SHARED = (
    "broker URL {url!r} names no database file other processes can share: "
    "use sqlite:///relative/path.db or sqlite:////absolute/path.db"
)


class DatabaseBusy(KQueueError):
    """Another process held the database's write lock for longer than the busy timeout.

    Nothing was lost: a publish that raised this was not committed, and was not confirmed.
    """


# -- the URL ------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What a ``sqlite://`` URL or the transport options may set.

    Attributes:
        busy_timeout: seconds to wait for another process's write to finish.
        confirm_batch: in confirm mode, messages committed together.
    """

    busy_timeout: float = 10.0
    confirm_batch: int = 500

    @classmethod
    def parse(cls, url: str, transport_options: dict[str, Any]) -> Options:
        """Options from the URL's query string, over those in `transport_options`.

        Raises:
            KQueueError: an unknown option, or a value that is not a positive number.
        """
        given: dict[str, Any] = {k: v for k, v in transport_options.items() if k in ("busy_timeout", "confirm_batch")}
        for key, value in parse_qsl(urlsplit(url).query):
            if key not in ("busy_timeout", "confirm_batch"):
                raise KQueueError(
                    f"broker URL {url!r} has an unknown option {key}: sqlite:// takes busy_timeout and confirm_batch"
                )
            given[key] = value
        try:
            options = cls(float(given.get("busy_timeout", cls.busy_timeout)), int(given.get("confirm_batch", 500)))
        except ValueError as exc:
            raise KQueueError(f"broker URL {url!r}: an option is not a number ({exc})") from None
        if options.busy_timeout <= 0 or options.confirm_batch < 1:
            raise KQueueError(f"broker URL {url!r}: busy_timeout and confirm_batch must be positive")
        return options


def path_of(url: str) -> Path:
    """The database file a ``sqlite://`` URL names, made absolute.

    Three slashes before a relative path, four before an absolute one, as in SQLAlchemy.

    Raises:
        KQueueError: the URL names no file, an in-memory database, or a host.
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise KQueueError(f"broker URL {url!r} is not a sqlite:// URL")
    if parts.netloc:
        raise KQueueError(
            f"broker URL {url!r} names a host ({parts.netloc}), but a SQLite database is a local file: "
            "use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    name = parts.path[1:]
    memory = name in ("", ":memory:") or name.startswith("file:") or "mode=memory" in parts.query
    if memory or name.endswith("/"):
        raise KQueueError(_NOT_SHARED.format(url=url))
    return Path(os.path.abspath(name))


# -- the database file, its owners and their wake-up sockets -------------------------


def _is_busy(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    if name:
        return bool(name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")))
    return "locked" in str(exc) or "busy" in str(exc)  # pragma: no cover - Python 3.10


class Store:
    """One connection's handle on the database: its sqlite3 connections, its owner lock and wake socket.

    Publishes go through a connection with ``synchronous=FULL``: a commit is on
    disk when it returns. Claims, acks and give-backs go through one with
    ``synchronous=NORMAL``: a power cut may undo the last of them, which only
    means a redelivery. All calls are serialised by a lock, so any thread may
    ack.
    """

    def __init__(self, path: Path, options: Options) -> None:
        self.path = path
        self.options = options
        self.owners_dir = Path(f"{path}.owners")
        self.owner: str | None = None
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        self._wake: socket.socket | None = None
        self._peers: tuple[int, list[str]] = (-1, [])
        self._last_reap = 0.0
        self._acked: list[int] = []
        self._tag = hashlib.sha1(os.fsencode(path)).hexdigest()[:16]
        self.durable = self._connect("FULL")
        try:
            self._create_schema()
            self.db = self._connect("NORMAL")
        except BaseException:
            self.durable.close()
            raise
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)

    # -- sqlite3 -----------------------------------------------------------------

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        if not self.path.parent.is_dir():
            raise KQueueError(f"cannot open the queue database {self.path}: its folder does not exist")
        with self._errors("open"):
            db = sqlite3.connect(
                self.path, timeout=self.options.busy_timeout, isolation_level=None, check_same_thread=False
            )
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
        return db

    def _create_schema(self) -> None:
        # Reading the version takes no lock, so opening a file never waits on a writer. Several
        # processes may open a new file at once: the write lock makes one of them create it.
        with self._mutex, self._errors("create tables"):
            if self.durable.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                self.durable.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Turn sqlite3's errors into one line that says which file and what to do."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise DatabaseBusy(
                    f"the queue database {self.path} stayed locked by another process for over "
                    f"{self.options.busy_timeout:g}s ({doing} not done, nothing lost): retry, "
                    "or raise ?busy_timeout= in the broker URL"
                ) from None
            raise KQueueError(f"queue database {self.path}: {doing} failed: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise KQueueError(f"queue database {self.path}: {doing} failed: {exc}") from None

    @contextlib.contextmanager
    def transaction(self, db: sqlite3.Connection | None = None, doing: str = "write") -> Iterator[sqlite3.Connection]:
        """A write transaction, begun with the write lock taken so that it never fails half-way."""
        db = db or self.db
        with self._mutex, self._errors(doing):
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._mutex, self._errors("read"):
            return self.db.execute(sql, params).fetchall()

    def write(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One statement, its own transaction: SQLite takes the write lock before it reads."""
        with self._mutex, self._errors("write"):
            return self.db.execute(sql, params).fetchall()

    # -- messages ----------------------------------------------------------------

    def insert(self, rows: Sequence[tuple[str, str]]) -> None:
        """Commit `rows` (queue, payload) to disk, then wake the consumers."""
        with self.transaction(self.durable, "publish") as db:
            db.executemany("INSERT INTO messages (queue, payload) VALUES (?, ?)", rows)
        self.notify()

    def claim(self, queue: str, limit: int, *, by_turn: bool = False) -> list[tuple[int, str, int]]:
        """Take up to `limit` ready rows of `queue`, oldest first: (id, payload, deliveries so far).

        With `by_turn` (a consumer's claim), consumers take turns as RabbitMQ's
        round-robin does: among those of the queue waiting for work, the one
        whose last delivery is oldest goes first; the others wait for it,
        unless it has not looked for `TURN_TIMEOUT` seconds. Acks not yet
        written are written in the same transaction.
        """
        owner = self.ensure_owner()
        now = time.time()
        with self.transaction(doing="fetch") as db:
            self._delete_acked(db)
            if by_turn and self._not_my_turn(db, owner, queue, now):
                return []
            rows = db.execute(
                "UPDATE messages SET owner = ?, deliveries = deliveries + 1 WHERE id IN "
                "(SELECT id FROM messages WHERE queue = ? AND owner IS NULL ORDER BY id LIMIT ?) "
                "RETURNING id, payload, deliveries",
                (owner, queue, limit),
            ).fetchall()
            if by_turn and rows:
                # To the back of the line; still waiting if it has room for more.
                db.execute(
                    "UPDATE consumers SET turn = (SELECT MAX(turn) + 1 FROM consumers WHERE queue = ?), "
                    "waiting = ?, looked = ? WHERE owner = ? AND queue = ?",
                    (queue, int(len(rows) < limit), now, owner, queue),
                )
        if by_turn and len(rows) == limit:
            self.notify()  # more may be ready, for the next in line
        return sorted(rows)

    @staticmethod
    def _not_my_turn(db: sqlite3.Connection, owner: str, queue: str, now: float) -> bool:
        """Mark this consumer waiting; whether another waiting consumer of `queue` comes before it."""
        db.execute(
            "UPDATE consumers SET waiting = 1, looked = ? WHERE owner = ? AND queue = ?",
            (now, owner, queue),
        )
        ahead = db.execute(
            "SELECT 1 FROM consumers WHERE queue = ? AND owner != ? AND waiting = 1 AND looked > ? "
            "AND turn < (SELECT MIN(turn) FROM consumers WHERE owner = ? AND queue = ?) LIMIT 1",
            (queue, owner, now - TURN_TIMEOUT, owner, queue),
        ).fetchone()
        return ahead is not None

    def delete(self, ids: Iterable[int], lazy: bool = False) -> None:
        """Ack: delete the rows, now or, if `lazy`, with the next fetch or before the next wait.

        A consumer fetches or waits again soon, so its acks ride on that transaction (twice the
        throughput at prefetch 100); until then the rows stay this owner's, and a crash in
        between means a redelivery, as a lost ack would.
        """
        with self._mutex:
            self._acked.extend(ids)
            if not lazy or len(self._acked) >= ACK_BATCH:
                self.flush_acks()

    def flush_acks(self) -> None:
        with self._mutex:
            if self._acked:
                with self.transaction(doing="ack") as db:
                    self._delete_acked(db)

    def _delete_acked(self, db: sqlite3.Connection) -> None:
        ids, self._acked = self._acked, []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            sql = f"DELETE FROM messages WHERE owner = ? AND id IN ({','.join('?' * len(chunk))})"
            db.execute(sql, (self.owner, *chunk))

    def give_back(self, ids: Iterable[int]) -> None:
        if self._by_ids("UPDATE messages SET owner = NULL WHERE owner = ? AND id IN ({})", ids):
            self.notify()

    def _by_ids(self, sql: str, ids: Iterable[int]) -> bool:
        ids = list(ids)
        if not ids or self.owner is None:
            return False
        with self.transaction(doing="ack") as db:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                db.execute(sql.format(",".join("?" * len(chunk))), (self.owner, *chunk))
        return True

    def add_consumer(self, tag: str, queue: str) -> None:
        """A new consumer joins the back of its queue's line."""
        owner = self.ensure_owner()
        self.write(
            "INSERT OR REPLACE INTO consumers (owner, tag, queue, turn) "
            "VALUES (?, ?, ?, (SELECT COALESCE(MAX(turn), 0) + 1 FROM consumers WHERE queue = ?))",
            (owner, tag, queue, queue),
        )

    def remove_consumer(self, tag: str) -> None:
        if self.owner is not None:
            self.write("DELETE FROM consumers WHERE owner = ? AND tag = ?", (self.owner, tag))

    # -- owners --------------------------------------------------------------------

    def ensure_owner(self) -> str:
        """This connection's owner id: its lock is held and its wake socket bound before any claim."""
        if self.owner is not None:
            return self.owner
        with self._mutex:
            if self.owner is None:
                owner = uuid.uuid4().hex[:16]
                self.owners_dir.mkdir(exist_ok=True)
                fd = os.open(self._lock_path(owner), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                wake = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                wake.setblocking(False)
                with contextlib.suppress(OSError):  # no wake-ups (too long a path): polling still works
                    wake.bind(self._address(owner))
                self._lock_fd, self._wake, self.owner = fd, wake, owner
        return self.owner

    def _lock_path(self, owner: str) -> Path:
        return self.owners_dir / f"{owner}.lock"

    def _address(self, owner: str) -> str:
        if sys.platform.startswith("linux"):
            # Abstract names: no file to clean up, no limit on the database's path length.
            return f"\0kqueue-sqlite-{self._tag}-{owner}"
        return str(self.owners_dir / f"{owner}.sock")

    def alive(self, owner: str) -> bool:
        """Whether `owner`'s process still holds its lock; a dead owner's lock file is removed."""
        if owner == self.owner:
            return True
        path = self._lock_path(owner)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return False
        finally:
            os.close(fd)

    def reap(self) -> int:
        """Give back the rows of owners whose process is gone; forget their consumers. Return rows freed."""
        self._last_reap = time.monotonic()
        owners = self.query(
            "SELECT DISTINCT owner FROM messages WHERE owner IS NOT NULL UNION SELECT owner FROM consumers"
        )
        dead = [owner for (owner,) in owners if not self.alive(owner)]
        freed = 0
        for owner in dead:
            with self.transaction(doing="recover") as db:
                freed += db.execute("UPDATE messages SET owner = NULL WHERE owner = ?", (owner,)).rowcount
                db.execute("DELETE FROM consumers WHERE owner = ?", (owner,))
        if freed:
            log.info("gave back %d unacknowledged messages of %d dead consumers", freed, len(dead))
            self.notify()
        return freed

    def maybe_reap(self) -> None:
        if time.monotonic() - self._last_reap >= REAP_INTERVAL:
            self.reap()

    # -- wake-ups ----------------------------------------------------------------------

    def wake_socket(self) -> socket.socket:
        self.ensure_owner()
        assert self._wake is not None
        return self._wake

    def notify(self) -> None:
        """Tell every owner that rows may be ready: one byte each, never blocking."""
        for owner in self._peer_owners():
            try:
                self._sender.sendto(b"!", self._address(owner))
            except (BlockingIOError, FileNotFoundError):
                pass  # its buffer is full (it will look anyway), or it never bound one
            except ConnectionRefusedError:
                if not self.alive(owner):
                    self._peers = (-1, [])
            except OSError as exc:
                if exc.errno not in (errno.ENOBUFS, errno.EPERM, errno.EACCES):
                    raise

    def _peer_owners(self) -> list[str]:
        try:
            stamp = os.stat(self.owners_dir).st_mtime_ns
        except FileNotFoundError:
            return []
        if stamp != self._peers[0]:
            owners = [name[:-5] for name in os.listdir(self.owners_dir) if name.endswith(".lock")]
            self._peers = (stamp, owners)
        return self._peers[1]

    def poke(self) -> None:
        """Wake this connection's own waiter: an ack on another thread freed a prefetch slot."""
        if self.owner is not None:
            with contextlib.suppress(OSError):
                self._sender.sendto(b"!", self._address(self.owner))

    def clear_wake(self) -> None:
        if self._wake is None:
            return
        with contextlib.suppress(OSError):
            while self._wake.recv(64):
                pass

    def wait(self, timeout: float) -> None:
        """Sleep until a wake-up byte comes or `timeout` seconds pass."""
        if self._wake is None:
            time.sleep(timeout)
        else:
            select.select([self._wake], [], [], timeout)

    # -- the end -------------------------------------------------------------------------

    def close(self) -> None:
        """Give back every row this connection holds, drop its lock and its consumers."""
        with self._mutex:
            try:
                if self.owner is not None:
                    with self.transaction(doing="close") as db:
                        self._delete_acked(db)
                        given = db.execute("UPDATE messages SET owner = NULL WHERE owner = ?", (self.owner,)).rowcount
                        db.execute("DELETE FROM consumers WHERE owner = ?", (self.owner,))
                    if given:
                        self.notify()
            except KQueueError as exc:
                log.warning("%s; its consumers' messages come back once this process exits", exc)
            finally:
                self._release_owner()
                self._sender.close()
                self.db.close()
                self.durable.close()

    def _release_owner(self) -> None:
        if self.owner is not None:
            with contextlib.suppress(FileNotFoundError):
                self._lock_path(self.owner).unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        if self._wake is not None:
            self._wake.close()
        self.owner, self._lock_fd, self._wake = None, None, None


# -- Kombu's virtual transport ------------------------------------------------------


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
    connection's ``drain_events`` is called.
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
        self._published = 0
        self._confirmed = 0
        self._broken: str | None = None

    # -- publishing ------------------------------------------------------------------

    def confirm_select(self, nowait: bool = False) -> None:
        """Confirm each publish once it is committed (see the class docstring)."""
        self._confirming = True

    def basic_publish(self, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> Any:
        if self._broken is not None:
            raise DatabaseBusy(self._broken)
        if self._confirming:
            self._published += 1
        result = super().basic_publish(message, exchange, routing_key, **kwargs)
        if self._confirming and len(self._pending) >= self.store.options.confirm_batch:
            self.flush()
        return result

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        row = (queue, json.dumps(message))
        if self._confirming:
            self._pending.append(row)
        else:
            self.store.insert([row])

    def _put_fanout(self, exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
        for queue in {queue for _, _, queue in self.get_table(exchange)}:
            self._put(queue, message)

    def flush(self) -> bool:
        """Commit the messages published in confirm mode, then confirm them; True if any were.

        Raises:
            DatabaseBusy: the commit timed out; those messages are not confirmed,
                and the channel takes no more publishes (as an AMQP channel would close).
        """
        if self._confirmed == self._published:
            return False
        rows, self._pending = self._pending, []
        last = self._published
        try:
            if rows:
                self.store.insert(rows)
        except KQueueError as exc:
            self._broken = str(exc)
            raise
        self._confirmed = last
        for callback in list(self.events["basic_ack"]):
            callback(last, True)
        return True

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
            return int(db.execute("DELETE FROM messages WHERE queue = ? AND owner IS NULL", (queue,)).rowcount)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        with self.store.transaction(doing="delete") as db:
            for table, column in (("messages", "queue"), ("queues", "name"), ("bindings", "queue")):
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (queue,))

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        ok = super().queue_declare(queue, passive, **kwargs)
        return queue_declare_ok_t(ok.queue, ok.message_count, _live_consumers(self.store, ok.queue))

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
                self.flush()
                self.store.flush_acks()
            finally:
                for queue in list(self._claimed):
                    self._give_back_claimed(queue)
                super().close()


def _live_consumers(store: Store, queue: str) -> int:
    owners = store.query("SELECT owner, COUNT(*) FROM consumers WHERE queue = ? GROUP BY owner", (queue,))
    return sum(n for owner, n in owners if store.alive(owner))


class Transport(virtual.Transport):  # type: ignore[misc]
    """Kombu's virtual transport over one SQLite file (see the module docstring)."""

    Channel = Channel

    can_parse_url = True
    default_port = 0
    driver_type = "sqlite"
    driver_name = "sqlite3"
    connection_errors = (DatabaseBusy,)
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
            self.store = Store(self.path, self.options)
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
            raise DatabaseBusy("the sqlite connection is closed")  # pragma: no cover - Kombu reconnects first
        while True:
            if any([channel.flush() for channel in list(self.channels)]):
                return
            store.clear_wake()  # before looking, so that a commit after the look still wakes the wait
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                pass
            store.flush_acks()
            if any(channel._consumers for channel in self.channels):
                store.ensure_owner()
                store.maybe_reap()
            remaining = self.polling_interval if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            store.wait(min(remaining, self.polling_interval))


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
    return _store_of(conn).wake_socket().fileno()


def queue_stats(conn: Any, queue_name: str) -> tuple[int, int, int]:
    """Messages ready, messages unacknowledged and consumers of `queue_name`, exactly.

    The rows and consumers of owners that died are given back first, so they count as ready.

    Raises:
        KQueueError: `conn` is not a ``sqlite://`` connection, or the database cannot be read.
    """
    store = _store_of(conn)
    store.flush_acks()
    store.reap()
    ((ready, unacked),) = store.query(
        "SELECT COUNT(*) - COUNT(owner), COUNT(owner) FROM messages WHERE queue = ?", (queue_name,)
    )
    return int(ready), int(unacked), _live_consumers(store, queue_name)
