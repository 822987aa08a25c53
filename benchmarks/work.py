"""Figure 2, work: ``kqueue-work --burst`` on a pre-filled queue against a raw `ConsumerMixin`, both subprocesses."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from benchmarks import plumbing
from benchmarks.core import Config, Figure, Row, Step, Target

N = 100_000
#: Prefetch 1 is slow (a round trip per message): it works N / 5 messages.
P1_DIVISOR = 5


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    prefetch: int
    concurrency: int
    divisor: int
    target: float


SETUPS = [
    Setup("p1", "prefetch 1", 1, 1, P1_DIVISOR, 0.9),
    Setup("p100c1", "prefetch 100 conc 1", 100, 1, 1, 0.85),
    Setup("p100c4", "prefetch 100 conc 4", 100, 4, 1, 0.85),
]


def figure(config: Config) -> Figure:
    starts: dict[str, float] = {}

    def kqueue_argv(name: str, setup: Setup) -> list[str]:
        # --quiet: no line per task, as the raw consumer prints none either
        return plumbing.kqueue_argv(
            "kqueue-work",
            config.url,
            name,
            config.queue_type,
            "--burst",
            "--quiet",
            "--dot-seconds",
            "0",
            "--prefetch",
            str(setup.prefetch),
            "--concurrency",
            str(setup.concurrency),
        )

    def raw_argv(name: str, setup: Setup) -> list[str]:
        return [
            plumbing.PYTHON,
            "-m",
            "benchmarks.raw_consumer",
            "--broker",
            config.url,
            "--queue",
            name,
            "--prefetch",
            str(setup.prefetch),
            "--queue-type",
            config.queue_type,
        ]

    def empty(side: str) -> dict[str, float]:
        name = plumbing.fresh_name("work-empty")
        argv = kqueue_argv(name, SETUPS[0]) if side == "kq" else raw_argv(name, SETUPS[0])
        try:
            plumbing.declare(config.url, plumbing.raw_queue(name, config.queue_type))
            seconds = plumbing.check(plumbing.run_timed(argv), f"{side} worker on an empty queue").seconds
        finally:
            plumbing.delete_queues(config.url, name)
        starts[side] = seconds
        return {f"{side}_empty_s": seconds}

    def work(side: str, setup: Setup) -> dict[str, float]:
        n = config.count(N // setup.divisor)
        name = plumbing.fresh_name(f"work-{setup.key}")
        argv = kqueue_argv(name, setup) if side == "kq" else raw_argv(name, setup)
        try:
            plumbing.prefill(config.url, plumbing.raw_queue(name, config.queue_type), plumbing.bodies(n))
            run = plumbing.check(plumbing.run_timed(argv), f"{side} worker ({setup.label})")
            left = plumbing.remaining(config.url, name)
            if left:
                raise RuntimeError(f"{side} worker ({setup.label}) exited with {left} messages left in {name}")
        finally:
            plumbing.delete_queues(config.url, name)
        key = f"{side}_{setup.key}"
        values = {
            key: n / run.seconds,
            f"{key}_cpu_us": run.cpu_seconds / n * 1e6,
            f"{key}_rss_mb": run.maxrss_mb,
        }
        net = run.seconds - starts[side]
        if net > 0.05 * run.seconds:  # else start-up noise swamps the work: leave it out
            values[f"{key}_net"] = n / net
        return values

    steps = [Step("kqueue-work, empty queue", lambda: empty("kq")), Step("raw, empty queue", lambda: empty("raw"))]
    rows = [Row("work: start-up, empty queue", "s", "kq_empty_s", "raw_empty_s")]
    for setup in SETUPS:
        steps.append(Step(f"kqueue-work {setup.label}", partial(work, "kq", setup)))
        steps.append(Step(f"raw {setup.label}", partial(work, "raw", setup)))
        target = Target("ratio>=", 0.9 if not config.amqp else setup.target)
        rows += [
            Row(f"work: {setup.label}", "msg/s", f"kq_{setup.key}", f"raw_{setup.key}", target),
            Row(f"work: {setup.label} excl. start", "msg/s", f"kq_{setup.key}_net", f"raw_{setup.key}_net", target),
            Row(f"work: {setup.label} CPU/msg", "us", f"kq_{setup.key}_cpu_us", f"raw_{setup.key}_cpu_us"),
        ]
    rows.append(Row("work: peak RSS, prefetch 100 conc 1", "MB", "kq_p100c1_rss_mb", "raw_p100c1_rss_mb"))
    counts = ", ".join(f"{s.label}: {config.count(N // s.divisor)}" for s in SETUPS)
    notes = [
        f"messages per run: {counts}; queue pre-filled by a raw loop, not timed",
        "both workers are subprocesses timed from start to exit; 'excl. start' subtracts the same round's "
        "run on an empty queue; raw = ConsumerMixin acking in its callback (no threads), same prefetch",
    ]
    return Figure("work", steps, rows, notes)
