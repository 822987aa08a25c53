"""The ceiling on one SQLite file: plain ``sqlite3`` loops that insert, claim and delete rows, no Kombu at all.

What the same work costs with nothing but SQL: inserts committed in batches with
``synchronous=FULL`` (on disk, as kqueue's confirms are), claims by
``UPDATE ... SET owner ... RETURNING`` and deletes, with ``synchronous=NORMAL``
(as kqueue's claims and acks), each claim transaction deleting the rows
claimed before it. Rows hold the task body only, not a Kombu message.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

#: Rows committed together by the insert loop: kqueue's confirm batch.
INSERT_BATCH = 500

_SCHEMA = """
DROP TABLE IF EXISTS tasks;
CREATE TABLE tasks (id INTEGER PRIMARY KEY, body TEXT NOT NULL, owner TEXT);
CREATE INDEX tasks_ready ON tasks (id) WHERE owner IS NULL;
"""


def _open(path: Path, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


def _insert(db: sqlite3.Connection, texts: Sequence[str], batch: int) -> None:
    for start in range(0, len(texts), batch):
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO tasks (body) VALUES (?)", [(text,) for text in texts[start : start + batch]])
        db.execute("COMMIT")


def send(path: Path, texts: Sequence[str], batch: int = INSERT_BATCH) -> float:
    """Seconds to insert `texts` in a fresh table, `batch` rows per fsync'd commit."""
    db = _open(path, "FULL")
    try:
        db.executescript(_SCHEMA)
        start = time.perf_counter()
        _insert(db, texts, batch)
        return time.perf_counter() - start
    finally:
        db.close()


def work(path: Path, texts: Sequence[str], batch: int) -> float:
    """Seconds to claim `batch` rows at a time and delete them, until a pre-filled table is empty."""
    filler = _open(path, "FULL")
    try:
        filler.executescript(_SCHEMA)
        _insert(filler, texts, INSERT_BATCH)
    finally:
        filler.close()
    db = _open(path, "NORMAL")
    owner = uuid.uuid4().hex[:16]
    done: list[int] = []
    handled = 0
    try:
        start = time.perf_counter()
        while True:
            db.execute("BEGIN IMMEDIATE")
            if done:
                db.execute(f"DELETE FROM tasks WHERE id IN ({','.join('?' * len(done))})", done)
            rows = db.execute(
                "UPDATE tasks SET owner = ? WHERE id IN "
                "(SELECT id FROM tasks WHERE owner IS NULL ORDER BY id LIMIT ?) RETURNING id, body",
                (owner, batch),
            ).fetchall()
            db.execute("COMMIT")
            if not rows:
                break
            done = [row for row, _ in rows]
            handled += len(rows)
        seconds = time.perf_counter() - start
    finally:
        db.close()
    if handled != len(texts):
        raise RuntimeError(f"plain sqlite3 loop handled {handled} of {len(texts)} rows")
    return seconds
