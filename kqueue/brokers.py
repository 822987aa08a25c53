"""Connections to a broker named by URL, with each transport's options in one table."""

from __future__ import annotations

import os
import select
import socket
import ssl
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

import amqp
from kombu import Connection
from kombu.exceptions import OperationalError

from kqueue.errors import BrokerUnavailable, KQueueError

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_URL",
    "ack_up_to",
    "buffered",
    "confirms",
    "connect",
    "default_url",
    "ensure_connected",
    "has_arrived",
    "has_read",
    "is_amqp",
    "mask",
    "next_node",
    "node_count",
    "nodes",
    "open_connection",
    "read_ahead",
    "read_arrived",
    "read_frames",
    "watch_blocked",
    "where",
]

DEFAULT_URL = "amqp://guest:guest@localhost:5672//"
#: Seconds. Kombu's default of 0 turns heartbeats off, so a dead broker would be
#: noticed only by TCP, minutes later. ``?heartbeat=N`` in the URL overrides it.
DEFAULT_HEARTBEAT = 60.0
#: Seconds to wait for a broker that does not answer, before saying so.
CONNECT_TIMEOUT = 10.0

#: Transport-specific knobs, per Kombu driver type. Everything else is the same
#: code on every broker.
TRANSPORT_OPTIONS: dict[str, dict[str, Any]] = {
    # Kombu polls the in-memory queues; its default of 1 s gives ~500 ms latency.
    # Every 2 ms: about 1.4 ms from send to handler, under 5% of a core idle.
    "memory": {"polling_interval": 0.002},
    # An unacked message comes back only after this many seconds; it also
    # redelivers any task that runs longer than this.
    "redis": {"visibility_timeout": 3600.0},
    "amqp": {},
}
#: kqueue's own transports for a scheme: Kombu's, with delays kept by the broker (see `kqueue.delays`).
#: ``sqlite://`` is kqueue's alone and registered with Kombu by name.
TRANSPORTS = {
    "redis": "kqueue.delays.redis:Transport",
    "memory": "kqueue.delays.memory:Transport",
}
#: Transport options a user may set in the URL's query string.
_URL_OPTIONS = {"visibility_timeout": float, "polling_interval": float}


def default_url() -> str:
    """The tools' default broker: ``sqlite://`` on a file in the user's data directory (XDG), its folder made.

    Raises:
        KQueueError: the folder cannot be made.
    """
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    folder = Path(base) / "kqueue"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KQueueError(f"cannot make {folder} for the default broker's file ({exc}): give --broker") from None
    return f"sqlite:///{folder / 'queues.db'}"


def mask(url: str) -> str:
    """The URL with its password, if any, replaced by ``**``; in every entry of a multi-node URL."""
    if ";" in url:
        return ";".join(_mask_one(entry) for entry in url.split(";"))
    return _mask_one(url)


def _mask_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:**@{netloc}"))


def _split_options(url: str) -> tuple[str, dict[str, Any]]:
    """Move the transport options kqueue knows out of the URL's query string."""
    parts = urlsplit(url)
    kept, options = [], {}
    for key, value in parse_qsl(parts.query):
        if key in _URL_OPTIONS:
            try:
                options[key] = _URL_OPTIONS[key](value)
            except ValueError:
                raise KQueueError(f"broker URL option {key}={value!r} is not a number") from None
        else:
            kept.append((key, value))
    if not options:
        return url, options
    base = url.split("?", 1)[0]
    return (f"{base}?{urlencode(kept)}" if kept else base), options


def nodes(url: str) -> list[str]:
    """The entries of a broker URL, one per node, each in full.

    ``amqp://user:pass@h1:5672/vhost;amqp://h2;amqp://h3`` names three nodes of
    one cluster. Kombu would give an alternate without credentials guest's, so
    an alternate missing its credentials, port, virtual host or options takes
    those of the first entry: the nodes of one cluster share them.

    Raises:
        KQueueError: entries with different schemes, or an alternate with options of its own.
        ValueError: an entry is malformed (a port that is not a number).
    """
    entries = [entry.strip() for entry in url.split(";") if entry.strip()]
    if len(entries) < 2:
        return entries or [url]
    first = urlsplit(entries[0])
    first.port  # noqa: B018 - raises ValueError for a port that is not a number
    complete = [entries[0]]
    for number, entry in enumerate(entries[1:], start=2):
        parts = urlsplit(entry)
        if parts.scheme != first.scheme:
            raise KQueueError(
                f"broker URL entry {number} ({mask(entry)}) starts {parts.scheme}:// but entry 1 starts "
                f"{first.scheme}://: every node of one broker is reached the same way"
            )
        if parts.query and parts.query != first.query:
            raise KQueueError(
                f"broker URL entry {number} ({mask(entry)}) has options of its own (?{parts.query}): "
                "put them on the first entry; they apply to every node"
            )
        complete.append(urlunsplit(_completed(parts, first)))
    return complete


