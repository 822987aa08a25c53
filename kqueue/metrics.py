"""Prometheus metrics and a health check for ``kqueue-work``, for one worker process or a fleet of them.

A worker counts what happens in a `Tally`, as cheaply as the hot path allows:
each handler thread adds to a row of plain numbers of its own (no lock), and
the connection thread keeps the rest. Nothing reaches prometheus_client until
a scrape: `Exposition` turns snapshots of the tallies into metric families
there and then. A lone worker process serves them itself; in a fleet, each
worker process writes its snapshot to a file in a folder the parent owns
(`Reports`), a few times a second and once more as it exits, and the parent
serves the sum: one scrape for the whole fleet.

`/healthz` answers from the same snapshots (`judge`): 200 while every worker
process is connected to the broker and its loop turned within `STALE_AFTER`
seconds, else 503 with the reason in one line.

The snapshots are a side channel: a write that fails (the folder removed, the
disk full) is logged once per `Outage` and tried again at the next report,
never raised into the worker's loop, which would take it for a lost broker.
"""

from __future__ import annotations

import bisect
import contextlib
import importlib.util
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from kqueue.errors import KQueueError, describe
from kqueue.logs import fields

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from kqueue.worker import Task, Worker

__all__ = [
    "BUCKETS",
    "STALE_AFTER",
    "Exposition",
    "Member",
    "MetricsServer",
    "Outage",
    "Reports",
    "Snapshot",
    "SnapshotFile",
    "Tally",
    "judge",
    "metered",
    "require_prometheus",
    "serve_worker",
]

log = logging.getLogger("kqueue.metrics")

#: Upper bounds (seconds) of the handler-duration histogram's buckets; +Inf follows.
BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
#: Seconds since its loop last turned after which a worker process counts as stuck (it turns at least once a second).
STALE_AFTER = 5.0
#: Seconds between the snapshots a fleet's worker process writes for its parent.
REPORT_EVERY = 0.25

# A handler thread's row: counts, then the histogram's buckets (the last one is +Inf).
_RECEIVED, _DONE, _FAILED, _SUM, _LAST = range(5)
_FIRST_BUCKET = 5


def require_prometheus() -> None:
    """Raise `KQueueError` in one line unless prometheus_client is installed.

    Found, not imported: the first scrape imports it, on the server's thread,
    so a worker's start does not wait for it.
    """
    try:
        found = importlib.util.find_spec("prometheus_client") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise KQueueError("--metrics-port needs prometheus_client: pip install 'kqueue[metrics]'")


@dataclass
class Snapshot:
    """What one worker process has counted so far, and how it is now.

    Counters only grow over the life of the process; `running`,
    `retries_waiting`, `connected` and `last_turn` describe it now.
    """

    queue: str
    process: int = 0
    pid: int = 0
    received: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    duration_sum: float = 0.0
    last_finished: float = 0.0
    running: int = 0
    retries_waiting: int = 0
    connected: bool = False
    last_turn: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        return cls(**json.loads(text))

    def plus(self, other: Snapshot) -> Snapshot:
        """The counters of both added up; the gauges are this one's."""
        dead = dict(self.dead_lettered)
        for reason, count in other.dead_lettered.items():
            dead[reason] = dead.get(reason, 0) + count
        return replace(
            self,
            received=self.received + other.received,
            done=self.done + other.done,
            failed=self.failed + other.failed,
            retried=self.retried + other.retried,
            dead_lettered=dead,
            reconnects=self.reconnects + other.reconnects,
            buckets=[a + b for a, b in zip(self.buckets, other.buckets, strict=True)],
            duration_sum=self.duration_sum + other.duration_sum,
            last_finished=max(self.last_finished, other.last_finished),
        )

    def retired(self) -> Snapshot:
        """Its counters alone: what stays of a worker process once it has exited."""
        return Snapshot(queue=self.queue).plus(self)


