"""The helper users test their own handlers with."""

from __future__ import annotations

import pytest

from kqueue.testing import HandlerFailed, MemoryQueue


def resize(name: str) -> None:
    if not name.endswith(".jpg"):
        raise ValueError(f"not a photo: {name}")


def test_work_returns_the_tasks_done_in_order() -> None:
    queue = MemoryQueue()
    queue.send("one.jpg", "two.jpg")

    assert queue.work(resize) == ["one.jpg", "two.jpg"]
    assert queue.messages() == 0


def test_a_handler_error_is_raised_in_the_test_and_the_task_dead_lettered() -> None:
    queue = MemoryQueue()
    queue.send("notes.txt")

    with pytest.raises(HandlerFailed) as failure:
        queue.work(resize)

    assert isinstance(failure.value.__cause__, ValueError)
    assert queue.messages(dead=True) == 1