def _completed(parts: SplitResult, first: SplitResult) -> SplitResult:
    """`parts` with the credentials, port, virtual host and options it lacks taken from `first`."""
    userinfo, _, host = parts.netloc.rpartition("@")
    if not userinfo and "@" in first.netloc:
        userinfo = first.netloc.rpartition("@")[0]
    if parts.port is None and first.port is not None:
        host = f"{host}:{first.port}"
    netloc = f"{userinfo}@{host}" if userinfo else host
    return parts._replace(netloc=netloc, path=parts.path or first.path, query=parts.query or first.query)


def connect(
    url: str,
    *,
    heartbeat: float | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    transport_options: dict[str, Any] | None = None,
) -> Connection:
    """A Kombu connection (not yet connected) to the broker at `url`.

    Parameters:
        url: a Kombu broker URL; ``?heartbeat=N`` and, for Redis,
            ``?visibility_timeout=S`` are honoured. Several nodes of one
            cluster are entries separated by ``;`` (see `nodes`): the
            connection tries them in turn, from the first (Kombu's
            round-robin failover).
        heartbeat: seconds, used when the URL does not say; None for the default.
        connect_timeout: seconds to wait for the broker to answer.
        transport_options: overrides for this transport's entry in `TRANSPORT_OPTIONS`.

    Raises:
        KQueueError: the URL is malformed or names no transport Kombu has.
    """
    try:
        split = [_split_options(entry) for entry in nodes(url)]
        plain, url_options = ";".join(entry for entry, _ in split), split[0][1]
        if plain.rstrip("/") == "memory:":
            plain = "memory://localhost//"  # the same transport, without Kombu's "no hostname" warning
        transport = TRANSPORTS.get(plain.split("://", 1)[0])
        conn = (Connection if transport is None else _Connection)(
            plain,
            heartbeat=DEFAULT_HEARTBEAT if heartbeat is None else heartbeat,
            connect_timeout=connect_timeout,
            transport=transport,
        )
        driver = conn.transport.driver_type
    except KeyError as exc:
        scheme = url.split("://", 1)[0]
        raise KQueueError(f"unknown broker URL scheme {scheme!r} in {mask(url)}: {exc.args[0]}") from None
    except TypeError as exc:
        option = str(exc).rsplit(" ", 1)[-1]
        raise KQueueError(f"broker URL {mask(url)} has an unknown option {option}") from None
    except ValueError as exc:
        raise KQueueError(f"malformed broker URL {mask(url)}: {exc}") from None
    options = dict(TRANSPORT_OPTIONS.get(driver, {}))
    options.update(transport_options or {})
    options.update(url_options)
    conn.transport_options.update(options)
    return conn


class _Connection(Connection):  # type: ignore[misc]
    """A connection on one of kqueue's `TRANSPORTS`, named in URLs by its scheme rather than its class."""

    def as_uri(self, *args: Any, **kwargs: Any) -> str:
        uri = str(super().as_uri(*args, **kwargs))
        return f"{self.get_transport_cls().scheme}://{uri.partition('://')[2]}"


def confirms(conn: Connection) -> bool:
    """Whether the transport confirms what it has stored: AMQP's publisher confirms, or ``sqlite://``'s commits."""
    return bool(conn.transport.driver_type in ("amqp", "sqlite"))


def is_amqp(conn: Connection) -> bool:
    """Whether the connection speaks AMQP (RabbitMQ): confirms, qos and heartbeats are real."""
    return bool(conn.transport.driver_type == "amqp")


def where(conn: Connection) -> str:
    """The node `conn` is on (or tries next), masked: after a failover, the live one, not the URL's first."""
    return mask(conn.as_uri(include_password=True))


def node_count(conn: Connection) -> int:
    """How many nodes the connection's URL names."""
    return max(1, len(conn.alt or ()))


def ensure_connected(
    conn: Connection, *, timeout: float = CONNECT_TIMEOUT, errback: Callable[[BaseException, float], None] | None = None
) -> Connection:
    """Connect now if not connected, trying each node once, in turn from the one `conn` is on.

    Kombu's own ``max_retries`` counts attempts across the whole list, and its
    ``Connection.connection`` makes two in all: too few to get past two dead
    nodes. Here every node gets one attempt of up to `timeout` seconds;
    `errback(error, 0)` is called for each that failed, while `conn` still
    names it. The caller decides whether to go round again.

    Raises:
        the last node's error, as Kombu raises it (an `OperationalError`, or the
        transport's own for wrong credentials).
    """
    count = node_count(conn)
    conn.ensure_connection(
        errback=errback,
        max_retries=count - 1,
        interval_start=0,
        interval_step=0,
        interval_max=0,
        timeout=timeout * count,
    )
    return conn