class Tally:
    """The counts of one worker process, kept where they happen.

    Handler threads each add to a row of their own, so that counting a task
    takes no lock (the GIL makes each store whole); a snapshot adds the rows
    up. The connection thread alone writes the plain attributes.
    """

    def __init__(self, queue: str, process: int = 0) -> None:
        self.queue = queue
        self.process = process
        self._rows: list[list[float]] = []
        self._local = threading.local()
        self._lock = threading.Lock()  # taken once per handler thread, to add its row
        # -- written by the connection thread only
        self.retried = 0
        self.dead_lettered: dict[str, int] = {}
        self.reconnects = 0
        self.connected = False
        self.last_turn = 0.0
        self.retries_waiting = 0

    def _row(self) -> list[float]:
        try:
            row: list[float] = self._local.row
        except AttributeError:
            row = [0] * (_FIRST_BUCKET + len(BUCKETS) + 1)
            with self._lock:
                self._rows.append(row)
            self._local.row = row
        return row

    def started(self) -> None:
        """On a handler thread: a task's handler is about to run."""
        self._row()[_RECEIVED] += 1

    def finished(self, ok: bool, duration: float) -> None:
        """On a handler thread: a task's handler returned (`ok`) or raised, after `duration` seconds."""
        row = self._row()
        row[_DONE if ok else _FAILED] += 1
        row[_SUM] += duration
        row[_FIRST_BUCKET + bisect.bisect_left(BUCKETS, duration)] += 1
        row[_LAST] = time.time()

    def dead_letter(self, reason: str) -> None:
        self.dead_lettered[reason] = self.dead_lettered.get(reason, 0) + 1

    def snapshot(self) -> Snapshot:
        with self._lock:
            rows = list(self._rows)
        # Finished before received: a task that starts and ends while this
        # reads can only make `running` one too high for a moment, never negative.
        done = int(sum(row[_DONE] for row in rows))
        failed = int(sum(row[_FAILED] for row in rows))
        received = int(sum(row[_RECEIVED] for row in rows))
        buckets = [int(sum(row[_FIRST_BUCKET + i] for row in rows)) for i in range(len(BUCKETS) + 1)]
        return Snapshot(
            queue=self.queue,
            process=self.process,
            pid=os.getpid(),
            received=received,
            done=done,
            failed=failed,
            retried=self.retried,
            dead_lettered=dict(self.dead_lettered),
            reconnects=self.reconnects,
            buckets=buckets,
            duration_sum=sum(row[_SUM] for row in rows),
            last_finished=max((row[_LAST] for row in rows), default=0.0),
            running=max(0, received - done - failed),
            retries_waiting=self.retries_waiting,
            connected=self.connected,
            last_turn=self.last_turn,
        )


def metered(base: type[Worker], tally: Tally, report: Callable[[Snapshot], None] | None = None) -> type[Worker]:
    """A subclass of `base` (a `Worker`) that counts into `tally` through the worker's hooks.

    `report`, if given, is called with a fresh snapshot on the connection
    thread every `REPORT_EVERY` seconds while the loop turns, at once when the
    connection comes or goes, and by `close()`. It must not raise: the loop
    would take its error for a lost connection (`Reports.writer` does not).
    """

    class MeteredWorker(base):  # type: ignore[valid-type,misc]
        _next_report = 0.0

        def on_task_start(self, task: Task) -> None:
            tally.started()
            super().on_task_start(task)

        def on_task_done(self, task: Task) -> None:
            tally.finished(task.error is None, task.duration)
            super().on_task_done(task)

        def on_consuming(self, broker: str) -> None:
            tally.connected = True
            tally.last_turn = time.time()
            self._report_now()
            super().on_consuming(broker)

        def on_connection_lost(self, error: BaseException) -> None:
            tally.connected = False
            tally.reconnects += 1
            self._report_now()
            super().on_connection_lost(error)

        def on_retry(self, task: Task, delay: float) -> None:
            tally.retried += 1
            super().on_retry(task, delay)

        def on_dead_letter(self, task: Task, reason: str) -> None:
            tally.dead_letter(reason)
            super().on_dead_letter(task, reason)

        def on_turn(self) -> None:
            now = tally.last_turn = time.time()
            tally.retries_waiting = self.retries_held
            if report is not None and now >= self._next_report:
                self._report_now()
            super().on_turn()

        def _report_now(self) -> None:
            if report is not None:
                self._next_report = time.time() + REPORT_EVERY
                report(tally.snapshot())

        def close(self) -> None:
            super().close()
            tally.connected = False
            tally.retries_waiting = 0
            self._report_now()

    return MeteredWorker


