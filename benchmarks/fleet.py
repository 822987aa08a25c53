"""Figure: ``kqueue-work --processes 2`` against two separate ``kqueue-work``; ``--metrics-port`` against none.

Both pairs drain the same pre-filled queue with ``--burst --quiet`` and a
no-op handler, timed from start to the last exit, interleaved round by round.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence

from benchmarks import plumbing
from benchmarks.core import Config, Figure, Row, Step, Target

#: Messages per run at scale 1.
N = 100_000
PREFETCH = 100


def figure(config: Config) -> Figure:
    n = config.count(N)

    def argv(name: str, *extra: str) -> list[str]:
        return plumbing.burst_worker_argv(config.url, name, config.queue_type, PREFETCH, *extra)

    def drained(key: str, what: str, commands: Sequence[list[str]]) -> dict[str, float]:
        name = plumbing.fresh_name(f"fleet-{key}")
        try:
            plumbing.prefill(config.url, plumbing.raw_queue(name, config.queue_type), plumbing.bodies(n))
            seconds = _run_all([[arg.replace("{queue}", name) for arg in command] for command in commands], what)
            left = plumbing.remaining(config.url, name)
            if left:
                raise RuntimeError(f"{what} exited with {left} messages left in {name}")
        finally:
            plumbing.delete_queues(config.url, name)
        return {key: n / seconds}

    steps = [
        Step(
            "kqueue-work --processes 2",
            lambda: drained("kq_fleet2", "a fleet of 2", [argv("{queue}", "--processes", "2")]),
        ),
        Step("2 x kqueue-work", lambda: drained("two_workers", "two workers", [argv("{queue}"), argv("{queue}")])),
        Step(
            "kqueue-work --metrics-port",
            lambda: drained("kq_metrics", "a worker with metrics", [argv("{queue}", "--metrics-port", "0")]),
        ),
        Step("kqueue-work", lambda: drained("kq_plain", "a worker without metrics", [argv("{queue}")])),
    ]
    rows = [
        Row("fleet: --processes 2 vs 2 workers", "msg/s", "kq_fleet2", "two_workers", Target("ratio>=", 0.95)),
        Row("fleet: --metrics-port vs none, p100", "msg/s", "kq_metrics", "kq_plain", Target("ratio>=", 0.95)),
    ]
    notes = [
        f"{n} messages per run, pre-filled by a raw loop, not timed; prefetch {PREFETCH}, concurrency 1, no-op handler",
        "--processes 2: one parent and its two worker processes, against two kqueue-work started together; "
        "timed from start to the last exit, start-up included",
        "--metrics-port: one worker process counting for Prometheus (nobody scrapes), against the same without",
    ]
    return Figure("fleet", steps, rows, notes)


def _run_all(commands: Sequence[list[str]], what: str, timeout: float = 900) -> float:
    """Start every command at once; seconds until the last one exited (each must exit 0)."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for command in commands
    ]
    failures = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            failures.append(err.decode(errors="replace")[-2000:])
    seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{what} exited non-zero:\n{failures[0]}")
    return seconds
