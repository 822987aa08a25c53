"""Figure 1, send: kqueue's confirmed sends (CLI and API) against raw Kombu publish loops."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import plain_sqlite, plumbing
from benchmarks.core import Config, Figure, Row, Step, StepFn, Target
from kqueue.brokers import connect, mask
from kqueue.producer import CONFIRM_WINDOW, Sender
from kqueue.queues import QueueType, task_queue
from kqueue.sqlite import Options

N = 100_000
TARGET = Target("ratio>=", 0.7)
#: Unconfirmed messages in flight in the raw pipelined-confirms baseline: kqueue's.
WINDOW = CONFIRM_WINDOW
#: Messages the raw Kombu baseline sends on ``sqla+sqlite://`` (a few hundred a second): a commit each.
N_SQLA = 2_000
#: On sqlite://: kqueue against sqla+sqlite (times) and against kqueue on RabbitMQ in the same run (ratio).
SQLA_TARGET = Target("ratio>=", 10.0)
REFERENCE_TARGET = Target("ratio>=", 0.5)


def figure(config: Config) -> Figure:
    n = config.count(N)
    n_confirm = config.count(N // 10)
    n_raw = config.count(N_SQLA) if plumbing.is_sqla_url(config.baseline) else n
    texts = [body.decode() for body in plumbing.bodies(n)]
    workdir = Path(tempfile.mkdtemp(prefix="kqbench-send-"))
    lines = workdir / "tasks.txt"
    lines.write_text("".join(f"{text}\n" for text in texts), encoding="utf-8")
    empty = workdir / "empty.txt"
    empty.write_text("", encoding="utf-8")

    def kqueue_cli() -> dict[str, float]:
        name = plumbing.fresh_name("send-cli")
        try:
            start = _cli(config, name, empty)
            run = _cli(config, name, lines)
            values = {"kq_cli": n / run, "kq_cli_start_s": start}
            if run - start > 0.05 * run:  # else start-up noise swamps the sending: leave it out
                values["kq_cli_net"] = n / (run - start)
            return values
        finally:
            plumbing.delete_queues(config.url, name)

    def kqueue_api(url: str = config.url, key: str = "kq_api") -> dict[str, float]:
        name = plumbing.fresh_name("send-api")
        queue = task_queue(name, QueueType(config.queue_type))
        try:
            with connect(url) as conn:
                conn.ensure_connection(max_retries=1)
                start = time.perf_counter()
                with Sender(conn, queue) as sender:
                    confirmed = sender.send_many(texts)
                seconds = time.perf_counter() - start
            _expect(url, name, n, confirmed)
            return {key: n / seconds}
        finally:
            plumbing.delete_queues(url, name)

    def raw(confirm: bool) -> dict[str, float]:
        count = n_confirm if confirm else n_raw
        name = plumbing.fresh_name("send-raw")
        queue = plumbing.raw_queue(name, config.queue_type)
        bodies = plumbing.bodies(count)
        options = {"confirm_publish": True} if confirm else {}
        try:
            with plumbing.raw_connection(config.baseline, **options) as conn:
                conn.ensure_connection(max_retries=1)
                start = time.perf_counter()
                channel = conn.channel()
                queue(channel).declare()
                publish = plumbing.raw_publisher(channel, name)
                for body in bodies:
                    publish(body)
                seconds = time.perf_counter() - start
            _expect(config.baseline, name, count, count)
            return {"raw_confirm_each" if confirm else "raw": count / seconds}
        finally:
            plumbing.delete_queues(config.baseline, name)

    def raw_pipelined() -> dict[str, float]:
        name = plumbing.fresh_name("send-pipe")
        try:
            seconds = _pipelined_confirms(config, name, plumbing.bodies(n))
            _expect(config.url, name, n, n)
            return {"raw_pipelined": n / seconds}
        finally:
            plumbing.delete_queues(config.url, name)

    def plain() -> dict[str, float]:
        assert config.plain_db is not None
        return {"plain": n / plain_sqlite.send(Path(config.plain_db), texts)}

    if config.sqlite:
        return _sqlite_figure(config, n, n_raw, kqueue_api, lambda: raw(False), kqueue_cli, plain)
    steps = [
        Step("kqueue Sender.send_many", kqueue_api),
        Step("raw publish, no confirms", lambda: raw(False)),
        Step("kqueue-send --file", kqueue_cli),
    ]
    rows = [
        Row("send: Sender.send_many vs raw", "msg/s", "kq_api", "raw", TARGET),
        Row("send: kqueue-send --file vs raw", "msg/s", "kq_cli", "raw", TARGET),
        Row("send: kqueue-send excl. start", "msg/s", "kq_cli_net", "raw", TARGET),
    ]
    notes = [
        f"N={n}; raw is Producer.publish without confirms; "
        + ("kqueue confirms every message" if config.amqp else "this transport has no confirms (kqueue neither)"),
        "kqueue-send is a subprocess: its time includes start-up; 'excl. start' subtracts a run on an empty file",
    ]
    if config.amqp:
        steps.append(Step("raw publish, confirm_publish=True", lambda: raw(True)))
        steps.append(Step("raw publish, pipelined confirms", raw_pipelined))
        rows.append(Row("send: send_many vs raw confirm-each", "msg/s", "kq_api", "raw_confirm_each"))
        rows.append(Row("send: send_many vs raw pipelined conf.", "msg/s", "kq_api", "raw_pipelined"))
        notes.append(
            f"raw pipelined confirms: confirm_select, up to {WINDOW} unconfirmed, drained down to {WINDOW // 2} "
            "(what Sender does, without kqueue's bookkeeping)"
        )
        notes.append(f"raw confirm-each (transport_options confirm_publish=True) sends N/10={n_confirm}")
    return Figure("send", steps, rows, notes)


def _sqlite_figure(
    config: Config,
    n: int,
    n_raw: int,
    kqueue_api: Callable[..., dict[str, float]],
    raw: StepFn,
    kqueue_cli: StepFn,
    plain: StepFn,
) -> Figure:
    """On sqlite://: kqueue beside raw Kombu on sqla+sqlite, a plain sqlite3 loop, and kqueue on RabbitMQ."""
    steps = [
        Step("kqueue Sender.send_many", kqueue_api),
        Step("raw Kombu publish, sqla+sqlite", raw),
        Step("kqueue-send --file", kqueue_cli),
        Step("plain sqlite3 inserts", plain),
    ]
    rows = [
        Row("send: send_many vs sqla+sqlite", "msg/s", "kq_api", "raw", SQLA_TARGET),
        Row("send: kqueue-send --file vs sqla", "msg/s", "kq_cli", "raw"),
        Row("send: kqueue-send excl. start vs sqla", "msg/s", "kq_cli_net", "raw"),
        Row("send: send_many vs plain sqlite3", "msg/s", "kq_api", "plain"),
    ]
    notes = [
        f"N={n}; kqueue confirms every message (committed with fsync, {Options().confirm_batch} a commit); "
        f"raw = Producer.publish on sqla+sqlite (a commit each, no fsync promise), N={n_raw}",
        f"plain = sqlite3 executemany, {plain_sqlite.INSERT_BATCH} rows a commit, synchronous=FULL, WAL "
        "(the ceiling: no Kombu, body only)",
        "kqueue-send is a subprocess: its time includes start-up; 'excl. start' subtracts a run on an empty file",
    ]
    if config.reference_url:
        steps.append(Step("kqueue Sender.send_many, RabbitMQ", lambda: kqueue_api(config.reference_url, "ref_api")))
        rows.append(Row("send: send_many vs kqueue on RabbitMQ", "msg/s", "kq_api", "ref_api", REFERENCE_TARGET))
        notes.append(f"RabbitMQ = kqueue's Sender.send_many (confirmed), same N, on {mask(config.reference_url)}")
    return Figure("send", steps, rows, notes)


