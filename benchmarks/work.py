"""Figure 2, work: ``kqueue-work --burst`` on a pre-filled queue against a raw `ConsumerMixin`, both subprocesses."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from benchmarks import embedded, plain_sqlite, plumbing
from benchmarks.core import Config, Figure, Row, Step, Target
from kqueue.brokers import mask

N = 100_000
#: Prefetch 1 is slow (a round trip per message): it works N / 5 messages.
P1_DIVISOR = 5
#: Messages the raw Kombu baseline works on ``sqla+sqlite://`` (a few hundred a second), at every prefetch.
N_SQLA = 2_000
#: On sqlite://: kqueue against sqla+sqlite (times) and against kqueue on RabbitMQ in the same run (ratio).
SQLA_TARGET = Target("ratio>=", 10.0)
REFERENCE_TARGET = Target("ratio>=", 0.5)


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    prefetch: int
    concurrency: int
    divisor: int
    target: float
    short: str


SETUPS = [
    Setup("p1", "prefetch 1", 1, 1, P1_DIVISOR, 0.95, "p1"),
    Setup("p100c1", "prefetch 100 conc 1", 100, 1, 1, 0.85, "p100 c1"),
    Setup("p100c4", "prefetch 100 conc 4", 100, 4, 1, 0.85, "p100 c4"),
]


def figure(config: Config) -> Figure:
    starts: dict[str, float] = {}
    start_cpu: dict[str, float] = {}

    urls = {"kq": config.url, "raw": config.baseline, "ref": config.reference_url or config.url}

    def kqueue_argv(name: str, setup: Setup, url: str = config.url) -> list[str]:
        concurrency = ("--concurrency", str(setup.concurrency))
        return plumbing.burst_worker_argv(url, name, config.queue_type, setup.prefetch, *concurrency)

    def raw_argv(name: str, setup: Setup) -> list[str]:
        return [
            plumbing.PYTHON,
            "-m",
            "benchmarks.raw_consumer",
            "--broker",
            config.baseline,
            "--queue",
            name,
            "--prefetch",
            str(setup.prefetch),
            "--queue-type",
            config.queue_type,
        ]

    def argv_of(side: str, name: str, setup: Setup) -> list[str]:
        return raw_argv(name, setup) if side == "raw" else kqueue_argv(name, setup, urls[side])

    def count(side: str, setup: Setup) -> int:
        if side == "raw" and plumbing.is_sqla_url(config.baseline):
            return config.count(N_SQLA)
        return config.count(N // setup.divisor)

    def empty(side: str) -> dict[str, float]:
        name = plumbing.fresh_name("work-empty")
        url = urls[side]
        try:
            plumbing.declare(url, plumbing.raw_queue(name, config.queue_type))
            run = plumbing.run_timed(argv_of(side, name, SETUPS[0]))
            seconds = plumbing.check(run, f"{side} worker on an empty queue").seconds
        finally:
            plumbing.delete_queues(url, name)
        starts[side] = seconds
        start_cpu[side] = run.cpu_seconds
        return {f"{side}_empty_s": seconds}

    def work(side: str, setup: Setup) -> dict[str, float]:
        n = count(side, setup)
        url = urls[side]
        name = plumbing.fresh_name(f"work-{setup.key}")
        try:
            plumbing.prefill(url, plumbing.raw_queue(name, config.queue_type), plumbing.bodies(n))
            run = plumbing.check(plumbing.run_timed(argv_of(side, name, setup)), f"{side} worker ({setup.label})")
            left = plumbing.remaining(url, name)
            if left:
                raise RuntimeError(f"{side} worker ({setup.label}) exited with {left} messages left in {name}")
        finally:
            plumbing.delete_queues(url, name)
        key = f"{side}_{setup.key}"
        values = {
            key: n / run.seconds,
            f"{key}_cpu_us": run.cpu_seconds / n * 1e6,
            f"{key}_rss_mb": run.maxrss_mb,
        }
        net = run.seconds - starts[side]
        if net > 0.05 * run.seconds:  # else start-up noise swamps the work: leave it out
            values[f"{key}_net"] = n / net
            values[f"{key}_cpu_net_us"] = (run.cpu_seconds - start_cpu[side]) / n * 1e6
        return values

    def plain(prefetch: int) -> dict[str, float]:
        assert config.plain_db is not None
        texts = [body.decode() for body in plumbing.bodies(config.count(N // (P1_DIVISOR if prefetch == 1 else 1)))]
        return {f"plain_p{prefetch}": len(texts) / plain_sqlite.work(Path(config.plain_db), texts, prefetch)}

    def embedded_run(side: str, action: str) -> dict[str, float]:
        """Huey or persist-queue draining (or enqueueing) as many tasks as kqueue-work does at prefetch 1."""
        assert config.plain_db is not None
        n = count("kq", SETUPS[0])
        path = str(Path(config.plain_db).with_name(f"{side}.db"))
        for leftover in Path(path).parent.glob(f"{side}.db*"):  # persist-queue's is a folder
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        command = [plumbing.PYTHON, "-m", "benchmarks.embedded", side]
        if action == "drain":
            plumbing.check(plumbing.run_timed([*command, "fill", path, str(n)]), f"{side}: filling")
        run = plumbing.check(plumbing.run_timed([*command, action, path, str(n)]), f"{side} {action}")
        return {f"{side}_{action}": n / run.seconds}

    def kq_send() -> dict[str, float]:
        """kqueue-send --file of as many tasks, whole process, as the embedded queues' enqueues are timed."""
        assert config.plain_db is not None
        n = count("kq", SETUPS[0])
        lines = Path(config.plain_db).with_name("tasks.txt")
        lines.write_text("".join(f"task {index}\n" for index in range(n)))
        name = plumbing.fresh_name("work-send")
        try:
            argv = plumbing.kqueue_argv("kqueue-send", config.url, name, config.queue_type, "--file", str(lines))
            run = plumbing.check(plumbing.run_timed(argv), "kqueue-send --file")
        finally:
            plumbing.delete_queues(config.url, name)
        return {"kq_send": n / run.seconds}

    if config.sqlite:
        figure = _sqlite_figure(config, empty, work, plain, count)
        sides = embedded.available()
        names = {"huey": "Huey SqliteHuey consumer (-w 1, fsync)", "persist": "persist-queue SQLiteAckQueue"}
        if sides:
            figure.steps.append(Step("kqueue-send --file", kq_send))
        for side in sides:
            figure.steps += [
                Step(f"{names[side]}, drain", partial(embedded_run, side, "drain")),
                Step(f"{names[side]}, enqueue", partial(embedded_run, side, "send")),
            ]
            target = Target("ratio>=", 1.2) if side == "huey" else None
            short = "Huey" if side == "huey" else "persist-queue"
            figure.rows += [
                Row(f"work: p1 vs {short} (whole process)", "msg/s", "kq_p1", f"{side}_drain", target),
                Row(f"send: kqueue-send --file vs {short}", "msg/s", "kq_send", f"{side}_send"),
            ]
        figure.notes.append(
            f"embedded queues (whole process, {count('kq', SETUPS[0])} no-op tasks): Huey's consumer, one worker "
            "thread, fsync=True, deletes a task as it dequeues it; persist-queue's SQLiteAckQueue keeps it until "
            "the ack, as kqueue does; each commits every enqueue, where kqueue-send commits 500 at a time"
            if sides
            else "Huey and persist-queue baselines: pip install -e '.[bench]'"
        )
        return figure
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


