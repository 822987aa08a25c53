"""kqueue: RabbitMQ's "Work Queues" pattern on Kombu, done so that no task is lost.

A producer (`kqueue.producer.Sender`) publishes each task as a persistent
`text/plain` message to a durable queue defined once in `kqueue.queues`, and
returns only when the broker has confirmed it. Workers (`kqueue.worker.Worker`,
a Kombu `ConsumerMixin`) share the queue: each takes `prefetch` tasks at a
time, runs the handler (`kqueue.handlers`) on a thread of its own while the
connection thread keeps the connection alive, and acks a task only once its
handler returned; tasks that fail are retried, then moved to ``<queue>.dead``.
The same code runs on RabbitMQ, Redis and Kombu's in-memory transport
(`kqueue.testing`), chosen by URL (`kqueue.brokers`); `kqueue.cli` holds the
``kqueue-send``, ``kqueue-work`` and ``kqueue`` commands.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

__version__ = "0.1.0"

# ``sqlite://`` (kqueue.sqlite) for every Kombu connection once kqueue is
# imported; the module itself loads only when such a URL is used.
TRANSPORT_ALIASES.setdefault("sqlite", "kqueue.sqlite:Transport")

__all__ = ["__version__"]
