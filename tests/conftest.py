"""Fixtures: a fresh queue on memory:// for each test, and real brokers where there are some."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from kombu import Connection, Queue

import kqueue
from kqueue.brokers import connect
from kqueue.queues import QueueType, task_queue

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URLS = {
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
    "redis": "redis://127.0.0.1:6379/0",
}
ENV = {"amqp": "KQUEUE_TEST_AMQP_URL", "redis": "KQUEUE_TEST_REDIS_URL"}
COMPOSE_PORTS = {"amqp": ("rabbitmq", 5672), "redis": ("redis", 6379)}


def pytest_configure(config: pytest.Config) -> None:
    """Under KQUEUE_TEST_INSTALLED (CI), refuse to test anything but the installed package."""
    source = Path(kqueue.__file__).resolve().parent
    if os.environ.get("KQUEUE_TEST_INSTALLED") and "site-packages" not in source.parts:
        raise pytest.UsageError(f"KQUEUE_TEST_INSTALLED is set, but kqueue was imported from {source}")


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, message: str = "condition") -> Any:
    """Poll `condition` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.01)


@pytest.fixture
def memory_conn() -> Iterator[Connection]:
    conn = connect("memory://")
    yield conn
    conn.release()


@pytest.fixture
def queue() -> Queue:
    """A task queue of this test's own: the memory transport's state is global to the process."""
    return task_queue(unique())


# -- real brokers -------------------------------------------------------------------


def _listening(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=1):
            return True
    except OSError:
        return False


def _docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


def _broker_url(kind: str, request: pytest.FixtureRequest) -> str:
    url = os.environ.get(ENV[kind], DEFAULT_URLS[kind])
    if _listening(url):
        return url
    if _docker_works():
        services = request.getfixturevalue("docker_services")
        service, port = COMPOSE_PORTS[kind]
        host_port = services.port_for(service, port)
        url = DEFAULT_URLS[kind].replace(str(port), str(host_port))
        services.wait_until_responsive(lambda: _listening(url), timeout=60, pause=0.5)
        return url
    reason = f"no {kind} broker at {url} (set {ENV[kind]}) and no Docker engine to start one"
    if os.environ.get("CI"):
        pytest.fail(f"CI needs a real broker: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(ROOT / "docker-compose.yml")


@pytest.fixture(params=["amqp", "redis", "sqlite"])
def broker_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Each real broker in turn: the same contract runs on every one (``sqlite://``: a file of its own)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'queues.db'}"
    return _broker_url(request.param, request)


@pytest.fixture
def amqp_url(request: pytest.FixtureRequest) -> str:
    return _broker_url("amqp", request)


@pytest.fixture
def broker_queue(broker_url: str) -> Iterator[tuple[str, Queue]]:
    """A fresh classic queue on a real broker, deleted afterwards with its dead letters."""
    queue = task_queue(unique("kq"), QueueType.CLASSIC)
    yield broker_url, queue
    delete_queues(broker_url, queue.name, f"{queue.name}.dead")


def delete_queues(url: str, *names: str) -> None:
    conn = connect(url)
    try:
        channel = conn.channel()
        for name in names:
            try:
                channel.queue_delete(name)
            except Exception:  # noqa: BLE001 - not there is as good as deleted
                channel = conn.channel()
    finally:
        conn.release()
