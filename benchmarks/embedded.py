"""Embedded SQLite queues as baselines for ``sqlite://``: Huey's ``SqliteHuey`` and persist-queue's ``SQLiteAckQueue``.

Each side runs as its own process, timed from start to exit as ``kqueue-work
--burst`` and ``kqueue-send --file`` are:

- ``python -m benchmarks.embedded huey drain DB N``: Huey's consumer, one
  worker thread (``-w 1``), ``fsync=True``, on a file of N no-op tasks; it
  stops once N have completed.
- ``python -m benchmarks.embedded huey send DB N``: N tasks enqueued, each its
  own committed transaction, as Huey enqueues.
- ``python -m benchmarks.embedded persist drain DB N`` / ``send``: an
  ``SQLiteAckQueue`` got and acked (``auto_commit``) until empty, or N put.

``fill`` puts N tasks in a fresh file without fsync, untimed, for a drain.
Huey deletes a task when it dequeues it (a killed consumer loses the task it
ran); persist-queue marks it unacked until the ack, as kqueue keeps it.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

__all__ = ["available"]


def available() -> list[str]:
    """The baselines installed here (``pip install -e '.[bench]'`` installs both)."""
    found = []
    for module, name in (("huey", "huey"), ("persistqueue", "persist")):
        try:
            __import__(module)
        except ImportError:
            continue
        found.append(name)
    return found


def _huey(path: str, *, fsync: bool) -> object:
    from huey import SqliteHuey

    return SqliteHuey("kqbench", filename=path, fsync=fsync, results=False)


def _texts(n: int) -> list[str]:
    return [f"task {index}" for index in range(n)]


def huey_main(action: str, path: str, n: int) -> None:
    from huey import signals

    huey = _huey(path, fsync=action != "fill")

    @huey.task()  # type: ignore[attr-defined, misc]
    def noop(text: str) -> None:
        pass

    if action in ("fill", "send"):
        for text in _texts(n):
            noop(text)
        return
    done = threading.Event()
    completed = 0

    @huey.signal(signals.SIGNAL_COMPLETE)  # type: ignore[attr-defined, misc]
    def count(signal: str, task: object) -> None:
        nonlocal completed
        completed += 1
        if completed >= n:
            done.set()

    consumer = huey.create_consumer(workers=1, worker_type="thread", periodic=False)  # type: ignore[attr-defined]
    consumer.start()
    if not done.wait(600):
        raise SystemExit(f"huey: {completed} of {n} tasks done in 600 s")
    consumer.stop(graceful=True)


def persist_main(action: str, path: str, n: int) -> None:
    from persistqueue import SQLiteAckQueue
    from persistqueue.exceptions import Empty

    queue = SQLiteAckQueue(path, auto_commit=True, multithreading=False)  # each put and ack committed
    if action in ("fill", "send"):
        for text in _texts(n):
            queue.put(text)
        return
    done = 0
    while True:
        try:
            item = queue.get(block=False)
        except Empty:
            break
        queue.ack(item)
        done += 1
    if done != n:
        raise SystemExit(f"persist-queue: {done} of {n} tasks done")


def main(argv: list[str]) -> None:
    side, action, path, n = argv[0], argv[1], argv[2], int(argv[3])
    if action == "fill" and Path(path).is_file():
        os.unlink(path)
    {"huey": huey_main, "persist": persist_main}[side](action, path, n)


if __name__ == "__main__":
    main(sys.argv[1:])
