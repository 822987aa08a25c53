"""Fixtures of the real-broker suites."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .procs import Worker


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Worker processes a test starts; killed at the end if still running."""
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()
