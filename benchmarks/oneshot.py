"""Figure 5, one-shot CLI cost: ``kqueue-send "hello."`` against a raw publish in ``python -c``."""

from __future__ import annotations

import math

from benchmarks import plumbing
from benchmarks.core import Config, Figure, Row, Step, Target

REPETITIONS = 10
TARGET = Target("ratio<=", 1.3)

RAW = """
import sys, kombu, click
url, name, confirm = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
queue = kombu.Queue(name, kombu.Exchange(""), routing_key=name, durable=True)
options = {"confirm_publish": True} if confirm else None
with kombu.Connection(url, transport_options=options) as conn:
    channel = conn.channel()
    queue(channel).declare()
    kombu.Producer(channel, exchange=kombu.Exchange(""), auto_declare=False).publish(
        b"hello.", routing_key=name, delivery_mode=2, content_type="text/plain", content_encoding="utf-8"
    )
print(" [x] Sent 'hello.'")
"""
#: The same on kqueue's sqlite:// transport: Kombu finds it only once kqueue.sqlite is imported.
RAW_SQLITE = "import kqueue.sqlite" + RAW


def figure(config: Config, rounds: int) -> Figure:
    name = plumbing.fresh_name("oneshot")
    kq_argv = [plumbing.tool("kqueue-send"), "--broker", config.url, "--queue", name, "hello."]
    raw_argv = [plumbing.PYTHON, "-c", RAW, config.baseline, name, "1" if config.amqp else "0"]
    raw_sqlite_argv = [plumbing.PYTHON, "-c", RAW_SQLITE, config.url, name, "0"]

    def once(argv: list[str], key: str) -> dict[str, float]:
        return {key: plumbing.check(plumbing.run_timed(argv), key).seconds * 1000}

    repetitions = max(1, math.ceil(REPETITIONS / rounds))
    steps = []
    for _ in range(repetitions):
        steps.append(Step("kqueue-send hello.", lambda: once(kq_argv, "kq_oneshot_ms")))
        steps.append(Step("python -c raw publish", lambda: once(raw_argv, "raw_oneshot_ms")))
        if config.sqlite:
            steps.append(Step("python -c raw publish, sqlite://", lambda: once(raw_sqlite_argv, "raw_sqlite_ms")))
    rows = [Row("one-shot: kqueue-send 'hello.'", "ms", "kq_oneshot_ms", "raw_oneshot_ms", TARGET)]
    notes = [
        f"{repetitions} interleaved pairs per round; raw = python -c 'import kombu, click' + connect, declare, "
        "publish (confirmed on AMQP, like kqueue-send), close; both print one line"
    ]
    urls = [config.url]
    if config.sqlite:
        urls.append(config.baseline)
        rows = [
            Row("one-shot: kqueue-send vs sqla+sqlite", "ms", "kq_oneshot_ms", "raw_oneshot_ms", TARGET),
            Row("one-shot: kqueue-send vs raw sqlite://", "ms", "kq_oneshot_ms", "raw_sqlite_ms", TARGET),
        ]
        notes.append(
            "sqlite://: raw runs on sqla+sqlite, and again on kqueue's sqlite:// transport (import kqueue.sqlite, "
            "then the same Kombu calls: a commit with fsync)"
        )

    def setup() -> None:
        for url in urls:
            plumbing.declare(url, plumbing.raw_queue(name))

    def teardown() -> None:
        for url in urls:
            plumbing.delete_queues(url, name)

    return Figure("oneshot", steps, rows, notes, setup=setup, teardown=teardown)
