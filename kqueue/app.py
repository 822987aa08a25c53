"""Tasks as Python functions: an `App` registers them, and sends each call as a JSON message.

```python
app = kqueue.App("sqlite:///queues.db")

@app.task(max_retries=5)
def resize(path: str, width: int) -> None: ...

resize.send("a.jpg", width=300)            # returns once the broker confirmed it
resize.send("b.jpg", width=300, delay=60)  # runs no earlier than a minute from now
```

``kqueue-work --app myapp.tasks`` runs every task the app registers. On the
wire a call is ``{"args": [...], "kwargs": {...}}`` (``application/json``) with
the task's name in the ``x-kqueue-task`` header, so any AMQP client can send
one; arguments that JSON cannot carry are refused when sending.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from functools import update_wrapper
from types import MappingProxyType
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, overload

from kombu import Connection

from kqueue import message as wire
from kqueue.brokers import connect, default_url
from kqueue.delays import check_delay
from kqueue.errors import KQueueError
from kqueue.producer import Outgoing, Sender
from kqueue.queues import DEFAULT_QUEUE, QueueType, task_queue
from kqueue.worker.settings import WorkerSettings

__all__ = ["App", "Args", "FunctionTask", "NotJSON"]

P = ParamSpec("P")
R = TypeVar("R")


class _Register(Protocol):
    def __call__(self, fn: Callable[P, R], /) -> FunctionTask[P, R]: ...


class NotJSON(KQueueError, TypeError):
    """An argument of a task that JSON cannot carry."""


class App:
    """Function tasks, and where their calls go: one broker, a default queue.

    Sending opens one connection, at the first send, shared by the app's tasks
    under a lock (any thread may send); `close` it, or use the app as a
    context manager, when done.

    Parameters:
        broker: a broker URL (see `kqueue.brokers.connect`), or None for the
            tools' default, a SQLite file in the user's data directory.
        queue: the queue tasks go to unless they name their own.
        queue_type: RabbitMQ's queue type, for every queue of the app.

    Attributes:
        tasks: the registered tasks, by name: what a worker of the app runs.
    """

    def __init__(
        self, broker: str | None = None, queue: str = DEFAULT_QUEUE, *, queue_type: QueueType | str = "classic"
    ) -> None:
        self.broker = broker
        self.queue_type = QueueType(queue_type)
        self.queue = task_queue(queue, self.queue_type)
        self.tasks: dict[str, FunctionTask[Any, Any]] = {}
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self._senders: dict[str, Sender] = {}

    @overload
    def task(self, fn: Callable[P, R], /) -> FunctionTask[P, R]: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        max_retries: int | None = None,
        retry_delay: float | None = None,
    ) -> _Register: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        max_retries: int | None = None,
        retry_delay: float | None = None,
    ) -> FunctionTask[Any, Any] | _Register:
        """Register a function (plain or ``async def``) as a task: ``@app.task`` or ``@app.task(...)``.

        Parameters:
            name: what the messages call it; the function's own name by default.
            queue: its queue, if not the app's.
            max_retries, retry_delay: its own, instead of the worker's.

        Raises:
            KQueueError: another task of the app has the name.
        """

        def register(fn: Callable[..., Any]) -> FunctionTask[Any, Any]:
            registered: FunctionTask[Any, Any] = FunctionTask(
                self, fn, name or fn.__name__, queue, max_retries, retry_delay
            )
            if registered.name in self.tasks:
                raise KQueueError(f"two tasks named {registered.name!r}: give one of them another name=")
            self.tasks[registered.name] = registered
            return registered

        return register if fn is None else register(fn)

    # -- sending --------------------------------------------------------------------------

    @property
    def connection(self) -> Connection:
        """The app's connection for sending, made at its first use."""
        if self._connection is None:
            self._connection = connect(self.broker or default_url())
        return self._connection

    def publish(self, messages: Iterable[Outgoing], queue: str) -> int:
        """Publish prepared calls to `queue`, each confirmed by the broker; return how many were.

        Raises:
            PublishFailed: not every one was confirmed; its `confirmed` says how many were.
        """
        with self._lock:
            sender = self._senders.get(queue)
            if sender is None:
                sender = self._senders[queue] = Sender(self.connection, task_queue(queue, self.queue_type))
            return sender.publish(messages)

    def close(self) -> None:
        """Close the connection for sending, if it was opened; the next send opens another."""
        with self._lock:
            for sender in self._senders.values():
                sender.close()
            self._senders.clear()
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.release()

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<kqueue.App {self.queue.name!r}: {', '.join(self.tasks) or 'no tasks'}>"


