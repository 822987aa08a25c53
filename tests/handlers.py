"""Handlers the tests load by their import path, as users' own would be."""

from __future__ import annotations

SEEN: list[str] = []


def record(text: str) -> None:
    SEEN.append(text)


def fail(text: str) -> None:
    raise RuntimeError(f"cannot handle {text!r}")


def slow_once(text: str) -> None:
    """Slow (8 s) the first time it sees a task, quick after: for tasks that outlive a timeout once."""
    import os
    import time
    from pathlib import Path

    marker = Path(os.environ["KQUEUE_TEST_MARKERS"]) / text
    if not marker.exists():
        marker.touch()
        time.sleep(float(os.environ.get("KQUEUE_TEST_SLOW", "8")))


def die(text: str) -> None:
    """Kill the worker process outright, as a segfault or the OOM killer would."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def fail_bad(text: str) -> None:
    """Fail the tasks whose text starts with 'bad'; do the rest."""
    if text.startswith("bad"):
        raise RuntimeError(f"cannot handle {text!r}")


def chaos_record(text: str) -> None:
    """Record this run's start and end in a file of this process's own, with a short pause between."""
    import os
    import time
    from pathlib import Path

    log = Path(os.environ["KQUEUE_TEST_RECORDS"]) / f"{os.getpid()}.log"
    with log.open("a") as out:
        out.write(f"start {text}\n")
        out.flush()
        time.sleep(0.01)
        out.write(f"done {text}\n")


def record_pid(text: str) -> None:
    """Log 'start TEXT PID' and, after a tenth of a second per '.', 'done TEXT PID' to the file $KQUEUE_TEST_PIDS."""
    import os
    import time

    def note(what: str) -> None:
        with open(os.environ["KQUEUE_TEST_PIDS"], "a", encoding="utf-8") as log:
            log.write(f"{what} {text} {os.getpid()}\n")

    note("start")
    time.sleep(text.count(".") * 0.1)
    note("done")


def stamp(text: str) -> None:
    """Print 'ran TEXT AT', AT the Unix time it started: for checking when delayed tasks run."""
    import time

    print(f"ran {text} {time.time():.6f}", flush=True)


def fail_first(text: str) -> None:
    """Fail a task the first time this folder of markers ($KQUEUE_TEST_MARKERS) sees it; do it after."""
    import os
    from pathlib import Path

    marker = Path(os.environ["KQUEUE_TEST_MARKERS"]) / text
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"first try of {text!r}")
