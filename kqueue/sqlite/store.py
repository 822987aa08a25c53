"""The store: one connection's handle on the queue file, each of its transactions a short method with its SQL."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kqueue.sqlite.failures import Episode, FileReplaced, StoreUnavailable, translated
from kqueue.sqlite.options import Options
from kqueue.sqlite.owners import Owner, Wakeups, alive, forget_stale
from kqueue.sqlite.schema import connect, prepare

__all__ = ["Store"]

log = logging.getLogger("kqueue.sqlite")

#: Seconds between looks for dead owners while a consumer finds nothing ready;
#: also the longest an idle consumer sleeps without looking at the queue.
REAP_INTERVAL = 0.5
#: Seconds between checks that the file at the queue's path is still the one open.
FILE_CHECK = 0.5
#: Seconds after which a consumer that has not looked at its queue loses its turn: it is stuck, or gone.
#: Live consumers look at least once a second (kqueue's worker does).
TURN_TIMEOUT = 2.0
#: A consumer's acks written together at most; fewer are written with its next fetch or before it waits.
ACK_BATCH = 100
#: Free pages (of 4 KiB: 1 MiB in all) from which an idle consumer gives the space of deleted rows back to the disk.
VACUUM_PAGES = 256
#: Rows a statement names by id at most (SQLite's limit on parameters is far above).
CHUNK = 500
#: Seconds between looks for the next delayed message of a queue while its consumer is busy;
#: one that finds its queue empty looks at once. Another process's delayed sends wake it, too.
DUE_LOOK = 0.2

#: Connections to a file that was removed or replaced, kept open until the process exits (see `_keep_open`).
_ABANDONED: list[sqlite3.Connection] = []


class Store:
    """One connection's handle on the queue file: its two sqlite3 connections, its owner, its pending writes.

    Publishes go through a connection with ``synchronous=FULL``: a commit is on
    disk when it returns. Claims, acks and give-backs go through one with
    ``synchronous=NORMAL``: a power cut may undo the last of them, which only
    means a redelivery. All calls are serialised by a lock, so any thread may ack.

    Acks and give-backs are written with the next claim, or when enough have
    come; if that write fails for a while (`kqueue.sqlite.failures`), they
    wait in memory and the consumer keeps its rows and its lock.
    """

    def __init__(self, path: Path, options: Options, label: str = "") -> None:
        self.path = path
        self.options = options
        self.label = label
        self.owner: Owner | None = None
        self.replaced = False
        self._mutex = threading.RLock()
        self._acked: list[int] = []
        self._returned: list[int] = []
        self._episode = Episode(path)
        self._last_reap = self._last_look = 0.0
        # Per queue: when its next delayed message is due (Unix time; inf: none), and when that was looked up.
        self._next_due: dict[str, float] = {}
        self._due_looked: dict[str, float] = {}
        prepare(path, options)
        self.durable = connect(path, options, "FULL")
        try:
            self.db = connect(path, options, "NORMAL")
            self._identity = _identity(path)
        except BaseException:
            self.durable.close()
            raise
        self.wakeups = Wakeups(path)
        self.owners_dir = self.wakeups.owners_dir

    # -- transactions ------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, db: sqlite3.Connection | None = None, doing: str = "write") -> Iterator[sqlite3.Connection]:
        """A write transaction, begun with the write lock taken so that it never fails half-way."""
        db = db or self.db
        with self._mutex, translated(self.path, doing, self.options.busy_timeout):
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._mutex, translated(self.path, "read", self.options.busy_timeout):
            return self.db.execute(sql, params).fetchall()

    def write(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One statement, its own transaction: SQLite takes the write lock before it reads."""
        with self._mutex, translated(self.path, "write", self.options.busy_timeout):
            return self.db.execute(sql, params).fetchall()

    # -- messages ------------------------------------------------------------------------

    def insert(self, rows: Sequence[tuple[str, str]], delayed: Sequence[tuple[str, str, float]] = ()) -> None:
        """Commit `rows` (queue, payload) and `delayed` ones (queue, payload, ready at) to disk, then wake consumers.

        Raises:
            StoreUnavailable: nothing was committed.
            FileReplaced: they were committed to a file that is no longer at the queue's path.
        """
        with self.transaction(self.durable, "publish") as db:
            db.executemany("INSERT INTO messages (queue, payload) VALUES (?, ?)", rows)
            if delayed:
                db.executemany("INSERT INTO delayed (queue, payload, ready_at) VALUES (?, ?, ?)", delayed)
            db.executemany(_TALLY, Counter(queue for queue, *_ in (*rows, *delayed)).items())
        self.check_file(every=0)
        self.wakeups.notify()

    def claim(self, queue: str, limit: int, *, by_turn: bool = False) -> list[tuple[int, str, int]]:
        """Take up to `limit` ready rows of `queue`, oldest first: (id, payload, deliveries so far).

        With `by_turn` (a consumer's claim), consumers take turns as RabbitMQ's
        round-robin does: among those of the queue waiting for work, the one
        whose last delivery is oldest goes first; the others wait for it,
        unless it has not looked for `TURN_TIMEOUT` seconds. Acks and
        give-backs not yet written are written in the same transaction. While
        the file cannot be written, nothing is claimed and they keep waiting.
        """
        owner = self.ensure_owner()
        self.check_file()
        if not self._episode.may_try():
            return []
        now = time.time()
        try:
            with self.transaction(doing="fetch") as db:
                self._write_pending(db, owner)
                looked = self._move_due(db, queue, now)
                if by_turn and self._ahead(db, owner, queue, now):
                    rows = []
                else:
                    rows = self._claim(db, owner, queue, limit)
                if by_turn:  # to the back of the line if it took any; waiting while it has room
                    self._took(db, owner, queue, now, turn=bool(rows), waiting=len(rows) < limit)
                if len(rows) < limit and not looked:  # about to wait: know how long for
                    self._look_due(db, queue)
        except StoreUnavailable as exc:
            self._episode.failed(exc, self._waiting())
            return []
        self._written()
        if by_turn and len(rows) == limit:
            self.wakeups.notify()  # more may be ready, for the next in line
        return sorted(rows)

    @staticmethod
    def _claim(db: sqlite3.Connection, owner: str, queue: str, limit: int) -> list[tuple[int, str, int]]:
        return db.execute(
            "UPDATE messages SET owner = ?, deliveries = deliveries + 1 WHERE id IN "
            "(SELECT id FROM messages WHERE queue = ? AND owner IS NULL ORDER BY id LIMIT ?) "
            "RETURNING id, payload, deliveries",
            (owner, queue, limit),
        ).fetchall()

    def _move_due(self, db: sqlite3.Connection, queue: str, now: float) -> bool:
        """Move the delayed rows of `queue` that are due to the back of the queue, if any may be; whether it looked."""
        due = self._next_due.get(queue, 0.0)
        if due > now and time.monotonic() - self._due_looked.get(queue, 0.0) < DUE_LOOK:
            return False
        if due <= now:
            moved = db.execute(
                "INSERT INTO messages (queue, payload) "
                "SELECT queue, payload FROM delayed WHERE queue = ? AND ready_at <= ? ORDER BY ready_at, id",
                (queue, now),
            ).rowcount
            if moved:
                db.execute("DELETE FROM delayed WHERE queue = ? AND ready_at <= ?", (queue, now))
        self._look_due(db, queue)
        return True

    def _look_due(self, db: sqlite3.Connection, queue: str) -> None:
        (due,) = db.execute("SELECT MIN(ready_at) FROM delayed WHERE queue = ?", (queue,)).fetchone()
        self._next_due[queue] = math.inf if due is None else float(due)
        self._due_looked[queue] = time.monotonic()

    def due_in(self) -> float:
        """Seconds until the next delayed message of a queue this store claims from is due (inf: none known)."""
        return min(self._next_due.values(), default=math.inf) - time.time()

    @staticmethod
    def _ahead(db: sqlite3.Connection, owner: str, queue: str, now: float) -> bool:
        """Whether another consumer of `queue`, waiting and looking, comes before this one."""
        ahead = db.execute(
            "SELECT 1 FROM consumers WHERE queue = ? AND owner != ? AND waiting = 1 AND looked > ? "
            "AND turn < (SELECT MIN(turn) FROM consumers WHERE owner = ? AND queue = ?) LIMIT 1",
            (queue, owner, now - TURN_TIMEOUT, owner, queue),
        ).fetchone()
        return ahead is not None

    @staticmethod
    def _took(db: sqlite3.Connection, owner: str, queue: str, now: float, *, turn: bool, waiting: bool) -> None:
        """Say this consumer looked now, and whether it waits; with `turn`, it took rows: to the back of the line."""
        db.execute(
            "UPDATE consumers SET turn = CASE WHEN ? THEN (SELECT MAX(turn) + 1 FROM consumers WHERE queue = ?) "
            "ELSE turn END, waiting = ?, looked = ? WHERE owner = ? AND queue = ?",
            (int(turn), queue, int(waiting), now, owner, queue),
        )

    def delete(self, ids: Iterable[int], lazy: bool = False) -> None:
        """Ack: delete the rows, now or, if `lazy`, with the next fetch or before the next wait.

        A consumer fetches or waits again soon, so its acks ride on that transaction (twice the
        throughput at prefetch 100); until then the rows stay this owner's, and a crash in
        between means a redelivery, as a lost ack would.

        Raises:
            StoreUnavailable: not `lazy`, and the file could not be written; the acks wait for the next write.
        """
        with self._mutex:
            self._acked.extend(ids)
            if not lazy:
                self.write_pending(strict=True)
            elif len(self._acked) >= ACK_BATCH:
                self.write_pending()

    def give_back(self, ids: Iterable[int]) -> None:
        """Requeue rows this connection claimed, in their place; under a failing write, with the next one."""
        with self._mutex:
            self._returned.extend(ids)
            self.write_pending()

    def write_pending(self, *, strict: bool = False) -> None:
        """Write the acks and give-backs that wait.

        Raises:
            StoreUnavailable: only if `strict`; otherwise the failure starts or
                continues an episode (`Episode`), and they go on waiting.
        """
        with self._mutex:
            if self.owner is None or not (self._acked or self._returned):
                return
            if not strict and not self._episode.may_try():
                return
            try:
                with self.transaction(doing="ack") as db:
                    self._write_pending(db, self.owner.id)
            except StoreUnavailable as exc:
                if strict:
                    raise
                self._episode.failed(exc, self._waiting())
                return
            self._written()

    def _write_pending(self, db: sqlite3.Connection, owner: str) -> None:
        # Kept in memory until the transaction commits: a failed write leaves them to the next.
        for sql, ids in (
            ("DELETE FROM messages WHERE owner = ? AND id IN ({})", self._acked),
            ("UPDATE messages SET owner = NULL WHERE owner = ? AND id IN ({})", self._returned),
        ):
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                db.execute(sql.format(",".join("?" * len(chunk))), (owner, *chunk))

    def _written(self) -> None:
        """The pending acks and give-backs are committed."""
        returned = bool(self._returned)
        if self._episode.active:  # the hot path pays for no message
            self._episode.ended(f"{len(self._acked)} acks and {len(self._returned)} give-backs that waited are written")
        self._acked.clear()
        self._returned.clear()
        if returned:
            self.wakeups.notify()

    def _waiting(self) -> str:
        return f"{len(self._acked)} acks and {len(self._returned)} give-backs waiting to be written"

    def retry_in(self) -> float:
        """Seconds until a write that failed is tried again; 0 if none failed."""
        return self._episode.retry_in()

    # -- consumers -------------------------------------------------------------------------

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
            with contextlib.suppress(StoreUnavailable):  # its row goes with the owner, at close or death
                self.write("DELETE FROM consumers WHERE owner = ? AND tag = ?", (self.owner.id, tag))

    def live_consumers(self, queue: str) -> int:
        owners = self.query("SELECT owner, COUNT(*) FROM consumers WHERE queue = ? GROUP BY owner", (queue,))
        return sum(n for owner, n in owners if self.is_alive(owner))

    # -- owners ------------------------------------------------------------------------------

    def ensure_owner(self) -> str:
        """This connection's owner id: its lock is held and its wake socket bound before any claim."""
        if self.owner is None:
            with self._mutex:
                if self.owner is None:
                    self.owner = Owner.create(self.owners_dir, self.wakeups, self.label)
        return self.owner.id

    def is_alive(self, owner: str) -> bool:
        return (self.owner is not None and owner == self.owner.id) or alive(self.owners_dir, owner)

    def reap(self) -> int:
        """Give back the rows of owners whose process is gone; forget their consumers. Return rows freed."""
        self._last_reap = time.monotonic()
        forget_stale(self.owners_dir)
        known = {owner for (owner,) in self.query(_OWNERS)}
        dead = [owner for owner in known | set(self.wakeups.owners()) if not self.is_alive(owner)]
        dead = [owner for owner in dead if owner in known]
        if not dead:
            return 0
        freed = 0
        with self.transaction(doing="recover") as db:
            for owner in dead:
                freed += db.execute("UPDATE messages SET owner = NULL WHERE owner = ?", (owner,)).rowcount
                db.execute("DELETE FROM consumers WHERE owner = ?", (owner,))
        if freed:
            log.info("gave back %d unacknowledged messages of %d dead consumers", freed, len(dead))
            self.wakeups.notify()
        return freed

    def idle(self) -> None:
        """A consumer found nothing: write what waits, look for dead owners and give free space back, now and then."""
        self.write_pending()
        if time.monotonic() - self._last_reap < REAP_INTERVAL:
            return
        self.check_file(every=0)
        if not self._episode.may_try():
            return
        try:
            self.reap()
            self._give_space_back()
        except StoreUnavailable as exc:
            self._episode.failed(exc, self._waiting())

    def _give_space_back(self) -> None:
        if self.query("PRAGMA freelist_count")[0][0] >= VACUUM_PAGES:
            self.vacuum()

    def vacuum(self) -> None:
        """Give the pages of deleted rows back to the disk."""
        with self._mutex, translated(self.path, "give free space back", self.options.busy_timeout):
            try:
                self.db.executescript("BEGIN IMMEDIATE; PRAGMA incremental_vacuum; COMMIT;")
            finally:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    # -- the file ------------------------------------------------------------------------------

    def check_file(self, every: float = FILE_CHECK) -> None:
        """Raise `FileReplaced` if the file at the queue's path is no longer the one open; look every `every` s."""
        now = time.monotonic()
        if now - self._last_look < every:
            return
        self._last_look = now
        try:
            current = _identity(self.path)
        except FileNotFoundError:
            current = None
        if current != self._identity:
            self.replaced = True
            raise FileReplaced(
                f"queue file {self.path} was removed or replaced while this process had it open; "
                "opening the one now at that name (what the old file held went with it)"
            )

    # -- waking -----------------------------------------------------------------------------

    def wake_socket(self) -> Any:
        self.ensure_owner()
        assert self.owner is not None
        return self.owner.wake

    def poke(self) -> None:
        """Wake this connection's own waiter: an ack on another thread freed a prefetch slot."""
        if self.owner is not None:
            self.wakeups.poke(self.owner.id)

    def clear_wake(self) -> None:
        if self.owner is not None:
            self.owner.clear()

    def wait(self, timeout: float) -> None:
        """Sleep until a wake-up byte comes or `timeout` seconds pass."""
        if self.owner is None:
            time.sleep(timeout)
        else:
            self.owner.wait(timeout)

    # -- the end --------------------------------------------------------------------------------

    def close(self) -> None:
        """Write what waits, give back every row this connection holds, drop its lock and its consumers."""
        with self._mutex:
            try:
                if self.replaced:
                    _keep_open(self.db, self.durable)
                elif self.owner is not None:
                    self._last_writes()
            finally:
                if self.owner is not None:
                    self.owner.close()
                    self.owner = None
                self.wakeups.close()
                if not self.replaced:
                    self.db.close()
                    self.durable.close()

    def _last_writes(self) -> None:
        """Try for a while: an ack lost here would run its task again."""
        assert self.owner is not None
        owner = self.owner.id
        deadline = time.monotonic() + 2 * self.options.busy_timeout
        while True:
            try:
                with self.transaction(doing="close") as db:
                    self._write_pending(db, owner)
                    given = db.execute("UPDATE messages SET owner = NULL WHERE owner = ?", (owner,)).rowcount
                    db.execute("DELETE FROM consumers WHERE owner = ?", (owner,))
            except StoreUnavailable as exc:
                if time.monotonic() < deadline:
                    self._episode.failed(exc, self._waiting())
                    time.sleep(self._episode.retry_in())
                    continue
                log.warning(
                    "%s; %s: their tasks come back once this process exits, and may run again", exc, self._waiting()
                )
                return
            except Exception as exc:  # noqa: BLE001 - a fatal error still lets the lock go
                log.warning("%s; this process's messages come back once it exits", exc)
                return
            self._written()
            if given:
                self.wakeups.notify()
            self._give_space_back()
            return


_TALLY = (
    "INSERT INTO tallies (queue, published) VALUES (?, ?) "
    "ON CONFLICT (queue) DO UPDATE SET published = published + excluded.published"
)
_OWNERS = "SELECT DISTINCT owner FROM messages WHERE owner IS NOT NULL UNION SELECT owner FROM consumers"


def _identity(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _keep_open(*connections: sqlite3.Connection) -> None:
    """Never close connections to a file that was removed or replaced.

    Closing the last connection to a file in WAL mode checkpoints it and
    deletes ``<name>-wal`` and ``<name>-shm`` by name, which now belong to the
    new file at that name: its committed messages would go with them. The
    kernel closes these when the process exits, without SQLite's clean-up.
    """
    import ctypes

    for connection in connections:
        _ABANDONED.append(connection)
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(connection))  # not even at interpreter exit
