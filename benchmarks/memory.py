"""Figure 4, memory: peak RSS (VmHWM) of a ``kqueue-work --burst`` process after 1,000 and after 100,000 tasks."""

from __future__ import annotations

from benchmarks import plumbing
from benchmarks.core import Config, Figure, Row, Step, Target

SMALL, LARGE = 1_000, 100_000
TARGET = Target("diff<=", 5.0)
PREFETCH = 100


def figure(config: Config) -> Figure:
    small, large = config.count(SMALL), config.count(LARGE)

    def peak(n: int, key: str) -> dict[str, float]:
        name = plumbing.fresh_name("memory")
        argv = plumbing.kqueue_argv(
            "kqueue-work",
            config.url,
            name,
            config.queue_type,
            "--burst",
            "--dot-seconds",
            "0",
            "--prefetch",
            str(PREFETCH),
        )
        try:
            plumbing.prefill(config.url, plumbing.raw_queue(name, config.queue_type), plumbing.bodies(n))
            run = plumbing.check(plumbing.run_timed(argv), f"kqueue-work on {n} tasks")
        finally:
            plumbing.delete_queues(config.url, name)
        return {key: run.maxrss_mb}

    steps = [
        Step(f"kqueue-work, {small} tasks", lambda: peak(small, "rss_small_mb")),
        Step(f"kqueue-work, {large} tasks", lambda: peak(large, "rss_large_mb")),
    ]
    rows = [Row(f"memory: peak RSS {large} vs {small} tasks", "MB", "rss_large_mb", "rss_small_mb", TARGET)]
    notes = [
        f"peak RSS (VmHWM sampled from /proc every 20 ms) of each kqueue-work child; --prefetch {PREFETCH}; "
        f"the 'baseline' column is the {small}-task run, the target is on the difference"
    ]
    return Figure("memory", steps, rows, notes)
