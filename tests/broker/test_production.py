"""A worker you can leave running: long tasks, timeouts, signals, restarts and poison messages.

Real kqueue-work processes against real brokers; the same contract per broker
wherever the broker can show it.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from kombu import Queue

from kqueue.queues import QueueType, task_queue

from ..conftest import delete_queues, unique, wait_for
from . import rabbit
from .procs import ROOT, Worker, is_redis, ready, run_send, start, tool

pytestmark = pytest.mark.broker


def admin(url: str, queue: Queue, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("kqueue"), *args, "--broker", url, "--queue", queue.name],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def test_a_task_five_times_longer_than_the_heartbeat_is_delivered_once(amqp_url: str, workers: list[Worker]) -> None:
    queue = task_queue(unique("heartbeat"))
    try:
        # Given heartbeats every 2 s, and a task that takes 10 s
        url = amqp_url + "?heartbeat=2"
        worker = start(workers, url, queue, "--dot-seconds", "10")
        assert run_send(url, queue.name, "long.").returncode == 0

        # Then the connection stays up through the task, which is delivered once and acked once
        worker.wait_for(" [x] Done", timeout=30)
        assert worker.received() == ["long."], worker.transcript()
        assert ready(url, queue) == 0
        log = "\n".join(worker.err)
        assert "reconnecting" not in log and "redelivered=True" not in log, log
    finally:
        delete_queues(amqp_url, queue.name, f"{queue.name}.dead")


def test_a_task_longer_than_consumer_timeout_is_delivered_again_not_lost(
    short_consumer_timeout: str, workers: list[Worker], tmp_path: Path
) -> None:
    url = short_consumer_timeout
    queue = task_queue(unique("ack-timeout"))
    try:
        # Given a task that takes 8 s the first time, on a broker that allows 3 s per ack
        worker = Worker(
            url,
            queue.name,
            "--handler",
            "tests.handlers:slow_once",
            env={"KQUEUE_TEST_MARKERS": str(tmp_path)},
        )
        workers.append(worker.ready())
        assert run_send(url, queue.name, "report").returncode == 0

        # Then the worker says what happened and how to change it, reconnects,
        # and does the task again; the first run's late end is not acked
        worker.wait_for("consumer_timeout", stream="err", timeout=30)
        worker.wait_for(" [x] Done", count=2, timeout=30)
        worker.wait_for("cannot be acked", stream="err", timeout=30)
        assert worker.received() == ["report", "report"], worker.transcript()
        timeout_line = next(line for line in worker.err if "consumer_timeout" in line)
        assert "raise RabbitMQ's consumer_timeout" in timeout_line
        assert ready(url, queue) == 0
        assert worker.proc.poll() is None
    finally:
        delete_queues(url, queue.name, f"{queue.name}.dead")


def test_sigterm_lets_the_running_task_finish_and_takes_no_more(
    broker_queue: tuple[str, Queue], workers: list[Worker]
) -> None:
    url, queue = broker_queue
    for text in ("running.", "waiting."):
        assert run_send(url, queue.name, text).returncode == 0
    worker = start(workers, url, queue, "--dot-seconds", "1")
    worker.wait_for(" [x] Received 'running.'")

    worker.signal(signal.SIGTERM)

    assert worker.wait(30) == 0, worker.transcript()
    assert worker.out[-1] == " [x] Done"
    assert worker.received() == ["running."]
    assert ready(url, queue) == 1


def test_a_task_still_running_after_the_grace_is_requeued(
    broker_queue: tuple[str, Queue], workers: list[Worker]
) -> None:
    url, queue = broker_queue
    if is_redis(url):
        url += "?visibility_timeout=2"
    assert run_send(url, queue.name, "too long.").returncode == 0
    worker = start(workers, url, queue, "--dot-seconds", "60", "--grace", "0.5")
    worker.wait_for(" [x] Received 'too long.'")

    worker.signal(signal.SIGTERM)

    assert worker.wait(30) == 0, worker.transcript()
    assert " [x] Done" not in worker.out
    wait_for(lambda: ready(url, queue) == 1, timeout=30, message="the task back in the queue")


def test_a_second_signal_requeues_at_once(broker_queue: tuple[str, Queue], workers: list[Worker]) -> None:
    url, queue = broker_queue
    if is_redis(url):
        url += "?visibility_timeout=2"
    assert run_send(url, queue.name, "too long.").returncode == 0
    worker = start(workers, url, queue, "--dot-seconds", "60", "--grace", "60")
    worker.wait_for(" [x] Received 'too long.'")

    worker.signal(signal.SIGINT)
    worker.wait_for("finishing running tasks", stream="err")
    worker.signal(signal.SIGINT)

    # The task was cut short: the exit status says so, as an interrupted command's does
    assert worker.wait(30) == 130, worker.transcript()
    assert worker.err[-1] == "kqueue-work: stopped at once: 1 task given back unfinished"
    wait_for(lambda: ready(url, queue) == 1, timeout=30, message="the task back in the queue")


def test_a_failing_task_is_retried_then_dead_lettered_and_can_be_moved_back(
    broker_queue: tuple[str, Queue], workers: list[Worker]
) -> None:
    url, queue = broker_queue
    assert run_send(url, queue.name, "bad input").returncode == 0

    worker = Worker(
        url, queue.name, "--handler", "tests.handlers:fail", "--max-retries", "2", "--retry-delay", "0.1", "--burst"
    )
    workers.append(worker)

    # Then it ran three times, and sits in <queue>.dead with its error
    assert worker.wait(60) == 0, worker.transcript()
    assert worker.received() == ["bad input"] * 3
    listed = admin(url, queue, "dead", "list")
    assert listed.returncode == 0, listed.stderr
    assert "'bad input'  reason=failed attempts=3 error=RuntimeError: cannot handle 'bad input'" in listed.stdout

    # When the cause is fixed and the dead letters are moved back, it is done
    moved = admin(url, queue, "dead", "retry")
    assert moved.stdout == f"moved 1 dead letter back to {queue.name}\n"
    fixed = Worker(url, queue.name, "--handler", "tests.handlers:record", "--burst")
    workers.append(fixed)
    assert fixed.wait(60) == 0, fixed.transcript()
    assert fixed.received() == ["bad input"]
    assert "0 dead letters" in admin(url, queue, "dead", "list").stdout


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_task_that_kills_its_worker_is_dead_lettered_after_the_delivery_limit(
    broker_url: str, queue_type: str, workers: list[Worker]
) -> None:
    url = broker_url
    if is_redis(url):
        if queue_type == "quorum":
            pytest.skip("Redis has no queue types")
        url += "?visibility_timeout=1"
    queue = task_queue(unique("poison"), QueueType(queue_type))
    try:
        assert run_send(url, queue.name, "--queue-type", queue_type, "poison").returncode == 0

        # When worker after worker is killed by the task (a segfault, the OOM killer)
        def dead_lettered() -> bool:
            return "1 dead letter in" in admin(url, queue, "dead", "list", "--queue-type", queue_type).stdout

        runs = 0
        while not dead_lettered():
            runs += 1
            assert runs <= 6, "the poison task was never dead-lettered"
            worker = Worker(
                url,
                queue.name,
                "--queue-type",
                queue_type,
                "--handler",
                "tests.handlers:die",
                "--delivery-limit",
                "2",
            )
            workers.append(worker.ready())
            # It dies on the task, or outlives it because the task went to <queue>.dead
            wait_for(lambda w=worker: w.proc.poll() is not None or dead_lettered(), timeout=30)
            worker.stop()

        # Then after two deliveries it goes to <queue>.dead before it runs again
        assert runs == 3
        listed = admin(url, queue, "dead", "list", "--queue-type", queue_type).stdout
        assert "'poison'  reason=delivery-limit" in listed
    finally:
        delete_queues(url.split("?")[0], queue.name, f"{queue.name}.dead")


def test_json_logs_carry_the_tasks_facts_and_no_password(
    broker_queue: tuple[str, Queue], workers: list[Worker]
) -> None:
    url, queue = broker_queue
    assert run_send(url, queue.name, "logged.").returncode == 0

    worker = Worker(url, queue.name, "--log-format", "json", "--dot-seconds", "0", "--burst")
    workers.append(worker)

    assert worker.wait(30) == 0
    events = [json.loads(line) for line in worker.err]
    done = next(event for event in events if event["message"] == "task done")
    assert done["queue"] == queue.name
    assert done["redelivered"] is False
    assert done["attempt"] == 1
    assert float(done["duration"]) >= 0
    assert "delivery_tag" in done
    assert "guest:guest" not in "\n".join(worker.err)


def test_a_task_running_through_a_broker_restart_is_done_again_and_the_worker_goes_on(
    amqp_url: str, workers: list[Worker]
) -> None:
    rabbit.local_rabbitmq(amqp_url)
    queue = task_queue(unique("restart-mid-task"))
    try:
        worker = start(workers, amqp_url, queue, "--dot-seconds", "3")
        assert run_send(amqp_url, queue.name, "through the restart.").returncode == 0
        worker.wait_for(" [x] Received")

        rabbit.stop()
        worker.wait_for("reconnecting", stream="err")
        rabbit.start()

        # The first run ends on a dead channel: not acked, said plainly; the task is done again
        worker.wait_for("cannot be acked", stream="err", timeout=60)
        worker.wait_for(" [x] Done", count=2, timeout=60)
        wait_for(lambda: ready(amqp_url, queue) == 0)
        assert worker.proc.poll() is None
        assert "Traceback" not in "\n".join(worker.err)
    finally:
        rabbit.start()
        delete_queues(amqp_url, queue.name, f"{queue.name}.dead")


def test_a_restart_with_prefetch_above_concurrency_runs_only_the_running_task_twice(
    amqp_url: str, workers: list[Worker], tmp_path: Path
) -> None:
    rabbit.local_rabbitmq(amqp_url)
    queue = task_queue(unique("restart-prefetch"))
    # One long task (3 s) and nine short ones, all handed to a worker that runs one at a time
    tasks = ["long..............."] + [f"short {i}." for i in range(9)]
    batch = tmp_path / "tasks.txt"
    batch.write_text("\n".join(tasks) + "\n")
    try:
        worker = start(workers, amqp_url, queue, "--prefetch", "10", "--concurrency", "1", "--dot-seconds", "0.2")
        assert run_send(amqp_url, queue.name, "--file", str(batch)).returncode == 0
        worker.wait_for(" [x] Received 'long...............'")
        wait_for(lambda: ready(amqp_url, queue) == 0, message="all ten handed to the worker")

        # When the broker goes away while the long one runs and nine wait behind it
        rabbit.stop()
        worker.wait_for("reconnecting", stream="err")
        rabbit.start()

        # Then every task is done, and only the one that was running is done twice: once the
        # worker is back, a last task queued behind whatever the broker delivers again marks the end
        worker.wait_for("consuming", count=2, stream="err", timeout=60)
        assert run_send(amqp_url, queue.name, "last").returncode == 0
        worker.wait_for(" [x] Received 'last'", timeout=60)
        wait_for(lambda: sum(line == " [x] Done" for line in list(worker.out)) == len(worker.received()), timeout=30)
        received = worker.received()[:-1]
        twice = sorted({text for text in received if received.count(text) > 1})
        assert set(received) == set(tasks), worker.transcript()
        assert len(received) <= len(tasks) + 1 and len(twice) <= 1, worker.transcript()
        lost_line = next(line for line in worker.err if "reconnecting" in line)
        assert "(1 running tasks will be delivered again)" in lost_line, worker.transcript()
    finally:
        rabbit.start()
        delete_queues(amqp_url, queue.name, f"{queue.name}.dead")
