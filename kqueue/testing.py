"""Helpers for testing your own handlers on Kombu's in-memory transport."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from kombu import Connection

from kqueue.brokers import connect
from kqueue.handlers import Handler
from kqueue.producer import send
from kqueue.queues import task_queue
from kqueue.worker import Task, Worker, WorkerSettings

__all__ = ["HandlerFailed", "MemoryQueue"]


class HandlerFailed(AssertionError):
    """A handler raised while the queue was being worked; its error is the cause."""


class _Recording(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors: list[BaseException] = []
        self.done: list[str] = []

    def on_task_done(self, task: Task) -> None:
        if task.error is None:
            self.done.append(task.text)
        else:
            self.errors.append(task.error)


class MemoryQueue:
    """A task queue of its own on ``memory://``, worked from the test's own thread.

    In a test:

    ```python
    def test_resize():
        queue = MemoryQueue()
        queue.send("photo-1.jpg", "photo-2.jpg")
        assert queue.work(resize) == ["photo-1.jpg", "photo-2.jpg"]
    ```

    Parameters:
        name: the queue's name; a unique one by default, since the memory
            transport's queues are shared by the whole process.

    Attributes:
        queue: the task queue (`kqueue.queues.task_queue`).
        connection: its ``memory://`` connection.
    """

    def __init__(self, name: str | None = None) -> None:
        self.queue = task_queue(name or f"test-{uuid.uuid4().hex[:12]}")
        self.connection: Connection = connect("memory://")

    def send(self, *texts: str) -> None:
        """Put tasks on the queue."""
        self.send_many(texts)

    def send_many(self, texts: Iterable[str]) -> None:
        """Put tasks on the queue, from any iterable of texts."""
        send(self.connection, self.queue, texts)

    def work(self, handler: Handler, *, raise_errors: bool = True, **settings: Any) -> list[str]:
        """Run a worker until the queue is empty; return the texts of the tasks done.

        Parameters:
            handler: your handler.
            raise_errors: raise `HandlerFailed` if the handler raised for any task
                (the task itself is retried, then dead-lettered, as in production).
            settings: `WorkerSettings` fields; retries default to none here.
        """
        settings.setdefault("max_retries", 0)
        worker = _Recording(self.connection, self.queue, handler, WorkerSettings(burst=True, **settings))
        try:
            worker.run()
        finally:
            worker.close()
        if raise_errors and worker.errors:
            first = worker.errors[0]
            raise HandlerFailed(f"{len(worker.errors)} tasks failed; the first: {first!r}") from first
        return worker.done

    def messages(self, dead: bool = False) -> int:
        """How many messages wait in the queue, or in its dead-letter queue."""
        name = f"{self.queue.name}.dead" if dead else self.queue.name
        channel = self.connection.default_channel
        return int(channel._size(name))