class FunctionTask(Generic[P, R]):
    """A function registered with an `App`: call it to run it here, `send` it to run on a worker.

    Attributes:
        name: the name messages carry.
        fn: the function itself.
        queue: the name of the queue it is sent to.
        max_retries, retry_delay: its own, or None for the worker's.
    """

    def __init__(
        self,
        app: App,
        fn: Callable[P, R],
        name: str,
        queue: str | None,
        max_retries: int | None,
        retry_delay: float | None,
    ) -> None:
        if not name or not isinstance(name, str):
            raise KQueueError(f"a task's name is a non-empty string, not {name!r}")
        self.app = app
        self.fn = fn
        self.name = name
        self.queue = queue or app.queue.name
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self._signature = inspect.signature(fn)
        # Where the function takes a `delay` or an `at` of its own, `send` passes them on to it.
        self._own = {"delay", "at"} & set(self._signature.parameters)
        self._positional, self._arity = _positional(self._signature)
        self._headers = MappingProxyType({wire.TASK: name})
        WorkerSettings(max_retries=max_retries or 0, retry_delay=retry_delay or 0).validate()
        update_wrapper(self, fn)  # type: ignore[arg-type]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here and now, as if it were not a task."""
        return self.fn(*args, **kwargs)

    def settings(self, base: WorkerSettings) -> WorkerSettings:
        """The worker's settings, with this task's own retries where it has them."""
        if self.max_retries is None and self.retry_delay is None:
            return base
        return dataclasses.replace(
            base,
            max_retries=base.max_retries if self.max_retries is None else self.max_retries,
            retry_delay=base.retry_delay if self.retry_delay is None else self.retry_delay,
        )

    # -- sending --------------------------------------------------------------------------

    def send(self, *args: Any, **kwargs: Any) -> None:
        """Send a call of the task, and return once the broker confirmed it.

        ``delay=SECONDS`` or ``at=DATETIME`` keep it from running before then
        (unless the function takes a ``delay`` or ``at`` of its own: then use
        `send_with`).

        Raises:
            NotJSON: an argument that JSON cannot carry, or arguments the function does not take.
            PublishFailed: the broker did not confirm it.
        """
        options = {key: kwargs.pop(key) for key in ("delay", "at") if key in kwargs and key not in self._own}
        self.send_with(args, kwargs, **options)

    def send_with(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        delay: float | None = None,
        at: datetime | None = None,
    ) -> None:
        """Send a call with `args` and `kwargs`, not to run before `delay` seconds from now, or `at`.

        Raises:
            NotJSON: an argument that JSON cannot carry, or arguments the function does not take.
            PublishFailed: the broker did not confirm it.
        """
        self.app.publish([self.message(args, kwargs, delay=delay, at=at)], self.queue)

    def send_many(self, calls: Iterable[Sequence[Any] | Args], *, delay: float | None = None) -> int:
        """Send many calls, their confirms pipelined; return how many the broker confirmed.

        Parameters:
            calls: each the call's positional arguments (``("a.jpg", 300)``), or an `Args`
                for keyword arguments too (``Args("a.jpg", width=300)``).
            delay: seconds before each may run.

        Raises:
            NotJSON: a call whose arguments JSON cannot carry; those before it are sent.
            PublishFailed: not every one was confirmed; its `confirmed` says how many were.
        """

        def messages() -> Iterable[Outgoing]:
            for call in calls:
                if isinstance(call, Args):
                    yield self.message(call.args, call.kwargs, delay=delay)
                else:
                    yield self.message(call, None, delay=delay)

        return self.app.publish(messages(), self.queue)

    def message(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        delay: float | None = None,
        at: datetime | None = None,
    ) -> Outgoing:
        """The message of one call, checked, ready for `App.publish` or a `Sender`.

        Raises:
            NotJSON: an argument that JSON cannot carry, or arguments the function does not take.
        """
        kwargs = dict(kwargs) if kwargs else {}
        low, high = self._arity
        if kwargs or not low <= len(args) <= high:  # else the count of positional arguments is all there is to check
            try:
                self._signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise NotJSON(f"task {self.name!r}: {exc}") from None
        if not (_json_ok(args) and _json_ok(kwargs)):
            for where, value in self._arguments(args, kwargs):
                _check_json(value, where, self.name)
        body = _ENCODE({"args": args if isinstance(args, list) else list(args), "kwargs": kwargs}).encode("utf-8")
        if delay is None and at is None:
            return Outgoing(body, self.queue, "application/json", "utf-8", self._headers)
        not_before = _not_before(delay, at)
        headers = {**self._headers, wire.NOT_BEFORE: not_before} if not_before is not None else self._headers
        return Outgoing(body, self.queue, "application/json", "utf-8", headers, not_before=not_before)

    def _arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
        names = self._positional
        for index, value in enumerate(args):
            yield (f"argument {names[index]!r}" if index < len(names) else f"positional argument {index + 1}"), value
        for key, value in kwargs.items():
            yield f"argument {key!r}", value

    def __repr__(self) -> str:
        return f"<kqueue task {self.name!r} of {self.fn.__module__}>"