def _pipelined_confirms(config: Config, name: str, bodies: list[bytes]) -> float:
    """Seconds to publish `bodies` with publisher confirms kept in flight, waiting for all at the end."""
    acked_upto = 0
    singles: set[int] = set()

    def on_ack(tag: int, multiple: bool) -> None:
        nonlocal acked_upto
        if multiple:
            acked_upto = max(acked_upto, tag)
        else:
            singles.add(tag)

    def unconfirmed(sent: int) -> int:
        singles.difference_update([tag for tag in singles if tag <= acked_upto])
        return sent - acked_upto - len(singles)

    with plumbing.raw_connection(config.url) as conn:
        conn.ensure_connection(max_retries=1)
        start = time.perf_counter()
        channel = conn.channel()
        plumbing.raw_queue(name, config.queue_type)(channel).declare()
        channel.confirm_select()
        channel.events["basic_ack"].add(on_ack)
        publish = plumbing.raw_publisher(channel, name)
        sent = 0
        for body in bodies:
            publish(body)
            sent += 1
            if sent - acked_upto >= WINDOW and unconfirmed(sent) >= WINDOW:
                while unconfirmed(sent) > WINDOW // 2:
                    conn.drain_events(timeout=30)
        while unconfirmed(sent) > 0:
            conn.drain_events(timeout=30)
        return time.perf_counter() - start


def _cli(config: Config, name: str, path: Path) -> float:
    argv = plumbing.kqueue_argv("kqueue-send", config.url, name, config.queue_type, "--file", str(path))
    return plumbing.check(plumbing.run_timed(argv), "kqueue-send").seconds


def _expect(url: str, name: str, n: int, confirmed: int) -> None:
    if confirmed != n:
        raise RuntimeError(f"{name}: {confirmed} of {n} messages confirmed")
    deadline = time.monotonic() + 10
    while (there := plumbing.remaining(url, name)) != n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: {there} messages in the queue, expected {n}")
        time.sleep(0.05)
