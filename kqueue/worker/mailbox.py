"""The one object the two threads share: finished tasks go back through it, and it wakes the connection thread."""

from __future__ import annotations

import os
import threading
from queue import Empty, SimpleQueue

from kqueue.worker.task import Task

__all__ = ["Mailbox"]


class Mailbox:
    """Handler threads post finished tasks; the connection thread selects on `fd` and takes them.

    A pipe rather than a condition variable, so that the connection thread can
    wait on it and the broker's socket in one select().
    """

    def __init__(self) -> None:
        self.fd, self._write = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write, False)
        self._finished: SimpleQueue[Task] = SimpleQueue()
        self._signalled = False
        # A handler can outlive its worker (its task requeued, the worker
        # closed): it must not write to a descriptor number reused since.
        self._lock = threading.Lock()
        self._closed = False

    def post(self, task: Task) -> None:
        """On a handler thread: hand a finished task back and wake the connection thread."""
        self._finished.put(task)
        if self._signalled:  # the reader has not taken the last wake-up: it will look anyway
            return
        with self._lock:
            if not self._closed:
                self._signalled = True
                self._poke()

    def nudge(self) -> None:
        """Wake the connection thread; safe in a signal handler (no lock, no allocation to wait on)."""
        if not self._closed:
            self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._write, b"!")
        except OSError:  # full: the reader is awake already; closed: nobody is waiting
            pass

    def take(self) -> list[Task]:
        """On the connection thread: the tasks finished since the last call."""
        taken = []
        while True:
            try:
                taken.append(self._finished.get_nowait())
            except Empty:
                return taken

    def has_mail(self) -> bool:
        return not self._finished.empty()

    def clear(self) -> None:
        """Take in the wake-ups. Drain first, lower the flag last: what a skipped wake-up signalled is queued."""
        try:
            os.read(self.fd, 4096)
        except BlockingIOError:
            pass
        self._signalled = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.fd)
            os.close(self._write)
