"""What the page shows and does, read from the broker: one connection, one broker call at a time.

Every reader of the page shares one `Board`, and the board reads the broker at
most once per `REFRESH` seconds, however many pages are open: a page asking
sooner gets the last reading. Rates come from the difference between two
readings: in, from the count of messages ever published to the queue
(RabbitMQ's management API, the ``sqlite://`` file's tallies); out, what came
in less what the queue grew by. Redis keeps no such count, so there the page
shows the counts without rates.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kombu import Connection, Queue

from kqueue import admin
from kqueue.brokers import connect, is_amqp, label_facts, mask, open_connection
from kqueue.errors import KQueueError, describe
from kqueue.queues import DEAD_SUFFIX, DEFAULT_QUEUE, QueueType, dead_letter_queue, declare, task_queue

__all__ = ["Board", "Consumer", "Reading", "Row"]

#: Seconds between two readings of the broker.
REFRESH = 2.0
#: Seconds of rates kept for the chart.
HISTORY = 300.0
#: The chart spans at least this many seconds, then as many as it has, up to `HISTORY`.
CHART_SPAN = 60.0
#: Seconds over which the rates shown beside the chart are averaged.
RATE_OVER = 10.0
#: Seconds between two looks for the broker's queues (when none were named).
DISCOVER_EVERY = 10.0
#: Dead letters listed per queue; the page says how many more there are.
DEAD_SHOWN = 100

T = TypeVar("T")


@dataclass(frozen=True)
class Consumer:
    """One consumer of a queue, as its connection names it (a kqueue worker names host, pid, prefetch, concurrency)."""

    name: str
    host: str | None = None
    pid: str | None = None
    prefetch: str | None = None
    concurrency: str | None = None

    @classmethod
    def named(cls, name: str, prefetch: object = None) -> Consumer:
        facts = label_facts(name) or {}
        shown = facts.get("prefetch", None if prefetch is None else str(prefetch))
        return cls(name, facts.get("host"), facts.get("pid"), shown, facts.get("concurrency"))


@dataclass(frozen=True)
class Row:
    """One queue, at one reading. None where the broker cannot tell.

    Attributes:
        workers: its consumers; None where the broker cannot say who they are.
        counted: whether the broker counts what is published (rates come after two readings).
        history: (seconds ago, in per second, out per second), oldest first.
    """

    name: str
    ready: int
    unacked: int | None
    delayed: int | None
    consumers: int | None
    dead: int
    rate_in: float | None
    rate_out: float | None
    workers: tuple[Consumer, ...] | None
    history: tuple[tuple[float, float, float], ...] = ()
    counted: bool = False


@dataclass(frozen=True)
class Reading:
    """The page at one moment: every queue's row, or why the broker could not be read."""

    at: float
    rows: tuple[Row, ...]
    error: str | None = None
    delayed_shared: bool = False


@dataclass
class _Sample:
    at: float
    published: int | None
    depth: int

    @staticmethod
    def rate(before: _Sample, after: _Sample) -> tuple[float, float, float]:
        """(when, in per second, out per second) from `before` to `after`: out is what came less what stayed."""
        assert before.published is not None and after.published is not None
        seconds = after.at - before.at
        came = max(0, after.published - before.published)
        left = max(0, came - (after.depth - before.depth))
        return after.at, came / seconds, left / seconds


@dataclass
class _Counts:
    ready: int
    unacked: int | None
    consumers: int | None
    dead: int
    published: int | None
    workers: tuple[Consumer, ...] | None
    delayed: int | None = None
    samples: deque[_Sample] = field(default_factory=deque)


