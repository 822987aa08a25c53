"""Figure: the worker with `kqueue web` open beside it, against the worker alone, in the same run.

The page is served by a real ``kqueue web`` process, and read as an open page
reads it: htmx asks for the queues part and each queue's dead letters every
`kqueue.web.board.REFRESH` seconds. Here a thread of the benchmark asks, at the
same pace and for the same parts, and checks each answer; the broker load is the
page's, whatever shows it.
"""

from __future__ import annotations

import html
import re
import subprocess
import threading
import time
import urllib.request
from functools import partial

from benchmarks import plumbing
from benchmarks.core import Config, Figure, Row, Step, Target
from kqueue.web.board import REFRESH

N = 100_000
#: Prefetch 1 works N / 5 messages (a round trip each).
P1_DIVISOR = 5


class OpenPage:
    """``kqueue web`` on `url`, showing `queue`, read every `REFRESH` seconds until `close`."""

    def __init__(self, url: str, queue: str) -> None:
        # The shared options before the command: `kqueue --queue NAME web` shows that queue alone.
        argv = plumbing.kqueue_argv("kqueue", url, queue, "classic", "web", "--port", "0")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        address = None
        deadline = time.monotonic() + 30
        while address is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"kqueue web exited {self.proc.returncode}")
            found = re.search(r"kqueue web: (http://\S+/) for ", line)
            address = found.group(1) if found else None
        if address is None:
            raise RuntimeError("kqueue web did not say where it listens")
        self.parts = [f"{address}parts/queues", f"{address}parts/dead?queue={queue}"]
        # htmx sends the page's CSRF token with every refresh of its parts: so does this reader.
        from kqueue.web.server import CSRF_HEADER  # the web extra's: only this figure needs it

        with urllib.request.urlopen(address, timeout=10) as reply:
            token = re.search(r'"X-KQueue-CSRF": "([^"]+)"', html.unescape(reply.read().decode()))
        if token is None:
            raise RuntimeError("kqueue web's page holds no CSRF token")
        self.headers = {CSRF_HEADER: token.group(1)}
        self.reads = 0
        self._stop = threading.Event()
        self._read_once = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # Open before the worker starts, as a page left open is: its first reading done.
        if not self._read_once.wait(30):
            raise RuntimeError("kqueue web did not answer within 30 s")

    def _read(self) -> None:
        while not self._stop.is_set():
            for part in self.parts:
                with urllib.request.urlopen(urllib.request.Request(part, headers=self.headers), timeout=10) as reply:
                    if reply.status not in (200, 204):
                        raise RuntimeError(f"{part}: {reply.status}")
                    reply.read()
            self.reads += 1
            self._read_once.set()
            self._stop.wait(REFRESH)

    def close(self) -> None:
        self._stop.set()
        self._reader.join(15)
        self.proc.terminate()
        self.proc.wait(15)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def figure(config: Config) -> Figure:
    n = config.count(N)

    def drain(prefetch: int, *, with_page: bool) -> dict[str, float]:
        count = n // (P1_DIVISOR if prefetch == 1 else 1)
        name = plumbing.fresh_name("web")
        page = None
        try:
            plumbing.prefill(config.url, plumbing.raw_queue(name, config.queue_type), plumbing.bodies(count))
            page = OpenPage(config.url, name) if with_page else None
            argv = plumbing.burst_worker_argv(config.url, name, config.queue_type, prefetch)
            run = plumbing.check(plumbing.run_timed(argv), f"kqueue-work, prefetch {prefetch}")
            if page is not None and page.reads < 2 and run.seconds > REFRESH:
                raise RuntimeError(f"the page was read {page.reads} times while the worker ran")
            if left := plumbing.remaining(config.url, name):
                raise RuntimeError(f"{name}: {left} tasks left")
            return {f"work_p{prefetch}_{'page' if with_page else 'alone'}": count / run.seconds}
        finally:
            if page is not None:
                page.close()
            plumbing.delete_queues(config.url, name, f"{name}.dead")

    steps, rows = [], []
    for prefetch in (1, 100):
        steps += [
            Step(f"kqueue-work, prefetch {prefetch}, alone", partial(drain, prefetch, with_page=False)),
            Step(f"kqueue-work, prefetch {prefetch}, kqueue web open", partial(drain, prefetch, with_page=True)),
        ]
        rows.append(
            Row(
                f"web: work p{prefetch} with the page open vs alone",
                "msg/s",
                f"work_p{prefetch}_page",
                f"work_p{prefetch}_alone",
                Target("ratio>=", 0.95),
            )
        )
    notes = [
        f"N={n} (prefetch 1: N/{P1_DIVISOR}); one kqueue-work --burst, timed from start to exit; the page "
        f"(a kqueue web process) read every {REFRESH:g} s for its queues and dead-letter parts while it runs"
    ]
    return Figure("web", steps, rows, notes)
