"""What a failed read or write of the queue file means: the one place that decides.

SQLite rolls back a statement (and on ``COMMIT`` the transaction) that fails
with ``SQLITE_BUSY``, ``SQLITE_FULL`` or ``SQLITE_IOERR``: nothing was written.
Such a failure is *transient*: another process holds the write lock, the disk
is full, the disk had a hiccup. Whatever was kept in memory for that write
(messages to commit, acks to delete, rows to give back) stays there until a
later write succeeds, and a consumer waits it out with a growing pause
(`Episode`), keeping its rows and its lock. Anything else (a read-only file,
a file that is not a database) is *fatal*: one line that says what to do.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from kqueue.errors import KQueueError

__all__ = [
    "DatabaseBusy",
    "DiskFull",
    "DiskTrouble",
    "Episode",
    "FileReplaced",
    "StoreUnavailable",
    "translated",
]

log = logging.getLogger("kqueue.sqlite")


class StoreUnavailable(KQueueError):
    """The queue file could not be written for now; nothing was written, nothing is lost.

    Attributes:
        state: what keeps it from being written, in a few words ("locked by another process", "disk full").
    """

    state = "unavailable"


class DatabaseBusy(StoreUnavailable):
    """Another process held the database's write lock for longer than the busy timeout.

    Nothing was lost: a publish that raised this was not committed, and was not confirmed.
    """

    state = "locked by another process"


class DiskFull(StoreUnavailable):
    """The disk of the queue file is full: the write was rolled back."""

    state = "disk full"


class DiskTrouble(StoreUnavailable):
    """The operating system failed a read or write of the queue file (SQLite's disk I/O error)."""

    state = "disk I/O errors"


class FileReplaced(KQueueError):
    """The queue file was removed or replaced while this connection had it open: reopen it by its name."""


def _transient(exc: sqlite3.Error) -> type[StoreUnavailable] | None:
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or (not name and ("locked" in text or "busy" in text)):
        return DatabaseBusy
    if name == "SQLITE_FULL" or (not name and "disk is full" in text):
        return DiskFull
    if name.startswith("SQLITE_IOERR") or (not name and "disk I/O error" in text):
        return DiskTrouble
    return None


@contextlib.contextmanager
def translated(path: Path, doing: str, busy_timeout: float) -> Iterator[None]:
    """Turn sqlite3's errors into one line that says which file, what failed and what to do.

    Raises:
        StoreUnavailable: a transient failure (see the module docstring); nothing was written.
        KQueueError: a fatal one.
    """
    try:
        yield
    except sqlite3.Error as exc:
        kind = _transient(exc)
        if kind is DatabaseBusy:
            raise DatabaseBusy(
                f"the queue database {path} stayed locked by another process for over {busy_timeout:g}s "
                f"({doing} not done, nothing lost): retry, or raise ?busy_timeout= in the broker URL"
            ) from None
        if kind is not None:
            raise kind(f"queue database {path}: {doing} not done, nothing lost: {exc}") from None
        raise KQueueError(f"queue database {path}: {doing} failed: {exc}") from None


class Episode:
    """A stretch of transient failures: said once when it starts and once when it ends, retried with a growing pause.

    Parameters:
        path: the queue file, for the log lines.
    """

    FIRST, LAST = 0.05, 2.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.since: float | None = None
        self.state = ""
        self._delay = self.FIRST
        self._retry_at = 0.0

    @property
    def active(self) -> bool:
        return self.since is not None

    def may_try(self) -> bool:
        """Whether the pause since the last failure is over."""
        return self.since is None or time.monotonic() >= self._retry_at

    def retry_in(self) -> float:
        """Seconds until the next try; 0 outside an episode."""
        return 0.0 if self.since is None else max(0.0, self._retry_at - time.monotonic())

    def failed(self, exc: StoreUnavailable, waiting: str) -> None:
        """A write failed; `waiting` says what stays in memory until one succeeds."""
        now = time.monotonic()
        if self.since is None or exc.state != self.state:
            self.since, self.state = now, exc.state
            log.warning("queue file %s: %s: %s; trying again (%s)", self.path, exc.state, waiting, exc)
        self._retry_at = now + self._delay
        self._delay = min(self._delay * 2, self.LAST)

    def ended(self, done: str) -> None:
        """A write succeeded; `done` says what it wrote of what had waited."""
        if self.since is not None:
            log.warning("queue file %s: %s for %.1fs; %s", self.path, self.state, time.monotonic() - self.since, done)
        self.since, self.state, self._delay = None, "", self.FIRST