def next_node(conn: Connection) -> Connection:
    """A copy of `conn`, not connected, that tries the node after the one `conn` was on first, then the rest.

    Kombu's ``clone()`` starts from the node its original is on, and its
    round-robin goes on from the URL's second entry whatever that was; after
    a lost connection the node that was lost is the likeliest to be down.
    """
    alternates = list(conn.alt or ())
    if len(alternates) < 2:
        return conn.clone()
    current = 0
    for index, entry in enumerate(alternates):
        parts = urlsplit(entry)
        if parts.hostname == conn.hostname and (parts.port or conn.port) == conn.port:
            current = index
            break
    order = alternates[current + 1 :] + alternates[: current + 1]
    # The URL's own parts win over these: each entry is complete (see `nodes`).
    return conn.clone(hostname=order[0], alternates=order, port=None, userid=None, password=None, virtual_host=None)


def open_connection(conn: Connection, *, timeout: float = CONNECT_TIMEOUT) -> Connection:
    """Connect now, trying each node of the URL in turn, each for up to `timeout` seconds.

    Raises:
        BrokerUnavailable: no node could be reached: refused, unreachable, wrong
            credentials, or no answer in time. One line, naming each node and why.
    """
    failures: list[str] = []

    def failed(exc: BaseException, interval: float) -> None:
        failures.append(f"{where(conn)}: {str(exc) or type(exc).__name__}")

    try:
        ensure_connected(conn, timeout=timeout, errback=failed)
    except (KeyError, ValueError) as exc:
        raise KQueueError(f"malformed broker URL {where(conn)}: {exc}") from None
    except (*conn.connection_errors, *conn.channel_errors, OperationalError, OSError) as exc:
        failures.append(f"{where(conn)}: {str(exc) or type(exc).__name__}")
        if len(failures) == 1:
            raise BrokerUnavailable(f"cannot connect to broker {failures[0]}") from None
        raise BrokerUnavailable(f"cannot connect to any node of the broker: {'; '.join(failures)}") from None
    return conn


_HEARTBEAT = 8  # the AMQP frame type
_FRAME_HEADER = 7  # octets before a frame's payload: type, channel, size; one frame-end octet after it
_frame_size = struct.Struct(">I").unpack_from
#: Bytes asked of the socket at a time: a small delivery is three frames of
#: about 150 bytes in all, and py-amqp would read each in two recv() calls.
READ_AHEAD = 4096


#: ``basic.ack`` with ``multiple`` set, one whole method frame: type 1, channel, payload size 13;
#: class 60, method 80, the delivery tag, the bit; the frame-end octet.
_ACK_MULTIPLE = struct.Struct(">BHIHHQBB")


def ack_up_to(message: Any) -> None:
    """Kombu's ``message.ack(multiple=True)``: ack `message` and every delivery before it on its channel.

    On py-amqp, one frame packed at once and written to the socket, which is
    what py-amqp's method serializer and frame writer come to for this
    method: at prefetch 1 the ack is on the path from one delivery to the
    next, and their way there cost more than the write itself. The caller
    holds the connection, as for any call on it. Other transports ack as
    Kombu does.

    Raises:
        What Kombu's ack raises for a closed connection, or the socket's error.
    """
    channel = message.channel
    connection = channel.connection if isinstance(channel, amqp.Channel) else None
    if connection is None or connection._transport is None or message.acknowledged:
        message.ack(multiple=True)  # another transport's, or a closed connection's, or acked already: Kombu's way
        return
    connection._transport.write(_ACK_MULTIPLE.pack(1, channel.channel_id, 13, 60, 80, message.delivery_tag, 1, 0xCE))
    connection.bytes_sent += 1  # as py-amqp's frame writer counts frames: what tells it no heartbeat is due
    message._state = "ACK"


def read_ahead(conn: Connection) -> None:
    """Have py-amqp read up to `READ_AHEAD` bytes per recv() instead of one frame part.

    py-amqp asks the socket for exactly the bytes it needs next, then keeps
    any surplus it is given for the next read; asking for more turns six
    system calls per small message into one per batch. Data read ahead no
    longer shows on the socket: `has_arrived` looks at it too. A py-amqp
    without these internals is left as it is.
    """
    transport = conn.connection.transport
    recv = getattr(transport, "_quick_recv", None)
    if recv is None or not hasattr(transport, "_read_buffer") or getattr(recv, "reads_ahead", False):
        return

    def recv_ahead(n: int) -> bytes:
        return recv(max(n, READ_AHEAD))  # type: ignore[no-any-return]

    recv_ahead.reads_ahead = True  # type: ignore[attr-defined]
    transport._quick_recv = recv_ahead


