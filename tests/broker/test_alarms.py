"""RabbitMQ resource alarms: the broker blocks every connection that publishes; kqueue says so and loses nothing.

These lower the local broker's memory watermark for the test (everyone on the
machine is blocked meanwhile) and always put it back.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from kombu import Queue

from kqueue.queues import task_queue

from ..conftest import delete_queues, unique, wait_for
from . import rabbit
from .procs import Worker, ready, run_send, tool

pytestmark = pytest.mark.broker


def _watermark() -> str:
    return rabbit.ctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().").strip()


def _alarmed() -> bool:
    return "memory" in rabbit.ctl("eval", "rabbit_alarm:get_alarms().")


@pytest.fixture
def amqp_queue(amqp_url: str) -> Iterator[tuple[str, Queue]]:
    queue = task_queue(unique("alarm"))
    yield amqp_url, queue
    delete_queues(amqp_url, queue.name, f"{queue.name}.dead")


@pytest.fixture
def memory_alarm(amqp_url: str) -> Iterator[Callable[[], None]]:
    """Raises RabbitMQ's memory alarm when called; lowers it again after the test, whatever happens."""
    rabbit.local_rabbitmq(amqp_url)
    before = _watermark()
    if not before.replace(".", "", 1).isdigit():
        before = "0.4"  # an absolute watermark reads otherwise; the machine's default is relative

    def raise_alarm() -> None:
        rabbit.ctl("set_vm_memory_high_watermark", "0.00001")
        wait_for(_alarmed, timeout=30, message="the memory alarm")

    try:
        yield raise_alarm
    finally:
        rabbit.ctl("set_vm_memory_high_watermark", before)
        wait_for(lambda: not _alarmed(), timeout=30, message="the alarm cleared")


def test_a_blocked_broker_holds_retries_but_the_worker_goes_on_and_stops_within_its_grace(
    amqp_queue: tuple[str, Queue], memory_alarm: Callable[[], None], workers: list[Worker]
) -> None:
    url, queue = amqp_queue
    for text in ("bad1", "ok1", "ok2", "ok3", "ok4", "ok5"):
        assert run_send(url, queue.name, text).returncode == 0

    # Given the broker blocking publishers, and a worker whose first task fails
    memory_alarm()
    worker = Worker(url, queue.name, "--handler", "tests.handlers:fail_bad", "--grace", "3")
    workers.append(worker)

    # Then it says the broker blocked its retry, and does the other five all the same
    worker.wait_for("blocked publishing", stream="err", timeout=30)
    worker.wait_for(" [x] Done", count=5, timeout=30)
    blocked = next(line for line in worker.err if "blocked publishing" in line)
    assert "low on memory" in blocked

    # When it is stopped, it keeps its grace and exits cleanly, giving the failed task back
    began = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.transcript()
    assert time.monotonic() - began < 10
    assert "Traceback" not in worker.transcript()
    wait_for(lambda: ready(url, queue) == 1, timeout=30, message="the failed task back in its queue")


def test_kqueue_send_to_a_blocked_broker_says_why_and_gives_up_within_its_bound(
    amqp_queue: tuple[str, Queue], memory_alarm: Callable[[], None]
) -> None:
    url, queue = amqp_queue
    memory_alarm()

    began = time.monotonic()
    done = run_send(url, queue.name, "--confirm-timeout", "2", "hello", timeout=60)

    assert time.monotonic() - began < 20
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert any("blocked this connection (low on memory)" in line for line in lines), done.stderr
    assert "confirmed 0 of 1" in lines[-1] or "was not confirmed" in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


def test_kqueue_stat_works_while_the_broker_blocks_publishers(
    amqp_queue: tuple[str, Queue], memory_alarm: Callable[[], None]
) -> None:
    url, queue = amqp_queue
    assert run_send(url, queue.name, "waiting").returncode == 0
    memory_alarm()

    done = subprocess.run(
        [tool("kqueue"), "stat", "--broker", url, "--queue", queue.name], capture_output=True, text=True, timeout=30
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[:2] == [queue.name, "1"]
