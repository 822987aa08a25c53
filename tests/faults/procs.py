"""The processes of a fault run: senders and workers as users run them, and the faults a machine meets."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker.procs import ROOT, Worker, tool
from tests.faults.history import Batch, History

HANDLER = "tests.faults.handlers:record"


class Run:
    """A fault run: its history, and the senders and workers it started, stopped at the end."""

    def __init__(self, history: History, url: str, queue: str = "task_queue") -> None:
        self.history = history
        self.url = url
        self.queue = queue
        self.workers: list[Worker] = []
        self.senders: list[tuple[Batch, subprocess.Popen[str]]] = []

    def worker(self, *args: str, ready: bool = True) -> Worker:
        env = {"KQUEUE_FAULT_RUNS": str(self.history.runs)}
        worker = Worker(self.url, self.queue, "--handler", HANDLER, "--log-format", "json", *args, env=env)
        self.workers.append(worker)
        return worker.ready() if ready else worker

    def send(self, name: str, count: int, *args: str, seconds: float = 0.0) -> subprocess.Popen[str]:
        """Start ``kqueue-send --file`` with a new batch of `count` tasks."""
        batch, path = self.history.batch(name, count, seconds=seconds)
        proc = subprocess.Popen(
            [tool("kqueue-send"), "--broker", self.url, "--queue", self.queue, "--file", str(path), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.senders.append((batch, proc))
        return proc

    def sent(self, timeout: float = 60) -> list[Batch]:
        """Wait for every sender; record what each said."""
        for batch, proc in self.senders:
            batch.out, batch.err = proc.communicate(timeout=timeout)
            batch.code = proc.returncode
        batches = [batch for batch, _ in self.senders]
        self.senders.clear()
        return batches

    def sending(self) -> int:
        """How many senders still run; record what each of the others said."""
        running = []
        for batch, proc in self.senders:
            if proc.poll() is None:
                running.append((batch, proc))
            else:
                batch.out, batch.err = proc.communicate()
                batch.code = proc.returncode
        self.senders = running
        return len(running)

    def wait_done(self, timeout: float = 60) -> None:
        """Wait until every confirmed task of every batch is done."""
        deadline = time.monotonic() + timeout
        while True:
            missing = self.history.missing()
            if not missing:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- worker {w.proc.pid}\n" + "\n".join(_notable(w.err)) for w in self.workers)
                raise AssertionError(f"{len(missing)} confirmed tasks not done, e.g. {missing[:5]}\n{logs}")
            time.sleep(0.02)

    def kill(self, worker: Worker, why: str = "SIGKILL") -> None:
        self.history.disrupted(worker.proc.pid, why, time.time())
        worker.kill()

    def stop(self) -> None:
        """Stop every worker with SIGTERM (gentle: they finish or give back), and read their logs.

        A sender still running (a test that failed half-way) is killed, so that nothing outlives the test.
        """
        for _, proc in self.senders:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        self.senders.clear()
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(30)
            finally:
                worker.stop()
            self.history.worker_log(worker.proc.pid, worker.err)


def _notable(lines: list[str]) -> list[str]:
    """A worker's log without its line per task: what a failing test shows."""
    return [line for line in lines if '"task done"' not in line][-30:]


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Hold the database's write lock, as another process's long transaction would."""
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


class SmallDisk:
    """A tmpfs of a few megabytes that a test can fill and free again: a real full disk."""

    def __init__(self, where: Path, size: str = "8m") -> None:
        self.path = where
        self.size = size
        self.filler = where / ".filler"

    def __enter__(self) -> SmallDisk:
        why = self.mount()
        if why:
            pytest.skip(why)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unmount()

    def mount(self) -> str:
        """Mount the tmpfs; why it could not be, or '' once it is (only root can mount)."""
        if os.geteuid() != 0:
            return "a full disk needs a tmpfs, which only root can mount"
        self.path.mkdir(parents=True, exist_ok=True)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)], capture_output=True, text=True
        )
        return f"cannot mount a tmpfs here: {mounted.stderr.strip()}" if mounted.returncode else ""

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)

    def fill(self) -> None:
        """Write until the disk refuses: ENOSPC."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        block = b"\0" * 65536
        try:
            while True:
                for size in (65536, 4096, 512, 1):
                    try:
                        os.write(fd, block[:size])
                        break
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC or size == 1:
                            raise
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)

    def take(self, size: int) -> None:
        """Take `size` bytes of the disk, to give back with `free`."""
        with open(self.filler, "wb") as ballast:
            ballast.write(b"\0" * size)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
