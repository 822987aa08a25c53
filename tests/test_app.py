"""Function tasks on memory://: an App, its tasks sent as JSON calls, run by a worker, async ones too, delays."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from kombu import Connection, Exchange, Producer

import kqueue
from kqueue import message as wire
from kqueue.admin import dead_letters, retry_dead
from kqueue.app import Args, NotJSON
from kqueue.brokers import connect
from kqueue.delays import LONGEST
from kqueue.errors import KQueueError
from kqueue.testing import HandlerFailed, MemoryQueue

from .conftest import unique


@pytest.fixture
def app() -> Iterator[kqueue.App]:
    """An app on memory:// with a queue of this test's own."""
    made = kqueue.App("memory://", unique("app"))
    yield made
    made.close()


def test_a_function_task_is_sent_as_a_json_call_and_run_with_its_arguments(app: kqueue.App) -> None:
    calls: list[tuple[str, int]] = []

    @app.task
    def resize(path: str, width: int = 100) -> None:
        calls.append((path, width))

    queue = MemoryQueue(app=app)
    resize.send("a.jpg", width=300)
    resize.send("b.jpg")

    assert queue.work() == ["resize('a.jpg', width=300)", "resize('b.jpg')"]
    assert calls == [("a.jpg", 300), ("b.jpg", 100)]


def test_on_the_wire_a_call_is_json_with_the_tasks_name_in_a_header(app: kqueue.App) -> None:
    @app.task(name="images.resize")
    def resize(path: str, width: int) -> None: ...

    message = resize.message(["a.jpg"], {"width": 300})

    assert message.content_type == "application/json"
    assert message.headers == {wire.TASK: "images.resize"}
    assert json.loads(message.body) == {"args": ["a.jpg"], "kwargs": {"width": 300}}


def test_a_call_from_a_plain_amqp_client_runs_like_one_from_kqueue(app: kqueue.App) -> None:
    done: list[list[str]] = []

    @app.task
    def tag(*words: str) -> None:
        done.append(list(words))

    queue = MemoryQueue(app=app)
    # Given a call published with Kombu alone: a JSON body and the task's name in a header
    with connect("memory://") as conn:
        Producer(conn.default_channel, exchange=Exchange("")).publish(
            b'{"args": ["x", "y"]}',
            routing_key=queue.queue.name,
            content_type="application/json",
            content_encoding="utf-8",
            headers={"x-kqueue-task": "tag"},
        )

    assert queue.work() == ["tag('x', 'y')"]
    assert done == [["x", "y"]]


@pytest.mark.parametrize(
    ("args", "kwargs", "words"),
    [
        ((datetime(2026, 1, 1),), {}, ["argument 'path'", "datetime.datetime", "JSON cannot carry"]),
        (("a.jpg",), {"width": {1: "one"}}, ["argument 'width'", "key 1 (int)"]),
        (("a.jpg",), {"width": float("nan")}, ["argument 'width'", "nan"]),
        (("a.jpg",), {"width": [1, {2, 3}]}, ["argument 'width'[1]", "set"]),
        (("a.jpg", 1, 2), {}, ["too many positional arguments"]),
        ((), {"colour": "red"}, ["missing a required argument: 'path'"]),
    ],
)
def test_a_call_that_json_or_the_function_cannot_take_is_refused_when_sending(
    app: kqueue.App, args: tuple[Any, ...], kwargs: dict[str, Any], words: list[str]
) -> None:
    @app.task
    def resize(path: str, width: Any = 100) -> None: ...

    queue = MemoryQueue(app=app)
    with pytest.raises(NotJSON) as refused:
        resize.send(*args, **kwargs)

    assert "task 'resize'" in str(refused.value)
    for word in words:
        assert word in str(refused.value)
    assert queue.messages() == 0


def test_tuples_travel_as_lists_and_the_function_can_still_be_called_here(app: kqueue.App) -> None:
    got: list[Any] = []

    @app.task
    def store(size: Any) -> str:
        got.append(size)
        return "stored"

    queue = MemoryQueue(app=app)
    store.send((300, 200))

    assert store((1, 2)) == "stored"  # a direct call runs it here and now
    assert queue.work() == ["store([300, 200])"]
    assert got == [(1, 2), [300, 200]]


