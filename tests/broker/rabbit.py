"""The local RabbitMQ, restarted and reconfigured the way an operator would."""

from __future__ import annotations

import shutil
import subprocess
from urllib.parse import urlsplit

import pytest


def local_rabbitmq(url: str) -> None:
    """Skip unless `url` is a RabbitMQ on this machine that rabbitmqctl can manage."""
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost") or shutil.which("rabbitmqctl") is None:
        pytest.skip("needs a RabbitMQ on this machine, managed with rabbitmqctl")


def ctl(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr}"
    return done.stdout


def stop() -> None:
    ctl("stop_app")


def start() -> None:
    ctl("start_app")
    ctl("await_startup")


def set_env(key: str, value: int) -> None:
    ctl("eval", f"application:set_env(rabbit, {key}, {value}).")
