"""Owners: the connections that claim rows, each alive exactly as long as it holds the lock on its file.

Each owner holds an exclusive ``flock`` on ``<db>.owners/<owner>.lock`` and
has a datagram socket that wakes it when rows may be ready. The kernel drops
the lock when the process dies, however it dies; a process that can take an
owner's lock knows that owner is gone. A lock file only ever appears under its
name already locked, its socket bound: it is made under a temporary name, then
renamed into place, so that no one can take a live owner for dead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import select
import socket
import sys
import uuid
from pathlib import Path

__all__ = ["Owner", "Wakeups", "alive", "forget_stale", "label_of"]

_SUFFIX = ".lock"
_MAKING = ".making"
#: Bytes of an owner's label kept in its lock file.
_LABEL_MAX = 1024


class Owner:
    """This connection's owner id, its lock and its wake-up socket, from `Owner.create` until `close`."""

    def __init__(self, owner: str, fd: int, wake: socket.socket, path: Path) -> None:
        self.id = owner
        self.wake = wake
        self._fd = fd
        self._path = path

    @classmethod
    def create(cls, owners_dir: Path, wakeups: Wakeups, label: str = "") -> Owner:
        """A new owner, its lock file holding `label` (the connection's name: who the owner is, for people)."""
        owner = uuid.uuid4().hex[:16]
        owners_dir.mkdir(exist_ok=True)
        making = owners_dir / f".{owner}{_MAKING}"
        fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, label.encode()[:_LABEL_MAX])
            wake = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            wake.setblocking(False)
            with contextlib.suppress(OSError):  # no wake-ups (too long a path): polling still works
                wake.bind(wakeups.address(owner))
            path = owners_dir / f"{owner}{_SUFFIX}"
            os.rename(making, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                making.unlink()
            raise
        return cls(owner, fd, wake, path)

    def clear(self) -> None:
        """Read away the wake-up bytes that have come."""
        with contextlib.suppress(OSError):
            while self.wake.recv(64):
                pass

    def wait(self, timeout: float) -> None:
        """Sleep until a wake-up byte comes or `timeout` seconds pass."""
        select.select([self.wake], [], [], timeout)

    def close(self) -> None:
        """Drop the lock and the name; the rows this owner still holds are anyone's to give back."""
        with contextlib.suppress(OSError):
            self._path.unlink()
        os.close(self._fd)
        self.wake.close()


def alive(owners_dir: Path, owner: str) -> bool:
    """Whether `owner`'s process still holds its lock; a dead owner's lock file is removed.

    An owner whose lock this process may not even open (another user's) counts as alive.
    """
    path = owners_dir / f"{owner}{_SUFFIX}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except PermissionError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        with contextlib.suppress(OSError):
            path.unlink()
        return False
    finally:
        os.close(fd)


def label_of(owners_dir: Path, owner: str) -> str:
    """The label `owner` was made with ('' if none, or if its lock file is gone)."""
    try:
        return (owners_dir / f"{owner}{_SUFFIX}").read_bytes()[:_LABEL_MAX].decode(errors="replace")
    except OSError:
        return ""


def forget_stale(owners_dir: Path) -> None:
    """Remove the half-made lock files of processes that died while making them."""
    try:
        names = [name for name in os.listdir(owners_dir) if name.endswith(_MAKING)]
    except FileNotFoundError:
        return
    for name in names:
        path = owners_dir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with contextlib.suppress(OSError):
                path.unlink()
        except OSError:
            pass  # being made right now
        finally:
            os.close(fd)


class Wakeups:
    """Sends the wake-up bytes: to every owner of the file when rows may be ready, or to one's own waiter.

    Parameters:
        path: the database file; its owners' sockets are named after it.
    """

    def __init__(self, path: Path) -> None:
        self.owners_dir = Path(f"{path}.owners")
        self._tag = hashlib.sha1(os.fsencode(path)).hexdigest()[:16]
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        self._peers: tuple[int, list[str]] = (-1, [])

    def address(self, owner: str) -> str:
        if sys.platform.startswith("linux"):
            # Abstract names: no file to clean up, no limit on the database's path length.
            return f"\0kqueue-sqlite-{self._tag}-{owner}"
        return str(self.owners_dir / f"{owner}.sock")

    def notify(self) -> None:
        """Tell every owner that rows may be ready: one byte each, never blocking."""
        for owner in self.owners():
            try:
                self._sender.sendto(b"!", self.address(owner))
            except (BlockingIOError, FileNotFoundError, ConnectionRefusedError):
                pass  # its buffer is full (it will look anyway), it never bound one, or it is gone
            except OSError as exc:
                if exc.errno not in (errno.ENOBUFS, errno.EPERM, errno.EACCES):
                    raise

    def poke(self, owner: str) -> None:
        """Wake `owner`'s own waiter: an ack on another thread freed a prefetch slot."""
        with contextlib.suppress(OSError):
            self._sender.sendto(b"!", self.address(owner))

    def owners(self) -> list[str]:
        """The owners whose lock files are in the folder, alive or not; listed again only when it changed."""
        try:
            stamp = os.stat(self.owners_dir).st_mtime_ns
        except FileNotFoundError:
            return []
        if stamp != self._peers[0]:
            owners = [name[: -len(_SUFFIX)] for name in os.listdir(self.owners_dir) if name.endswith(_SUFFIX)]
            self._peers = (stamp, owners)
        return self._peers[1]

    def close(self) -> None:
        self._sender.close()
