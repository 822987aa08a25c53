"""The session's three-node RabbitMQ cluster, booted once beside the machine's own broker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NoReturn

import pytest

from .cluster import SERVER, Cluster, ClusterError

_boot_seconds: list[float] = []


def _unavailable(reason: str) -> NoReturn:
    """Skip where RabbitMQ cannot run here; under CI a missing cluster is a failure, not a pass."""
    if os.environ.get("CI"):
        pytest.fail(f"CI needs the RabbitMQ cluster: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three clustered nodes on free ports (5701-5703 when free), stopped at the end of the session."""
    if not SERVER.exists():
        _unavailable(f"{SERVER} is missing: RabbitMQ is not installed on this machine")
    started: Cluster | None = None
    try:
        try:
            started = Cluster(tmp_path_factory.mktemp("rabbitmq-cluster"))
            _boot_seconds.append(started.boot())
        except (ClusterError, OSError) as exc:
            _unavailable(f"the three-node RabbitMQ cluster did not start: {exc}")
        yield started
    finally:
        if started is not None:
            started.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _boot_seconds:
        terminalreporter.write_line(f"cluster: three RabbitMQ nodes booted and clustered in {_boot_seconds[0]:.1f}s")
