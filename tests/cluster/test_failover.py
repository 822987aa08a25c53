"""Real kqueue-send and kqueue-work processes on the cluster, a node SIGKILLed under them mid-batch.

``pytest -m cluster -s`` prints, for each kill, how long each tool took to
work again and what was sent, confirmed, done and done twice.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import wait_for

from .cluster import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.broker]

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
#: Enough that the sender is still sending when the node dies a moment in.
TASKS = 30000
PREFETCH = 10
#: Low, so that a task redelivered by one failover too many would be dead-lettered.
DELIVERY_LIMIT = 3


@dataclass
class Proc:
    """A kqueue process whose output lines are collected with the moment each arrived."""

    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    out: list[tuple[float, str]] = field(default_factory=list)
    err: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / self.args[0]), *self.args[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,  # so that --handler tests.cluster.handlers:... imports
            env={**os.environ, **self.env},
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: object, into: list[tuple[float, str]]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append((time.monotonic(), line.rstrip("\n")))

    def first(self, text: str, after: float, stream: str = "err") -> float | None:
        """When the first line containing `text` arrived after `after`, or None."""
        lines = self.err if stream == "err" else self.out
        return next((t for t, line in list(lines) if t > after and text in line), None)

    def count(self, text: str, stream: str = "err") -> int:
        lines = self.err if stream == "err" else self.out
        return sum(text in line for _, line in list(lines))

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._close()
        return code

    def _close(self) -> None:
        for reader in self._readers:
            reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close()

    def transcript(self) -> str:
        return "\n".join(line for _, line in self.err[-40:])

    def events(self, after: float) -> list[str]:
        """Its log lines after `after`, but the line per task: what a user reads after a kill."""
        return [f"  {self.name}: {line}" for t, line in list(self.err) if t > after and "task done" not in line]


def url_from(cluster: Cluster, first: int) -> str:
    """The cluster's URL with node `first` first, the others after it in turn: where a tool connects first."""
    order = [*range(first, cluster.size + 1), *range(1, first)]
    return ";".join(cluster.node_url(i) for i in order)


def kqueue(url: str, queue: str, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "kqueue"), *args, "--broker", url, "--queue", queue, "--queue-type", "quorum"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, f"kqueue {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return done.stdout


def ready_counts(url: str, queue: str) -> dict[str, int]:
    """``kqueue stat``'s ready column, by queue."""
    rows = kqueue(url, queue, "stat").splitlines()[1:]
    return {row.split()[0]: int(row.split()[1]) for row in rows}


