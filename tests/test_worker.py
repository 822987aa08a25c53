"""The worker on memory://, stepped from the test's thread wherever the test needs to look between events."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection, Queue

from kqueue import message as wire
from kqueue.brokers import connect
from kqueue.handlers import dot_handler
from kqueue.producer import Outgoing, Sender, send
from kqueue.queues import dead_letter_queue, messages_ready
from kqueue.worker import Task, Worker, WorkerSettings


class Recorder(Worker):
    """A worker that notes which task ran when, and how it ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: list[str] = []
        self.finished: list[tuple[str, float, float, BaseException | None]] = []
        self.lock = threading.Lock()

    def on_task_start(self, task: Task) -> None:
        with self.lock:
            self.started.append(task.text)

    def on_task_done(self, task: Task) -> None:
        with self.lock:
            self.finished.append((task.text, task.started, task.started + task.duration, task.error))


class Stepper:
    """Drives `worker.consume()` one event at a time until a condition holds."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.steps: Iterator[None] = worker.consume()

    def until(self, condition: Callable[[], Any], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("timed out stepping the worker")
            # A handler thread may be about to make it true: look again briefly before stepping.
            if not self._soon(condition, 0.05):
                next(self.steps)

    @staticmethod
    def _soon(condition: Callable[[], Any], within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.001)
        return False

    def steps_taken(self, count: int) -> None:
        for _ in range(count):
            next(self.steps)

    def finish(self) -> None:
        for _ in self.steps:
            pass


def unacked(worker: Worker) -> int:
    qos = worker._consumer.channel.qos
    return len(qos._delivered) - len(qos._dirty)


def dead_letters(conn: Connection, queue: Queue) -> list[dict[str, Any]]:
    channel = conn.default_channel
    dead = dead_letter_queue(queue).name
    found = []
    while channel._size(dead):
        found.append(channel._get(dead))
    return found


@pytest.fixture
def make_worker(memory_conn: Connection, queue: Queue) -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(handler: Callable[[str], object] = lambda text: None, url: str = "memory://", **settings: Any) -> Recorder:
        # kqueue's memory:// keeps delays; Kombu's own ("memory://localhost//" through Connection) does not.
        conn = connect(url) if url == "memory://" else Connection(url, transport_options={"polling_interval": 0.002})
        worker = Recorder(conn, queue, handler, WorkerSettings(**settings))
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.close()


def test_a_task_is_acked_only_after_its_handler_returned(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    release = threading.Event()
    worker = make_worker(lambda text: release.wait(5))
    send(memory_conn, queue, ["slow."])
    stepper = Stepper(worker)

    # When the handler has started but not returned
    stepper.until(lambda: worker.started)
    # Then the message is out of the queue but not acknowledged
    assert messages_ready(memory_conn.default_channel, queue) == 0
    assert unacked(worker) == 1

    # When the handler returns
    release.set()
    stepper.until(lambda: worker.tasks_acked == 1)
    # Then, and only then, it is acknowledged
    assert unacked(worker) == 0


def test_with_prefetch_1_the_next_task_waits_for_the_ack(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    release = threading.Event()
    worker = make_worker(lambda text: release.wait(30), prefetch=1)
    send(memory_conn, queue, ["first", "second"])
    stepper = Stepper(worker)

    stepper.until(lambda: worker.started)
    stepper.steps_taken(1)
    assert not worker._consumer.channel.qos.can_consume()
    assert worker.started == ["first"]
    assert unacked(worker) == 1
    assert messages_ready(memory_conn.default_channel, queue) == 1

    release.set()
    stepper.until(lambda: worker.tasks_acked == 2)
    assert worker.started == ["first", "second"]


def run_in_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def test_two_workers_share_the_tasks_and_each_is_done_once(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    handler = dot_handler(0.01)
    workers = [make_worker(handler, burst=True), make_worker(handler, burst=True)]
    send(memory_conn, queue, [f"task {i}." for i in range(20)])

    threads = [run_in_thread(worker) for worker in workers]
    for thread in threads:
        thread.join(10)

    assert not any(thread.is_alive() for thread in threads)
    done = sorted(text for worker in workers for text, *_ in worker.finished)
    assert done == sorted(f"task {i}." for i in range(20))
    assert all(worker.finished for worker in workers), "each worker took a share"


def test_fair_dispatch_keeps_both_workers_busy_when_odd_tasks_are_heavy(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    # Given the tutorial's case: odd tasks heavy (0.3 s), even ones light
    heavy, tasks = 0.3, []
    for i in range(8):
        tasks.append("heavy..." if i % 2 == 0 else "light")
    workers = [make_worker(dot_handler(heavy / 3), burst=True, prefetch=1) for _ in range(2)]
    send(memory_conn, queue, tasks)

    # When two workers with prefetch 1 share them
    threads = [run_in_thread(worker) for worker in workers]
    for thread in threads:
        thread.join(10)

    # Then the four heavy tasks split two and two: close to the ideal 0.6 s,
    # where handing out by turns would give one worker all four (1.2 s)
    records = [r for worker in workers for r in worker.finished]
    assert len(records) == 8
    makespan = max(end for _, _, end, _ in records) - min(start for _, start, _, _ in records)
    heavy_counts = sorted(sum(text.startswith("heavy") for text, *_ in w.finished) for w in workers)
    assert heavy_counts == [2, 2]
    assert makespan < 0.9, f"makespan {makespan:.2f}s against an ideal of 0.6s"


def test_a_failing_task_is_retried_then_dead_lettered_with_its_error(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    calls: list[str] = []

    def always_fails(text: str) -> None:
        calls.append(text)
        raise ValueError(f"cannot do {text}")

    worker = make_worker(always_fails, burst=True, max_retries=2, retry_delay=0.01)
    send(memory_conn, queue, ["doomed"])

    worker.run()

    # Then it ran three times and then went to <queue>.dead, and nowhere else
    assert calls == ["doomed"] * 3
    assert messages_ready(memory_conn.default_channel, queue) == 0
    (dead,) = dead_letters(memory_conn, queue)
    assert dead["headers"][wire.ERROR] == "ValueError: cannot do doomed"
    assert dead["headers"][wire.ATTEMPT] == 3
    assert dead["headers"][wire.REASON] == "failed"
    assert dead["headers"][wire.ORIGIN] == queue.name
    assert dead["content-type"] == "text/plain"


def test_a_task_that_fails_once_is_done_on_its_retry(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    failed: set[str] = set()

    def flaky(text: str) -> None:
        if text not in failed:
            failed.add(text)
            raise RuntimeError("transient")

    worker = make_worker(flaky, burst=True, retry_delay=0.01)
    send(memory_conn, queue, ["flaky"])

    worker.run()

    assert [(text, error is None) for text, _, _, error in worker.finished] == [("flaky", False), ("flaky", True)]
    assert dead_letters(memory_conn, queue) == []


def test_a_retry_waiting_for_its_delay_blocks_no_other_task(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    failed: set[str] = set()

    def first_fails(text: str) -> None:
        if text == "fails once" and text not in failed:
            failed.add(text)
            raise RuntimeError("transient")

    # prefetch 1: were the waiting retry to hold the only slot, nothing else would run
    worker = make_worker(first_fails, burst=True, prefetch=1, retry_delay=0.5)
    send(memory_conn, queue, ["fails once", "a", "b", "c"])

    worker.run()

    order = [text for text, _, _, error in worker.finished if error is None]
    assert order == ["a", "b", "c", "fails once"]


def test_a_short_retry_does_not_wait_behind_a_longer_one(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    failed: set[str] = set()

    def fails_once(text: str) -> None:
        if text not in failed:
            failed.add(text)
            raise RuntimeError("transient")

    # Given a task on its third attempt (next delay 4 x 0.1 s) queued before one on its first (0.1 s)
    with Sender(memory_conn, queue) as sender:
        sender.publish(
            [
                Outgoing(b"long", queue.name, headers={wire.ATTEMPT: 3}),
                Outgoing(b"short", queue.name),
            ]
        )
    worker = make_worker(fails_once, burst=True, retry_delay=0.1)

    worker.run()

    # Then the short one's retry ran first
    assert [text for text, _, _, error in worker.finished if error is None] == ["short", "long"]


def test_a_body_that_cannot_be_decoded_is_dead_lettered_not_dropped(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    with Sender(memory_conn, queue) as sender:
        sender.publish(
            [
                Outgoing(b"{not json", queue.name, content_type="application/json"),
                Outgoing(b"\x80\x04K\x01.", queue.name, "application/x-python-serialize", "binary"),
                Outgoing(b"fine", queue.name),
            ]
        )
    worker = make_worker(burst=True)

    worker.run()

    assert worker.started == ["fine"]
    dead = dead_letters(memory_conn, queue)
    assert [d["headers"][wire.REASON] for d in dead] == ["undecodable", "undecodable"]
    assert "DecodeError" in dead[0]["headers"][wire.ERROR]
    assert "ContentDisallowed" in dead[1]["headers"][wire.ERROR]
    assert dead[1]["content-type"] == "application/x-python-serialize"


def test_json_bodies_reach_the_handler_as_text(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    with Sender(memory_conn, queue) as sender:
        sender.publish(
            [
                Outgoing(b'"resize photo.jpg"', queue.name, content_type="application/json"),
                Outgoing(b'{"photo": 1}', queue.name, content_type="application/json"),
            ]
        )
    worker = make_worker(burst=True)

    worker.run()

    assert worker.started == ["resize photo.jpg", '{"photo": 1}']


def test_a_task_delivered_too_often_is_dead_lettered_before_it_runs(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    # Given a task already delivered five times without an ack (a worker died on it each time)
    with Sender(memory_conn, queue) as sender:
        sender.publish([Outgoing(b"kills its worker", queue.name, headers={wire.DELIVERIES: 5})])
    worker = make_worker(burst=True, delivery_limit=5)

    worker.run()

    assert worker.started == []
    (dead,) = dead_letters(memory_conn, queue)
    assert dead["headers"][wire.REASON] == "delivery-limit"


def test_stop_lets_the_running_task_finish_and_acks_it(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    release = threading.Event()
    worker = make_worker(lambda text: release.wait(5), grace=5)
    send(memory_conn, queue, ["running", "waiting"])
    stepper = Stepper(worker)
    stepper.until(lambda: worker.started)

    # When a stop is asked while a task runs, and the task then finishes within the grace
    worker.stop()
    release.set()
    stepper.finish()

    # Then it is acked, and the next task was never taken
    assert worker.tasks_acked == 1
    assert worker.started == ["running"]
    assert messages_ready(memory_conn.default_channel, queue) == 1


def test_a_task_still_running_when_the_grace_ends_is_requeued(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    release = threading.Event()
    worker = make_worker(lambda text: release.wait(5), grace=0.05)
    send(memory_conn, queue, ["unfinished"])
    stepper = Stepper(worker)
    stepper.until(lambda: worker.started)

    worker.stop()
    stepper.finish()
    release.set()

    # Then it is back in the queue, not acked and not lost
    assert worker.tasks_acked == 0
    assert messages_ready(memory_conn.default_channel, queue) == 1


def test_prefetched_tasks_that_never_started_go_back_on_stop(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    release = threading.Event()
    worker = make_worker(lambda text: release.wait(5), prefetch=3, concurrency=1, grace=5)
    send(memory_conn, queue, ["one", "two", "three"])
    stepper = Stepper(worker)
    stepper.until(lambda: worker.started and len(worker.dispatcher.inflight) == 3)

    worker.stop()
    stepper.steps_taken(1)  # the stop is seen while "one" still runs
    release.set()
    stepper.finish()

    assert worker.started == ["one"]
    assert worker.tasks_acked == 1
    assert messages_ready(memory_conn.default_channel, queue) == 2


def test_concurrency_runs_tasks_side_by_side(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    barrier = threading.Barrier(3, timeout=5)
    worker = make_worker(lambda text: barrier.wait(), concurrency=3, burst=True)
    send(memory_conn, queue, ["a", "b", "c"])

    worker.run()

    # All three met at the barrier: they ran at once (one at a time would break it)
    assert worker.tasks_acked == 3
    assert worker.settings.prefetch_count == 3


def test_max_tasks_stops_after_that_many_and_leaves_the_rest(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    worker = make_worker(max_tasks=2, prefetch=3, concurrency=1)
    send(memory_conn, queue, ["1", "2", "3", "4"])

    worker.run()

    assert worker.tasks_acked == 2
    assert messages_ready(memory_conn.default_channel, queue) == 2


def test_burst_on_an_empty_queue_returns(make_worker: Callable[..., Recorder]) -> None:
    worker = make_worker(burst=True)

    worker.run()

    assert worker.tasks_run == 0


def test_max_tasks_is_not_exceeded_by_a_held_retry(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder]
) -> None:
    failed: set[str] = set()

    def fails_once(text: str) -> None:
        if text == "fails once" and text not in failed:
            failed.add(text)
            raise RuntimeError("transient")

    # On a broker that keeps no delays (Kombu's own memory transport), a retry comes back at once
    stock = "memory://localhost//"
    worker = make_worker(fails_once, url=stock, max_tasks=2, prefetch=3, concurrency=1, retry_delay=0.3)
    send(Connection(stock), queue, ["fails once"])
    stepper = Stepper(worker)
    # Given the failed task's retry held by the worker until its time
    stepper.until(lambda: len(worker.dispatcher.held) == 1)

    # When another task arrives and runs, reaching the quota of two
    send(memory_conn, queue, ["second"])
    stepper.finish()

    # Then the retry does not run as a third task: it is back in the queue
    assert worker.started == ["fails once", "second"]
    assert worker.tasks_run == 2
    assert messages_ready(memory_conn.default_channel, queue) == 1


def test_a_stop_asked_from_a_signal_handler_is_logged_by_the_loop(
    memory_conn: Connection, queue: Queue, make_worker: Callable[..., Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    worker = make_worker()
    stepper = Stepper(worker)
    stepper.steps_taken(1)

    # When a signal handler asks for a stop, nothing is logged there
    with caplog.at_level("WARNING", logger="kqueue"):
        caplog.clear()
        worker.stop(reason="SIGTERM")
        assert caplog.records == []
        # Then the loop logs it on its next step, and ends
        stepper.finish()
    assert [record.getMessage() for record in caplog.records] == ["SIGTERM: finishing running tasks, taking no more"]
