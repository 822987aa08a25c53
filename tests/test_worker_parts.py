"""The worker's parts on their own: decisions, the ack ledger, the lifecycle, held retries, the mailbox. No broker."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
from kombu.exceptions import ContentDisallowed

from kqueue import message as wire
from kqueue.errors import describe
from kqueue.worker import Task, TaskState, WorkerSettings, policy
from kqueue.worker.acks import Ledger
from kqueue.worker.lifecycle import Lifecycle, Phase
from kqueue.worker.mailbox import Mailbox
from kqueue.worker.pool import Pool
from kqueue.worker.retries import HeldRetries

from .conftest import wait_for


@dataclass
class FakeMessage:
    """What the worker's parts use of a Kombu message, recording each broker call."""

    delivery_tag: int = 1
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    headers: dict[str, Any] = field(default_factory=dict)
    delivery_info: dict[str, Any] = field(default_factory=dict)
    body: Any = "text"
    fail_with: BaseException | None = None
    channel: Any = None  # no broker's channel: acks go through `ack` below

    def ack(self, multiple: bool = False) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append(("ack", self.delivery_tag, multiple))

    def requeue(self) -> None:
        self.calls.append(("requeue", self.delivery_tag))

    def decode(self) -> Any:
        if isinstance(self.body, BaseException):
            raise self.body
        return self.body


# -- policy: what to do with a delivery --------------------------------------------


SETTINGS = WorkerSettings(delivery_limit=3, max_retries=2, retry_delay=1.0)


def test_a_fresh_task_runs() -> None:
    decision = policy.route(FakeMessage(body="hello"), SETTINGS, now=100.0, taking=True)

    assert decision == policy.Run("hello", wire.Delivery(False, 1, False, 1, None))


def test_a_worker_that_takes_no_more_gives_every_delivery_back() -> None:
    assert policy.route(FakeMessage(), SETTINGS, now=100.0, taking=False) == policy.GiveBack()


def test_a_retry_before_its_time_is_held_for_the_rest_of_its_delay() -> None:
    message = FakeMessage(headers={wire.ATTEMPT: 2, wire.RETRY_AT: 102.5})

    decision = policy.route(message, SETTINGS, now=100.0, taking=True)

    assert isinstance(decision, policy.Hold)
    assert decision.due_in == pytest.approx(2.5)
    assert decision.delivery.attempt == 2


def test_a_retry_whose_time_has_come_runs() -> None:
    message = FakeMessage(headers={wire.ATTEMPT: 2, wire.RETRY_AT: 99.0})

    assert isinstance(policy.route(message, SETTINGS, now=100.0, taking=True), policy.Run)


def test_a_redelivery_on_a_queue_that_does_not_count_is_republished_with_its_count() -> None:
    message = FakeMessage(delivery_info={"redelivered": True})

    decision = policy.route(message, SETTINGS, now=100.0, taking=True)

    assert decision == policy.Recount({wire.DELIVERIES: 1, wire.REDELIVERED: True})


def test_a_quorum_redelivery_is_counted_by_the_broker_and_runs() -> None:
    message = FakeMessage(headers={wire.QUORUM_DELIVERY_COUNT: 1}, delivery_info={"redelivered": True})

    decision = policy.route(message, SETTINGS, now=100.0, taking=True)

    assert isinstance(decision, policy.Run)
    assert decision.delivery.number == 2


def test_a_task_over_the_delivery_limit_is_dead_lettered_unrun() -> None:
    message = FakeMessage(headers={wire.DELIVERIES: 3})

    decision = policy.route(message, SETTINGS, now=100.0, taking=True)

    assert isinstance(decision, policy.DeadLetter)
    assert decision.reason == "delivery-limit"
    assert "delivered 4 times" in decision.error


def test_an_undecodable_body_is_dead_lettered() -> None:
    message = FakeMessage(body=ContentDisallowed("refusing to deserialize"))

    decision = policy.route(message, SETTINGS, now=100.0, taking=True)

    assert isinstance(decision, policy.DeadLetter)
    assert decision.reason == "undecodable"
    assert decision.changes("q")[wire.ORIGIN] == "q"


