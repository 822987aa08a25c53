"""How the connection thread waits: for the broker and the mailbox at once, by kind of transport.

Each waiter returns whether its wait was idle (nothing arrived, nothing
finished): only then is an empty queue worth asking the broker about.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from typing import Any

from kombu import Connection

from kqueue.brokers import buffered, is_amqp, read_frames
from kqueue.worker.mailbox import Mailbox

__all__ = ["Waiter", "waiter_for"]


class Waiter:
    """Memory and Redis: Kombu's own polling ``drain_events``, or the mailbox alone when no task may come."""

    def __init__(self, conn: Connection, mailbox: Mailbox) -> None:
        self.conn = conn
        self.mailbox = mailbox

    def wait(self, timeout: float, *, room: int) -> bool:
        """Wait up to `timeout` seconds; `room`: how many more tasks the worker may take now."""
        if room <= 0:
            return self.pause(timeout)
        try:
            self.conn.drain_events(timeout=min(timeout, 0.05))
        except TimeoutError:
            return True
        return False

    def pause(self, timeout: float) -> bool:
        """Wait for the mailbox alone (a finished task, a stop asked): the broker will hand us nothing."""
        ready, _, _ = select.select([self.mailbox.fd], [], [], timeout)
        if ready:
            self.mailbox.clear()
        return False


class WokenWaiter(Waiter):
    """A transport that says when a task may be ready (``sqlite://``): select on its descriptor and the mailbox."""

    def __init__(self, conn: Connection, mailbox: Mailbox, fd: int, due_in: Callable[[], float]) -> None:
        super().__init__(conn, mailbox)
        self.fd = fd
        self.due_in = due_in
        self.looked = False

    def wait(self, timeout: float, *, room: int) -> bool:
        if room <= 0:
            return self.pause(timeout)
        # A delayed task that comes due wakes nobody: wait no longer than until then. Nor does a
        # task sent before this consumer started: look at once, the first time.
        timeout = min(timeout, max(0.01, self.due_in())) if self.looked else 0.0
        self.looked = True
        ready, _, _ = select.select([self.fd, self.mailbox.fd], [], [], timeout)
        if self.mailbox.fd in ready:
            self.mailbox.clear()
        delivered = 0
        while delivered <= room:  # the transport stops at the prefetch limit; this bounds the loop
            try:
                self.conn.drain_events(timeout=0)  # also notices dead consumers, every half second
            except TimeoutError:
                break
            delivered += 1
        return not ready and not delivered


class AmqpWaiter(Waiter):
    """AMQP: select on the broker's socket, the mailbox and the copies' connection; serve heartbeats.

    While it waits in select() it lets go of `io`, the lock over the
    connection, so that a handler thread may ack its own task meanwhile.
    """

    def __init__(self, conn: Connection, mailbox: Mailbox, io: threading.Lock, copies: Callable[[], Any]) -> None:
        super().__init__(conn, mailbox)
        self.io = io
        self.copies = copies
        self.next_heartbeat = 0.0
        self.amqp = conn.connection  # py-amqp's, for this connection's life (each connection gets its waiter)

    def wait(self, timeout: float, *, room: int) -> bool:
        conn = self.conn
        amqp = self.amqp
        sock = amqp.sock
        if buffered(amqp):
            ready: list[Any] = [sock]
        else:
            copies = self.copies()
            watched = [sock, self.mailbox.fd] + ([copies] if copies is not None else [])
            self.io.release()
            try:
                ready, _, _ = select.select(watched, [], [], timeout)
            finally:
                self.io.acquire()
        if self.mailbox.fd in ready:
            self.mailbox.clear()
        if sock in ready:
            read_frames(amqp)
        now = time.monotonic()
        if now >= self.next_heartbeat:
            conn.heartbeat_check()
            self.next_heartbeat = now + max(0.2, (conn.heartbeat or 4) / 4)
        return not ready


def waiter_for(conn: Connection, mailbox: Mailbox, io: threading.Lock, copies: Callable[[], Any]) -> Waiter:
    """The waiter for `conn`'s transport; `copies` gives the socket of copies awaiting a confirm, if any."""
    if is_amqp(conn):
        return AmqpWaiter(conn, mailbox, io, copies)
    if conn.transport.driver_type == "sqlite":
        from kqueue.sqlite import due_in, wake_fd

        return WokenWaiter(conn, mailbox, wake_fd(conn), lambda: due_in(conn))
    return Waiter(conn, mailbox)
