"""The queue file's tables, and opening a file: kqueue's own, made anew, upgraded, or refused in one line."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from kqueue.errors import KQueueError
from kqueue.sqlite.failures import translated
from kqueue.sqlite.options import Options

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "connect", "prepare"]

#: SQLite's header field for the application that owns a file: "kque" in ASCII.
APPLICATION_ID = 0x6B717565
#: 1: the tables below, before files carried kqueue's application id. 2: the id, and free pages given back.
#: 3: delayed messages (`DELAYED`).
SCHEMA_VERSION = 3
#: How large the write-ahead log may stay once checkpointed (bytes); it grows past this only while needed.
WAL_LIMIT = 4 << 20

TABLES = """
CREATE TABLE queues (name TEXT PRIMARY KEY);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    payload TEXT NOT NULL,
    owner TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX messages_ready ON messages (queue, id) WHERE owner IS NULL;
CREATE INDEX messages_owned ON messages (owner) WHERE owner IS NOT NULL;
CREATE TABLE consumers (
    owner TEXT NOT NULL,
    tag TEXT NOT NULL,
    queue TEXT NOT NULL,
    turn INTEGER NOT NULL DEFAULT 0,
    waiting INTEGER NOT NULL DEFAULT 0,
    looked REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, tag)
);
CREATE TABLE bindings (
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    pattern TEXT,
    queue TEXT NOT NULL,
    type TEXT NOT NULL,
    PRIMARY KEY (exchange, routing_key, queue)
);
"""
_NAMES = {"queues", "messages", "consumers", "bindings"}
#: Messages that may not be handed out before `ready_at` (Unix time): moved into `messages` once due.
DELAYED = """
CREATE TABLE IF NOT EXISTS delayed (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    payload TEXT NOT NULL,
    ready_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS delayed_due ON delayed (queue, ready_at);
"""
#: Messages ever published to each queue, counted in the publish's own transaction: what rates are read from.
#: Added to files of this schema without a new version: a kqueue that does not know it still opens the file
#: (and leaves its publishes uncounted), so that workers of both can run on one file during an upgrade.
TALLIES = """
CREATE TABLE IF NOT EXISTS tallies (queue TEXT PRIMARY KEY, published INTEGER NOT NULL DEFAULT 0)
"""


def connect(path: Path, options: Options, synchronous: str) -> sqlite3.Connection:
    """A connection to the queue file, which `prepare` has checked, in WAL mode."""
    with translated(path, "open", options.busy_timeout):
        db = sqlite3.connect(path, timeout=options.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            _to_wal(db, options.busy_timeout)
            db.execute(f"PRAGMA synchronous={synchronous}")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        except BaseException:
            db.close()
            raise
    return db


def prepare(path: Path, options: Options) -> None:
    """Make sure `path` is a kqueue queue file of this version: create it, upgrade it, or refuse it.

    Raises:
        KQueueError: the folder is missing, a file is not writable, the file is another
            application's database, or a newer kqueue's.
    """
    _check_access(path)
    if not path.exists():
        _forget_leftovers(path)
    with translated(path, "open", options.busy_timeout):
        db = sqlite3.connect(path, timeout=options.busy_timeout, isolation_level=None)
        try:
            _prepare(db, path, options.busy_timeout)
        finally:
            db.close()


def _prepare(db: sqlite3.Connection, path: Path, busy_timeout: float) -> None:
    # A read transaction: the header and the tables from one snapshot, never half of another
    # process's creation. It waits on no writer, so opening a file never does.
    db.execute("BEGIN")
    try:
        kind = _kind(db, path)
    finally:
        db.execute("COMMIT")
    if kind == "current":
        return
    # Several processes may open a new file at once: the write lock makes one of them create it.
    # A new file gives back the pages of deleted rows (auto_vacuum), which it can take only before WAL and tables.
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    _to_wal(db, busy_timeout)
    db.execute("BEGIN IMMEDIATE")
    try:
        kind = _kind(db, path)
        if kind == "new":
            for statement in TABLES.split(";"):
                db.execute(statement)
        if kind != "current":
            for statement in (*DELAYED.split(";"), TALLIES):
                db.execute(statement)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")


def _to_wal(db: sqlite3.Connection, busy_timeout: float) -> None:
    """Put the file in WAL mode, if it is not yet.

    SQLite refuses a change of journal mode at once, without waiting, while
    another connection changes it too (processes opening a new file together):
    try again for as long as any other lock would be waited for.
    """
    deadline = time.monotonic() + busy_timeout
    while db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            if not getattr(exc, "sqlite_errorname", "SQLITE_BUSY").startswith("SQLITE_BUSY"):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _kind(db: sqlite3.Connection, path: Path) -> str:
    """'current', 'new' (empty) or 'old' (an earlier kqueue schema); anything else is refused."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    app = db.execute("PRAGMA application_id").fetchone()[0]
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if app == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise KQueueError(
                f"queue file {path} was made by a newer kqueue (schema {version}; this one knows up to "
                f"{SCHEMA_VERSION}): upgrade kqueue to use it"
            )
        return "current" if version == SCHEMA_VERSION and "tallies" in tables else "old"
    if app == 0 and version == 0 and not tables:
        return "new"
    if app == 0 and version == 1 and tables == _NAMES:
        return "old"  # kqueue's first schema, before the application id
    shown = ", ".join(sorted(tables)) or "none"
    raise KQueueError(
        f"{path} is not a kqueue queue file (application_id {app}, user_version {version}, tables: {shown}); "
        "kqueue leaves it alone: give the queue a file of its own"
    )


def _check_access(path: Path) -> None:
    """Refuse at once what SQLite would fail later, and leave -wal and -shm files behind for."""
    folder = path.parent
    if not folder.is_dir():
        raise KQueueError(f"cannot open the queue database {path}: its folder does not exist")
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if name.exists() and not os.access(name, os.R_OK | os.W_OK):
            raise KQueueError(_unwritable(name, path))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise KQueueError(_unwritable(folder, path))


def _unwritable(name: Path, path: Path) -> str:
    info = name.stat()
    return (
        f"queue file {path}: {name} is not writable by this user (uid {os.geteuid()}; it belongs to uid "
        f"{info.st_uid}, mode {info.st_mode & 0o777:o}): every process of a queue writes the file, its "
        f"-wal and -shm files, its folder and {path.name}.owners/; share them through a group (umask 002)"
    )


def _forget_leftovers(path: Path) -> None:
    """Remove the -wal and -shm files of a database file that was removed.

    A new file must not take them for its own: processes that still have the
    removed file open write to them, and SQLite would read their pages as the
    new file's.
    """
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