class Outage:
    """A run of failed writes to a side channel: one line as it starts, one more once a write works again.

    Such a write is tried again at its usual pace, so a line per failure
    would flood the log (four a second per worker process); and nothing of
    it reaches the tasks, which go on.

    Parameters:
        what: what failed, after "cannot", e.g. ``write the metrics snapshot to /tmp/x``.
        facts: fields of both lines.
    """

    def __init__(self, what: str, **facts: Any) -> None:
        self.what = what
        self.facts = facts
        self.since: float | None = None  # monotonic time of the first failure of this run

    def failed(self, exc: OSError) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning(
                "cannot %s: %s; tasks go on, and it is tried again",
                self.what,
                exc.strerror or describe(exc),
                extra=fields(**self.facts),
            )

    def worked(self) -> bool:
        """A write worked: whether that ended an outage (and said so)."""
        if self.since is None:
            return False
        log.info("could %s again, after %.1fs", self.what, time.monotonic() - self.since, extra=fields(**self.facts))
        self.since = None
        return True


class Reports:
    """The folder where a fleet's worker processes leave their snapshots for the parent, a file per process.

    A worker process replaces its file whole (write, then rename), so a
    reader never sees half of one. Once a process has exited, the parent
    folds its counters into the retired total and deletes its file, so a
    crash loop leaves no trail of files.

    The parent keeps the last snapshot it read of each live process: while a
    file is missing (its folder was removed, and is being made again) the
    counters it serves stay where they were rather than drop, which
    Prometheus would take for a restart of the counters.
    """

    def __init__(self, path: Path, queue: str) -> None:
        self.path = path
        self.queue = queue
        self._retired = Snapshot(queue=queue)
        self._last: dict[int, tuple[Snapshot, float]] = {}  # pid -> last snapshot read, its file's time
        self._lock = threading.Lock()  # between the parent's loop (retire) and the scrapes (read, gather)

    def writer(self) -> Callable[[Snapshot], None]:
        """For a worker process: a function that writes its snapshot, and never raises (see `SnapshotFile`)."""
        return SnapshotFile(self.path, os.getpid())

    def read(self, pid: int) -> Snapshot | None:
        """The last snapshot of worker process `pid`; None until it wrote one."""
        return self.look(pid)[0]

    def look(self, pid: int) -> tuple[Snapshot | None, float]:
        """Worker process `pid`'s last snapshot, and when it last gave a sign of life (its file's time; 0 if none)."""
        with self._lock:
            return self._look(pid)

    def _look(self, pid: int) -> tuple[Snapshot | None, float]:
        try:
            with (self.path / f"{pid}.json").open(encoding="utf-8") as file:
                seen = os.fstat(file.fileno()).st_mtime
                snapshot = Snapshot.from_json(file.read())
        except (OSError, ValueError, TypeError):  # not written yet, or its folder is gone for a moment
            return self._last.get(pid, (None, 0.0))
        self._last[pid] = (snapshot, seen)
        return snapshot, seen

    def retire(self, pid: int) -> None:
        """For the parent, once worker process `pid` has exited: keep its counters, drop its file."""
        with self._lock:
            last, _ = self._look(pid)
            self._last.pop(pid, None)
            if last is not None:
                self._retired = self._retired.plus(last)
            for leftover in (self.path / f"{pid}.json", self.path / f".{pid}.json.tmp"):
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)

    def gather(self, pids: Iterable[int]) -> tuple[Snapshot, list[Snapshot]]:
        """The retired counters, and the snapshots of the live processes `pids` that have written one."""
        with self._lock:
            live = [snapshot for pid in pids if (snapshot := self._look(pid)[0]) is not None]
            return self._retired, live


class SnapshotFile:
    """A worker process's file in a fleet's folder: called with a snapshot, it writes it there.

    A write that fails is logged once per `Outage` and tried again at the next
    report; it never raises into the worker's loop. The folder belongs to the
    parent, which makes it again if it was removed: a worker process that did
    so itself could, orphaned, bring back a folder that nobody owns.

    While writes fail, the file is still touched where it stands, a sign of
    life that needs no room on a full disk: the parent can tell a worker
    process that turns but cannot write from one that is stuck (see `judge`).
    """

    def __init__(self, folder: Path, pid: int) -> None:
        self.path = folder / f"{pid}.json"
        self._partial = folder / f".{pid}.json.tmp"
        self._outage = Outage(f"write the metrics snapshot to {folder}", pid=pid)

    def __call__(self, snapshot: Snapshot) -> None:
        try:
            self._partial.write_text(snapshot.to_json(), encoding="utf-8")
            os.replace(self._partial, self.path)
        except OSError as exc:
            self._outage.failed(exc)
            with contextlib.suppress(OSError):
                self._partial.unlink(missing_ok=True)  # so as not to keep what room it got
            with contextlib.suppress(OSError):
                os.utime(self.path)
        else:
            self._outage.worked()


