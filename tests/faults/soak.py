"""A soak: senders and workers on one broker for some minutes, real faults injected at random, then the history checked.

    python -m tests.faults.soak --minutes 10 --broker sqlite
    python -m tests.faults.soak --minutes 10 --broker amqp

On ``sqlite://``: workers SIGKILLed, SIGSTOPped past their turn, stopped
with SIGTERM; another process holding the write lock past ``busy_timeout``;
the disk filled (a tmpfs, as root). On RabbitMQ, through a TCP proxy on
loopback: workers SIGKILLed, SIGSTOPped past two heartbeats, stopped with
SIGTERM; the network cut or frozen under workers and senders. Prints a
table of the faults injected, the tasks confirmed, done, run twice (with
why) and lost, which must be 0; exits 1 if any promise of the history
failed. Bounded: it stops injecting at the deadline, then gives the queue
two minutes to drain.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.broker.procs import Worker
from tests.faults.history import History, Summary
from tests.faults.procs import Run, SmallDisk, write_lock_held

AMQP = "amqp://guest:guest@127.0.0.1:5672//"
WORKERS = 3
SENDERS = 2


class Soak:
    """One soak run: its processes, its faults, and the random choices that drive them (seeded)."""

    def __init__(self, run: Run, rng: random.Random, *, heartbeat: bool) -> None:
        self.run = run
        self.rng = rng
        self.heartbeat = heartbeat
        self.batches = 0
        self.faults: dict[str, Callable[[], None]] = {
            "SIGKILL a worker": self.kill,
            "SIGSTOP a worker": self.freeze_worker,
            "SIGTERM a worker": self.terminate,
        }

    # -- processes -------------------------------------------------------------------------

    def start_worker(self) -> Worker:
        prefetch = self.rng.choice(["1", "1", "5"])
        extra = ["--heartbeat", "2"] if self.heartbeat else []
        return self.run.worker("--prefetch", prefetch, "--grace", "10", *extra)

    def live_workers(self) -> list[Worker]:
        return [worker for worker in self.run.workers if worker.proc.poll() is None]

    def maybe_send(self) -> None:
        if self.run.sending() < SENDERS:
            self.batches += 1
            seconds = self.rng.choice([0.0, 0.0, 0.0, 0.02])
            self.run.send(f"b{self.batches}", self.rng.randint(100, 1000), "--retry-for", "60", seconds=seconds)

    # -- faults ------------------------------------------------------------------------------

    def kill(self) -> None:
        victim = self.rng.choice(self.live_workers())
        self.run.kill(victim, "SIGKILL a worker")
        self.start_worker()

    def terminate(self) -> None:
        victim = self.rng.choice(self.live_workers())
        victim.signal(signal.SIGTERM)
        victim.wait(30)
        self.run.history.faults["SIGTERM a worker"] += 1
        self.start_worker()

    def freeze_worker(self) -> None:
        victim = self.rng.choice(self.live_workers())
        stopped = time.time()
        victim.signal(signal.SIGSTOP)
        try:
            time.sleep(self.rng.uniform(1.0, 6.0))  # the fault itself: stopped this long
        finally:
            victim.signal(signal.SIGCONT)
        if self.heartbeat:
            # RabbitMQ drops a client that misses two heartbeats and hands its tasks to another;
            # the worker finds its connection gone once it runs again.
            self.run.history.disrupted(victim.proc.pid, "SIGSTOP a worker", stopped, time.time() + 5)
        else:
            self.run.history.faults["SIGSTOP a worker"] += 1  # a live owner keeps its tasks: no excuse

    # -- the run -------------------------------------------------------------------------------

    def soak(self, seconds: float) -> None:
        for _ in range(WORKERS):
            self.start_worker()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.maybe_send()
            name = self.rng.choice(list(self.faults))
            self.faults[name]()
            time.sleep(self.rng.uniform(0.2, 1.5))  # the pace of faults, not a wait for a condition
        self.run.sent(timeout=120)
        try:
            self.run.wait_done(timeout=120)
        finally:
            self.run.stop()


def sqlite_faults(soak: Soak, path: Path, disk: SmallDisk | None) -> None:
    def lock() -> None:
        with write_lock_held(path):
            time.sleep(soak.rng.uniform(0.5, 3.0))  # the fault itself: the lock held this long
        soak.run.history.faults["write lock held past busy_timeout"] += 1

    def fill() -> None:
        assert disk is not None
        disk.fill()
        try:
            time.sleep(soak.rng.uniform(0.5, 2.0))  # the fault itself: the disk full this long
        finally:
            disk.free()
        soak.run.history.faults["disk full"] += 1

    soak.faults["write lock held past busy_timeout"] = lock
    if disk is not None:
        soak.faults["disk full"] = fill


def amqp_faults(soak: Soak, proxy: object) -> None:
    from tests.faults.proxy import Proxy

    assert isinstance(proxy, Proxy)

    def cut() -> None:
        now = time.time()
        proxy.cut()
        soak.run.history.disrupted(None, "network cut", now, now)

    def freeze() -> None:
        frozen = time.time()
        proxy.freeze()
        try:
            time.sleep(soak.rng.uniform(1.0, 8.0))  # the fault itself: the network frozen this long
        finally:
            proxy.thaw()
        soak.run.history.disrupted(None, "network frozen", frozen, time.time())

    soak.faults["network cut"] = cut
    soak.faults["network frozen"] = freeze


@contextlib.contextmanager
def sqlite_soak(root: Path, rng: random.Random) -> Iterator[Soak]:
    with contextlib.ExitStack() as stack:
        disk: SmallDisk | None = SmallDisk(root / "disk", size="64m")
        assert disk is not None
        why = disk.mount()
        if why:
            print(f"soak: no disk-full faults: {why}", file=sys.stderr)
            disk = None
        else:
            stack.callback(disk.unmount)
        folder = disk.path if disk is not None else root
        run = Run(History(root / "history"), f"sqlite:///{folder / 'queues.db'}?busy_timeout=1")
        soak = Soak(run, rng, heartbeat=False)
        sqlite_faults(soak, folder / "queues.db", disk)
        try:
            yield soak
        finally:
            run.stop()


@contextlib.contextmanager
def amqp_soak(root: Path, rng: random.Random) -> Iterator[Soak]:
    from tests.conftest import delete_queues, unique
    from tests.faults.proxy import Proxy

    queue = unique("soak")
    with Proxy() as proxy:
        run = Run(History(root / "history"), proxy.url(), queue=queue)
        soak = Soak(run, rng, heartbeat=True)
        amqp_faults(soak, proxy)
        try:
            yield soak
        finally:
            run.stop()
            delete_queues(AMQP, queue, f"{queue}.dead")


def table(broker: str, seconds: float, seed: int, summary: Summary) -> str:
    twice = sum(summary.duplicated.values())
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(summary.duplicated.items())) or "-"
    rows = [
        (f"soak on {broker}: {seconds:g}s, seed {seed}", ""),
        *((f"  fault: {name}", str(n)) for name, n in sorted(summary.faults.items())),
        ("tasks sent", str(summary.sent)),
        ("tasks confirmed", str(summary.confirmed)),
        ("tasks done", str(summary.done)),
        ("tasks run twice", f"{twice} ({why})"),
        ("tasks lost", str(summary.lost)),
    ]
    return "\n".join(f"{name:<42} {value}" for name, value in rows)


def failed_batches(history: History) -> str:
    """Each batch whose sender exited non-zero, with its last line: what a reader of the table asks next."""
    lines = [f"{b.name}: exit {b.code}: {b.err.strip().splitlines()[-1:]}" for b in history.batches if b.code]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--broker", choices=["sqlite", "amqp"], default="sqlite")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="kqueue-soak-") as folder:
        opened = sqlite_soak if args.broker == "sqlite" else amqp_soak
        with opened(Path(folder), rng) as soak:
            try:
                soak.soak(args.minutes * 60)
            finally:
                print(table(args.broker, args.minutes * 60, seed, soak.run.history.summary()), flush=True)
                print(failed_batches(soak.run.history), flush=True)
            soak.run.history.check()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
