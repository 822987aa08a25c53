"""The benchmark harness runs end to end on a tiny scale against the local RabbitMQ."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.core import HEADER

from .conftest import ROOT

pytestmark = pytest.mark.broker


def test_benchmarks_run_at_a_tiny_scale(amqp_url: str, tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--broker",
            amqp_url,
            "--scale",
            "0.001",
            "--rounds",
            "1",
            "--only",
            "send,work",
            "--json",
            str(results),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert HEADER in done.stdout
    assert results.exists()