@dataclass(frozen=True)
class Member:
    """A worker process as the health check sees it: its slot, its pid if it runs, its last snapshot.

    `seen` is when it last gave a sign of life (its snapshot file's time), 0
    if unknown: later than the snapshot's last turn when it cannot write.
    """

    process: int
    pid: int | None
    snapshot: Snapshot | None = None
    note: str = ""
    seen: float = 0.0


def judge(members: Sequence[Member], now: float, stale_after: float = STALE_AFTER) -> tuple[bool, str]:
    """Whether every worker process is connected and turning; the reason in one line.

    A worker process that turns (its file was touched lately) but cannot
    write its snapshot (a full disk) counts as healthy: its tasks go on, and
    a restart would not give it room. The line then says which process's
    connection is only known as of its last snapshot, and how old that is.
    """
    mute: list[str] = []
    for member in members:
        trouble = _trouble(member, now, stale_after)
        if trouble is not None:
            return False, trouble
        age = now - member.snapshot.last_turn if member.snapshot is not None else 0.0
        if age > stale_after:
            mute.append(
                f"{_name(member)} cannot write its metrics snapshot: its loop turns, "
                f"and it was last known connected {age:.1f}s ago"
            )
    count = len(members)
    line = f"ok: {count} worker process{'' if count == 1 else 'es'} connected and turning"
    return True, "; ".join([line, *mute])


def _trouble(member: Member, now: float, stale_after: float) -> str | None:
    """Why `member` is not healthy, or None."""
    if member.pid is None:
        return f"{_name(member)} is not running{f' ({member.note})' if member.note else ''}"
    snapshot = member.snapshot
    if snapshot is None:
        return f"{_name(member)} has not started consuming yet"
    if not snapshot.connected:
        return f"{_name(member)} is not connected to the broker"
    age = now - snapshot.last_turn
    if age > stale_after and now - member.seen > stale_after:
        return f"{_name(member)} is stuck: its loop last turned {age:.1f}s ago"
    return None


def _name(member: Member) -> str:
    name = f"worker process {member.process}"
    return name if member.pid is None else f"{name} (pid {member.pid})"


