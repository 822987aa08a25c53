"""The benchmark harness runs end to end on a tiny scale: against the local RabbitMQ, and on sqlite://."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.core import HEADER

from .conftest import ROOT


def _run(results: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", "--scale", "0.001", "--rounds", "1", "--json", str(results), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.broker
def test_benchmarks_run_at_a_tiny_scale(amqp_url: str, tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    done = _run(results, "--broker", amqp_url, "--only", "send,work,tasks,web")

    assert done.returncode == 0, done.stderr
    assert HEADER in done.stdout
    assert results.exists()


def test_benchmarks_run_on_sqlite_beside_sqla_and_plain_sqlite3(tmp_path: Path) -> None:
    pytest.importorskip("sqlalchemy")
    folder = tmp_path / "made-by-the-run"
    results = tmp_path / "results.json"
    done = _run(
        results,
        "--broker",
        f"sqlite:///{folder / 'queues.db'}",
        "--reference",
        "none",
        "--only",
        "send,work,latency,idle,memory,oneshot",
    )

    assert done.returncode == 0, done.stderr
    assert HEADER in done.stdout
    for label in ("send: send_many vs sqla+sqlite", "work: p1 excl. start vs sqla", "idle CPU: sqlite:// worker"):
        assert label in done.stdout
    assert "kqueue on RabbitMQ" not in done.stdout
    assert results.exists()
    assert not folder.exists(), "the run's database files outlive it"


@pytest.mark.broker
def test_benchmarks_on_sqlite_measure_kqueue_on_rabbitmq_alongside(amqp_url: str, tmp_path: Path) -> None:
    pytest.importorskip("sqlalchemy")
    results = tmp_path / "results.json"
    done = _run(
        results,
        "--broker",
        f"sqlite:///{tmp_path / 'queues.db'}",
        "--reference",
        amqp_url,
        "--only",
        "send,work",
    )

    assert done.returncode == 0, done.stderr
    assert "send: send_many vs kqueue on RabbitMQ" in done.stdout
    assert "work: p100 c1 vs kqueue on RabbitMQ" in done.stdout
    assert list(tmp_path.iterdir()) == [results]
