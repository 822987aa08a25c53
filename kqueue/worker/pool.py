"""The handler threads: they run tasks and do no network I/O but one early ack, through the task's ledger."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue

from kqueue.handlers import Handler
from kqueue.worker.aio import EventLoop
from kqueue.worker.mailbox import Mailbox
from kqueue.worker.task import Task, run_handler

__all__ = ["Hook", "Pool", "run_task"]

Hook = Callable[[Task], None]


class Pool:
    """Daemon threads that run handlers, so a hard stop does not wait for a handler.

    They start with the first task: a worker that runs its tasks on the
    connection thread (`run_here`, `kqueue.worker.inline`) has none.

    A handler (or function task) that returns a coroutine has it run to its
    end on the pool's event loop (`kqueue.worker.aio`) while its thread waits.
    Each finished task goes back to the connection thread through the
    mailbox. A task that succeeded is first offered to its ledger for an early
    ack, which the ledger sends only if it can take the connection at once.

    Parameters:
        size: threads, the worker's concurrency.
        handler: called with each text task's text; function tasks carry their own call.
        mailbox: where finished tasks go.
        on_start, on_done: the worker's hooks, called on the handler's thread.
    """

    def __init__(self, size: int, handler: Handler, mailbox: Mailbox, on_start: Hook, on_done: Hook) -> None:
        self._handler = handler
        self._mailbox = mailbox
        self._on_start = on_start
        self._on_done = on_done
        self._jobs: SimpleQueue[Task | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._size = 0
        self._surplus = 0
        self._names = itertools.count()
        self._coroutines = EventLoop()
        self._wanted = size  # threads to start with the first task

    def _start(self, count: int) -> None:
        with self._lock:
            self._size += count
        for _ in range(count):
            name = f"kqueue-task-{next(self._names)}"
            threading.Thread(target=self._loop, name=name, daemon=True).start()

    @property
    def size(self) -> int:
        with self._lock:
            return self._size

    def submit(self, task: Task) -> None:
        if self._wanted:
            self._start(self._wanted)
            self._wanted = 0
        self._jobs.put(task)

    def run_here(self, task: Task) -> None:
        """Run a claimed task on the calling thread: the connection thread of a worker of one task at a time."""
        run_task(task, self._handler, self._coroutines, self._on_start, self._on_done)

    def grow(self, count: int) -> None:
        """Add threads for tasks whose channel is gone but whose handlers still run.

        Their results cannot be acked, but they hold a thread: without more,
        the tasks of the new channel would wait behind them. The pool shrinks
        back as threads finish.
        """
        if count <= 0:
            return
        with self._lock:
            self._surplus += count
        self._start(count)

    def shutdown(self) -> None:
        """Let every thread end once it has no task: one sentinel per thread."""
        with self._lock:
            count = self._size
        for _ in range(count):
            self._jobs.put(None)
        self._coroutines.close()

    def _loop(self) -> None:
        while (task := self._jobs.get()) is not None:
            if not task.claim():  # cancelled: given back, or its channel is gone
                continue
            self._run(task)
            with self._lock:
                if self._surplus > 0:
                    self._surplus -= 1
                    self._size -= 1
                    return
        with self._lock:
            self._size -= 1

    def _run(self, task: Task) -> None:
        try:
            run_task(task, self._handler, self._coroutines, self._on_start, self._on_done)
        finally:
            if task.error is None:
                task.ledger.ack_early(task)
            self._mailbox.post(task)


def run_task(task: Task, handler: Handler, coroutines: EventLoop, on_start: Hook, on_done: Hook) -> None:
    """Run a claimed task's handler between its hooks, on the calling thread; what it raises is the task's error."""
    task.started = time.monotonic()
    try:
        on_start(task)
        if task.call is None:
            run_handler(handler(task.text), coroutines)
        else:
            task.call.run(coroutines)
    except BaseException as exc:  # noqa: BLE001 - any failure of the handler is the task's
        task.error = exc
    task.duration = time.monotonic() - task.started
    task.finish()
    on_done(task)
