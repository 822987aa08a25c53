"""Where kqueue spends its time: cProfile of ``Sender.send_many`` or of a ``kqueue-work --burst`` process.

``python -m benchmarks.profiling send|work|raw-work [--broker URL] [-n N] [--prefetch P] [--concurrency C] [--top K]``
prints the top functions by cumulative and by self time. The worker's profile covers the threads
that run its loop (`benchmarks.profiled_worker`); use ``py-spy record --threads`` for handler threads.

``python -m benchmarks.profiling instructions [-n N] [--prefetch P]`` counts, under valgrind's
callgrind, the instructions a task costs ``kqueue-work --burst`` and the raw Kombu consumer: each
on N tasks less an empty run. Unlike a rate, the count hardly moves with the machine's load.

``python -m benchmarks.profiling handoff [-n N]`` times what a task's trip to a handler thread and
back costs the worker, with no broker: a put on the thread's queue, then a write to the pipe the
connection thread waits on in select().
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import select
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from queue import SimpleQueue

from benchmarks import plumbing
from kqueue.brokers import connect
from kqueue.producer import Sender
from kqueue.queues import task_queue


def profile_send(url: str, n: int, out: Path) -> None:
    name = plumbing.fresh_name("profile-send")
    texts = [body.decode() for body in plumbing.bodies(n)]
    try:
        with connect(url) as conn, Sender(conn, task_queue(name)) as sender:
            profiler = cProfile.Profile()
            profiler.enable()
            sender.send_many(texts)
            profiler.disable()
            profiler.dump_stats(out)
    finally:
        plumbing.delete_queues(url, name)


#: Where a profiled command's argument list takes the profile's path.
OUT = "{out}"


def profile_work(url: str, n: int, out: Path, argv: list[str]) -> None:
    name = plumbing.fresh_name("profile-work")
    try:
        plumbing.prefill(url, plumbing.raw_queue(name), plumbing.bodies(n))
        command = [
            plumbing.PYTHON,
            *(str(out) if arg == OUT else arg for arg in argv),
            "--broker",
            url,
            "--queue",
            name,
        ]
        plumbing.check(plumbing.run_timed(command), "profiled worker")
    finally:
        plumbing.delete_queues(url, name)


def instructions(url: str, n: int, argv: list[str]) -> tuple[float, int]:
    """Instructions per task of the command `argv` on `url` (N tasks less none), and of the empty run."""

    def counted(count: int) -> int:
        name = plumbing.fresh_name("instructions")
        try:
            plumbing.prefill(url, plumbing.raw_queue(name), plumbing.bodies(count))
            command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv]
            done = subprocess.run([*command, "--broker", url, "--queue", name], capture_output=True, text=True)
            found = re.search(r"Collected : (\d+)", done.stderr)
            if done.returncode or found is None:
                raise SystemExit(f"callgrind of {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
            return int(found.group(1))
        finally:
            plumbing.delete_queues(url, name)

    empty = counted(0)
    return (counted(n) - empty) / n, empty


def handoff(n: int) -> float:
    """Microseconds per round trip: connection thread -> handler thread -> connection thread."""
    jobs: SimpleQueue[int | None] = SimpleQueue()
    read_end, write_end = os.pipe()

    def handler_thread() -> None:
        while jobs.get() is not None:
            os.write(write_end, b"!")

    thread = threading.Thread(target=handler_thread, daemon=True)
    thread.start()
    start = time.perf_counter()
    for i in range(n):
        jobs.put(i)
        select.select([read_end], [], [], 1.0)
        os.read(read_end, 64)
    seconds = time.perf_counter() - start
    jobs.put(None)
    thread.join()
    os.close(read_end)
    os.close(write_end)
    return seconds / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiling")
    parser.add_argument("what", choices=["send", "work", "raw-work", "handoff", "instructions"])
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("-n", type=int, default=20_000, help="messages (default 20000)")
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="keep the profile here (pstats format)")
    args = parser.parse_args()
    if args.what == "instructions":
        kq = [
            plumbing.tool("kqueue-work"),
            "--burst",
            "--quiet",
            "--dot-seconds",
            "0",
            "--prefetch",
            str(args.prefetch),
        ]
        raw = [plumbing.PYTHON, "-m", "benchmarks.raw_consumer", "--prefetch", str(args.prefetch)]
        (kq_task, kq_empty), (raw_task, raw_empty) = (
            instructions(args.broker, args.n, kq),
            instructions(args.broker, args.n, raw),
        )
        print(f"instructions per task, {args.n} tasks at prefetch {args.prefetch}, less an empty run:")
        print(f"  kqueue-work  {kq_task:12,.0f}  (empty run {kq_empty:,})")
        print(f"  raw Kombu    {raw_task:12,.0f}  (empty run {raw_empty:,})")
        print(f"  ratio        {kq_task / raw_task:12.2f}x")
        return
    if args.what == "handoff":
        trips = [handoff(args.n) for _ in range(5)]
        print(f"thread hand-off round trip: median {statistics.median(trips):.1f} us (of 5 runs of {args.n}: ", end="")
        print(", ".join(f"{trip:.1f}" for trip in trips) + ")")
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="kqbench-profile-")) / f"{args.what}.prof"
    if args.what == "send":
        profile_send(args.broker, args.n, out)
    elif args.what == "work":
        worker = ["-m", "benchmarks.profiled_worker", OUT, "--burst", "--quiet", "--dot-seconds", "0"]
        worker += ["--prefetch", str(args.prefetch), "--concurrency", str(args.concurrency)]
        profile_work(args.broker, args.n, out, worker)
    else:
        raw = ["-m", "cProfile", "-o", OUT, "-m", "benchmarks.raw_consumer", "--prefetch", str(args.prefetch)]
        profile_work(args.broker, args.n, out, raw)
    stats = pstats.Stats(str(out))
    print(f"profile: {out}")
    for key in ("cumulative", "tottime"):
        print(f"\n=== top {args.top} by {key} ===")
        stats.sort_stats(key).print_stats(args.top)


if __name__ == "__main__":
    main()
