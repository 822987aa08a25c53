"""One task at a time (concurrency 1, prefetch 1): tasks run on the connection thread, and the keeper covers long ones.

Each test runs `Worker.run()` as users do, on memory://, in a thread of the test.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection, Queue

from kqueue.brokers import connect
from kqueue.producer import send
from kqueue.queues import messages_ready
from kqueue.worker import Task, Worker, WorkerSettings
from kqueue.worker.inline import PARK_AFTER, TICK

from .conftest import wait_for


class Watched(Worker):
    """Notes the thread each task and hook ran on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threads: list[str] = []
        self.consuming_on = ""
        self.turns_on: set[str] = set()

    def on_consuming(self, broker: str) -> None:
        self.consuming_on = threading.current_thread().name

    def on_task_start(self, task: Task) -> None:
        self.threads.append(threading.current_thread().name)

    def on_turn(self) -> None:
        self.turns_on.add(threading.current_thread().name)


@pytest.fixture
def make_worker(queue: Queue) -> Iterator[Callable[..., Watched]]:
    made: list[Watched] = []

    def make(handler: Callable[[str], object], **settings: Any) -> Watched:
        worker = Watched(connect("memory://"), queue, handler, WorkerSettings(**settings))
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop(now=True)
        worker.close()


def run_in_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def test_one_task_at_a_time_runs_on_the_connection_thread(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Watched]
) -> None:
    worker = make_worker(lambda text: None, burst=True)
    send(memory_conn, queue, ["a", "b", "c"])

    worker.run()

    assert worker.tasks_acked == 3
    assert worker.threads == ["kqueue-connection"] * 3
    assert worker.consuming_on == "kqueue-connection"


def test_more_at_a_time_run_on_handler_threads(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Watched]
) -> None:
    worker = make_worker(lambda text: None, burst=True, concurrency=2)
    send(memory_conn, queue, ["a", "b", "c"])

    worker.run()

    assert worker.tasks_acked == 3
    assert all(name.startswith("kqueue-task-") for name in worker.threads), worker.threads
    assert worker.consuming_on == threading.current_thread().name


def test_a_long_task_has_its_connection_kept_and_a_stop_acted_on_while_it_runs(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Watched], caplog: pytest.LogCaptureFixture
) -> None:
    # Given a task that runs until the test lets it go, on the connection thread
    release = threading.Event()
    worker = make_worker(lambda text: release.wait(30), grace=30)
    send(memory_conn, queue, ["long", "next"])
    with caplog.at_level(logging.WARNING, logger="kqueue"):
        thread = run_in_thread(worker)
        wait_for(lambda: worker.threads, message="the long task to start")

        # Then the keeper turns the loop meanwhile: taken over within two of its looks, a turn at least every second
        wait_for(lambda: "kqueue-keeper" in worker.turns_on, timeout=2.0, message="the keeper to turn the loop")

        # And a stop asked now is acted on while the task still runs, not after it
        worker.stop(reason="SIGTERM")
        wait_for(
            lambda: any("finishing running tasks" in record.getMessage() for record in caplog.records),
            timeout=1.0,
            message="the stop to be seen while the task runs",
        )
        assert thread.is_alive()

    # When the task then ends within the grace
    release.set()
    thread.join(5)

    # Then it is acked, and the next task was never taken
    assert not thread.is_alive()
    assert worker.tasks_acked == 1
    assert worker.threads == ["kqueue-connection"]
    assert messages_ready(memory_conn.default_channel, queue) == 1


def test_run_returns_at_the_end_of_the_grace_though_the_task_is_stuck_and_gives_it_back(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Watched]
) -> None:
    release = threading.Event()
    worker = make_worker(lambda text: release.wait(30), grace=0.3)
    send(memory_conn, queue, ["stuck"])
    thread = run_in_thread(worker)
    wait_for(lambda: worker.threads, message="the task to start")

    # When a stop is asked and the handler outlasts the grace
    worker.stop()

    # Then run() returns with the handler still running, and the task is the broker's again
    thread.join(5)
    assert not thread.is_alive()
    assert worker.dispatcher.requeued_unfinished == 1
    assert worker.tasks_acked == 0
    assert messages_ready(memory_conn.default_channel, queue) == 1
    release.set()


def test_a_keeper_asleep_after_idling_wakes_for_the_next_long_task(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Watched]
) -> None:
    release = threading.Event()
    worker = make_worker(lambda text: release.wait(30) if text == "long" else None)
    send(memory_conn, queue, ["short"])
    thread = run_in_thread(worker)
    wait_for(lambda: worker.tasks_acked == 1, message="the short task to be done")

    # Given a keeper that has seen no task running for a while, and sleeps
    assert worker._keeper is not None
    wait_for(lambda: worker._keeper._parked, timeout=(PARK_AFTER + 5) * TICK, message="the keeper to sleep")

    # When a long task comes
    send(memory_conn, queue, ["long"])
    wait_for(lambda: len(worker.threads) == 2, message="the long task to start")

    # Then the keeper wakes and keeps the loop turning while it runs
    worker.turns_on.clear()
    wait_for(lambda: "kqueue-keeper" in worker.turns_on, timeout=2.0, message="the keeper to turn the loop")
    release.set()
    wait_for(lambda: worker.tasks_acked == 2, message="the long task to be acked")
    worker.stop()
    thread.join(5)
    assert not thread.is_alive()
