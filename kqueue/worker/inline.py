"""One task at a time (concurrency 1, prefetch 1): tasks run on the connection thread, and a keeper covers long ones.

At prefetch 1 nothing overlaps: the broker sends the next task only for the
ack of the last. A handler thread would cost every task two hand-offs, to
that thread and back, each a wake-up of a sleeping thread; so a worker of one
task at a time runs each on the thread that owns the connection, which acks
it and reads the next with no thread in between.

A task that runs long must not starve the connection: heartbeats, a stop
asked by a signal, its grace, the broker closing the channel. The keeper, a
thread that sleeps while tasks are short, looks every `TICK` at which task
runs; one it sees running at two looks in a row, it takes the connection
over from (the connection thread lets go of it, the lock `io`, while a
handler runs) and runs the worker's loop for as long as the task runs, as if
the task ran on a handler thread. When the handler returns, its thread hands
the task to the keeper's loop through the mailbox, as a handler thread does,
and takes the connection back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kqueue.worker.task import Task

__all__ = ["TICK", "Adopt", "Keeper"]

#: Seconds between the keeper's looks: a task is taken over from after one to two of them.
TICK = 0.1
#: Looks with no task running after which the keeper sleeps until the next task starts.
PARK_AFTER = 10


class Adopt(Exception):
    """Raised out of the keeper's loop when the connection was lost while the task ran.

    The keeper then stays the connection thread: it reconnects, and the worker
    goes on with handler threads. The thread of the task it covered is left to
    finish it, as a handler thread whose task's channel is gone.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


class Keeper:
    """The thread that takes the connection over while a task runs long on the connection thread.

    Parameters:
        io: the lock over the connection; the connection thread lets go of it
            while a handler runs (`begin`) and takes it back after (`end`).
        serve: run the worker's loop, holding `io`, while the given task runs;
            called on the keeper's thread; raises `Adopt` when the connection is lost.
        adopt: called with the loss, no longer holding `io`, to reconnect and
            run the worker on the keeper's thread from then on.
    """

    def __init__(
        self, io: threading.Lock, serve: Callable[[Task], None], adopt: Callable[[BaseException], None]
    ) -> None:
        self._io = io
        self._serve = serve
        self._adopt = adopt
        #: The task its handler runs on the connection thread now, if any.
        self.running: Task | None = None
        #: Whether the keeper holds the connection: a task that ends now goes to the keeper's loop.
        self.holding = False
        self._error: BaseException | None = None
        # Set while the keeper runs no loop: the connection thread waits for it before it
        # takes the connection back, since the keeper lets go of it in every wait of its loop.
        self._left = threading.Event()
        self._left.set()
        self._thread: threading.Thread | None = None
        self._parked = False
        self._wake = threading.Event()
        self._closed = False

    # -- on the connection thread ------------------------------------------------

    def begin(self, task: Task) -> None:
        """The handler of `task` is about to run here: let go of the connection, for the keeper to take if need be."""
        self.running = task
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="kqueue-keeper", daemon=True)
            self._thread.start()
        elif self._parked:
            self._wake.set()
        self._io.release()

    def end(self, task: Task, post: Callable[[Task], None]) -> bool:
        """The handler returned: take the connection back; whether the keeper's loop was given the task (`post`).

        Raises:
            What the keeper's loop met while it held the connection (the
            connection lost, say): the connection thread's to handle now.
        """
        # Two threads, two flags, each set before the other is read: either the keeper sees
        # the task is over and leaves the connection alone, or this thread sees the keeper
        # holds it and hands the task to the keeper's loop.
        self.running = None
        handed = self.holding
        if handed:
            post(task)
            # Once the keeper has adopted the connection, this waits for good: this thread's
            # connection is gone, and the task it ran is the keeper's loop's to settle.
            self._left.wait()
        self._io.acquire()
        error, self._error = self._error, None
        if error is not None:
            raise error
        return handed

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    # -- on the keeper's thread ------------------------------------------------------

    def _watch(self) -> None:
        seen: Task | None = None
        idle = 0
        while not self._closed:
            if idle >= PARK_AFTER:
                self._park()
                idle = 0
            time.sleep(TICK)
            task = self.running
            if task is None:
                idle += 1
                seen = None
            elif task is not seen:
                idle = 0
                seen = task
            else:  # the same task at two looks in a row: it runs long
                if self._take_over(task):
                    return  # this thread was the connection thread since, until the worker ended
                seen = None

    def _park(self) -> None:
        self._parked = True
        if self.running is None:  # read after `_parked` is set, as `begin` reads it after setting `running`
            self._wake.wait()
        self._wake.clear()
        self._parked = False

    def _take_over(self, task: Task) -> bool:
        """Run the worker's loop while `task` runs; whether the connection was lost and this thread adopted it."""
        adopted: Adopt | None = None
        with self._io:
            self._left.clear()  # before `holding`: whoever sees the keeper holding waits for its loop to end
            self.holding = True
            try:
                if self.running is task:
                    self._serve(task)
            except Adopt as adopt:
                adopted = adopt  # `holding` stays: the task's thread waits for good when it ends
            except BaseException as exc:  # noqa: BLE001 - the connection thread raises it once the task ends
                self._error = exc
            finally:
                if adopted is None:
                    self.holding = False
                    self._left.set()
        if adopted is None:
            return False
        self._adopt(adopted.error)
        return True
