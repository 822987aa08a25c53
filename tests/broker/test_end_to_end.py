"""The same contract on every real broker, with real kqueue-send and kqueue-work processes."""

from __future__ import annotations

import pytest

from .procs import Worker, run_send

pytestmark = pytest.mark.broker


def test_a_task_sent_is_worked(broker_queue: tuple[str, object]) -> None:
    url, queue = broker_queue
    name = queue.name  # type: ignore[attr-defined]

    sent = run_send(url, name, "First", "message.")
    worker = Worker(url, name, "--burst", "--dot-seconds", "0.01")
    code = worker.wait()

    assert sent.returncode == 0, sent.stderr
    assert sent.stdout == " [x] Sent 'First message.'\n"
    assert code == 0, worker.transcript()
    assert worker.out == [
        " [*] Waiting for messages. To exit press CTRL+C",
        " [x] Received 'First message.'",
        " [x] Done",
    ]
