"""Handlers for the cluster's real worker processes: each records the tasks it finished."""

from __future__ import annotations

import os
from typing import TextIO

_done: TextIO | None = None


def record(text: str) -> None:
    """Append the task's text to the file named by ``KQUEUE_TEST_DONE``: one line per task run to its end."""
    global _done
    if _done is None:
        _done = open(os.environ["KQUEUE_TEST_DONE"], "a", encoding="utf-8")  # kept open for the process's life
    _done.write(text + "\n")
    _done.flush()


def held(text: str) -> None:
    """Wait while the file named by ``KQUEUE_TEST_HOLD`` exists, then record the task: a task a test keeps running."""
    import time
    from pathlib import Path

    hold = Path(os.environ["KQUEUE_TEST_HOLD"])
    while hold.exists():
        time.sleep(0.05)
    record(text)
