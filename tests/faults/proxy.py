"""A TCP proxy on loopback that a test controls: the network between a client and its broker, cut, frozen or refused.

One thread runs a selector loop over the listening socket, every connection's
two sockets and a wake-up socket; the test's calls (`Proxy.cut`,
`Proxy.freeze`, ...) are handed to that thread and return once it has acted,
so only the proxy's thread ever touches a connection's sockets.

- **cut**: every live connection is closed both ways at once with a reset
  (``SO_LINGER`` 0), as a dropped path or a killed middlebox does; new
  connections are still accepted.
- **freeze**: nothing is read or written on any connection, old or new, and
  nothing is closed: the peers see silence, never an error. A new connection
  is accepted but not forwarded (its upstream connection is made at the thaw).
  What the peers sent meanwhile waits in the kernel's buffers, as a real
  network's retransmissions would, and is delivered once thawed, as is a close.
- **refuse**: while on, a new connection is reset as soon as it is accepted.
"""

from __future__ import annotations

import errno
import ipaddress
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType

__all__ = ["Proxy"]

#: Bytes read from a socket at a time.
CHUNK = 65536
#: Bytes held for a side that does not read them, before the other side is no longer read (back-pressure).
HIGH_WATER = 1 << 20
#: Seconds a control call, a connection upstream or a stop may take before the proxy is reported broken.
DEADLINE = 5.0
#: SO_LINGER on, 0 s: close() sends a reset, not a FIN, and drops what was unsent.
_RESET = struct.pack("ii", 1, 0)
#: Errors that mean a peer went away (reset, closed): the connection ends, the proxy goes on.
_GONE = (ConnectionError, TimeoutError)


def _loopback(host: str) -> bool:
    return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    except OSError:
        pass  # already broken: close() is all that is left
    sock.close()


class _End:
    """One socket of a connection, and the bytes waiting to be written to it."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock
        self.out = bytearray()
        self.eof = False  # it sent FIN: nothing more to read from it
        self.shut = False  # we sent it FIN, after writing everything it was owed
        self.mask = 0  # the events it is registered for


class _Link:
    """A client's connection and its connection upstream."""

    def __init__(self, client: socket.socket) -> None:
        self.client = _End(client)
        self.upstream = _End(None)  # made at once, or at the thaw when accepted while frozen

    def peer(self, end: _End) -> _End:
        return self.upstream if end is self.client else self.client

    def ends(self) -> list[_End]:
        return [self.client, self.upstream]

    @property
    def finished(self) -> bool:
        return all(end.eof and not end.out for end in self.ends())


