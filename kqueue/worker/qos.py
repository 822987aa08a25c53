"""How a worker's prefetch is set, and raised while tasks wait here without running, on each broker."""

from __future__ import annotations

from typing import Any

from kombu import Queue

from kqueue.queues import is_quorum

__all__ = ["Prefetch"]


class Prefetch:
    """The prefetch of one channel, and the way to change it while its consumer runs.

    RabbitMQ applies a changed per-consumer prefetch only to consumers started
    after it; the channel-wide one (``global``) changes at once, so classic
    queues use that. Quorum queues refuse the channel-wide one: there a
    prefetch cannot change under a running consumer. Kombu's virtual
    transports (memory, Redis, sqlite) change theirs at once.

    Parameters:
        channel: the consuming channel.
        queue: the task queue.
        count: the prefetch the worker's settings ask for.
        amqp: the channel is RabbitMQ's.
    """

    def __init__(self, channel: Any, queue: Queue, count: int, *, amqp: bool) -> None:
        self.count = count
        self.now = count
        self.channel_wide = amqp and not is_quorum(queue)
        self.adjustable = self.channel_wide or not amqp
        self._channel = channel
        self._consumer: Any = None
        if self.channel_wide:
            channel.basic_qos(0, count, True)

    @property
    def consumer_count(self) -> int | None:
        """The prefetch to give the consumer itself; None where the channel's applies."""
        return None if self.channel_wide else self.count

    def attach(self, consumer: Any) -> None:
        """The consumer whose prefetch `raise_by` changes (where it is the consumer's own)."""
        self._consumer = consumer

    def raise_by(self, waiting: int) -> None:
        """Prefetch plus `waiting` deliveries held here without running; a no-op where it cannot change."""
        wanted = self.count + waiting
        if wanted == self.now or not self.adjustable:
            return
        if self.channel_wide:
            self._channel.basic_qos(0, wanted, True)
        else:
            self._consumer.qos(prefetch_count=wanted)
        self.now = wanted
