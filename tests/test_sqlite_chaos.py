"""Chaos on ``sqlite://``: senders and workers on one file, workers SIGKILLed at random while they run.

Real kqueue-send and kqueue-work processes; no server. At the end every task
is done at least once, nothing is left behind, and only a task whose worker
was killed may have run twice.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

from kqueue.brokers import connect
from kqueue.sqlite import queue_stats

from .broker.procs import ROOT, tool
from .conftest import wait_for

SENDERS, PER_SENDER, WORKERS, KILLS = 3, 200, 3, 6


def start_worker(url: str, records: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [tool("kqueue-work"), "--broker", url, "--handler", "tests.handlers:chaos_record", "--prefetch", "3", "-q"],
        cwd=ROOT,
        env={"KQUEUE_TEST_RECORDS": str(records), "PATH": str(Path(tool("kqueue-work")).parent)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_killing_workers_at_random_loses_no_task_and_repeats_only_theirs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queues.db'}"
    records = tmp_path / "records"
    records.mkdir()
    rng = random.Random(20261130)
    tasks = [f"s{s}-t{t}" for s in range(SENDERS) for t in range(PER_SENDER)]
    workers = [start_worker(url, records) for _ in range(WORKERS)]
    killed: list[int] = []
    try:
        # Given senders sending while workers work
        senders = []
        for s in range(SENDERS):
            batch = tmp_path / f"batch-{s}.txt"
            batch.write_text("".join(f"s{s}-t{t}\n" for t in range(PER_SENDER)))
            senders.append(subprocess.Popen([tool("kqueue-send"), "--broker", url, "--file", str(batch)], cwd=ROOT))

        # When workers are killed at random moments and replaced
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.05, 0.3))
            victim = workers.pop(rng.randrange(len(workers)))
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            killed.append(victim.pid)
            workers.append(start_worker(url, records))
        assert [sender.wait(60) for sender in senders] == [0] * SENDERS

        # Then every task is done and nothing is left in the file
        def finished() -> bool:
            return set(done_runs(records)) >= set(tasks)

        wait_for(finished, timeout=60, message="every task done")
        with connect(url) as conn:
            wait_for(lambda: queue_stats(conn, "task_queue")[:2] == (0, 0), timeout=30, message="nothing left")
            assert queue_stats(conn, "task_queue.dead")[:2] == (0, 0)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(30)

    # Only the tasks a killed worker had started ran more than once
    starts = started_by(records)
    repeated = [task for task, pids in starts.items() if len(pids) > 1]
    for task in repeated:
        assert set(starts[task]) & set(killed), f"{task} ran twice, though no worker that ran it was killed"
    print(f"{len(tasks)} tasks, {len(killed)} workers killed, {len(repeated)} ran twice")


def runs(records: Path, kind: str) -> list[tuple[int, str]]:
    found = []
    for log in records.glob("*.log"):
        pid = int(log.stem)
        for line in log.read_text().splitlines():
            word, _, task = line.partition(" ")
            if word == kind:
                found.append((pid, task))
    return found


def done_runs(records: Path) -> list[str]:
    return [task for _, task in runs(records, "done")]


def started_by(records: Path) -> dict[str, list[int]]:
    starts: dict[str, list[int]] = defaultdict(list)
    for pid, task in runs(records, "start"):
        starts[task].append(pid)
    return starts