class Args:
    """A call's positional and keyword arguments, for `FunctionTask.send_many`: ``Args("a.jpg", width=300)``."""

    __slots__ = ("args", "kwargs")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"Args{(*self.args, *(f'{k}={v!r}' for k, v in self.kwargs.items()))!r}"


#: Compact JSON, UTF-8 as it is: one encoder for every call (json.dumps makes one per call when given options).
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _positional(signature: inspect.Signature) -> tuple[list[str], tuple[float, float]]:
    """The names of a function's positional parameters, and how many positional arguments it takes at least and
    at most, where a call with no keyword arguments needs no other check (else ``(inf, -inf)``: bind it)."""
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in params):
        return [p.name for p in positional], (math.inf, -math.inf)
    low = sum(p.default is p.empty for p in positional)
    high = math.inf if any(p.kind is p.VAR_POSITIONAL for p in params) else len(positional)
    return [p.name for p in positional], (low, high)


def _json_ok(value: Any) -> bool:
    """Whether JSON carries `value` as it is (the quick check; `_check_json` says what is wrong)."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is list or kind is tuple:
        return all(_json_ok(item) for item in value)
    if kind is dict:
        return all(type(key) is str and _json_ok(item) for key, item in value.items())
    return False  # a subclass, or another type: `_check_json` decides


def _not_before(delay: float | None, at: datetime | None) -> float | None:
    """Unix time before which a call may not run, from a `delay` in seconds or a time `at`; None for now."""
    import time

    if delay is not None and at is not None:
        raise KQueueError("give delay= or at=, not both")
    if at is not None:
        if at.tzinfo is None:
            raise KQueueError(f"at={at.isoformat()} has no time zone: give an aware datetime (at.astimezone())")
        seconds = at.astimezone(timezone.utc).timestamp() - time.time()
        return None if seconds <= 0 else time.time() + check_delay(seconds)
    if not delay:
        return None
    return time.time() + check_delay(delay)


def _check_json(value: Any, where: str, task: str) -> None:
    """Refuse what JSON would not carry as it is: other types, dicts with keys that are not strings, NaN."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if math.isfinite(value):
            return
        raise NotJSON(f"task {task!r}: {where} is {value}, which JSON cannot carry")
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]", task)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise NotJSON(
                    f"task {task!r}: {where} has a key {key!r} ({type(key).__name__}); JSON's keys are strings"
                )
            _check_json(item, f"{where}[{key!r}]", task)
        return
    kind = type(value)
    named = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    raise NotJSON(
        f"task {task!r}: {where} has type {named}, which JSON cannot carry "
        "(arguments are str, int, float, bool, None, and lists and dicts of them)"
    )
