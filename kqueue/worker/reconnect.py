"""Losing the broker: one line that says what happened and what comes back, and a growing delay before trying again."""

from __future__ import annotations

import logging

from kqueue.errors import describe, is_ack_timeout
from kqueue.logs import fields

__all__ = ["Backoff", "report_loss"]

log = logging.getLogger("kqueue.worker")


class Backoff:
    """Seconds to wait before reconnecting: 0.5, then twice as long each time, up to 30; reset once work is done."""

    FIRST, LAST = 0.5, 30.0

    def __init__(self) -> None:
        self.delay = self.FIRST

    def reset(self) -> None:
        self.delay = self.FIRST

    def grow(self) -> None:
        self.delay = min(self.delay * 2, self.LAST)


def report_loss(exc: BaseException, *, running: int, what: str, queue: str, broker: str, delay: float) -> None:
    """Log the loss of the channel or connection (`what`), telling RabbitMQ's consumer ack timeout apart.

    Parameters:
        running: tasks still running here, which the broker delivers again and so may run twice.
    """
    if is_ack_timeout(exc):
        log.error(
            "the broker closed the channel because a task ran longer than its consumer_timeout; "
            "the task will be delivered again (%d still running here may run twice); "
            "raise RabbitMQ's consumer_timeout setting (rabbitmq.conf, in ms) for longer tasks",
            running,
            extra=fields(queue=queue, error=describe(exc)),
        )
        return
    log.warning(
        "lost the %s to the broker; reconnecting in %.1fs (%d running tasks will be delivered again)",
        what,
        delay,
        running,
        extra=fields(queue=queue, broker=broker, error=describe(exc)),
    )