def test_a_batch_of_calls_is_sent_with_its_confirms_pipelined(app: kqueue.App) -> None:
    @app.task
    def add(a: int, b: int = 0) -> None: ...

    queue = MemoryQueue(app=app)
    sent = add.send_many([(1, 2), Args(3, b=4), [5]])

    assert sent == 3
    assert queue.work() == ["add(1, 2)", "add(3, b=4)", "add(5)"]


def test_two_tasks_of_one_name_are_refused(app: kqueue.App) -> None:
    @app.task
    def resize() -> None: ...

    with pytest.raises(KQueueError, match="two tasks named 'resize'"):

        @app.task(name="resize")
        def other() -> None: ...


def test_an_unknown_task_is_dead_lettered_and_runs_once_a_worker_knows_it(app: kqueue.App) -> None:
    # Given a call of a task the worker does not register yet (a rolling deploy)
    old = kqueue.App("memory://", app.queue.name)

    @old.task
    def resize(path: str) -> None: ...

    queue = MemoryQueue(app=app)
    resize.send("a.jpg")
    old.close()

    # When a worker without it works the queue
    assert queue.work() == []

    # Then it is a dead letter that says why; replayed once the new code runs, it is done
    (letter,) = dead_letters(queue.connection, queue.queue)
    assert (letter.reason, letter.task, letter.text) == ("unknown-task", "resize", "resize('a.jpg')")
    assert "unknown task 'resize'" in letter.error
    done: list[str] = []
    app.task(lambda path: done.append(path), name="resize")
    assert retry_dead(queue.connection, queue.queue) == 1
    assert queue.work() == ["resize('a.jpg')"]
    assert done == ["a.jpg"]


def test_a_task_keeps_its_own_retries(app: kqueue.App) -> None:
    runs: list[int] = []

    @app.task(max_retries=2, retry_delay=0)
    def flaky() -> None:
        runs.append(1)
        raise RuntimeError("not yet")

    queue = MemoryQueue(app=app)
    flaky.send()

    # The worker's own setting is no retries (MemoryQueue's default): the task's two win
    with pytest.raises(HandlerFailed):
        queue.work()
    assert len(runs) == 3
    (letter,) = dead_letters(queue.connection, queue.queue)
    assert (letter.reason, letter.attempts) == ("failed", 3)


def test_text_tasks_and_function_tasks_share_a_queue(app: kqueue.App) -> None:
    @app.task
    def ping() -> None: ...

    queue = MemoryQueue(app=app)
    queue.send("hello")
    ping.send()

    assert queue.work(str.upper) == ["hello", "ping()"]


def test_a_text_task_with_no_handler_for_it_fails_and_says_so(app: kqueue.App) -> None:
    app.task(lambda: None, name="noop")
    queue = MemoryQueue(app=app)
    queue.send("hello")

    with pytest.raises(HandlerFailed) as failure:
        queue.work()
    assert "no handler for text tasks" in str(failure.value.__cause__)


# -- async tasks ----------------------------------------------------------------------


def test_an_async_task_runs_on_the_workers_event_loop(app: kqueue.App) -> None:
    seen: list[tuple[str, bool]] = []

    @app.task
    async def fetch(url: str) -> None:
        await asyncio.sleep(0.01)
        seen.append((url, threading.current_thread().name == "kqueue-asyncio"))

    queue = MemoryQueue(app=app)
    fetch.send("http://a")

    assert queue.work() == ["fetch('http://a')"]
    assert seen == [("http://a", True)]


def test_concurrency_is_the_coroutines_in_flight_at_once(app: kqueue.App) -> None:
    # Each of two coroutines waits for the other: they finish only if both run at once.
    arrived: dict[str, asyncio.Event] = {}

    @app.task
    async def meet(me: str, other: str) -> None:
        arrived.setdefault(me, asyncio.Event()).set()
        await asyncio.wait_for(arrived.setdefault(other, asyncio.Event()).wait(), timeout=5)

    queue = MemoryQueue(app=app)
    meet.send("a", "b")
    meet.send("b", "a")

    assert sorted(queue.work(concurrency=2)) == ["meet('a', 'b')", "meet('b', 'a')"]


def test_an_async_tasks_failure_is_retried_then_dead_lettered(app: kqueue.App) -> None:
    runs: list[int] = []

    @app.task(max_retries=1, retry_delay=0)
    async def broken() -> None:
        runs.append(1)
        await asyncio.sleep(0)
        raise ValueError("bad gateway")

    queue = MemoryQueue(app=app)
    broken.send()

    with pytest.raises(HandlerFailed) as failure:
        queue.work()
    assert isinstance(failure.value.__cause__, ValueError)
    assert len(runs) == 2
    assert queue.messages(dead=True) == 1


