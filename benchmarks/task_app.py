"""The app the ``tasks`` figure's workers run (``kqueue-work --app benchmarks.task_app``)."""

from __future__ import annotations

import os
import time

import kqueue

app = kqueue.App()


@app.task
def noop(index: int, text: str) -> None:
    """As little work as a text task's zero seconds of dots."""


@app.task
def late(due: float) -> None:
    """Note how late it started (ms) in $KQUEUE_BENCH_LATE, a line each."""
    lateness = (time.time() - due) * 1000
    with open(os.environ["KQUEUE_BENCH_LATE"], "a", encoding="utf-8") as out:
        out.write(f"{lateness:.3f}\n")
