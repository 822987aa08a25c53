"""``kqueue-work --processes N`` and ``--metrics-port``, as real processes on the local RabbitMQ."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kqueue.queues import QueueType, task_queue

from ..conftest import delete_queues, unique, wait_for
from ..test_fleet import free_port, get, notes, scrape
from . import rabbit
from .procs import Worker, ready, run_send

pytestmark = pytest.mark.broker


@pytest.fixture
def queue_name(amqp_url: str) -> Iterator[str]:
    name = unique("fleet")
    yield name
    delete_queues(amqp_url, name, f"{name}.dead")


def fleet(workers: list[Worker], url: str, queue: str, processes: int, *args: str, pids: Path) -> Worker:
    """A fleet of `processes` worker processes running tests.handlers:record_pid, all of them consuming."""
    worker = Worker(
        url,
        queue,
        "--processes",
        str(processes),
        "--handler",
        "tests.handlers:record_pid",
        *args,
        env={"KQUEUE_TEST_PIDS": str(pids)},
    )
    workers.append(worker)
    worker.wait_for("consuming", count=processes, stream="err")
    return worker


def send(url: str, queue: str, *texts: str) -> None:
    for text in texts:
        assert run_send(url, queue, text).returncode == 0


def test_three_processes_share_a_queue(amqp_url: str, queue_name: str, workers: list[Worker], tmp_path: Path) -> None:
    # Given a fleet of three worker processes
    pids = tmp_path / "pids"
    parent = fleet(workers, amqp_url, queue_name, 3, pids=pids)

    # When 30 tasks of a tenth of a second each arrive
    texts = [f"t{i}." for i in range(30)]
    send(amqp_url, queue_name, *texts)

    # Then every task was done, by three different processes, none of them the parent
    done = wait_for(lambda: len(notes(pids, "done")) == 30 and notes(pids, "done"), 30, "30 tasks done")
    assert set(done) == set(texts)
    assert len(set(done.values())) == 3
    assert parent.proc.pid not in done.values()

    # And SIGTERM stops them all, exit status 0, nothing left behind
    parent.signal(signal.SIGTERM)
    assert parent.wait(30) == 0, parent.transcript()
    assert ready(amqp_url, task_queue(queue_name, QueueType.CLASSIC)) == 0


def test_a_burst_fleet_exits_0_once_every_process_found_the_queue_empty(
    amqp_url: str, queue_name: str, workers: list[Worker], tmp_path: Path
) -> None:
    # Given 20 tasks waiting
    texts = [f"b{i}" for i in range(20)]
    send(amqp_url, queue_name, *texts)

    # When a burst fleet of two processes works them
    pids = tmp_path / "pids"
    parent = Worker(
        amqp_url,
        queue_name,
        "--processes",
        "2",
        "--burst",
        "--quiet",
        "--handler",
        "tests.handlers:record_pid",
        env={"KQUEUE_TEST_PIDS": str(pids)},
    )
    workers.append(parent)

    # Then it exits 0 with every task done and none replaced
    assert parent.wait(60) == 0, parent.transcript()
    assert set(notes(pids, "done")) == set(texts)
    assert not any("starting another" in line for line in parent.err)
    assert ready(amqp_url, task_queue(queue_name, QueueType.CLASSIC)) == 0


def test_a_killed_process_is_replaced_and_its_task_done_by_another(
    amqp_url: str, queue_name: str, workers: list[Worker], tmp_path: Path
) -> None:
    # Given a fleet of two, one of them running a three-second task
    pids = tmp_path / "pids"
    parent = fleet(workers, amqp_url, queue_name, 2, pids=pids)
    send(amqp_url, queue_name, "long" + "." * 30)
    victim = wait_for(lambda: notes(pids, "start").get("long" + "." * 30), 30, "the long task to start")

    # When that process is SIGKILLed mid-task
    os.kill(victim, signal.SIGKILL)

    # Then the parent says so in one line and starts another
    parent.wait_for("was killed by SIGKILL", stream="err")
    parent.wait_for("consuming", count=3, stream="err")
    # And the task is done, by another process
    done = wait_for(lambda: notes(pids, "done").get("long" + "." * 30), 30, "the long task done again")
    assert done != victim
    # And once stopped, nothing is left behind
    parent.signal(signal.SIGTERM)
    assert parent.wait(30) == 0, parent.transcript()
    assert ready(amqp_url, task_queue(queue_name, QueueType.CLASSIC)) == 0


def test_sigterm_lets_running_tasks_finish_within_the_grace_or_requeues_them(
    amqp_url: str, queue_name: str, workers: list[Worker], tmp_path: Path
) -> None:
    # Given a fleet of two with a grace of two seconds, running a short task and a long one
    pids = tmp_path / "pids"
    parent = fleet(workers, amqp_url, queue_name, 2, "--grace", "2", pids=pids)
    short, long = "short.....", "long" + "." * 100
    send(amqp_url, queue_name, short, long)
    wait_for(lambda: set(notes(pids, "start")) == {short, long}, 30, "both tasks to start")

    # When SIGTERM reaches the parent
    parent.signal(signal.SIGTERM)

    # Then each worker process finishes what it can, requeues the rest, and the fleet exits 0
    assert parent.wait(30) == 0, parent.transcript()
    assert set(notes(pids, "done")) == {short}
    assert sum("task requeued unfinished" in line for line in parent.err) == 1
    assert ready(amqp_url, task_queue(queue_name, QueueType.CLASSIC)) == 1


@pytest.mark.parametrize("processes", [1, 2])
def test_metrics_count_exactly_what_happened(
    amqp_url: str, queue_name: str, workers: list[Worker], processes: int
) -> None:
    # Given a worker (or a fleet) serving metrics, whose handler fails tasks named bad...
    port = free_port()
    worker = Worker(
        amqp_url,
        queue_name,
        "--processes",
        str(processes),
        "--metrics-port",
        str(port),
        "--handler",
        "tests.handlers:fail_bad",
        "--max-retries",
        "1",
        "--retry-delay",
        "0",
    )
    workers.append(worker)
    worker.wait_for("consuming", count=processes, stream="err")

    # When three good tasks and a bad one arrive
    send(amqp_url, queue_name, "good1", "good2", "good3", "bad1")

    # Then the scrape counts each: the bad one failed twice, was retried once, then dead-lettered
    wait_for(lambda: scrape(port).get('kqueue_tasks_dead_lettered_total{reason="failed"}') == 1, 30, "a dead letter")
    wait_for(lambda: scrape(port)["kqueue_tasks_done_total"] == 3, 30, "three done")
    metrics = scrape(port)
    assert metrics["kqueue_tasks_received_total"] == 5
    assert metrics["kqueue_tasks_done_total"] == 3
    assert metrics["kqueue_tasks_failed_total"] == 2
    assert metrics["kqueue_tasks_retried_total"] == 1
    assert metrics['kqueue_tasks_dead_lettered_total{reason="failed"}'] == 1
    assert metrics["kqueue_task_duration_seconds_count"] == 5
    assert metrics['kqueue_task_duration_seconds_bucket{le="+Inf"}'] == 5
    assert metrics["kqueue_tasks_running"] == 0
    assert metrics["kqueue_retries_waiting"] == 0
    assert metrics["kqueue_broker_reconnects_total"] == 0
    assert metrics["kqueue_worker_processes"] == processes
    assert all(metrics[f'kqueue_broker_connected{{process="{i}"}}'] == 1 for i in range(processes))
    assert time.time() - metrics["kqueue_last_task_finished_timestamp_seconds"] < 60
    assert get(port, "/healthz")[0] == 200

    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.transcript()


def test_healthz_turns_503_while_the_broker_is_down_and_200_once_it_is_back(
    amqp_url: str, queue_name: str, workers: list[Worker]
) -> None:
    rabbit.local_rabbitmq(amqp_url)
    # Given a healthy fleet of two
    port = free_port()
    worker = Worker(amqp_url, queue_name, "--processes", "2", "--metrics-port", str(port), "--quiet")
    workers.append(worker)
    wait_for(lambda: get(port, "/healthz")[0] == 200, 30, "healthy")
    try:
        # When RabbitMQ stops
        rabbit.stop()

        # Then the health check fails, saying why in one line
        _, reason = wait_for(lambda: (got := get(port, "/healthz"))[0] == 503 and got, 30, "unhealthy")
        assert "not connected to the broker" in reason
        assert reason.count("\n") == 1
        assert scrape(port)["kqueue_broker_reconnects_total"] >= 2
    finally:
        rabbit.start()

    # And once it is back, the health check passes again
    wait_for(lambda: get(port, "/healthz")[0] == 200, 90, "healthy again")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.transcript()
