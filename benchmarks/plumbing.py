"""What every figure needs: fresh queues, a fast raw pre-fill, and timed child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kombu import Connection, Exchange, Producer, Queue

from kqueue.brokers import TRANSPORT_OPTIONS

#: Where the console scripts of this virtualenv are (kqueue-send, kqueue-work).
BIN = Path(sys.executable).parent
PYTHON = sys.executable
#: The raw memory:// baselines poll as often as kqueue's connect() has Kombu poll.
MEMORY_OPTIONS: dict[str, Any] = dict(TRANSPORT_OPTIONS["memory"])
#: Seconds between polls of the raw ``sqla+sqlite://`` baselines where an idle consumer matters (latency, idle
#: CPU), a query each. Kombu's default of 1 s would put its send-to-handler latency near 500 ms.
SQLA_POLLING_INTERVAL = 0.01


def tool(name: str) -> str:
    return str(BIN / name)


def kqueue_argv(name: str, url: str, queue: str, queue_type: str, *args: str) -> list[str]:
    """The command line of kqueue's tool `name` on `queue` at `url`, then `args`."""
    return [tool(name), "--broker", url, "--queue", queue, "--queue-type", queue_type, *args]


def burst_worker_argv(url: str, queue: str, queue_type: str, prefetch: int, *args: str) -> list[str]:
    """kqueue-work draining `queue` and exiting, a no-op per task, no line per task; then `args`.

    --quiet: no line per task, as the raw consumers print none either.
    """
    return kqueue_argv(
        "kqueue-work",
        url,
        queue,
        queue_type,
        "--burst",
        "--quiet",
        "--dot-seconds",
        "0",
        "--prefetch",
        str(prefetch),
        *args,
    )


def fresh_name(figure: str) -> str:
    """A queue name no other benchmark (or run) uses."""
    return f"kqbench-{figure}-{uuid.uuid4().hex[:8]}"


def is_amqp_url(url: str) -> bool:
    return url.split("://", 1)[0] in ("amqp", "pyamqp", "amqps")


def is_sqlite_url(url: str) -> bool:
    """kqueue's own ``sqlite://`` transport (not Kombu's ``sqla+sqlite://``)."""
    return url.split("://", 1)[0] == "sqlite"


def is_sqla_url(url: str) -> bool:
    return url.split("://", 1)[0].startswith("sqla")


def idle_connection(url: str) -> Connection:
    """A raw connection for a consumer that waits idle on `url`; memory:// and sqla+sqlite:// poll as set here.

    On sqla+sqlite the interval is not a transport option (Kombu hands those to SQLAlchemy's
    ``create_engine``) but the transport class's, which the clones `ConsumerMixin` makes keep.
    """
    if url.startswith("memory"):
        return Connection("memory://localhost//", transport_options=MEMORY_OPTIONS)
    if is_sqla_url(url):
        from kombu.transport.sqlalchemy import Transport

        polling = type("PollingSqlaTransport", (Transport,), {"polling_interval": SQLA_POLLING_INTERVAL})
        return Connection(url.split("+", 1)[1], transport=polling)
    return Connection(url)


def raw_queue(name: str, queue_type: str = "classic") -> Queue:
    """The same durable queue kqueue declares, built with plain Kombu."""
    arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else None
    return Queue(name, Exchange(""), routing_key=name, durable=True, queue_arguments=arguments)


def raw_connection(url: str, **transport_options: Any) -> Connection:
    return Connection(url, transport_options=transport_options or None)


def declare(url: str, queue: Queue) -> None:
    with raw_connection(url) as conn:
        queue(conn.channel()).declare()


def message_count(conn: Connection, name: str) -> int:
    """Messages ready in `name` (0 for a queue that is not there, as Redis says)."""
    channel = conn.channel()
    try:
        if hasattr(channel, "_size"):  # Kombu's virtual transports
            return int(channel._size(name))
        return int(channel.queue_declare(queue=name, passive=True).message_count)
    finally:
        channel.close()


def raw_publisher(channel: Any, routing_key: str) -> Callable[[bytes], None]:
    """Publish one body the plain-Kombu way every raw baseline uses: persistent text/plain, no confirm."""
    producer = Producer(channel, exchange=Exchange(""), auto_declare=False)

    def publish(body: bytes) -> None:
        producer.publish(
            body,
            routing_key=routing_key,
            delivery_mode=2,
            content_type="text/plain",
            content_encoding="utf-8",
        )

    return publish


