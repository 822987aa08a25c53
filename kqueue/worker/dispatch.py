"""What the connection thread does with a task between its delivery and its ack."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kombu import Connection, Queue
from kombu.message import Message

from kqueue import message as wire
from kqueue.logs import fields
from kqueue.worker import policy
from kqueue.worker.acks import Ledger
from kqueue.worker.lifecycle import Lifecycle
from kqueue.worker.outbox import Outbox
from kqueue.worker.pool import Pool
from kqueue.worker.qos import Prefetch
from kqueue.worker.retries import HeldRetries
from kqueue.worker.settings import WorkerSettings
from kqueue.worker.task import Registered, Task, TaskState

__all__ = ["Dispatcher"]

log = logging.getLogger("kqueue.worker")


class Owner(Protocol):
    """What the dispatcher calls of its worker: two hooks, and a stop to taking tasks."""

    def on_retry(self, task: Task, delay: float) -> None: ...

    def on_dead_letter(self, task: Task, reason: str) -> None: ...

    def stop_taking(self) -> None: ...


class Dispatcher:
    """The worker's book of tasks, and what happens to each: run, hold, retry, dead-letter, ack, give back.

    It holds the tasks handed to handler threads (in flight), the retries
    held until their time, and the originals whose copies (retries, recounts,
    dead letters) await the broker's confirm. Every call is on the connection thread.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        lifecycle: Lifecycle,
        pool: Pool,
        queues: tuple[Queue, Queue],
        owner: Owner,
        tasks: Mapping[str, Registered],
    ) -> None:
        self.settings = settings
        self.tasks = tasks
        #: Whether the broker keeps delays (`kqueue.delays.kept_by`), known once connected.
        self.can_delay = False
        #: Unix time the last retry this worker sent to the broker is due.
        self.retries_due = 0.0
        self.lifecycle = lifecycle
        self.queue, self.dead_queue = queues
        self.tasks_acked = 0
        #: Tasks whose handler was still running when the worker gave them back (a hard stop, the grace ran out).
        self.requeued_unfinished = 0
        self.inflight: dict[int, Task] = {}  # handed to a handler thread, not yet settled
        self.held = HeldRetries()
        self.ledger = Ledger(coalesce=False, early=False, io=threading.Lock())
        self.ledger.close()  # no channel yet
        #: Where a task goes to run: the pool's threads, or a queue the connection thread runs itself.
        self.submit: Callable[[Task], None] = pool.submit
        self._owner = owner
        self._outbox: Outbox | None = None
        self._copies_connection: Callable[[], Connection] | None = None
        self._prefetch: Prefetch | None = None

    def new_channel(self, ledger: Ledger, prefetch: Prefetch, copies_connection: Callable[[], Connection]) -> None:
        """A channel (re)opened: its ledger, its prefetch, and where copies go."""
        self.ledger = ledger
        self._prefetch = prefetch
        self._copies_connection = copies_connection

    @property
    def copies_waiting(self) -> int:
        return self._outbox.pending if self._outbox is not None else 0

    @property
    def copies_sock(self) -> Any:
        """The socket the copies' confirms arrive on while some are awaited, else None."""
        outbox = self._outbox
        return outbox.sock if outbox is not None and outbox.pending else None

    @property
    def busy(self) -> bool:
        """Whether any task is running, waiting to run, waiting for its retry or for its copy's confirm."""
        return bool(self.inflight or self.held or self.copies_waiting)

    # -- a delivery ------------------------------------------------------------------

    def accept(self, message: Message) -> None:
        """Decide what to do with a delivery (`policy.route`), and do it."""
        decision = policy.route(
            message,
            self.settings,
            now=time.time(),
            taking=self.lifecycle.taking,
            tasks=self.tasks,
            can_delay=self.can_delay,
        )
        if isinstance(decision, policy.GiveBack):
            self.ledger.give_back(message)
            return
        if isinstance(decision, (policy.Run, policy.Hold)):
            task = Task(
                text=decision.text,
                call=decision.call,
                message=message,
                ledger=self.ledger,
                redelivered=decision.delivery.redelivered,
                attempt=decision.delivery.attempt,
            )
            if isinstance(decision, policy.Hold):
                self.held.hold(task, time.monotonic() + decision.due_in)
                log.debug("retry held", extra=task.facts(queue=self.queue.name, due_in=f"{decision.due_in:.3f}"))
            else:
                self._start(task)
            return
        original = Task(text="", message=message, ledger=self.ledger)
        if isinstance(decision, policy.Recount):
            # This queue does not count deliveries: carry the count in a copy.
            self._republish(original, self.queue.name, decision.changes)
        elif isinstance(decision, policy.Postpone):
            log.debug(
                "task came long before its time; back to the broker to wait",
                extra=fields(queue=self.queue.name, due_in=f"{decision.due_in:.3f}"),
            )
            self._republish(original, self.queue.name, {})
        else:
            self._dead_letter(original, decision)

    def _start(self, task: Task) -> None:
        self.inflight[id(task)] = task
        self.lifecycle.started += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task received", extra=task.facts(queue=self.queue.name))
        self.submit(task)
        if self.lifecycle.quota_reached:
            self._owner.stop_taking()

    # -- finished tasks -----------------------------------------------------------------

    def settle(self, finished: list[Task]) -> bool:
        """Ack what succeeded, retry or dead-letter what failed; whether any was acked."""
        done: list[Task] = []
        for task in finished:
            self.inflight.pop(id(task), None)
            if task.acked:  # by its handler thread, on the channel it came from
                done.append(task)
            elif not task.on_current_channel:
                log.warning(
                    "task finished after its channel was closed, so it cannot be acked: "
                    "the broker delivers it again, if it has not already",
                    extra=task.facts(queue=self.queue.name, duration=f"{task.duration:.3f}"),
                )
            elif task.error is None:
                done.append(task)
            else:
                self._failed(task)
        if not done:
            return False
        if len(done) == 1:
            self.ledger.ack_one(done[0])  # one task at a time: the common case, quickly
        else:
            self.ledger.ack(done)
        self.tasks_acked += len(done)
        if log.isEnabledFor(logging.INFO):
            for task in done:
                log.info("task done", extra=task.facts(queue=self.queue.name, duration=f"{task.duration:.3f}"))
        return True

    def tend(self, *, consuming: bool) -> None:
        """Ack originals whose copies are confirmed, start retries now due, fit prefetch to what waits here.

        A no-op, and a quick one, while nothing waits: no copy, no held retry, prefetch as set.
        """
        prefetch = self._prefetch
        if self._outbox is None and not self.held and (prefetch is None or prefetch.now == prefetch.count):
            return
        self.settle_copies()
        self.release_due_retries()
        if consuming:
            self.update_prefetch()

    def _failed(self, task: Task) -> None:
        assert task.error is not None
        settings = self.settings if task.call is None else task.call.task.settings(self.settings)
        decision = policy.on_failure(task.attempt, task.error, settings, now=time.time())
        if isinstance(decision, policy.DeadLetter):
            self._dead_letter(task, decision)
            return
        log.warning(
            "task failed; retrying in %.1fs",
            decision.delay,
            extra=task.facts(queue=self.queue.name, error=decision.error, duration=f"{task.duration:.3f}"),
            exc_info=_traceback(task.error),
        )
        self._republish(task, self.queue.name, decision.changes)
        self.retries_due = max(self.retries_due, time.time() + decision.delay)
        self._owner.on_retry(task, decision.delay)

    def _dead_letter(self, task: Task, decision: policy.DeadLetter) -> None:
        log.error(
            "task dead-lettered to %s: %s",
            self.dead_queue.name,
            decision.error,
            extra=fields(
                queue=self.queue.name, delivery_tag=task.delivery_tag, reason=decision.reason, attempt=decision.attempt
            ),
            exc_info=_traceback(task.error),
        )
        changes = {**decision.changes(self.queue.name), wire.DIED_AT: round(time.time(), 3)}
        self._republish(task, self.dead_queue.name, changes)
        self._owner.on_dead_letter(task, decision.reason)

    def _republish(self, task: Task, routing_key: str, changes: dict[str, Any]) -> None:
        """Put a changed copy where it belongs; the original is acked once the copy is confirmed."""
        if self._outbox is None:  # opened at the first copy: most workers never need it
            assert self._copies_connection is not None
            self._outbox = Outbox(self._copies_connection(), [self.queue, self.dead_queue])
        self._outbox.put(wire.copy_of(task.message, routing_key, changes), task)

    def settle_copies(self) -> None:
        """Ack the originals whose copies the broker has confirmed."""
        if self._outbox is None or not self._outbox.pending:
            return
        for original in self._outbox.confirmed():
            original.ledger.ack([original])  # a no-op if its channel is gone: it comes back to run again

    # -- retries waiting for their time ---------------------------------------------------

    def release_due_retries(self) -> None:
        if not self.held:
            return
        for task in self.held.due(time.monotonic()):
            if self.lifecycle.taking:
                self._start(task)
            else:  # stopping, or the quota is reached: it is the broker's again
                task.ledger.give_back(task.message)

    def update_prefetch(self) -> None:
        """Raise prefetch by the tasks that wait here without running: held retries, copies awaiting a confirm.

        Each holds an unacked delivery; without this they would take the place
        of tasks that could run now (and a blocked broker would starve the worker).
        """
        if self._prefetch is not None:
            self._prefetch.raise_by(len(self.held) + self.copies_waiting)

    # -- giving back --------------------------------------------------------------------------

    def give_back_waiting(self, *, not_started: bool = True) -> None:
        """Give back held retries and, with `not_started`, tasks no handler thread has started."""
        for task in self.held.take_all():
            task.ledger.give_back(task.message)
        if not not_started:
            return
        for task in list(self.inflight.values()):
            if task.cancel() is TaskState.QUEUED:
                del self.inflight[id(task)]
                task.ledger.give_back(task.message)

    def give_back_everything(self) -> None:
        """Give back every message still held: a hard stop, the grace ran out, or the work is done."""
        for task in list(self.inflight.values()):
            if task.cancel() is not TaskState.QUEUED and not task.acked:
                self.requeued_unfinished += 1
                log.warning("task requeued unfinished", extra=task.facts(queue=self.queue.name))
        copies = self._outbox.waiting if self._outbox is not None else []
        for task in [*self.inflight.values(), *self.held.take_all(), *copies]:
            if not task.acked:
                task.ledger.give_back(task.message)
        self.ledger.close()  # given back: no handler thread may ack them now
        self.inflight.clear()

    def abandon(self) -> list[Task]:
        """The channel is gone: forget what it delivered; return the tasks a handler thread still runs.

        Tasks not started are cancelled here: the broker delivers them again,
        and only those already running may run twice.
        """
        running = [task for task in self.inflight.values() if task.cancel() is TaskState.RUNNING]
        self.ledger.close()
        self.inflight.clear()
        self.held.take_all()
        self.close_outbox()
        return running

    def close_outbox(self) -> None:
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            outbox.close()


def _traceback(error: BaseException | None) -> BaseException | None:
    """A handler's error with its traceback, for the log line that says it failed, at debug level (``-v``) only."""
    return error if error is not None and log.isEnabledFor(logging.DEBUG) else None
