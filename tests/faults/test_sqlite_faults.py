"""Faults one machine meets, on ``sqlite://``: a held write lock, a full disk, a removed file, a frozen worker.

Real kqueue-send and kqueue-work processes, real faults; each test ends with
the history's check (`tests.faults.history`): every confirmed task done,
nothing done twice that nothing disrupted.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.faults.history import History
from tests.faults.procs import Run, SmallDisk, write_lock_held


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    run = Run(History(tmp_path / "history"), f"sqlite:///{tmp_path / 'queues.db'}?busy_timeout=0.5&confirm_batch=200")
    try:
        yield run
    finally:
        run.stop()


def rows(path: Path) -> int:
    """Messages in the file, read as any other process would; 0 before it has any."""
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=30)
    try:
        return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return 0
        raise
    finally:
        db.close()


def logged(run: Run, text: str) -> int:
    return sum(text in line for worker in run.workers for line in worker.err)


def test_a_batch_sent_through_a_held_write_lock_is_confirmed_only_as_it_is_stored(run: Run, tmp_path: Path) -> None:
    # Given a sender well into a batch
    run.send("batch", 20000)
    wait_for(lambda: rows(tmp_path / "queues.db") > 0, message="rows stored")

    # When another process holds the write lock for five times the busy timeout
    with write_lock_held(tmp_path / "queues.db"):
        time.sleep(2.5)  # the fault itself: the lock stays held this long
    (batch,) = run.sent()

    # Then what it says it sent is all in the queue, and all of it is done
    assert batch.code == 0, batch.err
    assert "locked" in batch.err
    run.worker("--prefetch", "100")
    run.wait_done()
    run.stop()
    print(run.history.check().row())


def test_workers_keep_their_running_tasks_while_another_process_holds_the_write_lock(run: Run, tmp_path: Path) -> None:
    # Given two workers in the middle of tasks
    workers = [run.worker(), run.worker()]
    run.send("slow", 40, seconds=0.2)
    (batch,) = run.sent()
    assert batch.code == 0, batch.err
    wait_for(lambda: len(run.history.starts()) >= 4, message="tasks running")

    # When another process holds the write lock for five times the busy timeout
    with write_lock_held(tmp_path / "queues.db"):
        time.sleep(2.5)  # the fault itself

    # Then each worker says so once, keeps its tasks and its lock, and nothing runs twice
    run.wait_done()
    assert all(worker.proc.poll() is None for worker in workers)
    assert logged(run, "locked by another process for") >= 1
    run.stop()
    summary = run.history.check()
    assert not summary.duplicated, summary.row()


def test_acks_written_through_a_full_disk_are_kept_until_they_are_on_disk(run: Run, tmp_path: Path) -> None:
    with SmallDisk(tmp_path / "disk") as disk:
        run.url = f"sqlite:///{disk.path / 'queues.db'}"
        # Given a worker working through a backlog on a small disk
        run.send("backlog", 3000)
        (batch,) = run.sent()
        assert batch.code == 0, batch.err
        (worker,) = [run.worker("--prefetch", "100")]
        wait_for(lambda: len(run.history.done()) >= 200, message="tasks done")

        # When the disk fills, then is freed again
        disk.fill()
        wait_for(lambda: logged(run, "disk full") >= 1, message="the worker saying the disk is full")
        done_while_full = len(run.history.done())
        disk.free()

        # Then the worker stayed up, no task came back for a second run, and the file holds nothing
        run.wait_done()
        assert worker.proc.poll() is None, worker.transcript()
        run.stop()
        summary = run.history.check()
        assert not summary.duplicated, summary.row()
        assert rows(disk.path / "queues.db") == 0
        print(f"{done_while_full} done when the disk filled; {summary.row()}")


def test_a_batch_that_fills_the_disk_says_how_many_were_stored_and_those_are_all_done(run: Run, tmp_path: Path) -> None:
    with SmallDisk(tmp_path / "disk", size="8m") as disk:
        run.url = f"sqlite:///{disk.path / 'queues.db'}?confirm_batch=200"
        disk.take(6 << 20)
        # When a batch is bigger than the room left on the disk
        run.send("big", 30000, "--retry-for", "1")
        (batch,) = run.sent()

        # Then the sender says the disk is full and how many it confirmed, and once there is room, those are done
        assert batch.code == 1, batch.out
        assert "disk" in batch.err and f"of {len(batch.ids)} messages" in batch.err, batch.err
        assert 0 < batch.confirmed < len(batch.ids)
        assert len(batch.err.strip().splitlines()) <= 3, batch.err
        stored = rows(disk.path / "queues.db")
        assert stored >= batch.confirmed
        disk.free()
        run.worker("--prefetch", "100")
        run.wait_done()
        run.stop()
        print(f"{batch.confirmed} confirmed, {stored} stored; {run.history.check().row()}")


def test_a_queue_file_removed_under_running_workers_is_noticed_and_its_successor_worked(
    run: Run, tmp_path: Path
) -> None:
    # Given workers idle on a queue file that has done some work
    run.worker()
    run.worker()
    run.send("before", 20)
    run.sent()
    run.wait_done()

    # When a user removes the file (and its -wal and -shm) to start afresh, and sends again
    removed = time.time()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'queues.db'}{suffix}").unlink(missing_ok=True)
    run.send("after", 20)
    run.sent()

    # Then the workers say so and work the new file's tasks
    run.wait_done(timeout=20)
    assert logged(run, "was removed or replaced") >= 1
    run.history.disrupted(None, "queue file removed", removed, removed)
    run.stop()
    print(run.history.check().row())


def test_a_worker_frozen_past_its_turn_keeps_its_task_and_the_others_go_on(run: Run) -> None:
    # Given two workers on tasks a tenth of a second long
    frozen = run.worker()
    run.worker()
    run.send("tasks", 60, seconds=0.1)
    run.sent()
    wait_for(lambda: any(pid == frozen.proc.pid for runs in run.history.starts().values() for pid, _ in runs))

    # When one is stopped (SIGSTOP) for longer than a turn may last, then continued
    frozen.signal(signal.SIGSTOP)
    before = len(run.history.done())
    try:
        wait_for(lambda: len(run.history.done()) >= before + 25, timeout=20, message="the other worker going on")
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)

    # Then everything is done, and the frozen worker's task was not handed to the other
    run.wait_done()
    run.stop()
    summary = run.history.check()
    assert not summary.duplicated, summary.row()
