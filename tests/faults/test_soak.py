"""The soak, a minute on each broker: faults at random over senders and workers, and nothing lost."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.broker.procs import ROOT


def soak(broker: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tests.faults.soak", "--minutes", "1", "--broker", broker],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    table = done.stdout
    print(table)
    assert done.returncode == 0, f"{table}\n{done.stderr[-5000:]}"
    assert "tasks lost                                 0" in table
    return table


@pytest.mark.timeout(300)
def test_a_minute_of_faults_on_sqlite_loses_nothing() -> None:
    soak("sqlite")


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_a_minute_of_faults_on_rabbitmq_loses_nothing(amqp_url: str) -> None:
    soak("amqp")
