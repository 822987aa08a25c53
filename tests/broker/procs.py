"""Real kqueue-send and kqueue-work processes, as users run them, watched line by line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from kombu import Queue

from kqueue.brokers import connect
from kqueue.queues import messages_ready

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    return str(BIN / name)


def run_send(
    url: str, queue: str, *args: str, timeout: float = 60, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run kqueue-send to completion."""
    return subprocess.run(
        [tool("kqueue-send"), "--broker", url, "--queue", queue, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,  # type: ignore[call-overload]
    )


class Worker:
    """A kqueue-work process whose output lines are collected as they come."""

    def __init__(self, url: str, queue: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [tool("kqueue-work"), "--broker", url, "--queue", queue, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,  # so that --handler tests.handlers:... imports
            env={**os.environ, **(env or {})},
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: object, into: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line.rstrip("\n"))

    def wait_for(self, text: str, count: int = 1, timeout: float = 30, stream: str = "out") -> None:
        """Wait until `count` lines of stdout (or stderr) contain `text`."""
        lines = self.out if stream == "out" else self.err
        deadline = time.monotonic() + timeout
        while sum(text in line for line in list(lines)) < count:
            if self.proc.poll() is not None:
                self._drain()
                if sum(text in line for line in list(lines)) >= count:
                    return
                raise AssertionError(f"worker exited ({self.proc.returncode}) before {text!r}:\n{self.transcript()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {count} x {text!r}:\n{self.transcript()}")
            time.sleep(0.01)

    def ready(self, timeout: float = 30) -> Worker:
        """Wait until the worker consumes (its 'consuming' log line)."""
        self.wait_for("consuming", timeout=timeout, stream="err")
        return self

    def received(self) -> list[str]:
        prefix = " [x] Received "
        return [line[len(prefix) :].strip("'\"") for line in list(self.out) if line.startswith(prefix)]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self._drain()
        return code

    def _drain(self) -> None:
        for reader in self._readers:
            reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None and not reader.is_alive():
                stream.close()

    def transcript(self) -> str:
        return "\n".join(["--- stdout", *self.out, "--- stderr", *self.err])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._drain()


def is_redis(url: str) -> bool:
    return url.startswith("redis")


def ready(url: str, queue: Queue) -> int:
    """Messages waiting in `queue`; 0 while it does not exist yet."""
    conn = connect(url)
    try:
        return messages_ready(conn.channel(), queue)
    except conn.channel_errors:
        return 0
    finally:
        conn.release()


def start(workers: list[Worker], url: str, queue: Queue, *args: str) -> Worker:
    worker = Worker(url, queue.name, *args)
    workers.append(worker)
    return worker.ready()
