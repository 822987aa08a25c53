"""kqueue: RabbitMQ's "Work Queues" pattern on Kombu, done so that no task is lost.

Tasks are texts (the tutorial's) or calls of Python functions registered
with a `kqueue.App` (``@app.task``), their arguments sent as JSON. A
producer (`kqueue.producer.Sender`) publishes each task as a persistent
message to a durable queue defined once in `kqueue.queues`, and returns only
when the broker has confirmed it. Workers (`kqueue.worker.Worker`, a Kombu
`ConsumerMixin`) share the queue: each takes `prefetch` tasks at a time,
runs the handler (`kqueue.handlers`) on a thread of its own while the
connection thread keeps the connection alive, and acks a task only once its
handler returned; tasks that fail are retried, then moved to ``<queue>.dead``.
The same code runs on RabbitMQ, Redis, SQLite and Kombu's in-memory transport
(`kqueue.testing`), chosen by URL (`kqueue.brokers`); every one keeps delayed
tasks itself until they are due (`kqueue.delays`). `kqueue.cli` holds the
``kqueue-send``, ``kqueue-work`` and ``kqueue`` commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kombu.transport import TRANSPORT_ALIASES

__version__ = "0.1.0"

# ``sqlite://`` (kqueue.sqlite) for every Kombu connection once kqueue is
# imported; the module itself loads only when such a URL is used.
TRANSPORT_ALIASES.setdefault("sqlite", "kqueue.sqlite:Transport")

__all__ = ["App", "Args", "FunctionTask", "__version__"]

if TYPE_CHECKING:
    from kqueue.app import App, Args, FunctionTask


def __getattr__(name: str) -> Any:
    # `App` loads Kombu's connection machinery: only when it is asked for, so
    # that ``import kqueue`` (every tool and worker process does) stays light.
    if name in ("App", "Args", "FunctionTask"):
        from kqueue import app

        return getattr(app, name)
    raise AttributeError(f"module 'kqueue' has no attribute {name!r}")