def _sqlite_figure(
    config: Config,
    empty: Callable[[str], dict[str, float]],
    work: Callable[[str, Setup], dict[str, float]],
    plain: Callable[[int], dict[str, float]],
    count: Callable[[str, Setup], int],
) -> Figure:
    """On sqlite://: kqueue-work beside raw Kombu on sqla+sqlite, a plain sqlite3 loop, and kqueue on RabbitMQ."""
    sides = ["kq", "raw"] + (["ref"] if config.reference_url else [])
    names = {"kq": "kqueue-work", "raw": "raw sqla+sqlite", "ref": "kqueue-work on RabbitMQ"}
    steps = [Step(f"{names[side]}, empty queue", partial(empty, side)) for side in sides]
    rows = [
        Row("work: start-up, empty queue, vs sqla", "s", "kq_empty_s", "raw_empty_s"),
    ]
    for setup in SETUPS:
        steps += [Step(f"{names[side]} {setup.label}", partial(work, side, setup)) for side in sides]
        if setup.concurrency == 1:
            steps.append(Step(f"plain sqlite3, {setup.prefetch} a claim", partial(plain, setup.prefetch)))
        key, short = setup.key, setup.short
        rows.append(Row(f"work: {short} excl. start vs sqla", "msg/s", f"kq_{key}_net", f"raw_{key}_net", SQLA_TARGET))
        if config.reference_url:
            label = f"work: {short} vs kqueue on RabbitMQ"
            rows.append(Row(label, "msg/s", f"kq_{key}", f"ref_{key}", REFERENCE_TARGET))
        rows += [
            Row(f"work: {short} excl. start vs sqlite3", "msg/s", f"kq_{key}_net", f"plain_p{setup.prefetch}"),
            Row(f"work: {short} net CPU/msg vs sqla", "us", f"kq_{key}_cpu_net_us", f"raw_{key}_cpu_net_us"),
        ]
    rows.append(Row("work: peak RSS, p100 c1, vs sqla", "MB", "kq_p100c1_rss_mb", "raw_p100c1_rss_mb"))
    counts = ", ".join(f"{s.label}: {count('kq', s)} (sqla+sqlite {count('raw', s)})" for s in SETUPS)
    notes = [
        f"messages per run: {counts}; queues pre-filled by a raw loop, not timed",
        "workers are subprocesses timed from start to exit; 'excl. start' subtracts the same round's run on an "
        "empty queue (the sqla+sqlite runs are short: their start-up would swamp them); raw = ConsumerMixin "
        "acking in its callback, same prefetch, on sqla+sqlite",
        "plain = sqlite3 in this process: claim N rows (UPDATE ... SET owner ... RETURNING), delete them with the "
        "next claim; N = the prefetch (the ceiling: no Kombu, no subprocess)",
    ]
    if config.reference_url:
        notes.append(f"RabbitMQ = the same kqueue-work, same N, on {mask(config.reference_url)}")
    return Figure("work", steps, rows, notes)
