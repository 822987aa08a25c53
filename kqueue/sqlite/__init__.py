"""``sqlite://``: a Kombu transport on one SQLite file, where tasks stay until acked, shared by one machine.

``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` (SQLAlchemy's slashes);
``?busy_timeout=SECONDS`` (default 10) and ``?confirm_batch=N`` (default 500) in
the query string (`options`). Importing this package registers the ``sqlite`` scheme with Kombu.

The parts, and how they keep the promises:

- `store`: each transaction a short method with its SQL. A delivery is a claim:
  one ``UPDATE ... RETURNING`` sets the row's owner and counts the delivery;
  nothing is deleted until the ack. A requeue, a closed channel or connection
  give the row back at once, in its place. A delayed message is a row of its
  own table until it is due; the claim that finds it due moves it to the back
  of its queue, and an idle consumer waits no longer than that.
- `owners`: each connection that claims rows is an owner holding an exclusive
  ``flock`` on ``<db>.owners/<owner>.lock``. The kernel drops the lock when the
  process dies, however it dies; an idle consumer looks for owners whose lock
  it can take (at most every 0.5 s) and gives their rows back, flagged
  redelivered. A slow owner that is alive keeps its lock, so it is never
  robbed. Every commit that makes rows ready sends a byte to each owner's
  datagram socket, which an idle consumer waits on.
- `failures`: the one place that decides what a failed write means. A lock
  held past ``busy_timeout``, a full disk, a disk I/O error: nothing was
  written, what waits in memory keeps waiting, and a consumer retries with a
  growing pause, keeping its rows. A publish that failed is never confirmed.
- `schema`: files carry kqueue's ``application_id`` and a schema version; a
  foreign database or a newer kqueue's is refused in one line, untouched.
  Publishes commit with ``synchronous=FULL`` (fsync) in WAL mode; the pages of
  deleted rows go back to the disk.
- `transport`: the Kombu channel and transport. In confirm mode
  (`Channel.confirm_select`) publishes are committed in batches and confirmed
  like AMQP publisher confirms, only once on disk. A file removed or replaced
  under a process is noticed within a second, and the new one opened.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

from kqueue.sqlite.failures import DatabaseBusy, DiskFull, FileReplaced, StoreUnavailable
from kqueue.sqlite.options import Options, path_of
from kqueue.sqlite.transport import (
    Channel,
    Transport,
    consumer_labels,
    delayed_count,
    due_in,
    published_count,
    queue_names,
    queue_stats,
    wake_fd,
)

__all__ = [
    "Channel",
    "DatabaseBusy",
    "DiskFull",
    "FileReplaced",
    "Options",
    "StoreUnavailable",
    "Transport",
    "consumer_labels",
    "delayed_count",
    "due_in",
    "path_of",
    "published_count",
    "queue_names",
    "queue_stats",
    "wake_fd",
]

TRANSPORT_ALIASES["sqlite"] = "kqueue.sqlite:Transport"
