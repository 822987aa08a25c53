"""Figure 3b, idle CPU: an idle worker on memory:// (and on sqlite://) in a subprocess, as % of one core.

``python -m benchmarks.idle kqueue|raw [--seconds S] [--broker URL]`` prints the percentage.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from kombu import Connection
from kombu.mixins import ConsumerMixin

from benchmarks import plumbing
from benchmarks.core import Config, Figure, Row, Step, Target

SECONDS = 3.0
TARGET = Target("kqueue<=", 5.0)
#: sqlite:// waits on a socket that commits write to, where memory:// has to poll.
SQLITE_TARGET = Target("kqueue<=", 2.0)


class _RawIdle(ConsumerMixin):  # type: ignore[misc]
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.queue = plumbing.raw_queue(plumbing.fresh_name("idle-raw"))

    def get_consumers(self, Consumer: Any, channel: Any) -> list[Any]:
        return [Consumer([self.queue], callbacks=[lambda body, message: message.ack()], prefetch_count=1)]


def _start(impl: str, url: str) -> None:
    if impl == "kqueue":
        from kqueue.brokers import connect
        from kqueue.queues import task_queue
        from kqueue.worker import Worker

        worker: Any = Worker(connect(url), task_queue(plumbing.fresh_name("idle-kq")), print)
    else:
        worker = _RawIdle(plumbing.idle_connection(url))
    threading.Thread(target=worker.run, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idle")
    parser.add_argument("impl", choices=["kqueue", "raw"])
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--broker", default="memory://")
    args = parser.parse_args()
    _start(args.impl, args.broker)
    time.sleep(0.5)  # let it settle into its idle loop
    cpu, wall = time.process_time(), time.perf_counter()
    time.sleep(args.seconds)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{cpu / wall * 100:.3f}")


def _measure(impl: str, seconds: float, url: str = "memory://") -> float:
    argv = [plumbing.PYTHON, "-m", "benchmarks.idle", impl, "--seconds", str(seconds), "--broker", url]
    run = plumbing.check(plumbing.run_timed(argv), f"idle {impl}")
    return float(run.stdout.strip().splitlines()[-1])


def figure(config: Config) -> Figure:
    seconds = SECONDS if config.scale >= 0.1 else 0.5
    steps = [
        Step("kqueue idle", lambda: {"kq_idle_pct": _measure("kqueue", seconds)}),
        Step("raw idle", lambda: {"raw_idle_pct": _measure("raw", seconds)}),
    ]
    rows = [Row("idle CPU: memory:// worker", "%core", "kq_idle_pct", "raw_idle_pct", TARGET)]
    notes = [
        f"time.process_time over {seconds:g} s of an idle worker thread in a subprocess, after 0.5 s to settle; "
        f"raw = ConsumerMixin with transport_options {plumbing.MEMORY_OPTIONS} (kqueue's memory:// setting)"
    ]
    if config.sqlite:
        steps += [
            Step("kqueue idle, sqlite://", lambda: {"kq_sqlite_idle_pct": _measure("kqueue", seconds, config.url)}),
            Step("raw idle, sqla+sqlite", lambda: {"raw_sqla_idle_pct": _measure("raw", seconds, config.baseline)}),
        ]
        label = "idle CPU: sqlite:// worker vs sqla"
        rows.append(Row(label, "%core", "kq_sqlite_idle_pct", "raw_sqla_idle_pct", SQLITE_TARGET))
        every = plumbing.SQLA_POLLING_INTERVAL
        notes.append(f"sqlite://: raw = ConsumerMixin on sqla+sqlite polling every {every:g} s")
    return Figure("idle", steps, rows, notes)


if __name__ == "__main__":
    main()
