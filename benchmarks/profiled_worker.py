"""``kqueue-work`` with cProfile on every thread that runs the worker's loop, for `benchmarks.profiling`.

``python -m benchmarks.profiled_worker OUT [kqueue-work options]``: one task at a time, the loop and
the tasks run on the ``kqueue-connection`` thread (and on ``kqueue-keeper`` while a task runs long);
with more at a time, on the main thread. Their profiles are merged into OUT (pstats format).
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
from pathlib import Path

from kqueue.cli.work import work_main

PROFILED = ("MainThread", "kqueue-connection", "kqueue-keeper")


def main() -> None:
    out = Path(sys.argv[1])
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    run = threading.Thread.run

    def profiled_run(thread: threading.Thread) -> None:
        if thread.name not in PROFILED:
            run(thread)
            return
        profile = cProfile.Profile()
        with lock:
            profiles.append(profile)
        profile.runcall(run, thread)

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    main_profile = cProfile.Profile()
    profiles.append(main_profile)
    sys.argv = ["kqueue-work", *sys.argv[2:]]
    try:
        main_profile.runcall(work_main)
    except SystemExit:
        pass
    finally:
        with lock:
            stats = pstats.Stats(profiles[0])
            for profile in profiles[1:]:
                profile.create_stats()
                if profile.stats:  # type: ignore[attr-defined]
                    stats.add(profile)
        stats.dump_stats(out)


if __name__ == "__main__":
    main()