def prefill(url: str, queue: Queue, bodies: Sequence[bytes]) -> None:
    """Publish `bodies` with a raw loop (no confirms, not timed), then wait until the queue has them all.

    On ``sqlite://`` a publish without confirms is a commit of its own: the loop uses the
    transport's confirm mode, which commits every few hundred messages.
    """
    with raw_connection(url) as conn:
        channel = conn.channel()
        queue(channel).declare()
        batched = is_sqlite_url(url)
        if batched:
            channel.confirm_select()
        publish = raw_publisher(channel, queue.name)
        for body in bodies:
            publish(body)
        if batched:
            channel.flush()
        deadline = time.monotonic() + 60
        while message_count(conn, queue.name) < len(bodies):
            if time.monotonic() > deadline:
                raise RuntimeError(f"pre-fill of {queue.name}: the broker did not take {len(bodies)} messages")
            time.sleep(0.01)


def wait_for_broker(url: str, timeout: float = 180.0) -> None:
    """Return once the broker accepts a connection again (it may have been restarted under us)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with raw_connection(url) as conn:
                conn.ensure_connection(max_retries=1, timeout=5)
                conn.channel().close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def reachable(url: str, timeout: float = 5.0) -> str | None:
    """None if a connection to `url` can be made now, else why not (one line)."""
    try:
        with raw_connection(url) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
            conn.channel().close()
    except Exception as exc:  # noqa: BLE001 - any failure means: not there
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def delete_queues(url: str, *names: str) -> None:
    """Delete the queues (and kqueue's dead-letter queues of them); missing ones are fine."""
    with raw_connection(url) as conn:
        conn.ensure_connection(max_retries=10, interval_start=1, interval_step=1, interval_max=3)
        for name in names:
            for each in (name, f"{name}.dead"):
                channel = conn.channel()
                try:
                    if hasattr(channel, "_size"):
                        # Kombu's virtual transports (Redis) delete only queues bound on this very
                        # connection: remove the lists (every priority) and the binding directly.
                        channel._delete(each, "", each, "")
                    channel.queue_delete(each)
                except Exception:  # noqa: BLE001 - not there is as good as deleted
                    pass
                finally:
                    try:
                        channel.close()
                    except Exception:  # noqa: BLE001 - a channel the broker closed
                        pass


def remaining(url: str, name: str) -> int:
    with raw_connection(url) as conn:
        return message_count(conn, name)


def bodies(n: int) -> list[bytes]:
    """`n` small task bodies, each with one dot (zero seconds of fake work at --dot-seconds 0)."""
    return [f"task {i}.".encode() for i in range(n)]


class _PeakRss:
    """Samples a child's VmHWM (peak RSS) from /proc until it exits.

    Not wait4's ru_maxrss: Linux carries the pre-exec high-water mark into it,
    so a child forked from this (large) process would report this process's size.
    """

    INTERVAL = 0.02

    def __init__(self, pid: int) -> None:
        self.path = Path(f"/proc/{pid}/status")
        self.kb = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            try:
                for line in self.path.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.kb = max(self.kb, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            if self._done.wait(self.INTERVAL):
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


@dataclass(frozen=True)
class Run:
    """A finished child process: wall time, exit status and its own resource usage."""

    seconds: float
    returncode: int
    maxrss_mb: float
    cpu_seconds: float
    stdout: str
    stderr: str


def run_timed(argv: Sequence[str], *, timeout: float = 900, env: dict[str, str] | None = None) -> Run:
    """Run `argv` to completion; wall time from start to exit, rusage of this very child (wait4).

    Standard output and error go to temporary files, so a chatty child is not slowed by a pipe.
    """
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        peak = _PeakRss(proc.pid)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
            peak.stop()
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(
            seconds=seconds,
            returncode=proc.returncode,
            maxrss_mb=peak.kb / 1024,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            stdout=out.read().decode(errors="replace")[-4000:],
            stderr=err.read().decode(errors="replace")[-4000:],
        )


def check(run: Run, what: str) -> Run:
    if run.returncode != 0:
        raise RuntimeError(f"{what} exited {run.returncode}:\n{run.stderr[-2000:]}")
    return run
