"""Delays kept by the broker, and function tasks, on every real broker, with real processes.

Each test runs on RabbitMQ (a classic and a quorum queue), Redis and sqlite://.
A delayed task is stored at once, runs no earlier than its time and within a
second after it, in the order of its time, and survives what it waits through.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Queue

import kqueue
from kqueue.queues import QueueType, task_queue

from .. import apps
from ..conftest import _broker_url, delete_queues, unique, wait_for
from . import rabbit
from .procs import ROOT, Worker, is_redis, ready, run_send, start, tool

pytestmark = pytest.mark.broker


@pytest.fixture(params=["amqp", "amqp-quorum", "redis", "sqlite"])
def delayed_queue(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Queue]]:
    """A fresh queue on each broker in turn, and on RabbitMQ of each queue type; deleted afterwards."""
    kind = request.param
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'queues.db'}"
    else:
        url = _broker_url(kind.split("-")[0], request)
    queue = task_queue(unique("delay"), QueueType.QUORUM if kind == "amqp-quorum" else QueueType.CLASSIC)
    yield url, queue
    delete_queues(url, queue.name, f"{queue.name}.dead")


def type_args(queue: Queue) -> list[str]:
    return ["--queue-type", "quorum"] if (queue.queue_arguments or {}).get("x-queue-type") == "quorum" else []


def send_delayed(url: str, queue: Queue, seconds: float, text: str) -> tuple[float, float]:
    """Send `text` with a delay; the earliest and the latest time it may be due."""
    before = time.time()
    sent = run_send(url, queue.name, *type_args(queue), "--delay", str(seconds), text)
    after = time.time()
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout == f" [x] Sent {text!r}, to run in {seconds:g}s\n"
    return before + seconds, after + seconds


def ran_at(worker: Worker, text: str) -> list[float]:
    """When the stamp handler started `text`, each time it did."""
    return [float(line.split()[-1]) for line in list(worker.out) if line.startswith(f"ran {text} ")]


def stat_delayed(url: str, queue: Queue) -> str:
    done = subprocess.run(
        [tool("kqueue"), "stat", "--broker", url, "--queue", queue.name, *type_args(queue)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[1].split()[4]


def test_a_short_delay_sent_after_a_long_one_runs_first_and_each_on_time(
    delayed_queue: tuple[str, Queue], workers: list[Worker]
) -> None:
    url, queue = delayed_queue
    worker = start(workers, url, queue, *type_args(queue), "--handler", "tests.handlers:stamp")

    # Given a task delayed by 3 s, then one delayed by 1 s, then one not delayed
    long_due = send_delayed(url, queue, 3, "long")
    short_due = send_delayed(url, queue, 1, "short")
    assert run_send(url, queue.name, *type_args(queue), "now").returncode == 0

    # Then the broker holds the delayed ones, the one not delayed runs at once
    worker.wait_for("ran now", timeout=10)
    shared = url.startswith("amqp")  # RabbitMQ's count is the whole virtual host's
    delayed = stat_delayed(url, queue)
    assert int(delayed.rstrip("*")) >= 1 if shared else delayed in ("1", "2")  # the short one may be due already
    worker.wait_for("ran long", timeout=10)

    # And the short one ran first; each no earlier than its time, and within a second after it
    (short,), (long,) = ran_at(worker, "short"), ran_at(worker, "long")
    assert short < long
    for started, (earliest, latest) in ((short, short_due), (long, long_due)):
        assert earliest <= started <= latest + 1.0, (started - earliest, latest - earliest)
    assert ready(url, queue) == 0
    assert shared or stat_delayed(url, queue) == "0"


def test_a_delayed_task_outlives_the_worker_killed_while_it_waits(
    delayed_queue: tuple[str, Queue], workers: list[Worker]
) -> None:
    url, queue = delayed_queue
    if is_redis(url):
        url += "?visibility_timeout=2"
    # Given a worker consuming while a task waits for its time
    doomed = start(workers, url, queue, *type_args(queue), "--handler", "tests.handlers:stamp")
    earliest, _ = send_delayed(url, queue, 1.5, "waiting")

    # When the worker is killed before the task is due
    doomed.kill()
    assert time.time() < earliest, "the kill came after the task was due: the test proves nothing"

    # Then another worker runs it, once, not before its time
    survivor = start(workers, url, queue, *type_args(queue), "--handler", "tests.handlers:stamp")
    survivor.wait_for("ran waiting", timeout=15)
    assert ran_at(doomed, "waiting") == []
    (started,) = ran_at(survivor, "waiting")
    assert started >= earliest


def test_a_delayed_task_outlives_a_broker_restart(amqp_url: str, workers: list[Worker]) -> None:
    rabbit.local_rabbitmq(amqp_url)
    queues = [task_queue(unique("delay-restart")), task_queue(unique("delay-restart"), QueueType.QUORUM)]
    try:
        # Given a task delayed by 10 s in a classic and in a quorum queue, and the broker restarted while they wait
        due = [send_delayed(amqp_url, queue, 10, "through")[0] for queue in queues]
        rabbit.stop()
        try:
            assert time.time() < min(due), "the restart came after the tasks were due: the test proves nothing"
        finally:
            rabbit.start()

        # Then workers started after the restart run them, once each, on time
        for queue, earliest in zip(queues, due, strict=True):
            worker = start(workers, amqp_url, queue, *type_args(queue), "--handler", "tests.handlers:stamp")
            worker.wait_for("ran through", timeout=30)
            (started,) = ran_at(worker, "through")
            assert earliest <= started
    finally:
        for queue in queues:
            delete_queues(amqp_url, queue.name, f"{queue.name}.dead")


@pytest.mark.parametrize("queue_type", [QueueType.CLASSIC, QueueType.QUORUM])
def test_a_retry_delay_longer_than_consumer_timeout_waits_in_the_broker(
    short_consumer_timeout: str, workers: list[Worker], tmp_path: Path, queue_type: QueueType
) -> None:
    url = short_consumer_timeout
    queue = task_queue(unique("retry-later"), queue_type)
    try:
        # Given a task that fails once, retried after 6 s, on a broker that allows 3 s per ack
        worker = Worker(
            url,
            queue.name,
            *type_args(queue),
            "--handler",
            "tests.handlers:fail_first",
            "--retry-delay",
            "6",
            env={"KQUEUE_TEST_MARKERS": str(tmp_path)},
        )
        workers.append(worker.ready())
        assert run_send(url, queue.name, *type_args(queue), "report").returncode == 0

        # Then its retry waits in the broker, not unacked in the worker: no channel is
        # closed, the task is delivered twice (the run that failed, the retry) and done
        worker.wait_for(" [x] Done", timeout=30)
        # The log comes through a pipe of its own: the second run's line may follow the Done
        worker.wait_for("attempt=2", timeout=10, stream="err")
        assert worker.received() == ["report", "report"], worker.transcript()
        log = "\n".join(worker.err)
        assert "consumer_timeout" not in log and "lost the channel" not in log, log
        assert ready(url, queue) == 0 and ready(url, task_queue(f"{queue.name}.dead")) == 0
    finally:
        delete_queues(url, queue.name, f"{queue.name}.dead")


# -- function tasks ------------------------------------------------------------------------


def app_for(url: str, queue: Queue) -> kqueue.App:
    return kqueue.App(url, queue.name, queue_type=(queue.queue_arguments or {}).get("x-queue-type", "classic"))


def test_function_tasks_plain_async_and_delayed_run_from_an_app(
    delayed_queue: tuple[str, Queue], workers: list[Worker]
) -> None:
    url, queue = delayed_queue
    worker = start(workers, url, queue, *type_args(queue), "--app", "tests.apps", "--concurrency", "2")

    # Given an app of the same tasks, sending to this broker and queue
    with app_for(url, queue) as app:
        stamp_call = app.task(apps.stamp_call.fn, name="stamp_call")
        astamp = app.task(apps.astamp.fn, name="astamp")
        earliest = time.time() + 1
        stamp_call.send("later", size=2, delay=1)
        stamp_call.send("now", size=1)
        astamp.send("slow", pause=0.5)
        astamp.send("quick")
        astamp.send("bad")

    # Then each runs on the worker with its arguments, the coroutines side by side, the delayed one on time
    worker.wait_for("ran later 2", timeout=15)
    worker.wait_for("ran slow async", timeout=15)
    assert " [x] Received stamp_call('now', size=1)" in worker.out
    assert worker.out.index(next(line for line in worker.out if line.startswith("ran quick"))) < worker.out.index(
        next(line for line in worker.out if line.startswith("ran slow"))
    ), "the quick coroutine waits for nothing: it ends before the slow one"
    assert float(next(line for line in worker.out if line.startswith("ran later")).split()[-1]) >= earliest
    worker.wait_for(" [!] Failed: ValueError: cannot stamp 'bad'", timeout=15)
    assert dead_list(url, queue).startswith("astamp('bad')  reason=failed attempts=1 error=ValueError: cannot stamp")


def dead_list(url: str, queue: Queue) -> str:
    """`kqueue dead list`, once the queue's one dead letter is there."""
    wait_for(lambda: ready(url, task_queue(f"{queue.name}.dead")) == 1, timeout=10, message="a dead letter")
    done = subprocess.run(
        [tool("kqueue"), "dead", "list", "--broker", url, "--queue", queue.name, *type_args(queue)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_task_no_worker_knows_is_dead_lettered_with_its_name(
    delayed_queue: tuple[str, Queue], workers: list[Worker]
) -> None:
    url, queue = delayed_queue
    worker = start(workers, url, queue, *type_args(queue), "--app", "tests.apps")
    with app_for(url, queue) as app:
        app.task(lambda path: None, name="resize").send("a.jpg")

    worker.wait_for("unknown task 'resize'", stream="err", timeout=15)
    assert dead_list(url, queue).startswith(
        "resize('a.jpg')  reason=unknown-task attempts=1 error=unknown task 'resize'"
    )


@pytest.mark.parametrize("queue_type", [QueueType.CLASSIC, QueueType.QUORUM])
def test_a_delayed_task_whose_queue_was_deleted_meanwhile_is_kept_not_dropped(
    amqp_url: str, queue_type: QueueType
) -> None:
    from kombu import Connection

    from kqueue.delays.amqp import UNROUTABLE

    queue = task_queue(unique("deleted"), queue_type)
    text = f"orphan {queue.name}"
    # Given a delayed task, and its queue deleted before it is due
    send_delayed(amqp_url, queue, 0.5, text)
    delete_queues(amqp_url, queue.name, f"{queue.name}.dead")

    # Then once due it waits in the chain's queue of unroutable tasks, where an operator finds it
    def found() -> bool:
        with Connection(amqp_url) as conn:
            channel = conn.channel()  # what it takes and does not ack goes back as it closes
            while (message := channel.basic_get(UNROUTABLE)) is not None:
                if message.body in (text, text.encode()):  # py-amqp decodes a body with a content encoding
                    channel.basic_ack(message.delivery_tag)
                    return True
        return False

    wait_for(found, timeout=30, message=f"{text!r} in {UNROUTABLE}")