def test_an_async_text_handler_is_awaited_too() -> None:
    seen: list[str] = []

    async def handler(text: str) -> None:
        await asyncio.sleep(0)
        seen.append(text)

    queue = MemoryQueue()
    queue.send("one", "two")

    assert queue.work(handler) == ["one", "two"]
    assert seen == ["one", "two"]


# -- delays -------------------------------------------------------------------------------


def test_a_delayed_task_waits_on_the_queues_clock_not_the_tests(app: kqueue.App) -> None:
    @app.task
    def remind(who: str) -> None: ...

    queue = MemoryQueue(app=app)
    remind.send("ann", delay=3600)

    # Stored at once, not run before its time
    assert (queue.messages(), queue.messages(delayed=True)) == (0, 1)
    assert queue.work() == []
    queue.advance(3599)
    assert queue.work() == []

    # Run once the clock reaches it
    queue.advance(1)
    assert queue.work() == ["remind('ann')"]
    assert queue.messages(delayed=True) == 0


def test_a_short_delay_sent_after_a_long_one_runs_first() -> None:
    queue = MemoryQueue()
    queue.send("ten", delay=10)
    queue.send("one", delay=1)
    queue.send("now")

    assert queue.work(str) == ["now"]
    queue.advance(1)
    assert queue.work(str) == ["one"]
    queue.advance(9)
    assert queue.work(str) == ["ten"]


def test_a_task_sent_at_a_time_waits_until_then(app: kqueue.App) -> None:
    @app.task
    def report() -> None: ...

    queue = MemoryQueue(app=app)
    report.send(at=datetime.now(timezone.utc) + timedelta(minutes=5))

    assert queue.work() == []
    queue.advance(300)
    assert queue.work() == ["report()"]


def test_a_function_with_a_delay_argument_of_its_own_gets_it_and_is_delayed_with_send_with(app: kqueue.App) -> None:
    got: list[float] = []

    @app.task
    def backoff(delay: float) -> None:
        got.append(delay)

    queue = MemoryQueue(app=app)
    backoff.send(delay=5)  # the function's own argument
    backoff.send_with([7], delay=60)

    assert queue.work() == ["backoff(delay=5)"]
    queue.advance(60)
    assert queue.work() == ["backoff(7)"]
    assert got == [5, 7]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"delay": -1}, "cannot be negative"),
        ({"delay": LONGEST + 1}, "longer than the longest"),
        ({"at": datetime(2030, 1, 1)}, "has no time zone"),
        ({"delay": 5, "at": datetime(2030, 1, 1, tzinfo=timezone.utc)}, "not both"),
    ],
)
def test_a_delay_kqueue_cannot_keep_is_refused(app: kqueue.App, options: dict[str, Any], words: str) -> None:
    @app.task
    def noop() -> None: ...

    queue = MemoryQueue(app=app)
    with pytest.raises(KQueueError, match=words):
        noop.send(**options)
    assert queue.messages() + queue.messages(delayed=True) == 0


def test_a_retry_waits_in_the_broker_not_in_the_worker() -> None:
    # Given a handler that fails once, and a retry delay of an hour
    failed: list[str] = []

    def once(text: str) -> None:
        if not failed:
            failed.append(text)
            raise RuntimeError("transient")

    queue = MemoryQueue()
    queue.send("job")
    with pytest.raises(HandlerFailed):
        queue.work(once, max_retries=1, retry_delay=3600)

    # Then the retry is the broker's, delayed: nothing unacked, nothing held in a worker
    assert (queue.messages(), queue.messages(delayed=True)) == (0, 1)
    queue.advance(3600)
    assert queue.work(once) == ["job"]


def test_a_stock_kombu_memory_connection_still_never_runs_a_task_early() -> None:
    # Kombu's own memory transport keeps no delays: the worker holds a task that comes early
    stock = Connection("memory://localhost//", transport_options={"polling_interval": 0.002})
    queue = MemoryQueue()
    queue.connection = stock
    queue.send("soon", delay=0.3)
    assert stock.default_channel._size(queue.queue.name) == 1  # it is in the queue at once

    started = datetime.now(timezone.utc)
    assert queue.work(str) == ["soon"]
    assert datetime.now(timezone.utc) - started >= timedelta(seconds=0.25)
