"""Fixtures of the real-broker suites."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import rabbit
from .procs import Worker


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Worker processes a test starts; killed at the end if still running."""
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture
def short_consumer_timeout(amqp_url: str) -> Iterator[str]:
    """RabbitMQ's consumer_timeout at 3 s, checked every 0.5 s, for this test only."""
    rabbit.local_rabbitmq(amqp_url)
    rabbit.set_env("consumer_timeout", 3000)
    rabbit.set_env("channel_tick_interval", 500)
    try:
        yield amqp_url
    finally:
        rabbit.set_env("consumer_timeout", 1800000)
        rabbit.set_env("channel_tick_interval", 60000)
