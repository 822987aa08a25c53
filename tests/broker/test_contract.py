"""The tutorial's promises, on every real broker, with real kqueue-send and kqueue-work processes.

Each test runs once per broker URL (RabbitMQ, Redis). Where a broker cannot give
a guarantee, the test says so and checks what it does give.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pika
import pytest
from kombu import Queue

from ..conftest import delete_queues, unique, wait_for
from . import rabbit
from .procs import Worker, is_redis, ready, run_send, start, tool

pytestmark = pytest.mark.broker

TUTORIAL = ["First message.", "Second message..", "Third message...", "Fourth message....", "Fifth message....."]


def test_round_robin_two_workers_share_the_tutorials_five_tasks(
    broker_queue: tuple[str, Queue], workers: list[Worker]
) -> None:
    url, queue = broker_queue
    # Given two workers waiting
    first = start(workers, url, queue, "--dot-seconds", "0.01")
    second = start(workers, url, queue, "--dot-seconds", "0.01")

    # When the tutorial's five tasks are sent one by one
    for count, text in enumerate(TUTORIAL, 1):
        sent = run_send(url, queue.name, *text.split())
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout == f" [x] Sent {text!r}\n"
        wait_for(lambda n=count: len(first.received()) + len(second.received()) == n)
    first.wait_for(" [x] Done", count=len(first.received()))
    second.wait_for(" [x] Done", count=len(second.received()))

    # Then they are handed out in turn, as in the tutorial's output, and all acked
    if is_redis(url):
        # Redis serves the worker whose BRPOP waited longest, but Kombu issues
        # an idle worker's BRPOP again every second, behind the other's: the
        # turns depend on when the tasks come. Each task still goes to one worker.
        assert sorted(first.received() + second.received()) == sorted(TUTORIAL)
        assert first.received() and second.received(), "each worker took a share"
    else:
        assert sorted([first.received(), second.received()]) == [TUTORIAL[0::2], TUTORIAL[1::2]]
    assert ready(url, queue) == 0


def test_a_killed_worker_loses_nothing(broker_queue: tuple[str, Queue], workers: list[Worker]) -> None:
    url, queue = broker_queue
    if is_redis(url):
        # Redis gives a task back only after the visibility timeout: make it short.
        url += "?visibility_timeout=2"
    doomed = start(workers, url, queue, "--dot-seconds", "10")

    # When a worker is killed in the middle of a task
    assert run_send(url, queue.name, "long task.").returncode == 0
    doomed.wait_for(" [x] Received 'long task.'")
    doomed.kill()

    # Then another worker is handed the same task, flagged as redelivered, and does it
    survivor = start(workers, url, queue, "--dot-seconds", "0.01")
    survivor.wait_for(" [x] Done", timeout=60)
    assert survivor.received() == ["long task."]
    survivor.wait_for("redelivered=True", stream="err")
    assert ready(url, queue) == 0


def test_every_task_a_killed_worker_was_handed_comes_back(
    broker_queue: tuple[str, Queue], workers: list[Worker]
) -> None:
    url, queue = broker_queue
    if is_redis(url):
        url += "?visibility_timeout=2"
    tasks = [f"task {i}." for i in range(5)]
    for text in tasks:
        assert run_send(url, queue.name, *text.split()).returncode == 0

    # Given a worker with prefetch 5 holding all five tasks, busy with the first
    doomed = start(workers, url, queue, "--prefetch", "5", "--dot-seconds", "10")
    doomed.wait_for(" [x] Received")
    wait_for(lambda: ready(url, queue) == 0, message="all five handed to the worker")

    # When it is killed
    doomed.kill()

    # Then all five are done by the next worker
    survivor = start(workers, url, queue, "--dot-seconds", "0")
    survivor.wait_for(" [x] Done", count=5, timeout=60)
    assert sorted(survivor.received()) == tasks


def test_fair_dispatch_gives_heavy_tasks_to_whoever_is_free(
    broker_queue: tuple[str, Queue], workers: list[Worker], tmp_path: Path
) -> None:
    url, queue = broker_queue
    # Odd tasks heavy (0.4 s), even ones light, as in the tutorial
    tasks = ["heavy...." if i % 2 == 0 else "light" for i in range(8)]
    batch = tmp_path / "tasks.txt"
    batch.write_text("\n".join(tasks) + "\n")

    def run(prefetch: int) -> tuple[list[int], float]:
        pair = [start(workers, url, queue, "--prefetch", str(prefetch), "--dot-seconds", "0.1") for _ in range(2)]
        began = time.monotonic()
        assert run_send(url, queue.name, "--file", str(batch)).returncode == 0
        wait_for(lambda: sum(len(w.received()) for w in pair) == 8, timeout=30)
        for worker in pair:
            worker.wait_for(" [x] Done", count=len(worker.received()))
        makespan = time.monotonic() - began
        heavy = sorted(sum(text.startswith("heavy") for text in w.received()) for w in pair)
        for worker in pair:
            worker.signal(signal.SIGTERM)
            assert worker.wait() == 0
        return heavy, makespan

    fair_split, fair_makespan = run(prefetch=1)
    greedy_split, greedy_makespan = run(prefetch=10)

    # With prefetch 1 each worker does two of the four heavy tasks: about 0.8 s
    # of work each, against 1.6 s for a worker handed all of them.
    print(f"makespan: prefetch 1 {fair_makespan:.2f}s {fair_split}, prefetch 10 {greedy_makespan:.2f}s {greedy_split}")
    assert fair_split == [2, 2]
    assert fair_makespan < 1.5
    if url.startswith("amqp"):
        # RabbitMQ hands a greedy worker every other task: all heavy ones to one worker.
        assert greedy_split == [0, 4]
        assert greedy_makespan > fair_makespan


def stat_rows(url: str, queue: Queue) -> dict[str, list[str]]:
    done = subprocess.run(
        [tool("kqueue"), "stat", "--broker", url, "--queue", queue.name], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["queue", "ready", "unacked", "consumers", "delayed"]
    return {row.split()[0]: row.split()[1:] for row in rows if not row.startswith("*")}


def test_stat_shows_the_task_a_worker_holds(broker_queue: tuple[str, Queue], workers: list[Worker]) -> None:
    url, queue = broker_queue
    for text in ("busy.", "waiting", "waiting too"):
        assert run_send(url, queue.name, text).returncode == 0
    worker = start(workers, url, queue, "--dot-seconds", "30")
    worker.wait_for(" [x] Received 'busy.'")

    # Like the tutorial's `rabbitmqctl list_queues name messages_ready messages_unacknowledged`;
    # RabbitMQ's management figures lag by a few seconds, Redis cannot count consumers.
    expected = ["2", "1", "?" if is_redis(url) else "1"]
    wait_for(lambda: stat_rows(url, queue)[queue.name][:3] == expected, timeout=30, message=f"stat {expected}")
    assert stat_rows(url, queue)[f"{queue.name}.dead"][:2] == ["0", "0"]


def test_stat_counts_tasks_sent_a_moment_ago(broker_queue: tuple[str, Queue]) -> None:
    url, queue = broker_queue
    for text in ("one", "two", "three"):
        assert run_send(url, queue.name, text).returncode == 0

    # At once: RabbitMQ's management figures would not have the new queue yet
    assert stat_rows(url, queue)[queue.name][0] == "3"


# -- RabbitMQ only: what only AMQP has ---------------------------------------------------------


@pytest.fixture
def tutorial_queue(amqp_url: str) -> str:
    name = unique("hello")
    yield name
    delete_queues(amqp_url, name, f"{name}.dead")


def pika_channel(url: str) -> tuple[pika.BlockingConnection, object]:
    connection = pika.BlockingConnection(pika.URLParameters(url.replace("//", "/%2F").replace(":/%2F", "://", 1)))
    return connection, connection.channel()


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        ({"durable": False}, "is not durable"),
        ({"durable": True, "arguments": {"x-queue-type": "quorum"}}, "use --queue-type quorum"),
    ],
    ids=["tutorial-non-durable-hello", "quorum-task-queue"],
)
@pytest.mark.parametrize("tool_args", [["kqueue-send", "hi"], ["kqueue-work", "--burst"]], ids=["send", "work"])
def test_a_queue_declared_otherwise_gets_one_line(
    amqp_url: str, tutorial_queue: str, declared: dict, expected: str, tool_args: list[str]
) -> None:
    connection, channel = pika_channel(amqp_url)
    channel.queue_declare(tutorial_queue, **declared)  # type: ignore[attr-defined]
    connection.close()

    began = time.monotonic()
    done = subprocess.run(
        [tool(tool_args[0]), "--broker", amqp_url, "--queue", tutorial_queue, *tool_args[1:]],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert time.monotonic() - began < 10
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert expected in lines[0]


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_plain_amqp_clients_and_kqueue_understand_each_other(
    amqp_url: str, tutorial_queue: str, queue_type: str, workers: list[Worker]
) -> None:
    arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else None
    connection, channel = pika_channel(amqp_url)
    # The tutorial's new_task.py: default exchange, delivery_mode=2, no content type
    channel.queue_declare(tutorial_queue, durable=True, arguments=arguments)  # type: ignore[attr-defined]
    channel.basic_publish(  # type: ignore[attr-defined]
        exchange="",
        routing_key=tutorial_queue,
        body="Tâche de pika.".encode(),
        properties=pika.BasicProperties(delivery_mode=2),
    )
    worker = Worker(amqp_url, tutorial_queue, "--queue-type", queue_type, "--burst", "--dot-seconds", "0")
    workers.append(worker)
    assert worker.wait() == 0, worker.transcript()
    assert worker.received() == ["Tâche de pika."]

    sent = run_send(amqp_url, tutorial_queue, "--queue-type", queue_type, "Tâche", "de", "kqueue.")
    assert sent.returncode == 0, sent.stderr
    _, properties, body = channel.basic_get(tutorial_queue, auto_ack=True)  # type: ignore[attr-defined]
    connection.close()
    assert body == "Tâche de kqueue.".encode()
    assert properties.delivery_mode == 2
    assert properties.content_type == "text/plain"


# -- RabbitMQ restarts ---------------------------------------------------------------------------


@pytest.fixture
def restartable(amqp_url: str) -> str:
    rabbit.local_rabbitmq(amqp_url)
    yield amqp_url
    rabbit.start()  # whatever happened, leave the broker running


def test_queued_tasks_survive_a_broker_restart(restartable: str, workers: list[Worker], tmp_path: Path) -> None:
    url = restartable
    queue = Queue(unique("durable"))
    try:
        batch = tmp_path / "tasks.txt"
        batch.write_text("".join(f"task {i}\n" for i in range(100)))
        assert run_send(url, queue.name, "--file", str(batch)).returncode == 0

        rabbit.stop()
        rabbit.start()

        worker = Worker(url, queue.name, "--burst", "--dot-seconds", "0")
        workers.append(worker)
        assert worker.wait() == 0, worker.transcript()
        assert sorted(worker.received()) == sorted(f"task {i}" for i in range(100))
    finally:
        delete_queues(url, queue.name, f"{queue.name}.dead")


def test_a_worker_and_a_sender_ride_out_a_broker_restart(
    restartable: str, workers: list[Worker], tmp_path: Path
) -> None:
    url = restartable
    queue = Queue(unique("restart"))
    total = 30000
    try:
        worker = start(workers, url, queue, "--dot-seconds", "0", "--concurrency", "2")
        batch = tmp_path / "tasks.txt"
        batch.write_text("".join(f"task {i}\n" for i in range(total)))
        sender = subprocess.Popen(
            [tool("kqueue-send"), "--broker", url, "--queue", queue.name, "--file", str(batch)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # When the broker restarts while the batch is being sent and worked
        worker.wait_for(" [x] Done", count=100, timeout=60)
        rabbit.stop()
        worker.wait_for("reconnecting", stream="err", timeout=30)
        rabbit.start()
        out, err = sender.communicate(timeout=120)

        # Then the sender either got every message confirmed, or says how many it did
        if sender.returncode == 0:
            assert out.strip() == f"[x] Sent {total} messages to {queue.name!r}"
            confirmed = total
        else:
            match = re.search(r"confirmed (\d+) of", err)
            assert match, err
            confirmed = int(match.group(1))
        # and the worker, reconnected, does every confirmed task at least once
        wait_for(lambda: len(set(worker.received())) >= confirmed, timeout=120, message="all confirmed tasks done")
        wait_for(lambda: ready(url, queue) == 0, timeout=30)
        assert "Traceback" not in "\n".join(worker.err)
        assert worker.proc.poll() is None, "the worker is still running"
    finally:
        delete_queues(url, queue.name, f"{queue.name}.dead")


def test_a_sender_whose_broker_stays_away_says_how_many_were_confirmed(restartable: str, tmp_path: Path) -> None:
    url = restartable
    queue = Queue(unique("confirms"))
    total = 200000
    try:
        batch = tmp_path / "tasks.txt"
        batch.write_text("".join(f"task {i}\n" for i in range(total)))
        sender = subprocess.Popen(
            [tool("kqueue-send"), "--broker", url, "--queue", queue.name, "--file", str(batch), "--retry-for", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # When the broker stops mid-batch and stays away longer than --retry-for
        wait_for(lambda: ready(url, queue) > 1000, timeout=60, message="the batch under way")
        rabbit.stop()
        out, err = sender.communicate(timeout=60)

        # Then the sender fails, in one line, saying how many the broker confirmed
        assert sender.returncode == 1, out + err
        assert out == ""
        # (after a log line per reconnect attempt)
        line = err.splitlines()[-1]
        assert line.startswith("kqueue-send: error: lost the connection to broker"), err
        match = re.search(r"confirmed (\d+) of 200000 messages", line)
        assert match, line
        confirmed = int(match.group(1))
        assert 0 < confirmed < total

        # and every one it confirmed is in the queue once the broker is back
        rabbit.start()
        assert ready(url, queue) >= confirmed
    finally:
        rabbit.start()
        delete_queues(url, queue.name, f"{queue.name}.dead")
