"""The connection thread: consume, wait, settle what finished, reconnect. Every broker call of the worker is here."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from kombu import Connection, Queue
from kombu.message import Message
from kombu.mixins import ConsumerMixin

from kqueue import message as wire
from kqueue.brokers import is_amqp, next_node, node_count, read_ahead, where, worker_label
from kqueue.delays import kept_by
from kqueue.errors import PublishFailed, describe, queue_mismatch
from kqueue.handlers import Handler
from kqueue.logs import fields
from kqueue.queues import dead_letter_queue, messages_ready
from kqueue.worker.acks import Ledger
from kqueue.worker.dispatch import Dispatcher
from kqueue.worker.hooks import Hooks
from kqueue.worker.inline import Adopt, Keeper
from kqueue.worker.lifecycle import DrainCheck, Lifecycle, Phase
from kqueue.worker.mailbox import Mailbox
from kqueue.worker.pool import Pool
from kqueue.worker.qos import Prefetch
from kqueue.worker.reconnect import Backoff, report_loss
from kqueue.worker.settings import WorkerSettings
from kqueue.worker.task import Registered, Task
from kqueue.worker.waiting import Waiter, waiter_for

__all__ = ["Worker"]

#: Seconds after a retry is due by which its broker has it in the queue again: Redis's consumers
#: look for due tasks every 0.25 s, sqlite's as they claim; RabbitMQ's chain moves it at once.
RETRY_MOVED_WITHIN = 1.0

log = logging.getLogger("kqueue.worker")


class Worker(ConsumerMixin, Hooks):
    """Consumes one queue and runs each task's handler, acking only once it returned.

    A handler that raises is retried after a growing delay, then dead-lettered
    to ``<queue>.dead``; so is a body that cannot be decoded, and a task
    delivered `delivery_limit` times without an ack. Extend it through its
    hooks (`kqueue.worker.hooks.Hooks`), overridden in a subclass.

    Kombu's `ConsumerMixin` still makes the connection, the channel and the
    consumer (`establish_connection`, `consumer_context`, `on_consume_ready`);
    the loop and the wait are the worker's own, to select on the broker's
    socket and the mailbox at once.

    Parameters:
        connection: where to consume; the worker reconnects it when it drops.
        queue: the task queue (see `kqueue.queues.task_queue`).
        handler: called with each text task's text; a coroutine it returns is
            run to its end (`kqueue.worker.aio`).
        settings: concurrency, prefetch, retries and stopping rules.
        tasks: the function tasks this worker runs, by name (`kqueue.App.tasks`);
            a function task of another name is dead-lettered (``unknown-task``).
    """

    def __init__(
        self,
        connection: Connection,
        queue: Queue,
        handler: Handler,
        settings: WorkerSettings | None = None,
        *,
        tasks: Mapping[str, Registered] | None = None,
    ) -> None:
        self.connection = connection
        self.should_stop = False
        self.queue = queue
        self.settings = (settings or WorkerSettings()).validate()
        self.lifecycle = Lifecycle(self.settings)
        self._mailbox = Mailbox()
        # Held by the connection thread except while it waits in select() or runs a task
        # itself: a handler thread that gets it may ack its own task on the idle connection,
        # and the keeper takes it to answer the broker while a task runs long.
        self._io = threading.Lock()
        self._pool = Pool(self.settings.concurrency, handler, self._mailbox, self.on_task_start, self.on_task_done)
        # One task at a time: `run` runs each on the connection thread (`kqueue.worker.inline`).
        self._keeper: Keeper | None = None
        if self.settings.concurrency == 1 and self.settings.prefetch_count == 1:
            self._keeper = Keeper(self._io, self._serve_while, self._adopt)
        self._here: deque[Task] = deque()  # tasks for the connection thread to run, in that mode
        self.dispatcher = Dispatcher(
            self.settings, self.lifecycle, self._pool, (queue, dead_letter_queue(queue)), self, tasks or {}
        )
        self._ended = threading.Event()
        self._failures: list[BaseException] = []  # of the connection thread, raised by run()
        self._arrivals: deque[Message] = deque()
        self._conn: Connection | None = None
        self._consumer: Any = None
        self._waiter: Waiter | None = None
        self._consuming = False
        self._idle = False
        self._drain_check = DrainCheck()
        self._backoff = Backoff()

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
    def tasks_acked(self) -> int:
        """Tasks whose handlers returned and that the broker has the ack of."""
        return self.dispatcher.tasks_acked

    @property
    def retries_held(self) -> int:
        """Retries that arrived before their time, held here until it comes."""
        return len(self.dispatcher.held)

    @property
    def busy(self) -> bool:
        """Whether any task is running, waiting to run, waiting for its retry or for its copy's confirm.

        A retry this worker sent waits in the broker; until it is due, the worker
        counts it as its own, so that a burst does not end before it.
        """
        return bool(self._arrivals) or self.dispatcher.busy or self._retries_pending()

    def _retries_pending(self) -> bool:
        return time.time() < self.dispatcher.retries_due + RETRY_MOVED_WITHIN

    def stop_taking(self) -> None:
        """The quota is reached: cancel the consumer; tasks already here still run."""
        if self._consuming:
            self._stop_consuming(not_started=False)

    def close(self) -> None:
        if self._keeper is not None:
            self._keeper.close()
        self._pool.shutdown()
        self._mailbox.close()

    # -- ConsumerMixin -------------------------------------------------------

    def get_consumers(self, Consumer: Any, channel: Any) -> list[Any]:
        # A new channel, a new ledger; made before the consumer starts, since
        # the broker may deliver during the basic.consume call itself.
        amqp = is_amqp(self.connection)
        # Where every delivered task is running (prefetch <= concurrency), the
        # broker sends the next only for an ack: ack at once, from the handler's
        # thread. With tasks queued here, acks batched by this thread cost less.
        early = amqp and self.settings.prefetch_count <= self.settings.concurrency
        ledger = Ledger(coalesce=amqp, early=early, io=self._io, recoverable=self._recoverable)
        prefetch = Prefetch(channel, self.queue, self.settings.prefetch_count, amqp=amqp)
        self._consumer = Consumer(
            queues=[self.queue],
            on_message=self._arrive,
            accept=wire.ACCEPT,
            prefetch_count=prefetch.consumer_count,
        )
        prefetch.attach(self._consumer)
        self.dispatcher.new_channel(ledger, prefetch, lambda: self.connection.clone(heartbeat=0))
        return [self._consumer]

    def _arrive(self, message: Message) -> None:
        self._arrivals.append(message)
        self.dispatcher.ledger.delivered(message.delivery_tag)

    def on_consume_ready(self, connection: Connection, channel: Any, consumers: Any, **kwargs: Any) -> None:
        self._conn = connection
        if is_amqp(connection):
            read_ahead(connection)
        self._waiter = waiter_for(connection, self._mailbox, self._io, lambda: self.dispatcher.copies_sock)
        self.dispatcher.can_delay = kept_by(connection)
        self._consuming = True
        facts = fields(queue=self.queue.name, broker=self._where, prefetch=self.settings.prefetch_count)
        log.info("consuming", extra=facts)
        self.on_consuming(self._where)

    def create_connection(self) -> Connection:
        # Named for the people reading the broker: RabbitMQ's management API and
        # `kqueue web` show who consumes (on sqlite:// the name is in the owner's lock file).
        conn = super().create_connection()
        facts = {"queue": self.queue.name, "prefetch": self.settings.prefetch_count}
        named = dict(conn.transport_options.get("client_properties") or {})
        named["connection_name"] = worker_label(concurrency=self.settings.concurrency, **facts)
        conn.transport_options = {**conn.transport_options, "client_properties": named}
        return conn

    @contextmanager
    def establish_connection(self) -> Iterator[Connection]:
        # Kombu would clone `self.connection`, so start again from the node first
        # connected, however dead; after a loss, start from the next node instead,
        # then go round the URL's nodes (`on_connection_error` says each).
        conn = next_node(self._conn) if self._conn is not None else self.create_connection()
        self._conn = conn  # what `_where` names from now on: the node tried, then the one connected
        with conn:
            conn.ensure_connection(self.on_connection_error, self.connect_max_retries, callback=self._check_stop)
            try:
                yield conn
            except conn.connection_errors:
                # A lost connection is dropped, not closed: a polite close waits for the broker's
                # reply, and a broker that missed its heartbeats (a frozen network) never sends one.
                conn.collect()
                raise

    def _check_stop(self) -> None:
        if self._stop_seen():
            raise _Stopped()

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        # Kombu calls this before it moves to the next node: `_where` names the one that failed.
        facts = fields(broker=self._where, error=describe(exc))
        if not interval:
            log.warning("cannot reach this node of the broker; trying the next", extra=facts)
        elif self._conn is not None and node_count(self._conn) > 1:
            log.warning("cannot reach any node of the broker; trying them again in %.0fs", interval, extra=facts)
        else:
            log.warning("cannot reach the broker; trying again in %.0fs", interval, extra=facts)
        self._check_stop()

    def run(self, _tokens: int = 1, **kwargs: Any) -> None:
        """Consume until stopped, reconnecting whenever the broker goes away.

        A worker of one task at a time runs its tasks on the connection thread,
        which is then a thread of its own: this one waits for the worker to end,
        and returns at the end of the grace even while a handler is still stuck.

        Raises:
            QueueMismatch: the queue exists with other arguments; fatal.
        """
        if self._keeper is None:
            self._run()
            return
        self.dispatcher.submit = self._here.append
        self._ended.clear()
        self._failures.clear()
        threading.Thread(target=self._run_and_end, name="kqueue-connection", daemon=True).start()
        self._ended.wait()
        if self._failures:
            raise self._failures[0]

    def _run_and_end(self, loss: BaseException | None = None) -> None:
        """`_run` on a thread of its own, its failure kept for `run` to raise; after `loss`, if one was met."""
        try:
            if loss is not None:
                self._lost(loss, orphans_here=True)
            if not self.should_stop:
                self._run()
        except BaseException as exc:  # noqa: BLE001 - raised again on the thread that called run()
            self._failures.append(exc)
        finally:
            self._ended.set()

    def _run(self) -> None:
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
            self._arrivals.clear()
            self._here.clear()
            self.dispatcher.abandon()

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
                    if self._here:
                        self._run_here()
                        if self.should_stop:  # the keeper ended the worker while a task ran
                            break
                    if self._finished():
                        self.should_stop = True
                        self.dispatcher.give_back_everything()
                        break
                    self._wait()
                    self.on_turn()
                    yield
        finally:
            self.dispatcher.ledger.close()  # the channel goes with this context: no handler thread may ack on it
            self.dispatcher.close_outbox()
            self._io.release()

    # -- one step of the connection thread ---------------------------------------

    def _step(self) -> None:
        dispatcher = self.dispatcher
        if self.lifecycle.asked:
            self._stop_seen()
        arrivals = self._arrivals
        while arrivals:
            dispatcher.accept(arrivals.popleft())
        if self._mailbox.has_mail() and dispatcher.settle(self._mailbox.take()):
            self._backoff.reset()  # the connection works: a new loss starts backing off afresh
        dispatcher.tend(consuming=self._consuming)

    def _run_here(self) -> None:
        """Run the tasks ready to run on this, the connection thread; ack each once its handler returned."""
        keeper = self._keeper
        assert keeper is not None
        while self._here and not self.should_stop:
            task = self._here.popleft()
            if not task.claim():  # cancelled: given back, or its channel is gone
                continue
            keeper.begin(task)
            try:
                self._pool.run_here(task)
            finally:
                handed = keeper.end(task, self._mailbox.post)
            if not handed and self.dispatcher.settle([task]):
                self._backoff.reset()

    def _serve_while(self, task: Task) -> None:
        """On the keeper's thread, holding the connection: the loop, while `task` runs on the connection thread."""
        log.debug("task runs long: its connection is kept by another thread meanwhile", extra=task.facts())
        keeper = self._keeper
        assert keeper is not None
        try:
            while keeper.running is task and not self.should_stop:
                self._step()
                if self._finished():  # stopped, and the grace is over: the task goes back unfinished
                    self.should_stop = True
                    self.dispatcher.give_back_everything()
                    self.dispatcher.close_outbox()
                    if keeper.running is task:  # its handler is stuck: run() returns without waiting for it
                        self._ended.set()
                    return
                self._wait()
                self.on_turn()
        except self._recoverable as exc:
            raise Adopt(exc) from None

    def _adopt(self, loss: BaseException) -> None:
        """On the keeper's thread: the connection was lost while a task ran long; reconnect here, and stay.

        From now on tasks run on handler threads: the connection thread of
        before still runs its task, whose channel is gone (its end is logged,
        and the broker delivers it again), and then waits for good.
        """
        self.dispatcher.submit = self._pool.submit
        self._here.clear()
        self._run_and_end(loss)

    def _stop_seen(self) -> bool:
        """Act on a stop asked since the last look (by a signal, another thread); whether stopping."""
        phase = self.lifecycle.advance(time.monotonic())
        if phase is not None:
            what = "finishing running tasks, taking no more"
            if phase is Phase.ABORTING:
                what = "requeueing running tasks and exiting"
            log.warning("%s: %s", self.lifecycle.reason or "stop", what)
            if self._consuming:
                self._stop_consuming()
        return self.lifecycle.stopping

    def _stop_consuming(self, *, not_started: bool = True) -> None:
        """Cancel the consumer; give back held retries and, with `not_started`, tasks not started."""
        self._consuming = False
        try:
            self._consumer.cancel()
        except Exception:  # noqa: BLE001 - a broken channel has no consumer to cancel
            pass
        self.dispatcher.give_back_waiting(not_started=not_started)

    def _finished(self) -> bool:
        if not self.lifecycle.may_end:
            return False
        busy = self.busy
        if busy:
            self._drain_check.forget()
        return self.lifecycle.done(
            running=len(self.dispatcher.inflight) + self.dispatcher.copies_waiting,
            busy=busy,
            clock=time.monotonic(),
            drained=lambda: self._drain_check.drained(idle=self._idle, empty=self._queue_empty),
        )

    def _queue_empty(self) -> bool:
        # A synchronous call may bring a delivery in: look at `busy` after it.
        return messages_ready(self._consumer.channel, self.queue) == 0 and not self.busy

    # -- waiting -----------------------------------------------------------------

    def _wait(self) -> None:
        self._idle = False
        if self._arrivals or self._mailbox.has_mail():
            return  # a synchronous call brought work in already
        assert self._waiter is not None
        room = self.settings.prefetch_count - len(self.dispatcher.inflight) if self._consuming else 0
        self._idle = self._waiter.wait(self._timeout(), room=room)

    def _timeout(self) -> float:
        timeout = 1.0
        now = time.monotonic()
        due = self.dispatcher.held.next_due()
        if due is not None:
            timeout = min(timeout, due - now)
        if self.lifecycle.stopping:
            timeout = min(timeout, self.lifecycle.seconds_left(now))
        elif self.settings.burst and not self.busy:
            timeout = min(timeout, 0.05)
        return max(0.0, timeout)

    # -- losing the connection -------------------------------------------------------

    def _lost(self, exc: BaseException, *, orphans_here: bool = False) -> None:
        """Report a lost connection and back off; `orphans_here`: the running task is not on a pool thread."""
        mismatch = queue_mismatch(exc)
        if mismatch is not None:
            raise mismatch from None
        self._consuming = False
        self._arrivals.clear()
        self._here.clear()
        running = self.dispatcher.abandon()
        if not orphans_here:
            self._pool.grow(len(running))
        self.on_connection_lost(exc)
        what = "channel" if isinstance(exc, self.connection.channel_errors) else "connection"
        report_loss(
            exc, running=len(running), what=what, queue=self.queue.name, broker=self._where, delay=self._backoff.delay
        )
        if self._stop_seen():
            self.should_stop = True
            return
        # Back off, so that a broker that keeps failing us is not hammered; a stop cuts it short.
        Waiter(self.connection, self._mailbox).pause(self._backoff.delay)
        self._backoff.grow()
        if self._stop_seen():
            self.should_stop = True

    @property
    def _where(self) -> str:
        # The live connection's node, masked: after a failover, not the URL's first.
        return where(self._conn if self._conn is not None else self.connection)


class _Stopped(Exception):
    """Raised out of a reconnect wait when a stop was asked."""
