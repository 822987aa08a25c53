"""A real `kqueue web` process on a free port, and the distribution's Chromium driven by Playwright."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker.procs import ROOT, tool
from tests.conftest import _broker_url, delete_queues, unique

#: Where Debian's chromium package puts the browser; `.ci/run` installs it.
CHROMIUM = os.environ.get("KQUEUE_TEST_CHROMIUM", "/usr/bin/chromium")
#: Chromium as root in a container, on a machine with no network beyond loopback.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Seconds for a count to reach the page: RabbitMQ's management API updates its figures every 5 s.
ON_PAGE = 20_000


class WebProcess:
    """``kqueue web`` running as users run it; `url` is where it listens."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [tool("kqueue"), "web", "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self.err: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = self._address()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line.rstrip("\n"))

    def _address(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.err):
                found = re.search(r"kqueue web: (http://\S+/) for ", line)
                if found:
                    return found.group(1)
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"kqueue web exited ({self.proc.returncode}):\n" + "\n".join(self.err))
            time.sleep(0.02)
        raise AssertionError("kqueue web did not say where it listens:\n" + "\n".join(self.err))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture(params=["sqlite", pytest.param("amqp", marks=pytest.mark.broker)])
def web_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A broker URL and a queue of this test's own, on ``sqlite://`` and on RabbitMQ."""
    name = unique("web")
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'queues.db'}", name
        return
    url = _broker_url("amqp", request)
    yield url, name
    delete_queues(url, name, f"{name}.dead")


@pytest.fixture
def web(web_broker: tuple[str, str]) -> Iterator[WebProcess]:
    url, name = web_broker
    process = WebProcess("--broker", url, "--queue", name)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium from the distribution's packages: Playwright downloads no browser here."""
    if not Path(CHROMIUM).exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the browser tests: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=ON_PAGE)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(ON_PAGE)
    try:
        yield opened
    finally:
        context.close()
