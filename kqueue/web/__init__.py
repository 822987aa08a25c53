"""``kqueue web``: a live page of the broker's queues, their workers and dead letters, with replay and purge.

Needs the ``web`` extra (``pip install 'kqueue[web]'``): Starlette under
uvicorn, Jinja2 templates, and htmx (shipped with kqueue, no build step).

- `board`: what the page reads from the broker and does to it, one broker call at a time.
- `server`: the routes, the templates and what keeps the page safe (CSRF, the token, the Host header).
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
from collections.abc import Callable, Iterator

from kqueue.errors import KQueueError

__all__ = ["is_loopback", "listen", "require_web", "serve"]


def is_loopback(host: str) -> bool:
    """Whether `host` is an address only this machine reaches (``localhost`` counts)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (0: any free port).

    Raises:
        KQueueError: the address is taken, or not this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family, backlog=128)
    except OSError as exc:
        raise KQueueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(
    sock: socket.socket,
    url: str,
    queues: tuple[str, ...],
    *,
    token: str | None,
    queue_type: str = "classic",
    management_url: str | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve the page on `sock` until interrupted (SIGINT or SIGTERM)."""
    import uvicorn

    from kqueue.queues import QueueType
    from kqueue.web.board import Board
    from kqueue.web.server import create_app

    host = sock.getsockname()[0]
    board = Board(url, queues, QueueType(queue_type), management_url)
    app = create_app(board, token=token, loopback=is_loopback(host))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = _server_class()(config)
    if on_ready is not None:
        on_ready()
    try:
        server.run(sockets=[sock])
    finally:
        board.close()


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):  # type: ignore[misc]
        """uvicorn's server, stopping on SIGINT or SIGTERM and then exiting 0, as the other tools do.

        (uvicorn itself raises the signal again once stopped, so that the process dies of it.)
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {signum: signal.signal(signum, self.handle_exit) for signum in handled}
            try:
                yield
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    return Server


def require_web() -> None:
    """Fail in one line if the ``web`` extra is missing."""
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise KQueueError(f"kqueue web needs {exc.name}: pip install 'kqueue[web]'") from None
