"""The sending side: persistent `text/plain` tasks, each confirmed by the broker."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kombu import Connection, Queue

from kqueue.brokers import confirms, ensure_connected, has_arrived, is_amqp, read_arrived, watch_blocked, where
from kqueue.delays import NOT_BEFORE, check_delay
from kqueue.delays import amqp as delays_amqp
from kqueue.errors import KQueueError, PublishFailed, describe
from kqueue.queues import declare

__all__ = ["Outgoing", "Sender", "send"]

log = logging.getLogger("kqueue.producer")

#: Messages published before waiting for the broker's confirms. RabbitMQ confirms
#: a persistent message once it is on disk, and writes in batches: the window
#: must cover a batch at full publishing speed, or the sender stalls each time
#: (2,000 gave three quarters of the unconfirmed publish rate, 10,000 all of it).
CONFIRM_WINDOW = 10000
#: Every this many publishes, confirms that have arrived are collected without waiting.
CONFIRM_POLL = 256
#: AMQP delivery mode 2: the broker writes the message to disk.
PERSISTENT = 2
#: Seconds to wait for confirms that do not come before giving up on them.
CONFIRM_TIMEOUT = 30.0
#: Seconds, in total, to keep reconnecting after the broker went away mid-batch.
RECONNECT_FOR = 30.0
#: Seconds before messages the broker refused (nacked) go out again; the wait
#: doubles while it keeps refusing, up to the second figure. A quorum queue
#: refuses while it has no leader, a second or two after a node died.
REFUSED_DELAY = (0.1, 2.0)
#: Seconds between log lines about a broker that keeps refusing.
REFUSED_LOG_EVERY = 5.0
#: Seconds of refusals after which the channel is replaced. RabbitMQ 3.10 was
#: seen to refuse on one channel for as long as it lived, the queue's new leader
#: long elected, and to leave the rest of its messages unconfirmed; a new
#: channel's messages were taken at once.
REFUSED_RENEW_AFTER = 3.0


@dataclass(frozen=True)
class Outgoing:
    """One message on its way: the body as bytes, exactly as it goes on the wire."""

    body: bytes
    routing_key: str
    content_type: str = "text/plain"
    content_encoding: str = "utf-8"
    headers: Mapping[str, Any] | None = None
    #: The caller's own number for it (a line of a file), never sent: see `Sender.pending`.
    seq: int = field(default=0, compare=False)
    #: Unix time before which it must not run: the broker keeps it until then (see `kqueue.delays`).
    #: The headers carry it too, as `kqueue.message.NOT_BEFORE`.
    not_before: float | None = None

    @classmethod
    def task(cls, text: str, queue: Queue, seq: int = 0, delay: float | None = None) -> Outgoing:
        """A text task for `queue`; `delay`: seconds before it may run."""
        if not delay:
            return cls(text.encode("utf-8"), queue.name, seq=seq)
        not_before = time.time() + check_delay(delay)
        return cls(text.encode("utf-8"), queue.name, headers={NOT_BEFORE: not_before}, seq=seq, not_before=not_before)


class Sender:
    """Publishes to one queue over one connection, and returns only once the broker has them.

    On RabbitMQ every message is confirmed (publisher confirms, pipelined: up to
    `window` messages are in flight before their confirms are collected). On
    other transports a publish that returned is as confirmed as it gets. If the
    connection is lost, the unconfirmed messages (at most `window`) are sent again
    once it is back, so a message may arrive twice but none is reported sent that
    was not confirmed.

    Parameters:
        connection: a Kombu connection; the sender connects it when needed.
        queue: where tasks go; declared once, before the first message.
        also: other queues this sender may publish to, each declared before its first message.
        window: how many unconfirmed messages may be in flight.
        reconnect_for: seconds to keep trying to reconnect before giving up.
        confirm_timeout: seconds without a confirm, the connection up, before giving up.
    """

    def __init__(
        self,
        connection: Connection,
        queue: Queue,
        *,
        also: Iterable[Queue] = (),
        window: int = CONFIRM_WINDOW,
        reconnect_for: float = RECONNECT_FOR,
        confirm_timeout: float = CONFIRM_TIMEOUT,
    ) -> None:
        self.connection = connection
        self.queue = queue
        self._queues = {q.name: q for q in (queue, *also)}
        self.window = max(1, window)
        self.reconnect_for = reconnect_for
        self.confirm_timeout = confirm_timeout
        self.confirmed = 0
        self._channel: Any = None
        # Whether the broker confirms (and returns unroutable messages): AMQP does.
        self._confirms = False
        self._amqp = False
        self._declared: set[str] = set()
        # Unconfirmed messages by delivery tag, in publish order.
        self._unconfirmed: OrderedDict[int, Outgoing] = OrderedDict()
        # Messages of a lost or replaced channel, to go out again before anything new.
        self._resend: deque[Outgoing] = deque()
        # Losses of the connection with nothing confirmed in between: one episode (see `_lost`).
        self._losses = _Losses()
        self._refused = _Refused()
        self._next_tag = 1
        self._returned: list[str] = []
        #: Keep the messages confirmed since the last `settled()` call (see `post`).
        self.track = False
        self._settled: list[Outgoing] = []
        #: Why the broker blocked this connection (a resource alarm), while it does.
        self.blocked: str | None = None
        # The broker let a confirm wait past `confirm_timeout`: it may answer nothing more.
        self._unanswered = False

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the sender's channel; the connection stays the caller's.

        A connection the broker blocks, or that let confirms wait past
        `confirm_timeout`, is closed outright instead: the broker (or a frozen
        network) reads nothing from it, so a polite close would wait for ever.
        """
        channel, self._channel = self._channel, None
        if self.blocked is not None or self._unanswered:
            self.connection.collect()
            return
        if channel is not None:
            try:
                channel.close()
            except Exception:  # noqa: BLE001 - closing a broken channel cannot fail usefully
                pass

    def open(self) -> None:
        """Connect and declare every queue of this sender now, rather than before its first message.

        For a sender that must not wait on the broker later: once a blocked
        connection has published, a declaration on it would wait as long as
        the block lasts.
        """
        self._ensure_channel()
        for name in self._queues:
            self._declare(name)

    def post(self, message: Outgoing) -> None:
        """Publish one message without waiting for its confirm; `settled()` hands it back once confirmed.

        For a caller with a loop of its own (the worker's retries and dead
        letters). Sets `track`. A lost connection raises; what was posted and
        not settled is then the caller's to account for.
        """
        self.track = True
        self._ensure_channel()
        self._publish_one(message, None)

    def settled(self) -> list[Outgoing]:
        """The posted messages confirmed since the last call, taking in the confirms that have arrived."""
        if self._confirms and self._unconfirmed:
            self._take_confirms()
        settled, self._settled = self._settled, []
        return settled

    def pending(self) -> list[Outgoing]:
        """The messages published and not confirmed yet: in flight, refused, or waiting to go out again."""
        return [*self._unconfirmed.values(), *self._refused.messages, *self._resend]

    @property
    def unconfirmed(self) -> int:
        """Messages published and not yet confirmed, including those the broker refused, to be sent again."""
        return self._in_flight + len(self._resend)

    @property
    def _in_flight(self) -> int:
        """Messages sent and not yet confirmed, refused ones included: what the window bounds and confirms settle.

        Not those still waiting in `_resend`: no confirm can come for a message
        not sent again yet, so waiting for theirs would wait out the timeout.
        """
        return len(self._unconfirmed) + len(self._refused.messages)

    def send(self, text: str, *, delay: float | None = None) -> None:
        """Send one task and wait for the broker's confirm.

        Parameters:
            text: the task.
            delay: seconds before it may run; the broker keeps it meanwhile (see `kqueue.delays`).

        Raises:
            PublishFailed: it was not confirmed.
            QueueMismatch: the queue exists with other arguments.
            KQueueError: the delay is negative or longer than `kqueue.delays.LONGEST`.
        """
        self.send_many([text], delay=delay)

    def send_many(
        self, texts: Iterable[str], on_confirmed: Callable[[int], None] | None = None, *, delay: float | None = None
    ) -> int:
        """Send many tasks over this connection; return how many the broker confirmed.

        Parameters:
            texts: the tasks, one message each.
            on_confirmed: called with the running total each time confirms arrive.
            delay: seconds before each may run, counted from when it is sent.

        Raises:
            PublishFailed: not every message was confirmed; `confirmed` says how many were.
            QueueMismatch: the queue exists with other arguments.
        """
        if delay:
            check_delay(delay)
        return self.publish((Outgoing.task(text, self.queue, delay=delay) for text in texts), on_confirmed)

    def publish(self, messages: Iterable[Outgoing], on_confirmed: Callable[[int], None] | None = None) -> int:
        """Publish prepared messages (see `Outgoing`); the lower level of `send_many`."""
        start = self.confirmed
        source = iter(messages)
        while True:
            try:
                self._ensure_channel()
                self._publish_all(source, on_confirmed)
                self._check_returned()
                return self.confirmed - start
            except (*self.connection.recoverable_connection_errors, OSError) as exc:
                self._lost(exc)

    # -- the publish loop ----------------------------------------------------

    def _publish_all(self, source: Iterator[Outgoing], on_confirmed: Callable[[int], None] | None) -> None:
        # After a reconnect, what was unconfirmed goes out again first. Each is taken off
        # `_resend` only as `_publish_one` counts it unconfirmed again: a loss half-way
        # through leaves every one of them to the next attempt.
        self._resend = deque([*self._unconfirmed.values(), *self._resend])
        self._unconfirmed = OrderedDict()
        while self._resend:
            self._publish_one(self._resend.popleft(), on_confirmed)
        for message in source:
            self._publish_one(message, on_confirmed)
        self._await_confirms(0, on_confirmed)

    def _publish_one(self, message: Outgoing, on_confirmed: Callable[[int], None] | None) -> None:
        # Counted as unconfirmed before it goes out: if the publish itself fails,
        # it is sent again after the reconnect like any other unconfirmed one.
        tag = self._next_tag
        self._unconfirmed[tag] = message
        self._next_tag += 1
        self._declare(message.routing_key, delayed=message.not_before is not None)
        before = self.confirmed
        self._send(message)
        if self.confirmed != before and on_confirmed is not None:
            on_confirmed(self.confirmed)  # sqlite:// confirms as it commits, inside the publish
        if not self._confirms:
            # A publish that returned is as confirmed as this transport gets.
            del self._unconfirmed[tag]
            self.confirmed += 1
            if self.track:
                self._settled.append(message)
            if on_confirmed is not None:
                on_confirmed(self.confirmed)
        elif self._in_flight >= self.window:
            self._await_confirms(self.window // 2, on_confirmed)
        elif not tag % CONFIRM_POLL and self._amqp and has_arrived(self.connection):
            # Collect the confirms that are in already, so the window seldom fills
            # and the broker is never left idle while this waits for it.
            self._collect(on_confirmed)

    def _send(self, message: Outgoing) -> None:
        # The channel's own prepare/publish, as Producer.publish ends up doing,
        # without its per-message serializer, compression and declare checks:
        # an Outgoing is already bytes with its content type.
        channel = self._channel
        routing_key = message.routing_key
        headers = dict(message.headers) if message.headers else None
        if message.not_before is not None and self._amqp:
            # RabbitMQ keeps delays in a chain of queues: into it, routed on by a CC key (the
            # other brokers read the header).
            due_in = message.not_before - time.time()
            if due_in > 0:
                routing_key, chain_key = delays_amqp.route(self._queues[routing_key], due_in)
                headers = {**(headers or {}), "CC": [chain_key]}
        channel.basic_publish(
            channel.prepare_message(
                message.body,
                None,
                message.content_type,
                message.content_encoding,
                headers,
                {"delivery_mode": PERSISTENT},
            ),
            exchange="",
            routing_key=routing_key,
            mandatory=self._confirms,
        )

    def _await_confirms(self, at_most: int, on_confirmed: Callable[[int], None] | None) -> None:
        """Drain the connection until no more than `at_most` messages sent are unconfirmed."""
        deadline = time.monotonic() + self.confirm_timeout
        while self._in_flight > at_most:
            before = self.confirmed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._unanswered = True
                why = f" (it blocked this connection: {self.blocked})" if self.blocked else ""
                raise PublishFailed(
                    f"broker {self._where} did not confirm {self.unconfirmed} messages "
                    f"within {self.confirm_timeout:g}s{why}",
                    self.confirmed,
                )
            self._send_refused()
            try:
                self.connection.drain_events(timeout=min(remaining, 1.0, self._refused.wait(time.monotonic())))
            except TimeoutError:
                self.connection.heartbeat_check()
            if self.confirmed != before:
                deadline = time.monotonic() + self.confirm_timeout
                if on_confirmed is not None:
                    on_confirmed(self.confirmed)

    def _take_confirms(self) -> None:
        """Take in the confirms that have arrived, without waiting for more.

        On AMQP they are frames already read or on the socket; ``sqlite://``
        confirms what it commits, so committing what is pending is the way to them.
        """
        if not self._amqp:
            self._channel.flush()
        elif has_arrived(self.connection):
            read_arrived(self.connection)

    def _collect(self, on_confirmed: Callable[[int], None] | None) -> None:
        """Take in the confirms that have arrived, without waiting for more."""
        before = self.confirmed
        read_arrived(self.connection)
        if on_confirmed is not None and self.confirmed != before:
            on_confirmed(self.confirmed)

    # -- broker callbacks ----------------------------------------------------

    def _settle(self, tag: int, multiple: bool) -> list[Outgoing]:
        if not multiple:
            message = self._unconfirmed.pop(tag, None)
            return [message] if message is not None else []
        settled = []
        while self._unconfirmed:
            first = next(iter(self._unconfirmed))
            if first > tag:
                break
            settled.append(self._unconfirmed.pop(first))
        return settled

    def _on_ack(self, tag: int, multiple: bool) -> None:
        settled = self._settle(tag, multiple)
        self.confirmed += len(settled)
        if self._refused.total and not self._refused.messages:
            total, seconds = self._refused.end(time.monotonic())
            log.warning(
                "broker %s takes messages again: %d refused in %.1fs, each sent again", self._where, total, seconds
            )
        if self.track:
            self._settled.extend(settled)

    def on_blocked(self, reason: str) -> None:
        """The broker blocked this connection (a resource alarm); a hook: this one logs it."""
        self.blocked = reason
        log.warning(
            "broker %s blocked this connection (%s): it takes no messages until the alarm clears; "
            "waiting up to %gs for each confirm",
            self._where,
            reason,
            self.confirm_timeout,
        )

    def on_unblocked(self) -> None:
        self.blocked = None
        log.warning("broker %s unblocked this connection; sending again", self._where)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        # The broker could not take these (a quorum queue without a leader, an
        # internal error): they go out again after a pause (`_send_refused`),
        # not at once, which only has them refused again, thousands of times.
        now = time.monotonic()
        first = not self._refused.total
        self._refused.add(self._settle(tag, multiple), now)
        if first:
            log.warning(
                "broker %s refused messages (a quorum queue does while it has no leader, during a failover); "
                "sending them again in %.1fs, then at growing intervals while it refuses",
                self._where,
                self._refused.delay,
            )
            self._refused.logged = now

    def _send_refused(self) -> None:
        """Publish again the refused messages whose pause is over."""
        now = time.monotonic()
        due = self._refused.take_due(now)
        if not due:
            return
        if now - self._refused.renewed >= REFUSED_RENEW_AFTER:
            self._renew_channel(due, now)
            return
        if now - self._refused.logged >= REFUSED_LOG_EVERY:
            log.warning(
                "broker %s still refuses messages: %d refused in %.0fs; sending %d again, next pause %.1fs",
                self._where,
                self._refused.total,
                now - self._refused.since,
                len(due),
                self._refused.delay,
            )
            self._refused.logged = now
        self._send_again(due)

    def _send_again(self, messages: list[Outgoing]) -> None:
        """Publish `messages` again on this channel, each counted unconfirmed before any goes out."""
        for message in messages:
            self._unconfirmed[self._next_tag] = message
            self._next_tag += 1
        for message in messages:
            self._send(message)

    def _renew_channel(self, refused: list[Outgoing], now: float) -> None:
        """Send everything unconfirmed again on a new channel: the old one keeps refusing."""
        pending = [*self._unconfirmed.values(), *refused]
        log.warning(
            "broker %s has refused messages for %.0fs (%d refused): sending the %d unconfirmed again on a new channel",
            self._where,
            now - self._refused.since,
            self._refused.total,
            len(pending),
        )
        self._refused.renewed = self._refused.logged = now
        channel, self._channel = self._channel, None
        self._resend = deque([*pending, *self._resend])
        self._unconfirmed = OrderedDict()
        try:
            channel.close()
        except Exception:  # noqa: BLE001 - closing a broken channel cannot fail usefully
            pass
        self._ensure_channel()
        again, self._resend = list(self._resend), deque()
        self._send_again(again)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self._returned.append(routing_key)

    def _check_returned(self) -> None:
        if self._returned:
            count, key = len(self._returned), self._returned[0]
            self._returned.clear()
            self.confirmed -= count
            raise PublishFailed(
                f"{count} messages were returned by the broker: no queue {key!r} to route them to",
                self.confirmed,
            )

    # -- connection management -------------------------------------------------

    @property
    def _where(self) -> str:
        return where(self.connection)  # the node connected (or tried), not the URL's first

    def _ensure_channel(self) -> None:
        if self._channel is not None:
            return
        ensure_connected(self.connection, timeout=10)
        channel = self.connection.channel()
        self._amqp = is_amqp(self.connection)
        self._confirms = self._amqp or confirms(self.connection)
        if self._confirms:
            watch_blocked(self.connection, self.on_blocked, self.on_unblocked)
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
        self._channel = channel
        self._next_tag = 1
        self._declared.clear()

    def _declare(self, routing_key: str, *, delayed: bool = False) -> None:
        if routing_key not in self._declared:
            if routing_key in self._queues:
                declare(self.connection, self._queues[routing_key])
            self._declared.add(routing_key)
        if delayed and self._amqp and (key := f"{routing_key} (delayed)") not in self._declared:
            if routing_key not in self._queues:
                raise KQueueError(f"a delayed task for {routing_key!r}, which this sender was not given")
            delays_amqp.declare(self.connection, self._queues[routing_key])
            self._declared.add(key)

    def _lost(self, exc: BaseException) -> None:
        """The connection broke: drop the channel and reconnect, to the next node first, or give up.

        Each round tries every node of the URL once; rounds are apart by a
        growing pause. What was unconfirmed or refused goes out again first.
        Losses with nothing confirmed in between are one episode (`_Losses`):
        said once, given `reconnect_for` seconds in all, and apart by a growing
        pause when reconnecting works at once but sending does not (a queue
        file locked by another process, a full disk).
        """
        self._channel = None
        for message in self._refused.take_all():
            self._unconfirmed[self._next_tag] = message
            self._next_tag += 1
        lost = self._where
        try:
            if self._amqp:
                # Dropped, not closed: a polite close waits for the broker's reply, and a broker
                # that missed its heartbeats (a frozen network) never sends one.
                self.connection.collect()
            else:
                self.connection.close()
        except Exception:  # noqa: BLE001 - the connection is already broken
            pass
        first = self._losses.begin(self.confirmed, self.reconnect_for)
        say = log.warning if first else log.debug
        say(
            "lost the connection to broker %s (%s); reconnecting, then sending the %d unconfirmed messages again",
            lost,
            describe(exc),
            self.unconfirmed,
        )
        self.connection.maybe_switch_next()  # the node just lost is the likeliest to be down
        deadline = self._losses.deadline
        time.sleep(min(self._losses.pause, max(0.0, deadline - time.monotonic())))
        delay = 0.5
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishFailed(
                    f"lost the connection to broker {lost} ({describe(exc)}) "
                    f"and could not send again within {self.reconnect_for:g}s",
                    self.confirmed,
                ) from None
            try:
                ensure_connected(self.connection, timeout=min(remaining, 10))
            except Exception as again:  # noqa: BLE001 - any failure here means "not yet"
                exc = again
                log.warning("cannot reach the broker (%s); trying again in %.1fs", describe(exc), delay)
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 5.0)
                continue
            say("reconnected to broker %s; sending %d messages again", self._where, self.unconfirmed)
            return