def has_arrived(conn: Connection) -> bool:
    """Whether the broker has sent something not yet handled (AMQP only; never blocks)."""
    sock = conn.connection.sock
    return has_read(conn) or bool(select.select([sock], [], [], 0)[0])


def has_read(conn: Connection) -> bool:
    """Whether bytes already read off the socket wait to be handled: what select() cannot see."""
    return buffered(conn.connection)


def buffered(amqp: Any) -> bool:
    """`has_read` of a py-amqp connection (`Connection.connection`), for callers that keep it at hand."""
    if getattr(amqp.transport, "_read_buffer", None):
        return True  # read ahead, not yet dispatched
    pending = getattr(amqp.sock, "pending", None)  # TLS: decrypted, not yet read
    return bool(pending is not None and pending())


def read_arrived(conn: Connection) -> None:
    """Read and dispatch the AMQP frames that have arrived, and no more.

    Not drain_events(): that keeps reading until a whole method arrives, so
    the broker's heartbeats alone would keep the caller waiting for as long
    as nothing else comes. Here a frame cut in two is waited for (briefly:
    the rest is on its way), but nothing that has not been sent.
    """
    read_frames(conn.connection)


def read_frames(amqp: Any) -> None:
    """`read_arrived` of a py-amqp connection (`Connection.connection`), for callers that keep it at hand."""
    if _whole_frames_read(amqp):
        return
    transport = amqp.transport
    try:
        with transport.having_timeout(1.0):
            while True:
                frame = transport.read_frame()
                complete = amqp.on_inbound_frame(frame)
                # What is on the socket but not read yet, the next select() sees: no call for it here.
                if (complete or frame[0] == _HEARTBEAT) and not buffered(amqp):
                    return
    except TimeoutError:
        pass  # py-amqp keeps the part of a frame it read for the next call


def _whole_frames_read(amqp: Any) -> bool:
    """Read what the socket holds without waiting and dispatch its whole frames; whether no part of one is left.

    The common case, a delivery in one segment, costs one recv() and none of
    the socket timeout's set and reset (two system calls) or its poll().
    A frame cut in two is left to `read_frames`'s timed reads; so is TLS,
    whose sockets take no flags.
    """
    transport = amqp.transport
    sock = transport.sock
    if isinstance(sock, ssl.SSLSocket) or not hasattr(transport, "_read_buffer"):
        return False
    try:
        data = sock.recv(READ_AHEAD, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):  # woken for nothing: read what is buffered
        data = None
    if data == b"":
        raise ConnectionError("Server unexpectedly closed connection")  # py-amqp's own words for it
    buffer = transport._read_buffer + data if data else transport._read_buffer
    transport._read_buffer = buffer
    while len(buffer) >= _FRAME_HEADER + 1 and len(buffer) >= _FRAME_HEADER + 1 + _frame_size(buffer, 3)[0]:
        amqp.on_inbound_frame(transport.read_frame())
        buffer = transport._read_buffer
    return not buffer


def watch_blocked(conn: Connection, on_blocked: Callable[[str], None], on_unblocked: Callable[[], None]) -> None:
    """Call `on_blocked(reason)` when RabbitMQ blocks this connection, `on_unblocked()` when it lets go.

    RabbitMQ stops reading from a connection that publishes while a memory or
    disk alarm is up (``connection.blocked``). py-amqp reports it, but drops
    the broker's reason for a fixed text; the reason (``low on memory``) is
    the one thing an operator needs, so this reads it from the method itself.
    Only AMQP connections, once connected; others are left alone.
    """
    if not is_amqp(conn):
        return
    from amqp import spec

    amqp = conn.connection
    methods = dict(amqp._METHODS)
    methods[spec.Connection.Blocked] = spec.method(spec.Connection.Blocked, "s")
    amqp._METHODS = methods  # this connection's own table: the class's stays as it is
    amqp._callbacks[spec.Connection.Blocked] = lambda reason="": on_blocked(reason or "no reason given")
    amqp._callbacks[spec.Connection.Unblocked] = on_unblocked


#: How a worker's connection name starts (``kqueue-worker host=... pid=... queue=... prefetch=1 concurrency=1``).
WORKER_LABEL = "kqueue-worker"


def worker_label(**facts: object) -> str:
    """A worker connection's name: this host and process, then `facts`, as ``key=value`` words."""
    words = {"host": socket.gethostname(), "pid": os.getpid(), **facts}
    return " ".join([WORKER_LABEL, *(f"{key}={str(value).replace(' ', '_')}" for key, value in words.items())])


def label_facts(label: str) -> dict[str, str] | None:
    """The facts of a `worker_label` name; None for a connection of anything else."""
    first, _, rest = label.partition(" ")
    if first != WORKER_LABEL:
        return None
    return dict(word.split("=", 1) for word in rest.split() if "=" in word)
