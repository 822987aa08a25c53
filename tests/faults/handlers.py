"""The fault suite's handler: records each run's start and end in the history (see `tests.faults.history`)."""

from __future__ import annotations

import os
import time


def _note(what: str, task: str) -> None:
    # One write per line, O_APPEND: lines of concurrent processes never interleave.
    line = f"{what} {task} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(os.environ["KQUEUE_FAULT_RUNS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def record(task: str) -> None:
    """Note the start, work for the seconds after '~' in the task's id (if any), note the end."""
    _note("start", task)
    _, _, seconds = task.partition("~")
    if seconds:
        time.sleep(float(seconds))
    _note("done", task)