class Board:
    """The broker at `url`, read for the page and acted on from it; the URL is fixed for the board's life.

    Parameters:
        url: the broker URL.
        queues: the task queues to show; empty for every kqueue queue the broker lists (`DEFAULT_QUEUE` if none).
        queue_type: RabbitMQ queue type, for declaring a queue an action needs.
        management_url: RabbitMQ's management API  [default: the broker's host, port 15672].
    """

    def __init__(
        self,
        url: str,
        queues: tuple[str, ...] = (),
        queue_type: QueueType = QueueType.CLASSIC,
        management_url: str | None = None,
    ) -> None:
        self.url = url
        self.shown_url = mask(url)
        self.named = queues
        self.queue_type = queue_type
        self._management_url = management_url
        self._lock = threading.RLock()
        self._conn: Connection | None = None
        self._api: admin.Management | None = None
        self._names: list[str] = list(queues) or [DEFAULT_QUEUE]
        self._looked = 0.0
        self._history: dict[str, deque[_Sample]] = {}
        self._reading: Reading | None = None
        self._letters: dict[str, tuple[int, list[admin.DeadLetter]]] = {}
        self._named: dict[str, str] = {}  # RabbitMQ: connections' own names, by the broker's
        self._chains: dict[str, int] = {}  # RabbitMQ: delayed tasks by queue type, this reading
        self._listed = False  # a reading has named the queues
        self._types: dict[str, str] = {}  # RabbitMQ: each queue's type, as last listed

    # -- reading -------------------------------------------------------------------------

    def read(self) -> Reading:
        """Every queue's counts, rates and consumers: the last reading if it is younger than `REFRESH`."""
        with self._lock:
            now = time.time()
            if self._reading is not None and now - self._reading.at < REFRESH:
                return self._reading
            try:
                with self._connected() as conn:
                    if self._api is not None:
                        self._api.available = True  # asked again at each reading, after a failure
                    self._discover(conn, now)
                    self._named = self._management(conn).connection_names() if is_amqp(conn) else {}
                    self._chains = {}
                    rows = tuple(self._row(conn, name, now) for name in self._names)
                self._reading = Reading(now, rows, delayed_shared=is_amqp(conn))
                self._listed = True
            except KQueueError as exc:
                self._reading = Reading(now, (), error=str(exc))
            return self._reading

    def queue_names(self) -> list[str]:
        """The queues the page shows, as last found."""
        return list(self._names)

    def letters(self, name: str) -> tuple[list[admin.DeadLetter], int]:
        """The first `DEAD_SHOWN` dead letters of queue `name`, and how many it holds in all.

        Read again only when the count changed or after an action: each reading fetches the
        letters and gives them back, which quorum queues count as a delivery.
        """
        with self._lock:
            count = next((row.dead for row in self.read().rows if row.name == name), 0)
            kept = self._letters.get(name)
            if kept is not None and kept[0] == count:
                return kept[1], count
            with self._connected() as conn:
                found = admin.dead_letters(conn, self._queue(name), DEAD_SHOWN) if count else []
            self._letters[name] = (count, found)
            return found, count

    def _discover(self, conn: Connection, now: float) -> None:
        if self.named or now - self._looked < DISCOVER_EVERY:
            return
        self._looked = now
        if conn.transport.driver_type == "sqlite":
            # The file is kqueue's own: each of its queues is a task queue or its dead letters.
            from kqueue.sqlite import queue_names

            found = [name for name in queue_names(conn) if not name.endswith(DEAD_SUFFIX)]
        elif is_amqp(conn):
            # A virtual host may hold other applications' queues too: kqueue's are those
            # with dead letters beside them, which a worker declares.
            types = self._management(conn).queue_types()
            if types is None:
                return
            self._types = types
            listed = sorted(types)
            names = set(listed)
            found = [name for name in listed if f"{name}{DEAD_SUFFIX}" in names]
        else:
            return
        self._names = sorted(found) or [DEFAULT_QUEUE]

    def _row(self, conn: Connection, name: str, now: float) -> Row:
        counts = self._counts(conn, self._queue(name))
        samples = self._history.setdefault(name, deque())
        # RabbitMQ's delayed tasks wait in the chain, not in the queue: they come in when due.
        delayed = (counts.delayed or 0) if conn.transport.driver_type == "sqlite" else 0
        samples.append(_Sample(now, counts.published, counts.ready + (counts.unacked or 0) + delayed))
        while samples and now - samples[0].at > HISTORY:
            samples.popleft()
        rates = _rates(samples)
        recent = [sample for sample in samples if now - sample.at <= RATE_OVER + REFRESH]
        last = _rates_over(recent)
        return Row(
            name,
            counts.ready,
            counts.unacked,
            counts.delayed,
            counts.consumers,
            counts.dead,
            None if last is None else last[1],
            None if last is None else last[2],
            counts.workers,
            tuple((now - at, rate_in, rate_out) for at, rate_in, rate_out in rates),
            counts.published is not None,
        )

    def _counts(self, conn: Connection, queue: Queue) -> _Counts:
        dead = dead_letter_queue(queue)
        if is_amqp(conn):
            api = self._management(conn)
            found, found_dead = api.queue(queue.name), api.queue(dead.name)
            if found is not None and found_dead is not None:
                return _Counts(
                    int(found.get("messages_ready", 0)),
                    int(found.get("messages_unacknowledged", 0)),
                    int(found.get("consumers", 0)),
                    int(found_dead.get("messages", 0)),
                    _published(found),
                    tuple(self._consumer(entry) for entry in found.get("consumer_details", [])),
                    self._delayed(conn, queue),
                )
        stats, dead_stats = admin.queue_stats(conn, queue, self._management_url)
        published: int | None = None
        workers: tuple[Consumer, ...] | None = None
        if conn.transport.driver_type == "sqlite":
            from kqueue.sqlite import consumer_labels, published_count

            published = published_count(conn, queue.name)
            workers = tuple(Consumer.named(label or "?") for label in consumer_labels(conn, queue.name))
        return _Counts(
            stats.ready,
            stats.unacked,
            stats.consumers,
            dead_stats.ready + (dead_stats.unacked or 0),
            published,
            workers,
            stats.delayed,
        )

    def _consumer(self, entry: dict[str, Any]) -> Consumer:
        """A consumer from RabbitMQ's details: named as its client named its connection, if it did."""
        connection = str((entry.get("channel_details") or {}).get("connection_name", "?"))
        return Consumer.named(self._named.get(connection, connection), entry.get("prefetch_count") or None)

    def _delayed(self, conn: Connection, queue: Queue) -> int:
        """RabbitMQ's delayed tasks, of every queue of the type of `queue`: counted once per reading."""
        from kqueue.delays import amqp

        kind = amqp.chain_of(queue)
        if kind not in self._chains:
            # One management API call for the chain's 32 queues (a passive declare each without it).
            from_api = self._management(conn).messages_by_prefix(amqp.level_name(kind, 0)[:-2])
            self._chains[kind] = amqp.count(conn, queue) if from_api is None else from_api
        return self._chains[kind]

    # -- acting --------------------------------------------------------------------------

    def replay(self, name: str, key: str | None = None) -> int:
        """Move one dead letter (of this key) or all of them back to queue `name`; return how many moved."""
        return self._act(name, lambda conn, queue: admin.retry_dead(conn, queue, key=key))

    def delete(self, name: str, key: str) -> int:
        """Delete one dead letter of queue `name`; return 1, or 0 if it was no longer there."""
        return self._act(name, lambda conn, queue: admin.delete_dead(conn, queue, key))

    def purge(self, name: str, *, dead: bool) -> int:
        """Delete every ready message of queue `name` (or of its dead letters); return how many."""

        def purge(conn: Connection, queue: Queue) -> int:
            target = dead_letter_queue(queue) if dead else queue
            declare(conn, target)
            return admin.purge(conn, target)

        return self._act(name, purge)

    def _act(self, name: str, action: Callable[[Connection, Queue], T]) -> T:
        with self._lock:
            # Before the first reading the page has shown no queue: none of them may be acted on.
            if name not in self._names or not (self.named or self._listed):
                raise KQueueError(f"no queue {name!r} on this page")
            try:
                with self._connected() as conn:
                    return action(conn, self._queue(name))
            finally:
                self._reading = None
                self._letters.pop(name, None)

    # -- the connection ------------------------------------------------------------------

    def _queue(self, name: str) -> Queue:
        """Queue `name`, of its type as the broker lists it (else as the page was told)."""
        kind = self._types.get(name)
        return task_queue(name, QueueType(kind) if kind in ("classic", "quorum") else self.queue_type)

    @contextmanager
    def _connected(self) -> Iterator[Connection]:
        """The board's connection, made at first use and again after the broker dropped it."""
        if self._conn is None:
            self._conn = open_connection(connect(self.url))
        conn = self._conn
        try:
            yield conn
        except (*conn.connection_errors, *conn.channel_errors, OSError) as exc:
            self._drop()
            raise KQueueError(f"lost the broker {self.shown_url}: {describe(exc)}") from None

    def _management(self, conn: Connection) -> admin.Management:
        if self._api is None:
            url = self._management_url or admin.management_url_for(conn.as_uri(include_password=True))
            self._api = admin.Management(url, conn)
        return self._api

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.collect()
            except Exception:  # noqa: BLE001 - a connection already broken is dropped all the same
                pass

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.release()
                self._conn = None


