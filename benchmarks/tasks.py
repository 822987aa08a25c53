"""Figure: function tasks and delays against text tasks, in the same run.

Function tasks (a call with JSON arguments) against the tutorial's text
tasks: sends through `FunctionTask.send_many` against `Sender.send_many`, and
``kqueue-work --app`` draining a queue of calls against ``kqueue-work`` a queue
of texts, at prefetch 1 and 100. Delayed sends against immediate ones. And
how late delayed tasks run: 1,000 sent at once, due over the next few
seconds, each noting when it started.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from benchmarks import plumbing, task_app
from benchmarks.core import Config, Figure, Row, Step, Target
from kqueue.app import App
from kqueue.brokers import connect
from kqueue.producer import Sender
from kqueue.queues import QueueType, task_queue

N = 100_000
#: Prefetch 1 works N / 5 messages (a round trip each).
P1_DIVISOR = 5
#: Delayed tasks whose lateness is measured, and the seconds over which they come due.
N_LATE = 1_000
LATE_SPREAD = (1.0, 4.0)
#: The delay of the delayed sends: past the end of the send at 4,000 a second, so that none comes due while
#: it is timed; on RabbitMQ the step then waits for them all to arrive, so that none is left in its shared chain.
SEND_DELAY_SECONDS = 2.0
SEND_DELAY_PER_MESSAGE = 1 / 4000


def figure(config: Config) -> Figure:
    n = config.count(N)
    texts = [body.decode() for body in plumbing.bodies(n)]
    calls = [(index, text) for index, text in enumerate(texts)]
    queue_type = QueueType(config.queue_type)

    delay = SEND_DELAY_SECONDS + n * SEND_DELAY_PER_MESSAGE

    def send(kind: str) -> dict[str, float]:
        name = plumbing.fresh_name(f"tasks-send-{kind}")
        try:
            start = time.perf_counter()
            if kind == "call":
                with App(config.url, name, queue_type=queue_type) as app:
                    confirmed = app.task(task_app.noop.fn, name="noop").send_many(calls)
            else:
                with connect(config.url) as conn, Sender(conn, task_queue(name, queue_type)) as sender:
                    confirmed = sender.send_many(texts, delay=delay if kind == "delayed" else None)
            seconds = time.perf_counter() - start
            if confirmed != n:
                raise RuntimeError(f"{name}: {confirmed} of {n} confirmed")
            if config.amqp:  # RabbitMQ's chain is shared: leave nothing in it (elsewhere deleting the queue does)
                _arrived(config.url, name, n, timeout=delay + 60)
            return {f"send_{kind}": n / seconds}
        finally:
            plumbing.delete_queues(config.url, name)

    def drain(kind: str, prefetch: int) -> dict[str, float]:
        count = n // (P1_DIVISOR if prefetch == 1 else 1)
        name = plumbing.fresh_name(f"tasks-work-{kind}")
        queue = task_queue(name, queue_type)
        try:
            if kind == "call":
                with App(config.url, name, queue_type=queue_type) as app:
                    app.task(task_app.noop.fn, name="noop").send_many(calls[:count])
            else:
                plumbing.prefill(config.url, plumbing.raw_queue(name, config.queue_type), plumbing.bodies(count))
            extra = ("--app", "benchmarks.task_app", "--queue", name) if kind == "call" else ()
            argv = plumbing.burst_worker_argv(config.url, name, config.queue_type, prefetch, *extra)
            run = plumbing.check(plumbing.run_timed(argv), f"kqueue-work, {kind} tasks, prefetch {prefetch}")
            if left := plumbing.remaining(config.url, name):
                raise RuntimeError(f"{name}: {left} tasks left")
            return {f"work_{kind}_p{prefetch}": count / run.seconds}
        finally:
            plumbing.delete_queues(config.url, queue.name, f"{queue.name}.dead")

    def lateness() -> dict[str, float]:
        name = plumbing.fresh_name("tasks-late")
        notes = Path(tempfile.mkdtemp(prefix="kqbench-late-")) / "late.txt"
        count = config.count(N_LATE, least=100)
        low, high = LATE_SPREAD
        now = time.time()
        dues = [now + low + (high - low) * index / count for index in range(count)]
        try:
            with App(config.url, name, queue_type=queue_type) as app:
                late = app.task(task_app.late.fn, name="late")
                messages = [late.message([due], delay=due - time.time()) for due in dues]
                app.publish(messages, name)
            argv = plumbing.kqueue_argv(
                "kqueue-work", config.url, name, config.queue_type, "--app", "benchmarks.task_app", "--quiet",
                "--max-tasks", str(count),
            )  # fmt: skip
            env = {**os.environ, "KQUEUE_BENCH_LATE": str(notes)}
            plumbing.check(plumbing.run_timed(argv, timeout=120, env=env), "kqueue-work, delayed tasks")
            values = sorted(float(line) for line in notes.read_text().split())
            if len(values) != count:
                raise RuntimeError(f"{name}: {len(values)} of {count} delayed tasks ran")
            if values[0] < 0:
                raise RuntimeError(f"{name}: a delayed task ran {-values[0]:.1f} ms early")
            return {"late_median_ms": statistics.median(values), "late_p99_ms": values[int(len(values) * 0.99)]}
        finally:
            plumbing.delete_queues(config.url, name, f"{name}.dead")

    steps = [
        Step("Sender.send_many, text tasks", partial(send, "text")),
        Step("FunctionTask.send_many, calls", partial(send, "call")),
        Step("Sender.send_many, delayed text tasks", partial(send, "delayed")),
    ]
    rows = [
        Row("tasks: send calls vs texts", "msg/s", "send_call", "send_text", Target("ratio>=", 0.9)),
        Row("tasks: send delayed vs immediate", "msg/s", "send_delayed", "send_text", Target("ratio>=", 0.5)),
    ]
    for prefetch in (1, 100):
        steps += [
            Step(f"kqueue-work, text tasks, prefetch {prefetch}", partial(drain, "text", prefetch)),
            Step(f"kqueue-work --app, calls, prefetch {prefetch}", partial(drain, "call", prefetch)),
        ]
        key = f"p{prefetch}"
        target = Target("ratio>=", 0.9)
        rows.append(Row(f"tasks: work calls vs texts, {key}", "msg/s", f"work_call_{key}", f"work_text_{key}", target))
    steps.append(Step("delayed tasks, how late", lateness))
    rows += [
        Row("tasks: delayed, lateness median", "ms", "late_median_ms", None, Target("kqueue<=", 50)),
        Row("tasks: delayed, lateness p99", "ms", "late_p99_ms", None, Target("kqueue<=", 1000)),
    ]
    notes = [
        f"N={n} (prefetch 1: N/{P1_DIVISOR}); calls are noop(index, text) with JSON arguments, texts the same "
        "bodies as the work figure; both confirmed; workers are subprocesses timed from start to exit",
        f"delayed sends wait {delay:g} s (on RabbitMQ through kqueue's chain of delay queues), longer than the "
        "send takes; the step then waits for them in the queue",
        f"lateness: {config.count(N_LATE, least=100)} calls sent at once, due evenly over {LATE_SPREAD[0]:g} to "
        f"{LATE_SPREAD[1]:g} s, one worker (prefetch 1); each notes how long after its time it started",
    ]
    return Figure("tasks", steps, rows, notes)


def _arrived(url: str, name: str, n: int, timeout: float) -> None:
    """Wait until `name` holds `n` messages: those sent, delayed ones included once due."""
    deadline = time.monotonic() + timeout
    while (there := plumbing.remaining(url, name)) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: {there} of {n} messages arrived")
        time.sleep(0.1)
