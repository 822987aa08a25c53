"""A run on ``sqlite://``: fresh database files in a folder of their own, removed afterwards.

The folder is made beside the file the URL names (so on the same file system, whose
fsync is what a confirm costs), and holds kqueue's file, Kombu's ``sqla+sqlite://``
baseline file and the plain ``sqlite3`` ceiling's file.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks import plumbing
from benchmarks.core import Config
from kqueue.brokers import mask
from kqueue.sqlite import path_of

#: kqueue's own figures on RabbitMQ, measured in the same run for comparison.
DEFAULT_REFERENCE = "amqp://guest:guest@127.0.0.1:5672//"


@contextlib.contextmanager
def prepared(
    url: str, scale: float, queue_type: str, reference: str | None, log: Callable[[str], None]
) -> Iterator[Config]:
    """The `Config` of a run on `url`; a plain one, and nothing made, unless `url` is ``sqlite://``."""
    if not plumbing.is_sqlite_url(url):
        yield Config(url, scale, queue_type)
        return
    given = path_of(url)
    made = not given.parent.exists()
    given.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="kqbench-", dir=given.parent))
    try:
        query = urlsplit(url).query
        config = Config(
            url=f"sqlite:///{folder / given.name}" + (f"?{query}" if query else ""),
            scale=scale,
            queue_type=queue_type,
            baseline_url=f"sqla+sqlite:///{folder / 'sqla.db'}",
            reference_url=_reference(reference, log),
            plain_db=str(folder / "plain.db"),
        )
        log(f"benchmarks: fresh files in {folder} (removed afterwards): kqueue {config.url}")
        log(f"benchmarks: baselines: raw Kombu on {config.baseline}, plain sqlite3 on {config.plain_db}")
        yield config
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                given.parent.rmdir()


def _reference(url: str | None, log: Callable[[str], None]) -> str | None:
    if not url or url == "none":
        log("benchmarks: no RabbitMQ reference (--reference none)")
        return None
    why = plumbing.reachable(url)
    if why is not None:
        log(f"benchmarks: RabbitMQ reference {mask(url)} not reachable ({why}): its rows are left out")
        return None
    log(f"benchmarks: kqueue on {mask(url)} measured alongside, for reference")
    return url
