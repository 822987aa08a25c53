"""The same contract on every real broker, with real kqueue-send and kqueue-work processes."""

from __future__ import annotations

import threading

import pytest

from kqueue.brokers import connect
from kqueue.producer import Sender
from kqueue.worker import Worker, WorkerSettings

from .procs import Worker as WorkerProcess
from .procs import run_send

pytestmark = pytest.mark.broker


def test_a_task_sent_is_worked(broker_queue: tuple[str, object]) -> None:
    url, queue = broker_queue
    name = queue.name  # type: ignore[attr-defined]

    sent = run_send(url, name, "First", "message.")
    worker = WorkerProcess(url, name, "--burst", "--dot-seconds", "0.01")
    code = worker.wait()

    assert sent.returncode == 0, sent.stderr
    assert sent.stdout == " [x] Sent 'First message.'\n"
    assert code == 0, worker.transcript()
    assert worker.out == [
        " [*] Waiting for messages. To exit press CTRL+C",
        " [x] Received 'First message.'",
        " [x] Done",
    ]


def test_a_worker_draining_a_backlog_never_stalls(broker_queue: tuple[str, object]) -> None:
    # Handlers finishing while the connection thread cleared its last wake-up
    # once left it asleep for its whole timeout (1 s), again and again.
    url, queue = broker_queue
    with connect(url) as conn, Sender(conn, queue) as sender:  # type: ignore[arg-type]
        sender.send_many(f"t{i}" for i in range(5000))
    worker = Worker(connect(url), queue, lambda text: None, WorkerSettings(burst=True, prefetch=100))  # type: ignore[arg-type]

    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    thread.join(15)  # about half a second when nothing stalls

    assert not thread.is_alive(), f"{worker.tasks_acked} of 5000 done in 15 s"
    assert worker.tasks_acked == 5000
    worker.close()


@pytest.mark.parametrize(("prefetch", "concurrency"), [(1, 1), (4, 4)])
def test_every_task_is_acked_once_whether_its_handler_thread_or_the_connection_thread_acks_it(
    broker_queue: tuple[str, object], caplog: pytest.LogCaptureFixture, prefetch: int, concurrency: int
) -> None:
    # With every delivered task running (prefetch <= concurrency), a handler
    # thread acks its own task when the connection thread is idle, and leaves
    # it to that thread when it is busy. Tasks of uneven length mix the two.
    url, queue = broker_queue
    total = 1500
    with connect(url) as conn, Sender(conn, queue) as sender:  # type: ignore[arg-type]
        sender.send_many(str(i) for i in range(total))
    ran: list[str] = []

    def handler(text: str) -> None:
        if int(text) % 7 == 0:
            threading.Event().wait(0.002)
        ran.append(text)

    settings = WorkerSettings(burst=True, prefetch=prefetch, concurrency=concurrency)
    worker = Worker(connect(url), queue, handler, settings)  # type: ignore[arg-type]
    thread = threading.Thread(target=worker.run, daemon=True)
    with caplog.at_level("WARNING", logger="kqueue"):
        thread.start()
        thread.join(60)
    worker.close()

    assert not thread.is_alive(), f"{worker.tasks_acked} of {total} done in 60 s"
    assert sorted(ran, key=int) == [str(i) for i in range(total)]  # each exactly once: none acked twice
    assert worker.tasks_acked == total
    assert [record.getMessage() for record in caplog.records] == []


def stamped_lines(url: str, queue: str, *options: str) -> list[tuple[str, float]]:
    """Run ``kqueue-work`` to its end (give it --max-tasks); each line it printed, with when it came."""
    import subprocess
    import time

    from .procs import ROOT, tool

    stamps: list[tuple[str, float]] = []
    with subprocess.Popen(
        [tool("kqueue-work"), "--broker", url, "--queue", queue, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # the worker ends after its tasks, and so does its output
            stamps.append((line.strip(), time.monotonic()))
        assert proc.wait(60) == 0
    return stamps


def test_a_worker_started_on_a_waiting_task_takes_it_at_once(broker_queue: tuple[str, object]) -> None:
    url, queue = broker_queue
    name = queue.name  # type: ignore[attr-defined]
    # Given a task waiting in the queue before any worker runs
    assert run_send(url, name, "waiting").returncode == 0

    # When a worker starts
    stamps = dict(reversed(stamped_lines(url, name, "--max-tasks", "1", "--dot-seconds", "0")))

    # Then it starts the task within 100 ms of saying it waits: it looks before it first waits
    waited = stamps["[x] Received 'waiting'"] - stamps["[*] Waiting for messages. To exit press CTRL+C"]
    assert waited < 0.1, f"the first task started {waited:.3f} s after the worker said it was waiting"


def test_the_task_after_a_long_one_starts_at_once(broker_queue: tuple[str, object]) -> None:
    url, queue = broker_queue
    name = queue.name  # type: ignore[attr-defined]
    # Given tasks long enough for a second thread to take the connection over, each with a short one after it
    pairs = 5
    for _ in range(pairs):
        assert run_send(url, name, "long...").returncode == 0
        assert run_send(url, name, "short").returncode == 0

    # When one worker does them all
    stamps = stamped_lines(url, name, "--max-tasks", str(2 * pairs), "--dot-seconds", "0.1")

    # Then each short one starts within 100 ms of the long one's end: the connection is handed back at once
    lines = [line for line, _ in stamps[1:]]
    assert lines == ["[x] Received 'long...'", "[x] Done", "[x] Received 'short'", "[x] Done"] * pairs, lines
    gaps = [stamps[i + 1][1] - stamps[i][1] for i in range(2, len(stamps), 4)]
    assert max(gaps) < 0.1, f"a task started {max(gaps):.3f} s after the long one before it was done: {gaps}"