def _published(found: dict[str, Any]) -> int | None:
    """What RabbitMQ counts as published to the queue; None where it keeps no count (metrics collection off)."""
    stats = found.get("message_stats")
    if stats is None:
        # A queue nothing was published to yet has no stats either: zero, if the management API collects them.
        return 0 if "messages" in found and found.get("messages", 0) == 0 else None
    publish = stats.get("publish")
    return None if publish is None else int(publish)


def _rates(samples: deque[_Sample]) -> list[tuple[float, float, float]]:
    """(time, in per second, out per second) between each two samples that both know what was published."""
    rates = []
    for before, after in itertools.pairwise(samples):
        if before.published is None or after.published is None or after.at <= before.at:
            continue
        rates.append(_Sample.rate(before, after))
    return rates


def _rates_over(samples: list[_Sample]) -> tuple[float, float, float] | None:
    """The rates from the first of `samples` to the last, if both know what was published."""
    if len(samples) < 2:
        return None
    first, last = samples[0], samples[-1]
    if first.published is None or last.published is None or last.at <= first.at:
        return None
    return _Sample.rate(first, last)


def describe_rate(rate: float | None) -> str:
    """``12.5/s``, ``0/s``; ``-`` where the broker keeps no count."""
    if rate is None:
        return "-"
    return f"{rate:.0f}/s" if rate >= 10 or rate == 0 else f"{rate:.1f}/s"


def sparkline(history: tuple[tuple[float, float, float], ...], width: int = 160, height: int = 32) -> dict[str, Any]:
    """The chart's two polylines (in, out), in an SVG of `width` by `height`, and what its axes span."""
    top = max([1.0, *(max(rate_in, rate_out) for _, rate_in, rate_out in history)])
    span = min(HISTORY, max([CHART_SPAN, *(ago for ago, _, _ in history)]))

    def points(index: int) -> str:
        return " ".join(
            f"{width - ago / span * width:.1f},{height - 1 - rates[index] / top * (height - 2):.1f}"
            for ago, *rates in history
        )

    shown = f"{span / 60:.0f} min" if span >= 90 else f"{span:.0f} s"
    return {
        "width": width,
        "height": height,
        "in": points(0),
        "out": points(1),
        "top": describe_rate(top),
        "span": shown,
    }
