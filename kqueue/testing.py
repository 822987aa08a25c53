"""Helpers for testing your own handlers on Kombu's in-memory transport."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from kombu import Connection

from kqueue.brokers import connect
from kqueue.delays import memory
from kqueue.errors import KQueueError
from kqueue.handlers import Handler
from kqueue.producer import Sender
from kqueue.queues import task_queue
from kqueue.worker import Task, Worker, WorkerSettings

if TYPE_CHECKING:
    from kqueue.app import App

__all__ = ["HandlerFailed", "MemoryQueue"]


class HandlerFailed(AssertionError):
    """A handler raised while the queue was being worked; its error is the cause."""


class _Recording(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors: list[BaseException] = []
        self.done: list[str] = []

    def _retries_pending(self) -> bool:
        # The queue's clock says when a retry is due, not the real one: `MemoryQueue.advance` it.
        return False

    def on_task_done(self, task: Task) -> None:
        if task.error is None:
            self.done.append(task.text)
        else:
            self.errors.append(task.error)


def _no_text_tasks(text: str) -> None:
    raise KQueueError(f"a text task came, {text!r:.80}, and work() was given no handler for text tasks")


class MemoryQueue:
    """A task queue of its own on ``memory://``, worked from the test's own thread.

    In a test:

    ```python
    def test_resize():
        queue = MemoryQueue()
        queue.send("photo-1.jpg", "photo-2.jpg")
        assert queue.work(resize) == ["photo-1.jpg", "photo-2.jpg"]
    ```

    For an app's function tasks, give it the app (made with ``broker="memory://"``):
    its tasks' sends land here, and `work` runs them. Delayed tasks wait on a
    clock of the queue's own, which `advance` moves: nothing waits in real time.

    Parameters:
        name: the queue's name; a unique one by default, since the memory
            transport's queues are shared by the whole process.
        app: an app whose tasks this queue runs; its queue, then, unless `name` says otherwise.

    Attributes:
        queue: the task queue (`kqueue.queues.task_queue`).
        connection: its ``memory://`` connection.
    """

    def __init__(self, name: str | None = None, *, app: App | None = None) -> None:
        if app is not None and not (app.broker or "").startswith("memory://"):
            raise KQueueError(f"MemoryQueue(app=...) wants an app on memory://, not {app.broker or 'the default file'}")
        self.app = app
        default = app.queue.name if app is not None else f"test-{uuid.uuid4().hex[:12]}"
        self.queue = task_queue(name or default)
        self.connection: Connection = connect("memory://")

    def send(self, *texts: str, delay: float | None = None) -> None:
        """Put tasks on the queue; with `delay`, not to run before the queue's clock moved that far."""
        self.send_many(texts, delay=delay)

    def send_many(self, texts: Iterable[str], *, delay: float | None = None) -> None:
        """Put tasks on the queue, from any iterable of texts."""
        with Sender(self.connection, self.queue) as sender:
            sender.send_many(texts, delay=delay)

    def advance(self, seconds: float) -> None:
        """Move the queue's clock `seconds` ahead: delayed tasks due by then are worked by the next `work`."""
        memory.advance(self.queue.name, seconds)

    def work(self, handler: Handler | None = None, *, raise_errors: bool = True, **settings: Any) -> list[str]:
        """Run a worker until the queue is empty; return the tasks done: texts, and calls as ``resize('a.jpg')``.

        Delayed tasks not yet due on the queue's clock stay for a later `work`.

        Parameters:
            handler: your handler of text tasks; with an app, it may be left out if
                no text task comes (function tasks run their own function).
            raise_errors: raise `HandlerFailed` if a handler raised for any task
                (the task itself is retried, then dead-lettered, as in production).
            settings: `WorkerSettings` fields; retries default to none here.
        """
        settings.setdefault("max_retries", 0)
        tasks = self.app.tasks if self.app is not None else None
        if handler is None:
            if tasks is None:
                raise TypeError("MemoryQueue.work() needs a handler, or an app (MemoryQueue(app=...))")
            handler = _no_text_tasks
        worker = _Recording(self.connection, self.queue, handler, WorkerSettings(burst=True, **settings), tasks=tasks)
        try:
            worker.run()
        finally:
            worker.close()
        if raise_errors and worker.errors:
            first = worker.errors[0]
            raise HandlerFailed(f"{len(worker.errors)} tasks failed; the first: {first!r}") from first
        return worker.done

    def messages(self, dead: bool = False, *, delayed: bool = False) -> int:
        """How many messages wait in the queue, in its dead-letter queue, or (`delayed`) for their time."""
        if delayed:
            return memory.delayed_count(self.queue.name)
        name = f"{self.queue.name}.dead" if dead else self.queue.name
        channel = self.connection.default_channel
        return int(channel._size(name))
