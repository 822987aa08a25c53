"""One delivery of a task, from its arrival until it is acked, retried, dead-lettered or given back."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from kombu.message import Message

from kqueue.logs import fields

if TYPE_CHECKING:
    from kqueue.worker.acks import Ledger
    from kqueue.worker.settings import WorkerSettings

__all__ = ["Call", "Registered", "Task", "TaskState", "run_handler"]

# One lock for every task's state: the two threads race only over "start it"
# against "cancel it", and each side holds it for one comparison.
_STATE = threading.Lock()


class TaskState(Enum):
    """QUEUED -> RUNNING -> FINISHED, or QUEUED -> CANCELLED (given back before it started)."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class Registered(Protocol):
    """A function task as the worker knows it (`kqueue.app.FunctionTask`)."""

    name: str
    fn: Callable[..., Any]

    def settings(self, base: WorkerSettings) -> WorkerSettings:
        """The worker's settings with this task's own retries."""
        ...


class Runner(Protocol):
    """Where coroutines run: `kqueue.worker.aio.EventLoop`."""

    def run(self, awaitable: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class Call:
    """A function task's call, decoded: what its handler thread runs."""

    task: Registered
    args: list[Any]
    kwargs: dict[str, Any]

    def run(self, loop: Runner) -> None:
        run_handler(self.task.fn(*self.args, **self.kwargs), loop)

    def describe(self) -> str:
        """``resize('a.jpg', width=300)``: the call as the tools print it."""
        from kqueue.message import describe_call

        return describe_call(self.task.name, self.args, self.kwargs)


def run_handler(result: Any, loop: Runner) -> None:
    """A handler's result: an awaitable (an ``async def`` handler's coroutine) is run to its end on `loop`."""
    if result is not None and inspect.isawaitable(result):
        loop.run(result)


@dataclass(eq=False, kw_only=True)
class Task:
    """A task as the worker holds it.

    Attributes:
        text: what the handler is called with; for a function task, the call as the tools print it.
        call: a function task's call, or None for a text task.
        message: the Kombu message it came in.
        ledger: the ack ledger of the channel it came on; its acks go nowhere else.
        redelivered: the broker handed it out before.
        attempt: which run of the handler this is.
        error: what the handler raised, once it finished.
        started, duration: when the handler started (monotonic) and how long it ran.
        acked: the broker has its ack.
    """

    text: str
    call: Call | None = None
    message: Message = field(repr=False)
    ledger: Ledger = field(repr=False)
    redelivered: bool = False
    attempt: int = 1
    state: TaskState = TaskState.QUEUED
    error: BaseException | None = None
    started: float = 0.0
    duration: float = 0.0
    acked: bool = False

    @property
    def delivery_tag(self) -> Any:
        return self.message.delivery_tag

    @property
    def on_current_channel(self) -> bool:
        """Whether the channel it came on is still open: only there can it be acked or given back."""
        return self.ledger.open

    def claim(self) -> bool:
        """QUEUED -> RUNNING, on the handler thread about to run it; False if it was cancelled."""
        with _STATE:
            if self.state is not TaskState.QUEUED:
                return False
            self.state = TaskState.RUNNING
            return True

    def finish(self) -> None:
        """RUNNING -> FINISHED, on the handler thread once the handler returned or raised."""
        with _STATE:
            self.state = TaskState.FINISHED

    def cancel(self) -> TaskState:
        """QUEUED -> CANCELLED; return the state it was in (RUNNING: a handler thread holds it)."""
        with _STATE:
            was = self.state
            if was is TaskState.QUEUED:
                self.state = TaskState.CANCELLED
            return was

    def facts(self, **more: Any) -> dict[str, Any]:
        """The fields every log line about this task carries."""
        return fields(delivery_tag=self.delivery_tag, redelivered=self.redelivered, attempt=self.attempt, **more)