# -- policy: what to do with a failure ----------------------------------------------


def test_a_failure_is_retried_after_a_delay_that_doubles() -> None:
    first = policy.on_failure(1, ValueError("no"), SETTINGS, now=100.0)
    second = policy.on_failure(2, ValueError("no"), SETTINGS, now=100.0)

    assert isinstance(first, policy.Retry) and isinstance(second, policy.Retry)
    assert (first.delay, second.delay) == (1.0, 2.0)
    assert second.changes[wire.ATTEMPT] == 3
    assert second.changes[wire.NOT_BEFORE] == 102.0
    assert first.error == "ValueError: no"


def test_a_failure_after_the_last_retry_is_dead_lettered() -> None:
    decision = policy.on_failure(3, KeyError("k"), SETTINGS, now=100.0)

    assert decision == policy.DeadLetter("failed", "KeyError: 'k'", 3)


# -- the ack ledger -----------------------------------------------------------------


def task_on(ledger: Ledger, message: FakeMessage) -> Task:
    return Task(text="t", message=message, ledger=ledger)  # type: ignore[arg-type]


def amqp_ledger(*, early: bool = False) -> tuple[Ledger, threading.Lock]:
    io = threading.Lock()
    return Ledger(coalesce=True, early=early, io=io, recoverable=(ConnectionError,)), io


def delivered(ledger: Ledger, count: int) -> list[Task]:
    calls: list[tuple[Any, ...]] = []
    tasks = [task_on(ledger, FakeMessage(tag, calls)) for tag in range(1, count + 1)]
    for task in tasks:
        ledger.delivered(task.delivery_tag)
    return tasks


def test_a_run_of_finished_tasks_is_acked_with_one_multiple_ack() -> None:
    ledger, _ = amqp_ledger()
    tasks = delivered(ledger, 3)

    ledger.ack(tasks)

    assert tasks[0].message.calls == [("ack", 3, True)]
    assert all(task.acked for task in tasks)
    assert ledger.unacked == 0


def test_tasks_finished_out_of_order_are_acked_one_by_one_until_the_oldest_is_done() -> None:
    ledger, _ = amqp_ledger()
    first, second, third = delivered(ledger, 3)

    # Given the third and second finish before the first
    ledger.ack([third])
    ledger.ack([second])
    # Then each is acked alone: a multiple ack would cover the first, still running
    assert first.message.calls == [("ack", 3, False), ("ack", 2, False)]

    # When the first finishes, it is acked (a multiple ack now covers it alone), and nothing is left
    ledger.ack([first])
    assert first.message.calls[-1][:2] == ("ack", 1)
    assert ledger.unacked == 0


def test_a_run_is_coalesced_up_to_the_first_unfinished_task() -> None:
    ledger, _ = amqp_ledger()
    one, two, _running, four = delivered(ledger, 4)

    ledger.ack([one, two, four])

    assert one.message.calls == [("ack", 2, True), ("ack", 4, False)]
    assert ledger.unacked == 1


def test_a_failed_ack_leaves_the_ledger_as_it_was() -> None:
    ledger, _ = amqp_ledger()
    first, second = delivered(ledger, 2)
    second.message.fail_with = ConnectionError("gone")

    with pytest.raises(ConnectionError):
        ledger.ack([first, second])

    assert not first.acked and not second.acked
    assert ledger.unacked == 2


def test_an_early_ack_is_sent_only_when_the_connection_is_free() -> None:
    ledger, io = amqp_ledger(early=True)
    (task,) = delivered(ledger, 1)

    with io:  # the connection thread is busy
        ledger.ack_early(task)
    assert not task.acked

    ledger.ack_early(task)  # the connection thread waits in select()
    assert task.acked
    assert task.message.calls == [("ack", 1, True)]


