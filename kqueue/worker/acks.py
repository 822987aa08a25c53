"""The ack ledger: what one channel has delivered and not yet acknowledged.

One ledger per channel. When the channel is lost, its ledger is closed and a
new channel gets a new one: a task keeps the ledger it came with, so a task
of a dead channel can never be acked or given back on its successor. That is
the one rule for "this task's channel is still the current one": `open`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from kqueue.brokers import ack_up_to
from kqueue.logs import fields
from kqueue.worker.task import Task

__all__ = ["Ledger"]

log = logging.getLogger("kqueue.worker")


class Ledger:
    """Acks, coalesced where AMQP allows, and give-backs, on one channel.

    The connection thread holds `io` except while it waits in select(); a
    handler thread that can take it then may ack its own task at once
    (`ack_early`), so that the broker hears of it without waiting for the
    connection thread to wake up.

    Parameters:
        coalesce: the channel is AMQP: delivery tags grow one by one, and one
            ``basic.ack`` with multiple=True covers a run of finished tasks.
        early: handler threads may ack their own tasks (every delivered task
            is running: prefetch <= concurrency).
        io: the lock over the connection.
        recoverable: the errors that mean the channel or connection is gone.
    """

    def __init__(
        self,
        *,
        coalesce: bool,
        early: bool,
        io: threading.Lock,
        recoverable: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.coalesce = coalesce
        self.early = early
        self.open = True
        self._io = io
        self._recoverable = recoverable
        # Delivery tags not yet acked, in delivery order (AMQP only).
        self._outstanding: dict[int, None] = {}

    def delivered(self, tag: int) -> None:
        """On the connection thread: a message arrived on this channel."""
        if self.coalesce:
            self._outstanding[tag] = None

    @property
    def unacked(self) -> int:
        return len(self._outstanding)

    def ack(self, tasks: Iterable[Task]) -> None:
        """Ack tasks whose handlers returned: a run of them with one ``basic.ack`` where AMQP allows.

        The ledger changes only once the broker call returned: a failed ack
        leaves every task unacked, for the broker to deliver again.
        """
        done = [task for task in tasks if not task.acked]
        if not done or not self.open:
            return
        if not self.coalesce:
            for task in done:
                task.message.ack()
                task.acked = True
            return
        finished = {task.delivery_tag: task for task in done}
        covered: set[int] = set()  # the oldest outstanding deliveries, if all of them are finished now
        for tag in self._outstanding:
            if tag not in finished:
                break
            covered.add(tag)
        if covered:
            # Every delivery up to the last of them is done: one ack with multiple=True covers them.
            ack_up_to(finished[max(covered)].message)
            for tag in covered:
                del self._outstanding[tag]
        for task in done:
            if task.delivery_tag not in covered:
                task.message.ack()
                self._outstanding.pop(task.delivery_tag, None)
            task.acked = True

    def ack_one(self, task: Task) -> None:
        """`ack` of one task, quicker where it is the oldest outstanding: one task at a time."""
        tag = task.delivery_tag
        if self.open and next(iter(self._outstanding), None) == tag:
            # The common case: it is the oldest, so it acks all before it.
            ack_up_to(task.message)
            del self._outstanding[tag]
            task.acked = True
        else:
            self.ack([task])

    def ack_early(self, task: Task) -> None:
        """On a handler thread: ack the task now, if the connection thread is idle in select().

        When the connection thread is busy, or the connection is gone, the task
        is left to the connection thread, which acks it (or meets the same
        failure and reconnects) as it settles finished tasks.
        """
        if not self.early or not self._io.acquire(blocking=False):
            return
        try:
            self.ack_one(task)
        except self._recoverable as exc:
            log.debug("early ack failed; the connection thread takes over", extra=fields(error=exc))
        finally:
            self._io.release()

    def give_back(self, message: Any) -> None:
        """Requeue a message that will not be acked here (shutdown, grace over, quota), if this channel is open."""
        if not self.open:
            return
        self._outstanding.pop(message.delivery_tag, None)
        try:
            message.requeue()
        except Exception as exc:  # noqa: BLE001 - a dead channel gives it back by itself
            log.debug("could not requeue; the broker will redeliver", extra=fields(error=exc))

    def close(self) -> None:
        """The channel is gone: nothing it delivered can be acked or given back any more."""
        self.open = False
        self._outstanding.clear()
