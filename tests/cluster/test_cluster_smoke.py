"""A quorum queue keeps every confirmed message when the node leading it crashes, with plain Kombu."""

from __future__ import annotations

import time
import uuid

import pytest
from amqp.exceptions import AMQPError
from kombu import Connection, Exchange, Queue
from kombu.exceptions import OperationalError

from tests.conftest import wait_for

from .cluster import Cluster

# broker too: it needs real RabbitMQ, and `pytest -m "not broker"` is the memory suite, in seconds.
pytestmark = [pytest.mark.cluster, pytest.mark.broker]

MESSAGES = 100
#: What a consumer may meet right after a crash: a refused or reset socket, a closed
#: connection, or RabbitMQ's ``541 INTERNAL_ERROR ... timed out consuming from quorum
#: queue`` while the queue elects its new leader (py-amqp raises it as a connection error).
CONSUME_ERRORS = (OSError, AMQPError, OperationalError)


def quorum_queue(name: str) -> Queue:
    return Queue(
        name,
        Exchange(""),
        routing_key=name,
        durable=True,
        auto_delete=False,
        queue_arguments={"x-queue-type": "quorum"},
    )


def publish(url: str, queue: Queue, bodies: list[str]) -> None:
    """Publish persistent messages, each confirmed by the broker before the next goes."""
    with Connection(url, connect_timeout=5, transport_options={"confirm_publish": True}) as conn:
        conn.ensure_connection(max_retries=3, interval_start=0, interval_step=0.5, interval_max=1)
        queue(conn.default_channel).declare()
        producer = conn.Producer(serializer="json")
        for body in bodies:
            producer.publish(body, routing_key=queue.name, delivery_mode=2)


def consume(url: str, queue: Queue, expected: set[str], timeout: float) -> tuple[list[str], list[str], set[int]]:
    """Consume and ack until every expected body arrived, on fresh connections after any error.

    Returns the bodies in arrival order (a redelivery shows twice), the errors
    met on the way, and the AMQP ports of the nodes the consumer was on.
    """
    received: list[str] = []
    errors: list[str] = []
    ports: set[int] = set()
    deadline = time.monotonic() + timeout

    def on_message(body: str, message: object) -> None:
        received.append(body)
        message.ack()  # type: ignore[attr-defined]

    while not expected <= set(received):
        if time.monotonic() > deadline:
            missing = len(expected - set(received))
            raise AssertionError(f"{missing} messages not consumed in {timeout}s; errors: {errors}")
        try:
            with Connection(url, connect_timeout=5) as conn:
                conn.ensure_connection(max_retries=3, interval_start=0, interval_step=0.5, interval_max=1)
                ports.add(conn.connection.sock.getpeername()[1])
                with conn.Consumer(queue, accept=["json"], prefetch_count=20, callbacks=[on_message]):
                    while not expected <= set(received) and time.monotonic() < deadline:
                        try:
                            conn.drain_events(timeout=1)
                        except TimeoutError:
                            continue
        except CONSUME_ERRORS as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return received, errors, ports


def messages_ready(url: str, queue: Queue) -> int:
    with Connection(url, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=3, interval_start=0, interval_step=0.5, interval_max=1)
        return int(queue(conn.default_channel).queue_declare(passive=True).message_count)


def online_members(cluster: Cluster, name: str) -> list[int]:
    """The nodes on which quorum queue `name` has a running replica."""
    for row in cluster.queues("name", "online"):
        if row["name"] == name:
            return sorted(cluster.index_of(node) for node in row["online"])
    raise LookupError(name)


def test_confirmed_messages_survive_the_leader_crashing(cluster: Cluster) -> None:
    assert cluster.running() == [1, 2, 3]  # a quorum queue declared now gets a replica on every node
    queue = quorum_queue(f"smoke-{uuid.uuid4().hex[:8]}")
    bodies = [f"task {n}" for n in range(MESSAGES)]

    publish(cluster.url, queue, bodies)

    assert messages_ready(cluster.url, queue) == MESSAGES
    assert online_members(cluster, queue.name) == [1, 2, 3]
    leader = cluster.leader(queue.name)
    cluster.kill(leader)
    survivors = [i for i in cluster.indexes if i != leader]

    received, errors, ports = consume(cluster.url, queue, set(bodies), timeout=60)

    assert set(received) == set(bodies), f"lost: {sorted(set(bodies) - set(received))}"
    assert ports <= {cluster.ports[i] for i in survivors}
    assert messages_ready(cluster.url, queue) == 0
    new_leader = wait_for(lambda: _leader_or_none(cluster, queue.name), timeout=30, message="a new leader")
    assert new_leader in survivors

    cluster.start(leader)

    assert cluster.running() == [1, 2, 3]
    wait_for(lambda: online_members(cluster, queue.name) == [1, 2, 3], timeout=30, message="the replica back")
    assert cluster.connections(leader) == 0
    if errors:
        print(f"consume retried after: {errors}")


def _leader_or_none(cluster: Cluster, name: str) -> int | None:
    try:
        return cluster.leader(name)
    except LookupError:
        return None