class Proxy:
    """A TCP proxy from 127.0.0.1:`port` to `target`, both on loopback; a context manager that starts and stops it.

    Parameters:
        target: where connections are forwarded; must be a loopback address.
        port: where to listen; 0 for a free port the system picks (see `port`).
    """

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5672), port: int = 0) -> None:
        if not _loopback(target[0]):
            raise ValueError(f"the proxy only forwards to loopback, not to {target[0]}")
        self.target = target
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._links: list[_Link] = []
        self._frozen = False
        self._refusing = False
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"proxy:{self.port}", daemon=True)
        #: Connections accepted since the start, refused ones included.
        self.accepted = 0
        #: Bytes written upstream (client to target) and downstream (target to client).
        self.bytes_up = 0
        self.bytes_down = 0

    # -- the test's controls ---------------------------------------------------------

    def __enter__(self) -> Proxy:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop(raise_errors=exc is None)

    def start(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ, self._accept)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._woken)
        self._thread.start()

    def stop(self, *, raise_errors: bool = True) -> None:
        """Close every socket and join the thread, within `DEADLINE`; raise what broke the proxy's loop, if anything."""
        self._stopping = True
        self._wake()
        if self._thread.ident is not None:
            self._thread.join(DEADLINE)
        alive = self._thread.is_alive()
        if not alive:
            self._close_all()  # the loop closes them as it ends; this is for a loop that never started
        if raise_errors and alive:
            raise RuntimeError(f"the proxy's thread did not stop within {DEADLINE}s")
        if raise_errors and self._error is not None:
            raise RuntimeError("the proxy's loop failed") from self._error

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "//") -> str:
        """An ``amqp://`` URL through the proxy; `vhost` as Kombu spells it (``//`` is the default vhost ``/``)."""
        path = vhost if vhost.startswith("/") else f"/{vhost}"
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}{path}"

    @property
    def connections(self) -> int:
        """Connections live now (accepted, not yet closed)."""
        return len(self._links)

    def cut(self) -> None:
        """Reset every live connection, both ways at once; new connections are still accepted."""
        self._call(self._cut)

    def freeze(self) -> None:
        """Forward nothing more, on live connections and new ones, and close nothing, until `thaw`."""
        self._call(self._freeze)

    def thaw(self) -> None:
        """Forward again, what was held first."""
        self._call(self._thaw)

    def refuse(self, on: bool) -> None:
        """While `on`, reset each new connection as soon as it is accepted; live ones are left alone."""

        def refuse() -> None:
            self._refusing = on

        self._call(refuse)

    def _call(self, command: Callable[[], None]) -> None:
        """Run `command` on the proxy's thread; return once it has run."""
        done = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                command()
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
                failed.append(exc)
            done.set()

        if not self._thread.is_alive():
            raise RuntimeError("the proxy is not running") from self._error
        self._commands.put(run)
        self._wake()
        if not done.wait(DEADLINE):
            raise RuntimeError(f"the proxy did not act within {DEADLINE}s") from self._error
        if failed:
            raise failed[0]

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"!")
        except (BlockingIOError, OSError):
            pass  # already awake (its buffer is full), or stopped

    # -- the proxy's thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, events in self._selector.select(timeout=1.0):
                    key.data(key.fileobj, events)
        except BaseException as exc:  # noqa: BLE001 - kept for the test, raised by stop() and the controls
            self._error = exc
        finally:
            self._close_all()

    def _woken(self, sock: socket.socket, events: int) -> None:
        try:
            while sock.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _accept(self, listener: socket.socket, events: int) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                return
            self.accepted += 1
            if self._refusing:
                _reset(client)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client)
            self._links.append(link)
            if not self._frozen:
                self._connect(link)
            self._update(link)

    def _connect(self, link: _Link) -> None:
        """Connect `link` upstream; a target that refuses has the client reset, as it would be."""
        try:
            upstream = socket.create_connection(self.target, timeout=DEADLINE)
        except OSError:
            self._close(link, reset=True)
            return
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.upstream.sock = upstream

    def _update(self, link: _Link) -> None:
        """Register each socket of `link` for what it can do now: nothing at all while frozen."""
        if link not in self._links:
            return
        if link.finished:
            self._close(link, reset=False)
            return
        for end in link.ends():
            if end.sock is None:
                continue
            mask = 0
            if not self._frozen and link.upstream.sock is not None:
                peer = link.peer(end)
                if not end.eof and len(peer.out) < HIGH_WATER:
                    mask |= selectors.EVENT_READ
                if end.out:
                    mask |= selectors.EVENT_WRITE
            if mask == end.mask:
                continue
            if not end.mask:
                self._selector.register(end.sock, mask, self._handler(link, end))
            elif not mask:
                self._selector.unregister(end.sock)
            else:
                self._selector.modify(end.sock, mask, self._handler(link, end))
            end.mask = mask

    def _handler(self, link: _Link, end: _End) -> Callable[[socket.socket, int], None]:
        def handle(sock: socket.socket, events: int) -> None:
            # Events of one select() are handled in turn: an earlier one may have closed this
            # connection, or a command frozen it, since.
            events &= end.mask
            if not events:
                return
            try:
                if events & selectors.EVENT_WRITE:
                    self._write(link, end)
                if events & selectors.EVENT_READ:
                    self._read(link, end)
            except _GONE:
                self._close(link, reset=True)  # a reset on one side is passed on to the other
                return
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    raise
                self._close(link, reset=True)
                return
            self._update(link)

        return handle

    def _read(self, link: _Link, end: _End) -> None:
        assert end.sock is not None
        try:
            data = end.sock.recv(CHUNK)
        except BlockingIOError:
            return
        peer = link.peer(end)
        if data:
            peer.out += data
            self._write(link, peer)  # at once: most writes go through without waiting for the selector
            return
        end.eof = True
        self._shut_if_done(peer, end)

    def _write(self, link: _Link, end: _End) -> None:
        if not end.out or end.sock is None:
            return
        try:
            sent = end.sock.send(end.out)
        except BlockingIOError:
            return
        del end.out[:sent]
        if end is link.upstream:
            self.bytes_up += sent
        else:
            self.bytes_down += sent
        self._shut_if_done(end, link.peer(end))

    def _shut_if_done(self, end: _End, source: _End) -> None:
        """Pass a FIN on to `end` once it has been given everything `source` sent before it."""
        if source.eof and not end.out and not end.shut and end.sock is not None:
            end.shut = True
            try:
                end.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # it went away first: its own events say so

    def _cut(self) -> None:
        for link in list(self._links):
            self._close(link, reset=True)

    def _freeze(self) -> None:
        self._frozen = True
        for link in list(self._links):
            self._update(link)

    def _thaw(self) -> None:
        self._frozen = False
        for link in list(self._links):
            if link.upstream.sock is None:
                self._connect(link)
            self._update(link)

    def _close(self, link: _Link, *, reset: bool) -> None:
        if link in self._links:
            self._links.remove(link)
        for end in link.ends():
            if end.sock is None:
                continue
            if end.mask:
                self._selector.unregister(end.sock)
                end.mask = 0
            if reset:
                _reset(end.sock)
            else:
                end.sock.close()

    def _close_all(self) -> None:
        for link in list(self._links):
            self._close(link, reset=True)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()