def test_an_early_ack_that_meets_a_dead_connection_leaves_the_task_to_the_connection_thread() -> None:
    ledger, io = amqp_ledger(early=True)
    (task,) = delivered(ledger, 1)
    task.message.fail_with = ConnectionError("reset")  # type: ignore[attr-defined]

    ledger.ack_early(task)

    assert not task.acked
    assert ledger.unacked == 1
    assert not io.locked()


def test_an_early_ack_does_not_hide_a_bug() -> None:
    ledger, io = amqp_ledger(early=True)
    (task,) = delivered(ledger, 1)
    task.message.fail_with = TypeError("a bug")  # type: ignore[attr-defined]

    with pytest.raises(TypeError):
        ledger.ack_early(task)
    assert not io.locked()


def test_nothing_is_acked_or_given_back_on_a_closed_channel() -> None:
    # Given a task delivered on a channel that has since been lost
    ledger, _ = amqp_ledger(early=True)
    (task,) = delivered(ledger, 1)
    ledger.close()

    # When it finishes, or is given back
    ledger.ack([task])
    ledger.ack_early(task)
    ledger.give_back(task.message)

    # Then the dead channel hears nothing of it: the broker delivers it again
    assert task.message.calls == []
    assert not task.acked
    assert not task.on_current_channel


def test_a_new_channel_has_a_ledger_of_its_own() -> None:
    old, _ = amqp_ledger()
    (stale,) = delivered(old, 1)
    old.close()
    new, _ = amqp_ledger()
    (fresh,) = delivered(new, 1)  # the same delivery tag, on the new channel

    new.ack([fresh])

    assert fresh.acked and not stale.acked
    assert stale.ledger is old and not stale.on_current_channel


def test_a_given_back_task_leaves_the_ledger() -> None:
    ledger, _ = amqp_ledger()
    first, second = delivered(ledger, 2)

    ledger.give_back(first.message)
    ledger.ack([second])

    assert first.message.calls == [("requeue", 1), ("ack", 2, True)]
    assert ledger.unacked == 0


def test_without_coalescing_each_task_is_acked_alone() -> None:
    ledger = Ledger(coalesce=False, early=False, io=threading.Lock())
    calls: list[tuple[Any, ...]] = []
    tasks = [task_on(ledger, FakeMessage(tag, calls)) for tag in (1, 2)]

    ledger.ack(tasks)

    assert calls == [("ack", 1, False), ("ack", 2, False)]


# -- the task ---------------------------------------------------------------------------


def test_a_task_is_built_from_named_fields_and_its_states_are_an_enum() -> None:
    ledger, _ = amqp_ledger()
    with pytest.raises(TypeError):
        Task("t", FakeMessage(), ledger)  # type: ignore[misc]
    task = task_on(ledger, FakeMessage())

    assert task.state is TaskState.QUEUED
    assert task.claim() and task.state is TaskState.RUNNING
    assert task.cancel() is TaskState.RUNNING  # too late: a handler thread has it


def test_a_cancelled_task_is_never_claimed() -> None:
    ledger, _ = amqp_ledger()
    task = task_on(ledger, FakeMessage())

    assert task.cancel() is TaskState.QUEUED
    assert not task.claim()


# -- the lifecycle ------------------------------------------------------------------------


def test_a_stop_is_noticed_by_the_loop_not_where_it_was_asked() -> None:
    life = Lifecycle(WorkerSettings(grace=5))

    life.ask(reason="SIGTERM")
    assert life.phase is Phase.RUNNING and life.taking  # asking changes nothing yet

    assert life.advance(clock=10.0) is Phase.STOPPING
    assert life.advance(clock=10.5) is None  # once
    assert not life.taking
    assert life.seconds_left(12.0) == 3.0
    assert not life.done(running=1, busy=True, clock=14.9, drained=lambda: False)
    assert life.done(running=1, busy=True, clock=15.0, drained=lambda: False)
    assert life.done(running=0, busy=False, clock=11.0, drained=lambda: False)


