"""The connection thread: consume, wait, settle what finished, reconnect. Every broker call of the worker is here."""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kombu import Connection, Queue
from kombu.message import Message
from kombu.mixins import ConsumerMixin

from kqueue import message as wire
from kqueue.brokers import has_read, is_amqp, mask, read_ahead, read_arrived
from kqueue.errors import PublishFailed, describe, is_ack_timeout, queue_mismatch
from kqueue.handlers import Handler
from kqueue.logs import fields
from kqueue.queues import dead_letter_queue, is_quorum, messages_ready
from kqueue.worker import policy
from kqueue.worker.acks import Ledger
from kqueue.worker.lifecycle import Lifecycle, Phase
from kqueue.worker.mailbox import Mailbox
from kqueue.worker.outbox import Outbox
from kqueue.worker.pool import Pool
from kqueue.worker.retries import HeldRetries
from kqueue.worker.settings import WorkerSettings
from kqueue.worker.task import Task, TaskState

__all__ = ["Worker"]

log = logging.getLogger("kqueue.worker")


class Worker(ConsumerMixin):
    """Consumes one queue and runs each task's handler, acking only once it returned.

    A handler that raises is retried after a growing delay, then dead-lettered
    to ``<queue>.dead``; so is a body that cannot be decoded, and a task
    delivered `delivery_limit` times without an ack. Extend it through its
    hooks: `on_task_start` and `on_task_done` run on the handler's thread.

    Kombu's `ConsumerMixin` still makes the connection, the channel and the
    consumer (`establish_connection`, `consumer_context`, `on_consume_ready`);
    the loop and the wait are the worker's own, to select on the broker's
    socket and the mailbox at once.

    Parameters:
        connection: where to consume; the worker reconnects it when it drops.
        queue: the task queue (see `kqueue.queues.task_queue`).
        handler: called with each task's text.
        settings: concurrency, prefetch, retries and stopping rules.
    """

    def __init__(
        self,
        connection: Connection,
        queue: Queue,
        handler: Handler,
        settings: WorkerSettings | None = None,
    ) -> None:
        self.connection = connection
        self.should_stop = False
        self.queue = queue
        self.dead_queue = dead_letter_queue(queue)
        self.settings = (settings or WorkerSettings()).validate()
        self.lifecycle = Lifecycle(self.settings)
        self.tasks_acked = 0
        self._mailbox = Mailbox()
        self._pool = Pool(self.settings.concurrency, handler, self._mailbox, self.on_task_start, self.on_task_done)
        # Held by the connection thread except while it waits in select(): a
        # handler thread that gets it may ack its own task on the idle connection.
        self._io = threading.Lock()
        self._ledger = self._new_ledger(amqp=False)
        self._ledger.close()  # no channel yet
        self._inflight: dict[int, Task] = {}  # handed to a handler thread, not yet settled
        self._arrivals: deque[Message] = deque()
        self._held = HeldRetries()
        self._outbox: Outbox | None = None
        self._conn: Connection | None = None
        self._consumer: Any = None
        self._prefetch = self.settings.prefetch_count  # as the broker has it now
        self._raise_prefetch: Callable[[int], None] | None = None
        self._wake_fd: int | None = None  # what the transport wakes us through, where it has one
        self._consuming = False
        self._idle = False
        self._empty_readings = 0
        self._next_heartbeat = 0.0
        self._backoff = 0.5

    # -- hooks ---------------------------------------------------------------

    def on_task_start(self, task: Task) -> None:
        """Called on the handler's thread just before the handler runs."""

    def on_task_done(self, task: Task) -> None:
        """Called on the handler's thread once the handler returned or raised (`task.error`)."""

    def on_consuming(self, broker: str) -> None:
        """Called on the connection thread once it consumes, after each (re)connect; `broker` masked."""

    def on_connection_lost(self, error: BaseException) -> None:
        """Called on the connection thread when the broker went away; a reconnect follows."""

    def on_retry(self, task: Task, delay: float) -> None:
        """Called on the connection thread when a failed task is sent back for another attempt."""

    def on_dead_letter(self, task: Task, reason: str) -> None:
        """Called on the connection thread when a task goes to ``<queue>.dead`` (`reason`: failed, ...)."""

    def on_turn(self) -> None:
        """Called on the connection thread at every turn of its loop (at least once a second): it is alive."""

    # -- the public controls --------------------------------------------------

    def stop(self, *, now: bool = False, reason: str = "") -> None:
        """Stop taking tasks; let running ones finish for `grace` seconds, or none if `now`.

        Safe to call from a signal handler or another thread: it only records
        the request and wakes the connection thread, which logs and acts.
        """
        self.lifecycle.ask(now=now, reason=reason)
        self._mailbox.nudge()

    @property
    def tasks_run(self) -> int:
        """Tasks handed to a handler thread so far."""
        return self.lifecycle.started

    @property
    def busy(self) -> bool:
        """Whether any task is running, waiting to run, waiting for its retry or for its copy's confirm."""
        return bool(self._inflight or self._held or self._arrivals or self._copies_waiting)

    @property
    def _copies_waiting(self) -> int:
        return self._outbox.pending if self._outbox is not None else 0

    def close(self) -> None:
        self._pool.shutdown()
        self._mailbox.close()

    # -- ConsumerMixin -------------------------------------------------------

    def get_consumers(self, Consumer: Any, channel: Any) -> list[Any]:
        # A new channel, a new ledger; made before the consumer starts, since
        # the broker may deliver during the basic.consume call itself.
        amqp = is_amqp(self.connection)
        self._ledger = self._new_ledger(amqp=amqp)
        prefetch = self.settings.prefetch_count
        channel_wide = amqp and not is_quorum(self.queue)
        if channel_wide:
            # RabbitMQ applies a changed per-consumer prefetch only to consumers
            # started after it; the channel-wide one changes at once, which
            # `_update_prefetch` needs. Quorum queues refuse it.
            channel.basic_qos(0, prefetch, True)
        self._consumer = Consumer(
            queues=[self.queue],
            on_message=self._arrive,
            accept=wire.ACCEPT,
            prefetch_count=None if channel_wide else prefetch,
        )
        self._raise_prefetch = self._channel_wide_qos if channel_wide else None if amqp else self._consumer_qos
        return [self._consumer]

    def _channel_wide_qos(self, count: int) -> None:
        self._consumer.channel.basic_qos(0, count, True)

    def _consumer_qos(self, count: int) -> None:
        self._consumer.qos(prefetch_count=count)

    def _arrive(self, message: Message) -> None:
        self._arrivals.append(message)
        self._ledger.delivered(message.delivery_tag)

    def _new_ledger(self, *, amqp: bool) -> Ledger:
        # Where every delivered task is running (prefetch <= concurrency), the
        # broker sends the next only for an ack: ack at once, from the handler's
        # thread. With tasks queued here, acks batched by this thread cost less.
        early = amqp and self.settings.prefetch_count <= self.settings.concurrency
        return Ledger(coalesce=amqp, early=early, io=self._io, recoverable=self._recoverable)

    def on_consume_ready(self, connection: Connection, channel: Any, consumers: Any, **kwargs: Any) -> None:
        self._conn = connection
        self._prefetch = self.settings.prefetch_count
        self._wake_fd = None
        if is_amqp(connection):
            read_ahead(connection)
        elif connection.transport.driver_type == "sqlite":
            from kqueue.sqlite import wake_fd

            self._wake_fd = wake_fd(connection)
        self._consuming = True
        log.info(
            "consuming", extra=fields(queue=self.queue.name, broker=self._where, prefetch=self.settings.prefetch_count)
        )

    @contextmanager
    def establish_connection(self) -> Iterator[Connection]:
        with self.create_connection() as conn:
            conn.ensure_connection(self.on_connection_error, self.connect_max_retries, callback=self._check_stop)
            yield conn

    def _check_stop(self) -> None:
        if self._stop_seen():
            raise _Stopped()

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        log.warning(
            "cannot reach the broker; trying again in %.0fs",
            interval,
            extra=fields(broker=self._where, error=describe(exc)),
        )
        self._check_stop()

    def run(self, _tokens: int = 1, **kwargs: Any) -> None:
        """Consume until stopped, reconnecting whenever the broker goes away.

        Raises:
            QueueMismatch: the queue exists with other arguments; fatal.
        """
        try:
            while not self.should_stop:
                try:
                    for _ in self.consume():
                        pass
                except _Stopped:
                    break
                except self._recoverable as exc:
                    self._lost(exc)
        finally:
            self._consuming = False
            self._abandon_all()

    @property
    def _recoverable(self) -> tuple[type[BaseException], ...]:
        conn = self.connection
        return (*conn.connection_errors, *conn.channel_errors, PublishFailed, OSError)

    def consume(self, limit: int | None = None, timeout: float | None = None, **kwargs: Any) -> Iterator[None]:
        """Step the worker: each step settles what finished and waits for the next event."""
        self._io.acquire()
        try:
            with self.consumer_context(**kwargs):
                while not self.should_stop:
                    self._step()
                    if self._finished():
                        self.should_stop = True
                        self._give_back_everything()
                        break
                    self._wait()
                    self.on_turn()
                    yield
        finally:
            self._ledger.close()  # the channel goes with this context: no handler thread may ack on it
            self._close_outbox()
            self._io.release()

    # -- one step of the connection thread ---------------------------------------

    def _step(self) -> None:
        if self.lifecycle.asked:
            self._stop_seen()
        while self._arrivals:
            self._accept(self._arrivals.popleft())
        self._settle(self._mailbox.take())
        if self._copies_waiting:
            self._settle_copies()
        if self._held:
            self._release_due_retries()
        self._update_prefetch()

    def _stop_seen(self) -> bool:
        """Act on a stop asked since the last look (by a signal, another thread); whether stopping."""
        phase = self.lifecycle.advance(time.monotonic())
        if phase is not None:
            what = (
                "requeueing running tasks and exiting"
                if phase is Phase.ABORTING
                else "finishing running tasks, taking no more"
            )
            log.warning("%s: %s", self.lifecycle.reason or "stop", what)
            if self._consuming:
                self._stop_consuming()
        return self.lifecycle.stopping

    def _accept(self, message: Message) -> None:
        decision = policy.route(message, self.settings, now=time.time(), taking=self.lifecycle.taking)
        if isinstance(decision, policy.GiveBack):
            self._ledger.give_back(message)
            return
        if isinstance(decision, (policy.Run, policy.Hold)):
            task = Task(
                text=decision.text,
                message=message,
                ledger=self._ledger,
                redelivered=decision.delivery.redelivered,
                attempt=decision.delivery.attempt,
            )
            if isinstance(decision, policy.Hold):
                self._hold(task, decision.due_in)
            else:
                self._start(task)
            return
        original = Task(text="", message=message, ledger=self._ledger)
        if isinstance(decision, policy.Recount):
            # This queue does not count deliveries: carry the count in a copy.
            self._republish(original, self.queue.name, decision.changes)
        else:
            self._dead_letter(original, decision)

    def _start(self, task: Task) -> None:
        self._inflight[id(task)] = task
        self.lifecycle.started += 1
        log.debug("task received", extra=task.facts(queue=self.queue.name))
        self._pool.submit(task)
        if self.lifecycle.quota_reached and self._consuming:
            self._stop_consuming(give_back_waiting=False)

    def _settle(self, finished: list[Task]) -> None:
        done: list[Task] = []
        for task in finished:
            self._inflight.pop(id(task), None)
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
            return
        self._backoff = 0.5  # the connection works: a new loss starts backing off afresh
        self._ledger.ack(done)
        self.tasks_acked += len(done)
        if log.isEnabledFor(logging.INFO):
            for task in done:
                log.info("task done", extra=task.facts(queue=self.queue.name, duration=f"{task.duration:.3f}"))

    def _failed(self, task: Task) -> None:
        assert task.error is not None
        decision = policy.on_failure(task.attempt, task.error, self.settings, now=time.time())
        if isinstance(decision, policy.DeadLetter):
            self._dead_letter(task, decision)
            return
        log.warning(
            "task failed; retrying in %.1fs",
            decision.delay,
            extra=task.facts(queue=self.queue.name, error=decision.error, duration=f"{task.duration:.3f}"),
        )
        self._republish(task, self.queue.name, decision.changes)
        self.on_retry(task, decision.delay)

    def _dead_letter(self, task: Task, decision: policy.DeadLetter) -> None:
        log.error(
            "task dead-lettered to %s: %s",
            self.dead_queue.name,
            decision.error,
            extra=fields(
                queue=self.queue.name, delivery_tag=task.delivery_tag, reason=decision.reason, attempt=decision.attempt
            ),
        )
        self._republish(task, self.dead_queue.name, decision.changes(self.queue.name))
        self.on_dead_letter(task, decision.reason)

    def _republish(self, task: Task, routing_key: str, changes: dict[str, Any]) -> None:
        """Put a changed copy where it belongs; the original is acked once the copy is confirmed."""
        if self._outbox is None:  # opened at the first copy: most workers never need it
            assert self._conn is not None
            self._outbox = Outbox(self._conn.clone(heartbeat=0), [self.queue, self.dead_queue])
        self._outbox.put(wire.copy_of(task.message, routing_key, changes), task)

    def _settle_copies(self) -> None:
        assert self._outbox is not None
        for original in self._outbox.confirmed():
            original.ledger.ack([original])  # a no-op if its channel is gone: it comes back to run again

    # -- retries waiting for their time ---------------------------------------

    def _hold(self, task: Task, delay: float) -> None:
        self._held.hold(task, time.monotonic() + delay)
        log.debug("retry held", extra=task.facts(queue=self.queue.name, due_in=f"{delay:.3f}"))

    def _release_due_retries(self) -> None:
        due = self._held.due(time.monotonic())
        for task in due:
            if self.lifecycle.taking:
                self._start(task)
            else:  # stopping, or the quota is reached: it is the broker's again
                task.ledger.give_back(task.message)

    def _update_prefetch(self) -> None:
        """Raise prefetch by the tasks that wait here without running: held retries, copies awaiting a confirm.

        Each holds an unacked delivery; without this they would take the place
        of tasks that could run now (and a blocked broker would starve the worker).
        Not on quorum queues: RabbitMQ changes no running consumer's own
        prefetch, and quorum queues refuse the channel-wide one.
        """
        wanted = self.settings.prefetch_count + len(self._held) + self._copies_waiting
        if wanted != self._prefetch and self._consuming and self._raise_prefetch is not None:
            self._raise_prefetch(wanted)
            self._prefetch = wanted

    # -- stopping ----------------------------------------------------------------

    def _stop_consuming(self, give_back_waiting: bool = True) -> None:
        """Cancel the consumer and give back held retries and, unless told otherwise, tasks not started."""
        self._consuming = False
        try:
            self._consumer.cancel()
        except Exception:  # noqa: BLE001 - a broken channel has no consumer to cancel
            pass
        for task in self._held.take_all():
            task.ledger.give_back(task.message)
        if not give_back_waiting:
            return
        for task in list(self._inflight.values()):
            if task.cancel() is TaskState.QUEUED:
                del self._inflight[id(task)]
                task.ledger.give_back(task.message)

    def _finished(self) -> bool:
        if not self.lifecycle.may_end:
            return False
        if self.busy:
            self._empty_readings = 0  # a reading before this work is stale
        return self.lifecycle.done(
            running=len(self._inflight) + self._copies_waiting,
            busy=self.busy,
            clock=time.monotonic(),
            drained=self._queue_drained,
        )

    def _queue_drained(self) -> bool:
        """Twice in a row nothing in the queue, after a wait in which nothing happened.

        Once is not enough: the count leaves out messages on their way to us.
        """
        if not self._idle:
            self._empty_readings = 0
            return False
        count = messages_ready(self._consumer.channel, self.queue)
        self._empty_readings = self._empty_readings + 1 if count == 0 and not self.busy else 0
        return self._empty_readings >= 2

    def _give_back_everything(self) -> None:
        """Give back every message still held: a hard stop, the grace ran out, or the work is done."""
        for task in list(self._inflight.values()):
            if task.cancel() is not TaskState.QUEUED and not task.acked:
                log.warning("task requeued unfinished", extra=task.facts(queue=self.queue.name))
        copies = self._outbox.waiting if self._outbox is not None else []
        for task in [*self._inflight.values(), *self._held.take_all(), *copies]:
            if not task.acked:
                task.ledger.give_back(task.message)
        self._ledger.close()  # given back: no handler thread may ack them now
        self._inflight.clear()

    def _abandon_all(self) -> list[Task]:
        """The channel is gone: forget what it delivered; return the tasks a handler thread still runs."""
        running = [task for task in self._inflight.values() if task.cancel() is TaskState.RUNNING]
        self._ledger.close()
        self._inflight.clear()
        self._arrivals.clear()
        self._held.take_all()
        self._close_outbox()
        return running

    def _close_outbox(self) -> None:
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            outbox.close()

    # -- waiting -----------------------------------------------------------------

    def _wait(self) -> None:
        conn = self._conn
        assert conn is not None
        self._idle = False
        if self._arrivals or self._mailbox.has_mail():
            return  # a synchronous call brought work in already
        timeout = self._timeout()
        if self._ledger.coalesce:  # AMQP
            self._wait_amqp(conn, timeout)
        elif len(self._inflight) >= self.settings.prefetch_count or not self._consuming:
            self._pause(timeout)  # the broker will hand us nothing: wait for a handler instead
        elif self._wake_fd is not None:
            self._wait_woken(conn, self._wake_fd, timeout)
        else:
            try:
                conn.drain_events(timeout=min(timeout, 0.05))
            except TimeoutError:
                self._idle = True

    def _wait_woken(self, conn: Connection, fd: int, timeout: float) -> None:
        """A transport that tells when a task may be ready (``sqlite://``): wait on it and the mailbox at once."""
        ready, _, _ = select.select([fd, self._mailbox.fd], [], [], timeout)
        if self._mailbox.fd in ready:
            self._mailbox.clear()
        delivered = 0
        while delivered <= self._prefetch:  # the transport stops at the prefetch limit; this bounds the loop
            try:
                conn.drain_events(timeout=0)
            except TimeoutError:
                break
            delivered += 1
        self._idle = not ready and not delivered

    def _pause(self, timeout: float) -> None:
        """Wait for the mailbox (a finished task, a stop asked) or the timeout."""
        ready, _, _ = select.select([self._mailbox.fd], [], [], timeout)
        if ready:
            self._mailbox.clear()

    def _wait_amqp(self, conn: Connection, timeout: float) -> None:
        sock = conn.connection.sock
        outbox = self._outbox
        copies = outbox.sock if outbox is not None and outbox.pending else None
        if has_read(conn):
            ready: list[Any] = [sock]
        else:
            watched = [sock, self._mailbox.fd] + ([copies] if copies is not None else [])
            self._io.release()  # while this waits, a handler thread may ack on the connection
            try:
                ready, _, _ = select.select(watched, [], [], timeout)
            finally:
                self._io.acquire()
        self._idle = not ready
        if self._mailbox.fd in ready:
            self._mailbox.clear()
        if sock in ready:
            read_arrived(conn)
        now = time.monotonic()
        if now >= self._next_heartbeat:
            conn.heartbeat_check()
            self._next_heartbeat = now + max(0.2, (conn.heartbeat or 4) / 4)

    def _timeout(self) -> float:
        timeout = 1.0
        now = time.monotonic()
        due = self._held.next_due()
        if due is not None:
            timeout = min(timeout, due - now)
        if self.lifecycle.stopping:
            timeout = min(timeout, self.lifecycle.seconds_left(now))
        elif self.settings.burst and not self.busy:
            timeout = min(timeout, 0.05)
        return max(0.0, timeout)

    # -- losing the connection -------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        mismatch = queue_mismatch(exc)
        if mismatch is not None:
            raise mismatch from None
        self._consuming = False
        # Tasks not started are cancelled here: the broker delivers them again,
        # and only those already running may run twice.
        running = self._abandon_all()
        self._pool.grow(len(running))
        self.on_connection_lost(exc)
        if is_ack_timeout(exc):
            log.error(
                "the broker closed the channel because a task ran longer than its consumer_timeout; "
                "the task will be delivered again (%d still running here may run twice); "
                "raise RabbitMQ's consumer_timeout setting (rabbitmq.conf, in ms) for longer tasks",
                len(running),
                extra=fields(queue=self.queue.name, error=describe(exc)),
            )
        else:
            log.warning(
                "lost the %s to the broker; reconnecting in %.1fs (%d running tasks will be delivered again)",
                "channel" if isinstance(exc, self.connection.channel_errors) else "connection",
                self._backoff,
                len(running),
                extra=fields(queue=self.queue.name, broker=self._where, error=describe(exc)),
            )
        if self._stop_seen():
            self.should_stop = True
            return
        # Back off, so that a broker that keeps failing us is not hammered; a stop cuts it short.
        self._pause(self._backoff)
        self._backoff = min(self._backoff * 2, 30.0)
        if self._stop_seen():
            self.should_stop = True

    @property
    def _where(self) -> str:
        return mask(self.connection.as_uri(include_password=True))


class _Stopped(Exception):
    """Raised out of a reconnect wait when a stop was asked."""
