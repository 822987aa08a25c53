"""The fault suite's TCP proxy (`tests.faults.proxy`), against a tiny echo server on loopback."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import wait_for
from tests.faults.proxy import Proxy


class Echo:
    """A server on loopback that sends back every byte it gets, a thread per connection, all joined at the end."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            if not select.select([self.listener], [], [], 0.05)[0]:
                continue
            conn, _ = self.listener.accept()
            self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while not self.stopping.is_set():
                if not select.select([conn], [], [], 0.05)[0]:
                    continue
                try:
                    data = conn.recv(65536)
                    if not data:
                        return
                    conn.sendall(data)
                except OSError:
                    return

    def stop(self) -> None:
        self.stopping.set()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in sendall
            except OSError:
                pass
        for thread in self.threads:
            thread.join(5)
        assert not any(thread.is_alive() for thread in self.threads)
        self.listener.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    yield server
    server.stop()


@pytest.fixture
def proxy(echo: Echo) -> Iterator[Proxy]:
    with Proxy(target=("127.0.0.1", echo.port)) as proxy:
        yield proxy


def client(proxy: Proxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def nothing_comes(sock: socket.socket, seconds: float) -> bool:
    """Whether `sock` stays silent, without error or EOF, for `seconds` (the time is the check itself)."""
    sock.settimeout(seconds)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)
    return False


def test_bytes_flow_both_ways_and_connections_are_counted(proxy: Proxy) -> None:
    # Given a client connected through the proxy
    with client(proxy) as sock:
        wait_for(lambda: proxy.connections == 1, message="the connection counted")

        # When it sends a little, then more than the proxy holds for a slow reader
        sock.sendall(b"hello")
        assert receive(sock, 5) == b"hello"
        big = bytes(range(256)) * 12000  # 3 MB
        writer = threading.Thread(target=sock.sendall, args=(big,), daemon=True)
        writer.start()

        # Then every byte comes back, in order
        assert receive(sock, len(big)) == big
        writer.join(5)
    assert proxy.bytes_up == proxy.bytes_down == 5 + len(big)
    # and once the client has gone, so has the connection
    wait_for(lambda: proxy.connections == 0, message="the closed connection forgotten")


def test_a_cut_resets_the_client_and_new_connections_still_work(proxy: Proxy) -> None:
    with client(proxy) as sock:
        sock.sendall(b"ping")
        assert receive(sock, 4) == b"ping"

        # When the proxy cuts every connection
        proxy.cut()

        # Then the client's next read is a reset (or at worst an end of file), at once
        assert proxy.connections == 0
        with pytest.raises(ConnectionResetError):
            assert sock.recv(1) == b""  # an EOF would fail here: a cut is a reset
    # and a new connection goes through as before
    with client(proxy) as again:
        again.sendall(b"pong")
        assert receive(again, 4) == b"pong"


def test_a_freeze_stalls_without_error_and_a_thaw_delivers_what_was_held(proxy: Proxy) -> None:
    with client(proxy) as old:
        old.sendall(b"before")
        assert receive(old, 6) == b"before"

        # When the network freezes and both an old and a new connection send
        proxy.freeze()
        old.sendall(b"held")
        with client(proxy) as new:
            new.sendall(b"new")

            # Then neither gets anything back, and neither sees an error; the new one is accepted
            assert nothing_comes(old, 0.5)
            assert nothing_comes(new, 0.2)
            assert proxy.connections == 2

            # When it thaws, what was held is delivered, and both work again
            proxy.thaw()
            assert receive(old, 4) == b"held"
            assert receive(new, 3) == b"new"
            new.sendall(b"after")
            assert receive(new, 5) == b"after"


def test_a_close_during_a_freeze_is_delivered_at_the_thaw(proxy: Proxy) -> None:
    sock = client(proxy)
    wait_for(lambda: proxy.connections == 1, message="the connection counted")
    proxy.freeze()
    sock.close()
    assert proxy.connections == 1  # frozen: the close is not seen yet
    proxy.thaw()
    wait_for(lambda: proxy.connections == 0, message="the close passed on")


def test_refused_connections_are_reset_while_live_ones_go_on(proxy: Proxy) -> None:
    with client(proxy) as live:
        # When the proxy refuses new connections
        proxy.refuse(True)

        # Then a new one is reset before any byte comes back (on loopback, often during connect() itself)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            with client(proxy) as refused:
                refused.sendall(b"x")
                assert refused.recv(1) == b""  # an EOF would fail here
        # and the live one still works
        live.sendall(b"still")
        assert receive(live, 5) == b"still"

        # When it stops refusing, new connections work again
        proxy.refuse(False)
        with client(proxy) as again:
            again.sendall(b"ok")
            assert receive(again, 2) == b"ok"


def test_stopping_closes_everything_and_leaves_no_thread(echo: Echo) -> None:
    with Proxy(target=("127.0.0.1", echo.port)) as proxy:
        sock = client(proxy)
        sock.sendall(b"x")
        assert receive(sock, 1) == b"x"
        proxy.freeze()  # a frozen proxy stops as promptly as any
    with sock, pytest.raises(ConnectionResetError):
        sock.recv(1)
    assert not [thread.name for thread in threading.enumerate() if thread.name == f"proxy:{proxy.port}"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1)


def test_it_only_forwards_to_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        Proxy(target=("192.0.2.1", 5672))