class Exposition:
    """A prometheus_client collector: the metric families of a worker process or of a fleet, made at each scrape.

    Parameters:
        queue: the queue's name, every metric's `queue` label.
        gather: returns the retired counters (None for a lone process) and the live snapshots.
        restarts: worker processes replaced so far (0 for a lone process).
    """

    def __init__(
        self,
        queue: str,
        gather: Callable[[], tuple[Snapshot | None, list[Snapshot]]],
        restarts: Callable[[], int] = lambda: 0,
    ) -> None:
        self.queue = queue
        self._gather = gather
        self._restarts = restarts

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        retired, live = self._gather()
        total = Snapshot(queue=self.queue)
        for snapshot in [*([retired] if retired is not None else []), *live]:
            total = total.plus(snapshot)
        for name, doc, value in [
            ("kqueue_tasks_received", "Tasks whose handler started.", total.received),
            ("kqueue_tasks_done", "Tasks whose handler returned.", total.done),
            ("kqueue_tasks_failed", "Tasks whose handler raised.", total.failed),
            ("kqueue_tasks_retried", "Failed tasks sent back to the queue for another attempt.", total.retried),
            ("kqueue_broker_reconnects", "Times the connection to the broker was lost.", total.reconnects),
            ("kqueue_worker_process_restarts", "Worker processes that died and were replaced.", self._restarts()),
        ]:
            yield self._family(CounterMetricFamily, name, doc, value)
        dead = CounterMetricFamily(
            "kqueue_tasks_dead_lettered", "Tasks sent to the dead-letter queue, by reason.", labels=["queue", "reason"]
        )
        for reason, count in sorted(total.dead_lettered.items()):
            dead.add_metric([self.queue, reason], count)
        yield dead
        yield self._histogram(total)
        for name, doc, level in [
            ("kqueue_tasks_running", "Tasks whose handler is running now.", sum(s.running for s in live)),
            ("kqueue_retries_waiting", "Retries held until their time.", sum(s.retries_waiting for s in live)),
            ("kqueue_last_task_finished_timestamp_seconds", "When a handler last finished.", total.last_finished),
            ("kqueue_worker_processes", "Worker processes running and reporting.", len(live)),
        ]:
            yield self._family(GaugeMetricFamily, name, doc, level)
        yield from self._per_process(GaugeMetricFamily, sorted(live, key=lambda s: s.process))

    def _family(self, kind: Any, name: str, doc: str, value: float) -> Metric:
        family = kind(name, doc, labels=["queue"])
        family.add_metric([self.queue], value)
        return family  # type: ignore[no-any-return]

    def _per_process(self, kind: Any, live: list[Snapshot]) -> Iterator[Metric]:
        """What the health check looks at, by worker process (0 to N-1, the same across restarts)."""
        connected = kind("kqueue_broker_connected", "1 while connected to the broker.", labels=["queue", "process"])
        turned = kind(
            "kqueue_worker_last_turn_timestamp_seconds",
            "When the worker loop last turned; it turns at least once a second.",
            labels=["queue", "process"],
        )
        for snapshot in live:
            connected.add_metric([self.queue, str(snapshot.process)], 1.0 if snapshot.connected else 0.0)
            turned.add_metric([self.queue, str(snapshot.process)], snapshot.last_turn)
        yield connected
        yield turned

    def _histogram(self, total: Snapshot) -> Metric:
        from prometheus_client.core import HistogramMetricFamily

        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip([*map(_float_label, BUCKETS), "+Inf"], total.buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family = HistogramMetricFamily(
            "kqueue_task_duration_seconds", "How long handlers ran, successful or not.", labels=["queue"]
        )
        family.add_metric([self.queue], buckets, total.duration_sum)
        return family


def _float_label(bound: float) -> str:
    return repr(float(bound))


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """A scrape every few seconds is not worth a log line."""


class MetricsServer:
    """Serves ``/metrics`` (Prometheus text format) and ``/healthz`` over HTTP on a thread of its own.

    Raises:
        KQueueError: prometheus_client is missing, or the port cannot be bound.
    """

    def __init__(self, port: int, exposition: Exposition, health: Callable[[], tuple[bool, str]]) -> None:
        require_prometheus()
        self._exposition = exposition
        self._metrics: Callable[..., Iterable[bytes]] | None = None  # made at the first scrape
        self._health = health
        try:
            self._server = make_server("", port, self._app, server_class=_Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise KQueueError(f"cannot serve metrics on port {port}: {exc.strerror or exc}") from None
        self.port: int = self._server.server_address[1]
        # Polled every 0.1 s for a shutdown (the default 0.5 s would hold up a worker's exit).
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="kqueue-metrics", daemon=True
        )
        self._thread.start()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/healthz":
            ok, reason = self._health()
            return _text(start_response, "200 OK" if ok else "503 Service Unavailable", reason)
        if path in ("/", "/metrics"):
            if self._metrics is None:
                from prometheus_client import CollectorRegistry, make_wsgi_app

                registry = CollectorRegistry()
                registry.register(self._exposition)
                self._metrics = make_wsgi_app(registry)
            return self._metrics(environ, start_response)
        return _text(start_response, "404 Not Found", "not found: try /metrics or /healthz")

    def close(self) -> None:
        # shutdown() waits for the serving loop's next poll; a connection of
        # our own wakes it at once, so a worker's exit is not held up.
        stopper = threading.Thread(target=self._server.shutdown, name="kqueue-metrics-stop", daemon=True)
        stopper.start()
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        stopper.join(5)
        self._server.server_close()
        self._thread.join(5)


def _text(start_response: Callable[..., Any], status: str, line: str) -> list[bytes]:
    body = (line + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]


def serve_worker(port: int, tally: Tally) -> MetricsServer:
    """Serve the metrics and health of this one worker process, read from its tally at each request."""

    def gather() -> tuple[Snapshot | None, list[Snapshot]]:
        return None, [tally.snapshot()]

    def health() -> tuple[bool, str]:
        return judge([Member(tally.process, os.getpid(), tally.snapshot())], time.time())

    return MetricsServer(port, Exposition(tally.queue, gather), health)
