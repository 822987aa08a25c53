"""Copies of tasks the worker publishes (retries, recounts, dead letters), on a connection of their own.

RabbitMQ blocks a connection that publishes while a memory or disk alarm is
up, and then reads nothing from it, acks included; its documentation advises
separate connections for publishing and consuming. So the worker consumes and
acks on one connection and publishes here, without waiting: the original is
acked only once its copy is confirmed, and until then stays unacked, safe.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu import Connection, Queue

from kqueue.logs import fields
from kqueue.producer import Outgoing, Sender
from kqueue.worker.task import Task

__all__ = ["Outbox"]

log = logging.getLogger("kqueue.worker")


class _Sender(Sender):
    def on_blocked(self, reason: str) -> None:
        self.blocked = reason
        log.warning(
            "the broker blocked publishing (%s): retries and dead letters wait, their tasks stay unacked; "
            "other tasks go on",
            reason,
            extra=fields(broker=self._where),
        )

    def on_unblocked(self) -> None:
        self.blocked = None
        log.warning("the broker unblocked publishing", extra=fields(broker=self._where))


class Outbox:
    """Publishes copies and tells which originals may be acked now.

    Parameters:
        connection: a connection of the outbox's own (not the consuming one).
        queues: every queue a copy may go to; declared before anything is published.
    """

    def __init__(self, connection: Connection, queues: list[Queue]) -> None:
        self.connection = connection
        self._sender = _Sender(connection, queues[0], also=queues[1:], reconnect_for=0)
        self._sender.open()
        self._waiting: dict[int, Task] = {}  # id of the copy -> the original

    def put(self, copy: Outgoing, original: Task) -> None:
        """Publish `copy`; `confirmed()` returns `original` once the broker has it."""
        self._waiting[id(copy)] = original
        self._sender.post(copy)

    def confirmed(self) -> list[Task]:
        """The originals whose copies the broker has confirmed since the last call."""
        if not self._waiting:
            return []
        done = []
        for copy in self._sender.settled():  # the same objects as posted: the sender held them
            done.append(self._waiting.pop(id(copy)))
        return done

    @property
    def pending(self) -> int:
        """How many copies await their confirm."""
        return len(self._waiting)

    @property
    def waiting(self) -> list[Task]:
        """Originals whose copies are not confirmed yet."""
        return list(self._waiting.values())

    @property
    def sock(self) -> Any:
        """The socket its confirms arrive on, for the worker's select(); None where there is none."""
        return getattr(self.connection.connection, "sock", None)

    def close(self) -> None:
        """Close without a word to the broker: it may be blocking this connection."""
        self._waiting.clear()
        try:
            self.connection.collect()
        except Exception as exc:  # noqa: BLE001 - what cannot be closed is dropped all the same
            log.debug("could not close the publishing connection", extra=fields(error=exc))
