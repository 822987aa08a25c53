"""Figure 3b, idle CPU: an idle worker on memory:// in a subprocess, as % of one core.

``python -m benchmarks.idle kqueue|raw [--seconds S]`` prints the percentage.
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


class _RawIdle(ConsumerMixin):  # type: ignore[misc]
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.queue = plumbing.raw_queue(plumbing.fresh_name("idle-raw"))

    def get_consumers(self, Consumer: Any, channel: Any) -> list[Any]:
        return [Consumer([self.queue], callbacks=[lambda body, message: message.ack()], prefetch_count=1)]


def _start(impl: str) -> None:
    if impl == "kqueue":
        from kqueue.brokers import connect
        from kqueue.queues import task_queue
        from kqueue.worker import Worker

        worker: Any = Worker(connect("memory://"), task_queue(plumbing.fresh_name("idle-kq")), print)
    else:
        worker = _RawIdle(Connection("memory://localhost//", transport_options=plumbing.MEMORY_OPTIONS))
    threading.Thread(target=worker.run, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idle")
    parser.add_argument("impl", choices=["kqueue", "raw"])
    parser.add_argument("--seconds", type=float, default=SECONDS)
    args = parser.parse_args()
    _start(args.impl)
    time.sleep(0.5)  # let it settle into its idle loop
    cpu, wall = time.process_time(), time.perf_counter()
    time.sleep(args.seconds)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{cpu / wall * 100:.3f}")


def _measure(impl: str, seconds: float) -> float:
    run = plumbing.check(
        plumbing.run_timed([plumbing.PYTHON, "-m", "benchmarks.idle", impl, "--seconds", str(seconds)]),
        f"idle {impl}",
    )
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
    return Figure("idle", steps, rows, notes)


if __name__ == "__main__":
    main()
