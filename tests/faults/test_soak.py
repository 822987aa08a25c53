"""The soak, a minute on each broker: faults at random over senders and workers, and nothing lost.

The two soaks run side by side, the sqlite:// one in the background while
the RabbitMQ one runs, so that the suite waits one minute for both, not two.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.broker.procs import ROOT

LOST_NONE = "tasks lost                                 0"


def start(broker: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.faults.soak", "--minutes", "1", "--broker", broker],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(soak: subprocess.Popen[str]) -> None:
    """Wait for a soak; fail with its table and the end of its log unless it lost nothing."""
    try:
        table, log = soak.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        soak.kill()
        soak.communicate()
        raise
    print(table)
    assert soak.returncode == 0, f"{table}\n{log[-5000:]}"
    assert LOST_NONE in table


@pytest.fixture(scope="module")
def sqlite_soak() -> Iterator[subprocess.Popen[str]]:
    soak = start("sqlite")
    yield soak
    if soak.poll() is None:
        soak.kill()
        soak.communicate()


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_a_minute_of_faults_on_rabbitmq_loses_nothing(amqp_url: str, sqlite_soak: subprocess.Popen[str]) -> None:
    finish(start("amqp"))


@pytest.mark.timeout(300)
def test_a_minute_of_faults_on_sqlite_loses_nothing(sqlite_soak: subprocess.Popen[str]) -> None:
    finish(sqlite_soak)
