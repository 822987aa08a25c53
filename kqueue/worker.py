"""The consuming side: a `ConsumerMixin` whose handlers run on threads of their own.

One thread owns the connection. It drains events, answers heartbeats and is
the only one to ack, reject or publish, because Kombu channels are not
thread-safe. Handlers run on a pool of threads; when one finishes it wakes the
connection thread through a pipe that thread selects on together with the
broker's socket, so an ack goes out at once rather than at the next timeout.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Any

from kombu import Connection, Queue
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.message import Message
from kombu.mixins import ConsumerMixin

from kqueue import message as wire
from kqueue.brokers import has_read, is_amqp, mask, read_ahead, read_arrived
from kqueue.errors import KQueueError, PublishFailed, is_ack_timeout, queue_mismatch
from kqueue.handlers import Handler
from kqueue.logs import fields
from kqueue.producer import Sender
from kqueue.queues import dead_letter_queue, messages_ready

__all__ = ["Task", "Worker", "WorkerSettings"]

log = logging.getLogger("kqueue.worker")


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker runs; validated once, where it is built.

    Attributes:
        concurrency: tasks run at once, each on a thread.
        prefetch: unacknowledged messages the broker may hand this worker;
            None for the same as `concurrency` (fair dispatch).
        max_tasks: stop after running this many tasks.
        burst: stop once the queue is empty and nothing is in flight.
        grace: seconds running tasks get to finish after a stop is asked.
        max_retries: how often a failing task is tried again before it is dead-lettered.
        retry_delay: seconds before the first retry; each next one waits twice as long.
        delivery_limit: deliveries without an ack (a worker killed mid-task)
            after which a task is dead-lettered instead of run again.
    """

    concurrency: int = 1
    prefetch: int | None = None
    max_tasks: int | None = None
    burst: bool = False
    grace: float = 30.0
    max_retries: int = 3
    retry_delay: float = 1.0
    delivery_limit: int = 5

    def validate(self) -> WorkerSettings:
        """Return self, or raise `KQueueError` naming the first setting out of range."""
        checks = [
            ("concurrency", self.concurrency, 1),
            ("prefetch", self.prefetch, 1),
            ("max_tasks", self.max_tasks, 1),
            ("grace", self.grace, 0),
            ("max_retries", self.max_retries, 0),
            ("retry_delay", self.retry_delay, 0),
            ("delivery_limit", self.delivery_limit, 1),
        ]
        for name, value, least in checks:
            if value is not None and value < least:
                raise KQueueError(f"{name} must be at least {least}, not {value}")
        return self

    @property
    def prefetch_count(self) -> int:
        return self.prefetch if self.prefetch is not None else self.concurrency


@dataclass(eq=False)
class Task:
    """One delivery of a task, from its arrival until it is acked, retried or dead-lettered."""

    text: str
    message: Message = field(repr=False)
    generation: int = field(repr=False)
    redelivered: bool = False
    attempt: int = 1
    deliveries: int = 1
    state: str = "queued"  # queued -> running -> finished, or queued -> cancelled
    error: BaseException | None = None
    started: float = 0.0
    duration: float = 0.0
    acked: bool = False

    @property
    def delivery_tag(self) -> Any:
        return self.message.delivery_tag

    def facts(self, **more: Any) -> dict[str, Any]:
        """The fields every log line about this task carries."""
        return fields(
            delivery_tag=self.delivery_tag,
            redelivered=self.redelivered,
            attempt=self.attempt,
            **more,
        )