def test_a_second_stop_aborts_and_a_later_plain_stop_does_not_undo_it() -> None:
    life = Lifecycle(WorkerSettings())
    life.ask()
    life.advance(1.0)

    life.ask(now=True, reason="SIGINT")
    assert life.advance(1.1) is Phase.ABORTING
    life.ask()
    assert life.advance(1.2) is None
    assert life.done(running=3, busy=True, clock=1.3, drained=lambda: False)


def test_the_quota_stops_taking_and_ends_once_nothing_is_in_flight() -> None:
    life = Lifecycle(WorkerSettings(max_tasks=2))
    life.started = 2

    assert not life.taking
    assert not life.done(running=1, busy=True, clock=0, drained=lambda: False)
    assert life.done(running=0, busy=False, clock=0, drained=lambda: False)


def test_burst_asks_about_the_queue_only_when_nothing_is_in_flight() -> None:
    life = Lifecycle(WorkerSettings(burst=True))
    asked: list[bool] = []

    def drained() -> bool:
        asked.append(True)
        return True

    assert not life.done(running=1, busy=True, clock=0, drained=drained)
    assert asked == []
    assert life.done(running=0, busy=False, clock=0, drained=drained)


# -- held retries -------------------------------------------------------------------------


def test_held_retries_come_out_soonest_first_when_due() -> None:
    ledger, _ = amqp_ledger()
    late, soon = task_on(ledger, FakeMessage(1)), task_on(ledger, FakeMessage(2))
    held = HeldRetries()
    held.hold(late, due=20.0)
    held.hold(soon, due=10.0)

    assert held.next_due() == 10.0
    assert held.due(5.0) == []
    assert held.due(15.0) == [soon]
    assert held.take_all() == [late]
    assert len(held) == 0


# -- the mailbox and the pool -------------------------------------------------------------


def test_a_signal_landing_inside_a_wake_up_does_not_block() -> None:
    # A signal handler runs on the main thread between any two bytecodes: here,
    # while that thread holds the mailbox's lock in the middle of a post.
    mailbox = Mailbox()
    finished = threading.Event()

    def signal_lands_mid_post() -> None:
        with mailbox._lock:
            mailbox.nudge()  # what the worker's stop(), called by the signal handler, does
        finished.set()

    thread = threading.Thread(target=signal_lands_mid_post, daemon=True)
    thread.start()
    thread.join(2)
    assert finished.is_set(), "the signal handler blocked on the mailbox's lock"
    mailbox.close()


def test_finished_tasks_come_back_through_the_mailbox_in_order() -> None:
    mailbox = Mailbox()
    ledger, _ = amqp_ledger()
    tasks = [task_on(ledger, FakeMessage(tag)) for tag in (1, 2)]

    for task in tasks:
        mailbox.post(task)

    assert mailbox.has_mail()
    assert mailbox.take() == tasks
    assert mailbox.take() == []
    mailbox.clear()
    mailbox.close()


def test_the_pool_runs_tasks_shrinks_back_after_growing_and_ends_every_thread() -> None:
    mailbox = Mailbox()
    ledger, _ = amqp_ledger()
    release = threading.Event()
    baseline = threading.active_count()
    pool = Pool(1, lambda text: release.wait(5), mailbox, lambda task: None, lambda task: None)

    # Given two orphaned tasks still running, the pool grown by two for them
    pool.grow(2)
    tasks = [task_on(ledger, FakeMessage(tag)) for tag in (1, 2, 3)]
    for task in tasks:
        pool.submit(task)
    release.set()

    # Then all three run, and the pool is back to its size
    wait_for(lambda: all(task.state is TaskState.FINISHED for task in tasks) and pool.size == 1)
    assert len(mailbox.take()) == 3

    # When it shuts down, every thread it started ends
    pool.shutdown()
    wait_for(lambda: threading.active_count() == baseline, message="every pool thread ended")
    mailbox.close()


def test_an_error_with_no_message_is_described_by_its_class() -> None:
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ValueError("bad")) == "bad"