@pytest.fixture
def running(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster with every node up, before the test and after it."""
    for i in sorted(cluster.down):
        cluster.start(i)
    yield cluster
    for i in sorted(cluster.down):
        cluster.start(i)


@dataclass
class Failover:
    """What one kill did to the tools."""

    case: str
    killed: int
    sender_again: float | None
    workers_again: list[float | None]
    workers_task: list[float | None]
    sent: int
    confirmed: int
    done: int
    duplicates: int
    in_doubt: int
    logs: list[str]

    def report(self) -> str:
        def seconds(value: float | None) -> str:
            return "never stopped" if value is None else f"{value:.2f}s"

        workers = ", ".join(
            f"worker {n}: {seconds(again)} (first task after {seconds(task)})"
            for n, (again, task) in enumerate(zip(self.workers_again, self.workers_task, strict=True), start=1)
        )
        return (
            f"\n{self.case}: SIGKILL node {self.killed}; sending again after {seconds(self.sender_again)}, "
            f"consuming again after {workers}; sent {self.sent}, confirmed {self.confirmed}, done {self.done}, "
            f"duplicates {self.duplicates} (in doubt {self.in_doubt})\n" + "\n".join(self.logs)
        )


def run_kill(
    cluster: Cluster, tmp_path: Path, case: str, declare_on: int, victim: Callable[[str], int]
) -> tuple[Failover, list[Proc], str]:
    """Two workers and a sender of TASKS tasks; SIGKILL node `victim(queue)` mid-batch; return the figures."""
    queue = f"failover-{uuid.uuid4().hex[:8]}"
    kqueue(cluster.node_url(declare_on), queue, "stat")  # declares it: a quorum queue's leader starts where declared
    tasks = tmp_path / f"{case}.txt"
    tasks.write_text("".join(f"{case} task {n}\n" for n in range(TASKS)))
    common = ["--queue", queue, "--queue-type", "quorum"]
    work = ["--handler", "tests.cluster.handlers:record", "--prefetch", str(PREFETCH)]
    work += ["--delivery-limit", str(DELIVERY_LIMIT), "--heartbeat", "5"]
    done_files = [tmp_path / f"{case}-done-{n}.txt" for n in (1, 2)]
    workers = [
        Proc(f"worker {n}", ["kqueue-work", "--broker", url_from(cluster, first), *common, *work],
             env={"KQUEUE_TEST_DONE": str(path)})
        for n, (first, path) in enumerate(zip((1, 2), done_files, strict=True), start=1)
    ]  # fmt: skip
    sender: Proc | None = None
    try:
        for worker in workers:
            wait_for(lambda w=worker: w.count("consuming"), timeout=30, message=f"{worker.name} consuming")
        # Which node to kill, found before the batch starts: finding the leader takes a rabbitmqctl
        # call of a second or more, time in which the sender could finish the whole batch.
        killed = victim(queue)
        sender = Proc("sender", ["kqueue-send", "--broker", url_from(cluster, 1), *common, "--file", str(tasks)])
        wait_for(lambda: any(path.exists() and path.stat().st_size for path in done_files), message="a task done")
        assert sender.proc.poll() is None, "the sender finished before the kill: no longer mid-batch"
        kill_at = time.monotonic()
        cluster.kill(killed)

        code = sender.finish(timeout=120)
        assert code == 0, f"kqueue-send exited {code}:\n{sender.transcript()}"
        done_lines = lambda: [line for path in done_files for line in path.read_text().splitlines()]  # noqa: E731
        expected = set(tasks.read_text().splitlines())
        wait_for(lambda: expected <= set(done_lines()), timeout=120, message="every task done")
        # The queue and its dead letters end empty: nothing refused, nothing over the delivery limit.
        survivor = url_from(cluster, next(i for i in cluster.indexes if i not in cluster.down))
        wait_for(lambda: set(ready_counts(survivor, queue).values()) == {0}, timeout=30, message="empty queues")
        assert kqueue(survivor, queue, "dead", "list").strip() == f"0 dead letters in {queue}.dead"
    except BaseException:
        for proc in [*workers, *([sender] if sender is not None else [])]:
            proc.stop()
        raise

    confirmed = int(re.search(r"Sent (\d+) messages", sender.out[-1][1]).group(1))  # type: ignore[union-attr]
    counts = Counter(done_lines())
    resent = sum(int(n) for _, line in sender.err for n in re.findall(r"sending the (\d+) unconfirmed", line))
    lost = sum(worker.first("lost the", kill_at) is not None for worker in workers)
    figures = Failover(
        case=case,
        killed=killed,
        sender_again=_since(kill_at, sender.first("reconnected to broker", kill_at)
                            or sender.first("takes messages again", kill_at)),
        workers_again=[_since(kill_at, worker.first("consuming", kill_at)) for worker in workers],
        workers_task=[_since(kill_at, worker.first("[x] Received", kill_at, stream="out")) for worker in workers],
        sent=TASKS,
        confirmed=confirmed,
        done=len(counts),
        duplicates=sum(counts.values()) - len(counts),
        in_doubt=resent + lost * PREFETCH,
        logs=[line for proc in (sender, *workers) for line in proc.events(kill_at - 1)],
    )  # fmt: skip
    return figures, workers, queue


def _since(start: float, moment: float | None) -> float | None:
    return None if moment is None else moment - start


def check(cluster: Cluster, figures: Failover, workers: list[Proc], queue: str) -> None:
    """What every kill must leave behind; then the killed node rejoins and the tools do not notice."""
    print(figures.report())
    assert figures.confirmed == figures.sent == figures.done
    assert figures.duplicates <= figures.in_doubt
    for worker in workers:
        assert worker.proc.poll() is None, f"{worker.name} exited:\n{worker.transcript()}"
    for seconds in [figures.sender_again, *figures.workers_again]:
        assert seconds is None or seconds < 10, figures.report()
    # Each tool says where it went: the node it is connected to now, never the dead one.
    dead = f":{cluster.ports[figures.killed]}/"
    for worker in workers:
        if worker.first("lost the", 0.0) is not None:
            last = [line for _, line in worker.err if "consuming" in line][-1]
            assert dead not in last, last

    cluster.start(figures.killed)
    rejoined = time.monotonic()
    time.sleep(2)
    for worker in workers:
        assert worker.first("lost the", rejoined) is None, worker.transcript()
        assert worker.proc.poll() is None
    assert set(ready_counts(cluster.url, queue).values()) == {0}
    for worker in workers:
        worker.stop()
        assert worker.proc.returncode == 0, worker.transcript()


def test_killing_the_node_of_the_sender_and_a_worker(running: Cluster, tmp_path: Path) -> None:
    # Given the sender and worker 1 on node 1, worker 2 on node 2, the queue led by node 1
    # When node 1 is SIGKILLed mid-batch
    figures, workers, queue = run_kill(running, tmp_path, "A", 1, lambda queue: 1)

    # Then both fail over to a live node, and nothing is lost
    assert figures.sender_again is not None, "the sender never noticed"
    assert figures.workers_again[0] is not None, "worker 1 never noticed"
    check(running, figures, workers, queue)


def test_killing_the_node_that_leads_the_queue(running: Cluster, tmp_path: Path) -> None:
    # Given the queue declared on node 3, so led by it, and every tool connected to nodes 1 and 2
    # When the leader is SIGKILLed mid-batch
    figures, workers, queue = run_kill(running, tmp_path, "B", 3, running.leader)

    # Then a new leader takes over, the tools carry on where they are, and nothing is lost
    check(running, figures, workers, queue)


def test_a_task_that_lives_through_two_failovers_is_not_dead_lettered(running: Cluster, tmp_path: Path) -> None:
    # Given a worker running a task that goes on until told, with a delivery limit of 3
    queue = f"limit-{uuid.uuid4().hex[:8]}"
    done, hold = tmp_path / "done.txt", tmp_path / "hold"
    hold.touch()
    common = ["--broker", running.url, "--queue", queue, "--queue-type", "quorum"]
    worker = Proc(
        "worker",
        ["kqueue-work", *common, "--handler", "tests.cluster.handlers:held", "--delivery-limit", "3"],
        env={"KQUEUE_TEST_DONE": str(done), "KQUEUE_TEST_HOLD": str(hold)},
    )
    try:
        wait_for(lambda: worker.count("consuming"), timeout=30, message="the worker consuming")
        sent = subprocess.run([str(BIN / "kqueue-send"), *common, "survivor"], capture_output=True, text=True)
        assert sent.returncode == 0, sent.stderr

        # When the node it is on dies twice while the task runs (node 1, then, back up, node 2)
        for node, turn in ((1, 1), (2, 2)):
            wait_for(lambda t=turn: worker.count("Received", "out") >= t, timeout=60, message=f"delivery {turn}")
            running.kill(node)
            wait_for(lambda t=turn: worker.count("consuming") > t, timeout=30, message="the worker back")
            running.start(node)
        wait_for(lambda: worker.count("Received", "out") >= 3, timeout=60, message="delivery 3")
        hold.unlink()

        # Then its third delivery (x-delivery-count 2) still runs, and nothing is dead-lettered
        wait_for(lambda: done.exists() and "survivor" in done.read_text(), timeout=60, message="the task done")
        assert worker.count("Received", "out") == 3  # the runs cut off by a failover finish too, unacked
        assert worker.count("dead-lettered") == 0, worker.transcript()
        assert ready_counts(running.url, queue) == {queue: 0, f"{queue}.dead": 0}
    finally:
        worker.stop()