class _Waker:
    """A pipe the handler threads write to, and the connection thread waits on."""

    def __init__(self) -> None:
        self.fd, self._write = os.pipe()
        os.set_blocking(self._write, False)
        os.set_blocking(self.fd, False)
        self.event = threading.Event()
        self._signalled = False
        # A handler can outlive its worker (its task requeued, the worker
        # closed): it must not write to a descriptor number reused since.
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        if self._signalled:  # the reader has not cleared the last wake-up: it will look anyway
            return
        with self._lock:
            if self._closed:
                return
            self._signalled = True
            self.event.set()
            try:
                os.write(self._write, b"!")
            except BlockingIOError:  # the pipe is full: the reader is awake already
                pass

    def clear(self) -> None:
        # Drain first, lower the flag last: a wake-up in between is skipped,
        # but what it signalled is already there for the reader to find.
        try:
            os.read(self.fd, 4096)  # what is left makes the next select return at once: harmless
        except BlockingIOError:
            pass
        self.event.clear()
        self._signalled = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.fd)
            os.close(self._write)


class _Pool:
    """Daemon threads that run tasks; daemons, so a hard stop does not wait for a handler."""

    def __init__(self, size: int, run: Any) -> None:
        self._jobs: SimpleQueue[Task | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._run = run
        self._size = 0
        self._surplus = 0
        self._names = itertools.count()
        self._start(size)

    def _start(self, count: int) -> None:
        for _ in range(count):
            name = f"kqueue-task-{next(self._names)}"
            threading.Thread(target=self._loop, name=name, daemon=True).start()
        self._size += count

    def grow(self, count: int) -> None:
        """Add threads for tasks whose channel is gone but whose handlers still run.

        Their results cannot be acked, but they hold a thread: without more,
        the tasks of the new channel would wait behind them. The pool shrinks
        back as threads finish.
        """
        with self._lock:
            self._surplus += count
        self._start(count)

    def submit(self, task: Task) -> None:
        self._jobs.put(task)

    def cancel(self, task: Task) -> bool:
        """Cancel a task that has not started; False if it has."""
        with self._lock:
            if task.state != "queued":
                return False
            task.state = "cancelled"
            return True

    def shutdown(self) -> None:
        for _ in range(self._size):
            self._jobs.put(None)

    def _loop(self) -> None:
        while (task := self._jobs.get()) is not None:
            with self._lock:
                if task.state != "queued":
                    continue
                task.state = "running"
            self._run(task)
            with self._lock:
                if self._surplus > 0:
                    self._surplus -= 1
                    self._size -= 1
                    return


class Worker(ConsumerMixin):
    """Consumes one queue and runs each task's handler, acking only once it returned.

    A handler that raises is retried after a growing delay, then dead-lettered
    to ``<queue>.dead``; so is a body that cannot be decoded, and a task
    delivered `delivery_limit` times without an ack. Extend it through its
    hooks: `on_task_start` and `on_task_done` run on the handler's thread.

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
        self.handler = handler
        self.settings = (settings or WorkerSettings()).validate()
        self.tasks_run = 0
        self.tasks_acked = 0
        self._generation = 0
        self._conn: Connection | None = None
        self._consumer: Any = None
        self._sender: Sender | None = None
        self._arrivals: deque[Message] = deque()
        # AMQP delivery tags still unacked on this channel, in delivery order;
        # True once the task is done and only waits for its ack.
        self._outstanding: dict[int, bool] = {}
        self._idle = False
        self._inflight: dict[int, Task] = {}
        self._held: list[tuple[float, int, Task]] = []
        self._order = itertools.count()
        self._finished: SimpleQueue[Task] = SimpleQueue()
        self._waker = _Waker()
        self._pool = _Pool(self.settings.concurrency, self._run_task)
        self._stopping = False
        self._abort = False
        self._consuming = False
        self._grace_deadline = 0.0
        self._empty_readings = 0
        self._next_heartbeat = 0.0
        self._backoff = 0.5
        self._multiple_acks = False
        # Held by the connection thread except while it waits in select(): a
        # handler thread that gets it may ack its own task on the idle connection.
        self._io = threading.Lock()
        self._early_acks = False

    # -- hooks ---------------------------------------------------------------

    def on_task_start(self, task: Task) -> None:
        """Called on the handler's thread just before the handler runs."""

    def on_task_done(self, task: Task) -> None:
        """Called on the handler's thread once the handler returned or raised (`task.error`)."""

    # -- the public controls --------------------------------------------------

    def stop(self, *, now: bool = False) -> None:
        """Stop taking tasks; let running ones finish for `grace` seconds, or none if `now`.

        Safe to call from a signal handler or another thread.
        """
        if not self._stopping:
            self._grace_deadline = time.monotonic() + self.settings.grace
        self._stopping = True
        self._abort = self._abort or now
        self._waker.wake()

    @property
    def busy(self) -> bool:
        """Whether any task is running, waiting to run or waiting for its retry."""
        return bool(self._inflight or self._held or self._arrivals)

    def close(self) -> None:
        self._pool.shutdown()
        self._waker.close()

    # -- ConsumerMixin -------------------------------------------------------

    def get_consumers(self, Consumer: Any, channel: Any) -> list[Any]:
        self._consumer = Consumer(
            queues=[self.queue],
            on_message=self._arrive,
            accept=wire.ACCEPT,
            prefetch_count=self.settings.prefetch_count,
        )
        return [self._consumer]

    def _arrive(self, message: Message) -> None:
        self._arrivals.append(message)
        if self._multiple_acks:
            self._outstanding[message.delivery_tag] = False

    def on_consume_ready(self, connection: Connection, channel: Any, consumers: Any, **kwargs: Any) -> None:
        self._generation += 1
        self._conn = connection
        self._outstanding.clear()
        self._multiple_acks = is_amqp(connection)
        if self._multiple_acks:
            read_ahead(connection)
        # Where every delivered task is running (prefetch <= concurrency), the
        # broker sends the next only for an ack: ack at once, from the handler's
        # thread. With tasks queued here, acks batched by this thread cost less.
        self._early_acks = self._multiple_acks and self.settings.prefetch_count <= self.settings.concurrency
        self._consuming = True
        self._sender = Sender(connection, self.queue, also=[self.dead_queue], reconnect_for=0)
        # Retries held for the old channel are the broker's again.
        self._held.clear()
        facts = fields(queue=self.queue.name, broker=self._where, prefetch=self.settings.prefetch_count)
        log.info("consuming", extra=facts)

    @contextmanager
    def establish_connection(self) -> Iterator[Connection]:
        with self.create_connection() as conn:
            conn.ensure_connection(self.on_connection_error, self.connect_max_retries, callback=self._check_stop)
            yield conn

    def _check_stop(self) -> None:
        if self._stopping:
            raise _Stopped()

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        log.warning(
            "cannot reach the broker; trying again in %.0fs",
            interval,
            extra=fields(broker=self._where, error=exc),
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
            self._requeue_everything()

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
                    if self._done():
                        self.should_stop = True
                        self._requeue_everything()
                        break
                    self._wait()
                    yield
        finally:
            self._early_acks = False
            self._io.release()

    # -- one step of the connection thread ---------------------------------------

    def _step(self) -> None:
        while self._arrivals:
            self._accept(self._arrivals.popleft())
        self._settle_finished()
        self._release_due_retries()
        if self._stopping and self._consuming:
            self._stop_consuming()

    def _accept(self, message: Message) -> None:
        if self._stopping or self._quota_reached():
            self._requeue(message)
            return
        delivery = wire.Delivery.of(message)
        if delivery.number > self.settings.delivery_limit:
            self._dead_letter(
                message,
                "delivery-limit",
                f"delivered {delivery.number} times without an ack: its handler may be killing the worker",
                delivery.attempt,
            )
            return
        if delivery.uncounted:
            # This queue does not count deliveries: carry the count in a copy.
            changes = {wire.DELIVERIES: delivery.number - 1, wire.REDELIVERED: True}
            self._publish_then_ack(message, self.queue.name, changes)
            return
        try:
            text = wire.decode_task(message)
        except (ContentDisallowed, DecodeError, UnicodeDecodeError) as exc:
            self._dead_letter(message, "undecodable", f"{type(exc).__name__}: {exc}", delivery.attempt)
            return
        task = Task(text, message, self._generation, delivery.redelivered, delivery.attempt, delivery.number)
        if delivery.retry_at is not None and delivery.retry_at > time.time():
            self._hold(task, delivery.retry_at - time.time())
            return
        self._start(task)

    def _start(self, task: Task) -> None:
        self._inflight[id(task)] = task
        self.tasks_run += 1
        log.debug("task received", extra=task.facts(queue=self.queue.name))
        self._pool.submit(task)
        if self._quota_reached() and self._consuming:
            self._stop_consuming(give_back_waiting=False)

    def _quota_reached(self) -> bool:
        limit = self.settings.max_tasks
        return limit is not None and self.tasks_run >= limit

    def _run_task(self, task: Task) -> None:
        """On a handler thread: run the handler, then wake the connection thread."""
        task.started = time.monotonic()
        try:
            self.on_task_start(task)
            self.handler(task.text)
        except BaseException as exc:  # noqa: BLE001 - any failure of the handler is the task's
            task.error = exc
        task.duration = time.monotonic() - task.started
        task.state = "finished"
        try:
            self.on_task_done(task)
        finally:
            if task.error is None:
                self._ack_early(task)
            self._finished.put(task)
            self._waker.wake()

    def _ack_early(self, task: Task) -> None:
        """On a handler thread: ack the task now if the connection thread is idle in select().

        The broker hears of it without waiting for the connection thread to
        wake up; at prefetch 1 that is the next task's delivery started sooner.
        When the connection thread is busy, it acks the task itself, as it
        settles the finished ones.
        """
        if not self._io.acquire(blocking=False):
            return
        try:
            if self._early_acks and task.generation == self._generation:
                self._send_acks([task])
        except Exception:  # noqa: BLE001 - the connection thread meets the same failure and handles it
            pass
        finally:
            self._io.release()

    def _settle_finished(self) -> None:
        done: list[Task] = []
        while True:
            try:
                task = self._finished.get_nowait()
            except Empty:
                break
            self._inflight.pop(id(task), None)
            if task.acked:  # by its handler thread, on the channel it came from
                done.append(task)
                continue
            if task.generation != self._generation:
                log.warning(
                    "task finished after its channel was closed, so it cannot be acked: "
                    "the broker delivers it again, if it has not already",
                    extra=task.facts(queue=self.queue.name, duration=f"{task.duration:.3f}"),
                )
                continue
            self._backoff = 0.5  # the connection works: a new loss starts backing off afresh
            if task.error is None:
                done.append(task)
            else:
                self._failed(task)
        if done:
            self._ack_done(done)

    def _ack_done(self, done: list[Task]) -> None:
        """Ack tasks whose handlers returned, unless acked already, and count them."""
        unsent = [task for task in done if not task.acked]
        if unsent:
            self._send_acks(unsent)
        self.tasks_acked += len(done)
        if log.isEnabledFor(logging.INFO):
            for task in done:
                log.info("task done", extra=task.facts(queue=self.queue.name, duration=f"{task.duration:.3f}"))

    def _send_acks(self, done: list[Task]) -> None:
        """Ack tasks, a run of them with one `basic.ack` where AMQP allows."""
        if self._multiple_acks:
            for task in done:
                self._outstanding[task.delivery_tag] = True
            last = None
            for tag, finished in self._outstanding.items():
                if not finished:
                    break
                last = tag
            if last is not None:
                # Every delivery up to `last` is done: one ack with multiple=True covers them.
                by_tag = {task.delivery_tag: task for task in done}
                while self._outstanding and next(iter(self._outstanding)) <= last:
                    del self._outstanding[next(iter(self._outstanding))]
                by_tag[last].message.ack(multiple=True)
                single = [task for task in done if task.delivery_tag > last]
            else:
                single = done
        else:
            single = done
        for task in single:
            self._ack(task.message)
        for task in done:
            task.acked = True

    def _ack(self, message: Message) -> None:
        self._outstanding.pop(message.delivery_tag, None)
        message.ack()

    def _failed(self, task: Task) -> None:
        error = f"{type(task.error).__name__}: {task.error}"
        if task.attempt <= self.settings.max_retries:
            delay = self.settings.retry_delay * 2 ** (task.attempt - 1)
            log.warning(
                "task failed; retrying in %.1fs",
                delay,
                extra=task.facts(queue=self.queue.name, error=error, duration=f"{task.duration:.3f}"),
            )
            changes = {
                wire.ATTEMPT: task.attempt + 1,
                wire.RETRY_AT: time.time() + delay,
                wire.DELIVERIES: None,
                wire.REDELIVERED: None,
            }
            self._publish_then_ack(task.message, self.queue.name, changes)
            return
        self._dead_letter(task.message, "failed", error, task.attempt)

    def _dead_letter(self, message: Message, reason: str, error: str, attempts: int) -> None:
        log.error(
            "task dead-lettered to %s: %s",
            self.dead_queue.name,
            error,
            extra=fields(queue=self.queue.name, delivery_tag=message.delivery_tag, reason=reason, attempt=attempts),
        )
        changes = {
            wire.REASON: reason,
            wire.ERROR: error[:2000],
            wire.ORIGIN: self.queue.name,
            wire.ATTEMPT: attempts,
            wire.RETRY_AT: None,
        }
        self._publish_then_ack(message, self.dead_queue.name, changes)

    def _publish_then_ack(self, message: Message, routing_key: str, changes: dict[str, Any]) -> None:
        """Put a changed copy where it belongs, confirmed, and only then ack the original."""
        assert self._sender is not None
        self._sender.publish([wire.copy_of(message, routing_key, changes)])
        self._ack(message)

    # -- retries waiting for their time ---------------------------------------

    def _hold(self, task: Task, delay: float) -> None:
        heapq.heappush(self._held, (time.monotonic() + delay, next(self._order), task))
        # A held retry must not take the place of a task that could run now.
        self._consumer.qos(prefetch_count=self.settings.prefetch_count + len(self._held))
        log.debug("retry held", extra=task.facts(queue=self.queue.name, due_in=f"{delay:.3f}"))

    def _release_due_retries(self) -> None:
        now = time.monotonic()
        released = False
        while self._held and self._held[0][0] <= now and not self._stopping:
            _, _, task = heapq.heappop(self._held)
            self._start(task)
            released = True
        if released and self._consuming:
            self._consumer.qos(prefetch_count=self.settings.prefetch_count + len(self._held))

    # -- stopping ----------------------------------------------------------------

    def _stop_consuming(self, give_back_waiting: bool = True) -> None:
        """Cancel the consumer and, unless told otherwise, give back what has not started."""
        self._consuming = False
        try:
            self._consumer.cancel()
        except Exception:  # noqa: BLE001 - a broken channel has no consumer to cancel
            pass
        if not give_back_waiting:
            return
        for task in list(self._inflight.values()):
            if self._pool.cancel(task):
                self._inflight.pop(id(task))
                self._requeue(task.message)
        while self._held:
            self._requeue(heapq.heappop(self._held)[2].message)

    def _done(self) -> bool:
        if self._stopping:
            if not self._inflight:
                return True
            if self._abort or time.monotonic() >= self._grace_deadline:
                return True
            return False
        if self._quota_reached() and not self.busy:
            return True
        return self.settings.burst and self._queue_drained()

    def _queue_drained(self) -> bool:
        """Twice in a row nothing in flight and nothing in the queue.

        Once is not enough: the count leaves out messages on their way to us.
        """
        if self.busy or not self._idle:
            # Only a wait in which nothing happened is worth asking the broker about.
            self._empty_readings = 0
            return False
        count = messages_ready(self._consumer.channel, self.queue)
        self._empty_readings = self._empty_readings + 1 if count == 0 and not self.busy else 0
        return self._empty_readings >= 2

    def _requeue_everything(self) -> None:
        """Give back every message still held: a hard stop, or the grace ran out."""
        for task in list(self._inflight.values()):
            if task.generation == self._generation and not task.acked:
                log.warning("task requeued unfinished", extra=task.facts(queue=self.queue.name))
                self._requeue(task.message)
                task.generation = -1  # given back: its handler thread must not ack it
        self._inflight.clear()
        while self._held:
            self._requeue(heapq.heappop(self._held)[2].message)

    def _requeue(self, message: Message) -> None:
        self._outstanding.pop(message.delivery_tag, None)
        try:
            message.requeue()
        except Exception as exc:  # noqa: BLE001 - a dead channel gives it back by itself
            log.debug("could not requeue; the broker will redeliver", extra=fields(error=exc))

    # -- waiting -----------------------------------------------------------------

    def _wait(self) -> None:
        conn = self._conn
        assert conn is not None
        self._idle = False
        if self._arrivals or not self._finished.empty():
            return  # a synchronous call (a publish's confirm) brought work in already
        timeout = self._timeout()
        if is_amqp(conn):
            self._wait_amqp(conn, timeout)
        elif len(self._inflight) >= self.settings.prefetch_count or self._stopping:
            # The broker will hand us nothing: wait for a handler instead.
            self._waker.event.wait(timeout)
            self._waker.clear()
        else:
            try:
                conn.drain_events(timeout=min(timeout, 0.05))
            except TimeoutError:
                self._idle = True

    def _wait_amqp(self, conn: Connection, timeout: float) -> None:
        sock = conn.connection.sock
        if has_read(conn):
            ready: list[Any] = [sock]
        else:
            self._io.release()  # while this waits, a handler thread may ack on the connection
            try:
                ready, _, _ = select.select([sock, self._waker.fd], [], [], timeout)
            finally:
                self._io.acquire()
        self._idle = not ready
        if self._waker.fd in ready:
            self._waker.clear()
        if sock in ready:
            read_arrived(conn)
        now = time.monotonic()
        if now >= self._next_heartbeat:
            conn.heartbeat_check()
            self._next_heartbeat = now + max(0.2, (conn.heartbeat or 4) / 4)

    def _timeout(self) -> float:
        timeout = 1.0
        if self._held:
            timeout = min(timeout, self._held[0][0] - time.monotonic())
        if self._stopping:
            timeout = min(timeout, self._grace_deadline - time.monotonic())
        elif self.settings.burst and not self.busy:
            timeout = min(timeout, 0.05)
        return max(0.0, timeout)

    # -- losing the connection -------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        mismatch = queue_mismatch(exc)
        if mismatch is not None:
            raise mismatch from None
        self._consuming = False
        running = sum(1 for task in self._inflight.values() if task.state == "running")
        if is_ack_timeout(exc):
            log.error(
                "the broker closed the channel because a task ran longer than its consumer_timeout; "
                "the task will be delivered again (%d still running here may run twice); "
                "raise RabbitMQ's consumer_timeout setting (rabbitmq.conf, in ms) for longer tasks",
                running,
                extra=fields(queue=self.queue.name, error=exc),
            )
        else:
            log.warning(
                "lost the %s to the broker; reconnecting in %.1fs (%d running tasks will be delivered again)",
                "channel" if isinstance(exc, self.connection.channel_errors) else "connection",
                self._backoff,
                running,
                extra=fields(queue=self.queue.name, broker=self._where, error=exc or type(exc).__name__),
            )
        # Whatever was delivered on the old channel is the broker's to deliver again.
        self._pool.grow(running)
        for task in list(self._inflight.values()):
            task.generation = -1
        self._inflight.clear()
        self._arrivals.clear()
        self._held.clear()
        if self._stopping:
            self.should_stop = True
            return
        # Back off, so that a broker that keeps failing us is not hammered.
        self._waker.event.wait(self._backoff)
        self._waker.clear()
        self._backoff = min(self._backoff * 2, 30.0)

    @property
    def _where(self) -> str:
        return mask(self.connection.as_uri(include_password=True))


class _Stopped(Exception):
    """Raised out of a reconnect wait when a stop was asked."""
