"""Where kqueue spends its time: cProfile of ``Sender.send_many`` or of a ``kqueue-work --burst`` process.

``python -m benchmarks.profiling send|work|raw-work [--broker URL] [-n N] [--prefetch P] [--concurrency C] [--top K]``
prints the top functions by cumulative and by self time. Only the main thread is profiled; use
``py-spy record --threads`` for the handler threads.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

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


def profile_work(url: str, n: int, out: Path, argv: list[str]) -> None:
    name = plumbing.fresh_name("profile-work")
    try:
        plumbing.prefill(url, plumbing.raw_queue(name), plumbing.bodies(n))
        command = [plumbing.PYTHON, "-m", "cProfile", "-o", str(out), *argv, "--broker", url, "--queue", name]
        plumbing.check(plumbing.run_timed(command), "profiled worker")
    finally:
        plumbing.delete_queues(url, name)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiling")
    parser.add_argument("what", choices=["send", "work", "raw-work"])
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("-n", type=int, default=20_000, help="messages (default 20000)")
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="keep the profile here (pstats format)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="kqbench-profile-")) / f"{args.what}.prof"
    if args.what == "send":
        profile_send(args.broker, args.n, out)
    elif args.what == "work":
        worker = [plumbing.tool("kqueue-work"), "--burst", "--quiet", "--dot-seconds", "0"]
        worker += ["--prefetch", str(args.prefetch), "--concurrency", str(args.concurrency)]
        profile_work(args.broker, args.n, out, worker)
    else:
        profile_work(args.broker, args.n, out, ["-m", "benchmarks.raw_consumer", "--prefetch", str(args.prefetch)])
    stats = pstats.Stats(str(out))
    print(f"profile: {out}")
    for key in ("cumulative", "tottime"):
        print(f"\n=== top {args.top} by {key} ===")
        stats.sort_stats(key).print_stats(args.top)


if __name__ == "__main__":
    main()
