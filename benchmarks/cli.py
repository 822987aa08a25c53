"""``python -m benchmarks``: run the figures against a broker, interleaved, and print the table."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kqueue
from benchmarks import fleet, idle, latency, memory, oneshot, plumbing, send, sqlite_run, tasks, web, work
from benchmarks.core import Config, Figure, format_table, row_result, run_figure
from kqueue.brokers import mask

#: The kqueue being measured: the child processes import the same one only if they get the same sys.path.
KQUEUE_SOURCE = Path(kqueue.__file__).resolve().parent
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"

#: Every figure, in the order they run: name -> builder.
FIGURES: dict[str, Callable[[Config, int], Figure]] = {
    "send": lambda config, rounds: send.figure(config),
    "work": lambda config, rounds: work.figure(config),
    "latency": lambda config, rounds: latency.figure(config),
    "idle": lambda config, rounds: idle.figure(config),
    "memory": lambda config, rounds: memory.figure(config),
    "oneshot": oneshot.figure,
    "fleet": lambda config, rounds: fleet.figure(config),
    "tasks": lambda config, rounds: tasks.figure(config),
    "web": lambda config, rounds: web.figure(config),
}
#: The figures --queue-type applies to; the others always use a classic queue (or none).
TYPED = {"send", "work", "memory", "fleet", "tasks", "web"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="kqueue against raw Kombu baselines, measured interleaved in the same run.",
    )
    parser.add_argument("--broker", default=DEFAULT_URL, metavar="URL", help=f"broker URL (default {DEFAULT_URL})")
    parser.add_argument("--rounds", type=int, default=3, metavar="N", help="rounds of A B A B (default 3)")
    parser.add_argument("--scale", type=float, default=1.0, metavar="F", help="multiplies message counts (default 1)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH", help="where the raw figures go")
    parser.add_argument(
        "--only", default=",".join(FIGURES), metavar="NAME,...", help=f"figures to run, of: {', '.join(FIGURES)}"
    )
    parser.add_argument("--queue-type", choices=["classic", "quorum"], default="classic", help="for send, work, memory")
    parser.add_argument(
        "--reference",
        default=sqlite_run.DEFAULT_REFERENCE,
        metavar="URL",
        help="with a sqlite:// broker: kqueue's figures on this RabbitMQ, measured alongside ('none' to skip)",
    )
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    if args.rounds < 1 or args.scale <= 0:
        parser.error("--rounds must be at least 1 and --scale above 0")
    return args


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    with sqlite_run.prepared(args.broker, args.scale, args.queue_type, args.reference, _log) as config:
        _run(args, argv, config)


def _run(args: argparse.Namespace, argv: list[str] | None, config: Config) -> None:
    where = mask(args.broker)
    log = _log

    log(f"benchmarks: broker {where}, rounds {args.rounds}, scale {args.scale:g}, queue type {args.queue_type}")
    log(f"benchmarks: kqueue from {KQUEUE_SOURCE} (PYTHONPATH and the working directory decide)")
    started = time.time()
    results: list[dict[str, Any]] = []
    figures: dict[str, Any] = {}
    for name in args.only:
        figure = FIGURES[name](config, args.rounds)
        log(f"{name}: {'; '.join(figure.notes)}")
        begun = time.perf_counter()
        series = run_figure(figure, args.rounds, log, lambda: plumbing.wait_for_broker(config.url))
        rows = [row_result(row, series) for row in figure.rows]
        results += rows
        figures[name] = {
            "notes": figure.notes,
            "series": series,
            "rows": rows,
            "seconds": time.perf_counter() - begun,
        }
    report = {
        "broker": where,
        "rounds": args.rounds,
        "scale": args.scale,
        "queue_type": args.queue_type,
        "queue_type_applies_to": sorted(TYPED),
        "baseline_broker": mask(config.baseline),
        "reference_broker": None if config.reference_url is None else mask(config.reference_url),
        "command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": time.time() - started,
        "python": platform.python_version(),
        "versions": _versions(),
        "kqueue_source": str(KQUEUE_SOURCE),
        "figures": figures,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"broker {where}  rounds {args.rounds}  scale {args.scale:g}  queue type {args.queue_type}")
    print(f"kqueue {KQUEUE_SOURCE}")
    if config.sqlite:
        reference = "none" if config.reference_url is None else mask(config.reference_url)
        print(f"baselines: raw Kombu on sqla+sqlite (a file of its own), plain sqlite3; kqueue on {reference}")
    print(format_table(results))
    for name, figure in figures.items():
        for note in figure["notes"]:
            print(f"  [{name}] {note}")
    unmet = [row["label"] for row in results if row["met"] is False]
    print(f"targets met: {sum(row['met'] is True for row in results)}, not met: {len(unmet)}")
    print(f"raw figures: {args.json}  ({report['seconds']:.0f} s)")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("kqueue", "kombu", "amqp", "redis", "click", "sqlalchemy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "-"
    return found