class _Losses:
    """Losses of the connection with nothing confirmed in between: one episode, with one deadline."""

    def __init__(self) -> None:
        self.confirmed = -1
        self.deadline = 0.0
        self.pause = 0.0  # before reconnecting: 0 for a first loss, then growing

    def begin(self, confirmed: int, reconnect_for: float) -> bool:
        """Count a loss, `confirmed` messages having been confirmed; whether it starts a new episode."""
        if confirmed != self.confirmed:
            self.confirmed, self.deadline, self.pause = confirmed, time.monotonic() + reconnect_for, 0.0
            return True
        self.pause = min(max(self.pause * 2, 0.1), 2.0)
        return False


class _Refused:
    """Messages the broker refused, waiting out a pause before they go again, and the tally of one episode."""

    def __init__(self) -> None:
        self.messages: list[Outgoing] = []
        self.delay = REFUSED_DELAY[0]
        self.due = 0.0
        self.total = 0  # refusals since the broker last took a message
        self.since = 0.0
        self.renewed = 0.0  # when the channel was last replaced, or the episode began
        self.logged = 0.0

    def add(self, messages: list[Outgoing], now: float) -> None:
        if not self.total:
            self.since = self.renewed = now
        if not self.messages:
            self.due = now + self.delay
        self.messages.extend(messages)
        self.total += len(messages)

    def wait(self, now: float) -> float:
        """Seconds until the next refused message may go again (a long time if there is none)."""
        return max(0.01, self.due - now) if self.messages else 3600.0

    def take_due(self, now: float) -> list[Outgoing]:
        if not self.messages or now < self.due:
            return []
        self.delay = min(self.delay * 2, REFUSED_DELAY[1])
        return self.take_all()

    def take_all(self) -> list[Outgoing]:
        messages, self.messages = self.messages, []
        return messages

    def end(self, now: float) -> tuple[int, float]:
        """The broker took a message again: the episode's refusals and seconds; the next starts afresh."""
        total, seconds = self.total, now - self.since
        self.total, self.delay = 0, REFUSED_DELAY[0]
        return total, seconds


def send(connection: Connection, queue: Queue, texts: Iterable[str]) -> int:
    """Send `texts` to `queue`, each confirmed; return how many were.

    Raises:
        PublishFailed: not every message was confirmed.
    """
    with Sender(connection, queue) as sender:
        return sender.send_many(texts)
