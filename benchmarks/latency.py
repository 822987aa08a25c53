"""Figure 3, latency: send to handler start on an idle worker, in-process, kqueue against a raw `ConsumerMixin`."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from kombu import Connection
from kombu.mixins import ConsumerMixin

from benchmarks import plumbing
from benchmarks.core import Config, Figure, Row, Step, Target
from kqueue.brokers import connect
from kqueue.producer import Sender
from kqueue.queues import QueueType, task_queue
from kqueue.worker import Worker, WorkerSettings

SAMPLES = 200
TARGET = Target("kqueue<=", 2.0)
#: On sqlite:// every send is a commit with fsync before the worker can see it.
SQLITE_TARGET = Target("kqueue<=", 5.0)
#: The raw consumer on memory:// gets the polling interval kqueue sets (Kombu's default of 1 s means ~500 ms).
#: Seconds between a task being handled and the next send, so the worker is idle again.
PAUSE = 0.005


class _Clock:
    """Handler side: records when each task's handler started."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.event = threading.Event()

    def handle(self, text: str) -> None:
        self.started[text] = time.perf_counter()
        self.event.set()


class _RawWorker(ConsumerMixin):  # type: ignore[misc]
    def __init__(self, connection: Connection, name: str, clock: _Clock) -> None:
        self.connection = connection
        self.queue = plumbing.raw_queue(name)
        self.clock = clock

    def get_consumers(self, Consumer: Any, channel: Any) -> list[Any]:
        return [Consumer([self.queue], callbacks=[self.on_message], accept=["text/plain"], prefetch_count=1)]

    def on_message(self, body: Any, message: Any) -> None:
        self.clock.handle(body if isinstance(body, str) else body.decode())
        message.ack()


class _ReadyWorker(Worker):
    """A kqueue worker that says when it consumes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consuming = threading.Event()

    def on_consume_ready(self, *args: Any, **kwargs: Any) -> None:
        super().on_consume_ready(*args, **kwargs)
        self.consuming.set()


def _measure(samples: int, send: Callable[[str], None], clock: _Clock, ready: Callable[[], bool]) -> float:
    """Median milliseconds from just before a send to its handler's start."""
    deadline = time.monotonic() + 30
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError("worker did not start consuming within 30 s")
        time.sleep(0.01)
    time.sleep(0.2)
    latencies = []
    for i in range(samples):
        text = f"latency {i}"
        clock.event.clear()
        sent = time.perf_counter()
        send(text)
        if not clock.event.wait(10):
            raise RuntimeError(f"task {text!r} was not handled within 10 s")
        while text not in clock.started:  # the event may be an earlier task's
            clock.event.clear()
            if not clock.event.wait(10):
                raise RuntimeError(f"task {text!r} was not handled within 10 s")
        latencies.append((clock.started[text] - sent) * 1000)
        time.sleep(PAUSE)
    return statistics.median(latencies)


def kqueue_latency(url: str, samples: int) -> float:
    name = plumbing.fresh_name("latency-kq")
    queue = task_queue(name, QueueType.CLASSIC)
    clock = _Clock()
    worker = _ReadyWorker(connect(url), queue, clock.handle, WorkerSettings())
    thread = threading.Thread(target=worker.run, daemon=True)
    with connect(url) as conn:
        sender = Sender(conn, queue)
        sender.send_many([])  # declares the queue before the worker consumes it
        thread.start()
        try:
            return _measure(samples, sender.send, clock, worker.consuming.is_set)
        finally:
            worker.stop(now=True)
            thread.join(10)
            worker.close()
            sender.close()
            if not url.startswith("memory"):
                plumbing.delete_queues(url, name)


def raw_latency(url: str, samples: int) -> float:
    name = plumbing.fresh_name("latency-raw")
    memory = url.startswith("memory")
    url = "memory://localhost//" if memory else url  # Kombu warns about memory:// without a host
    clock = _Clock()
    consuming = threading.Event()
    worker = _RawWorker(plumbing.idle_connection(url), name, clock)
    worker.on_consume_ready = lambda *args, **kwargs: consuming.set()
    thread = threading.Thread(target=worker.run, daemon=True)
    with plumbing.idle_connection(url) as conn:
        channel = conn.channel()
        worker.queue(channel).declare()
        publish = plumbing.raw_publisher(channel, name)

        def send(text: str) -> None:
            publish(text.encode())

        thread.start()
        try:
            return _measure(samples, send, clock, consuming.is_set)
        finally:
            worker.should_stop = True
            thread.join(10)
            if not memory:
                plumbing.delete_queues(url, name)


def figure(config: Config) -> Figure:
    samples = config.count(SAMPLES, least=20)
    steps = [
        Step("kqueue, broker", lambda: {"kq_broker_ms": kqueue_latency(config.url, samples)}),
        Step("raw, broker", lambda: {"raw_broker_ms": raw_latency(config.baseline, samples)}),
        Step("kqueue, memory://", lambda: {"kq_memory_ms": kqueue_latency("memory://", samples)}),
        Step("raw, memory://", lambda: {"raw_memory_ms": raw_latency("memory://", samples)}),
    ]
    broker = Row("latency: broker, median", "ms", "kq_broker_ms", "raw_broker_ms", TARGET)
    if config.sqlite:
        broker = Row("latency: sqlite:// vs sqla, median", "ms", "kq_broker_ms", "raw_broker_ms", SQLITE_TARGET)
    rows = [
        broker,
        Row("latency: memory://, median", "ms", "kq_memory_ms", "raw_memory_ms", TARGET),
    ]
    notes = [
        f"{samples} tasks one at a time per run, {PAUSE * 1000:.0f} ms apart; each run's value is its median; "
        "kqueue sends with Sender.send (confirmed), raw with Producer.publish",
        f"raw memory:// uses transport_options {plumbing.MEMORY_OPTIONS} like kqueue's connect()",
    ]
    if config.sqlite:
        notes.append(
            f"sqlite://: kqueue's send is a commit with fsync; raw = ConsumerMixin on sqla+sqlite polling every "
            f"{plumbing.SQLA_POLLING_INTERVAL:g} s (Kombu's default 1 s would mean ~500 ms)"
        )
    return Figure("latency", steps, rows, notes)
