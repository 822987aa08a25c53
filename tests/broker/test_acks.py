"""The worker's ack of a run of deliveries, written to RabbitMQ as one prepared frame."""

from __future__ import annotations

import pytest
from kombu import Connection, Consumer, Producer

from kqueue.brokers import ack_up_to
from kqueue.queues import task_queue

from ..conftest import delete_queues, unique, wait_for


@pytest.mark.broker
def test_an_ack_up_to_a_delivery_acks_it_and_those_before_it_and_no_other(amqp_url: str) -> None:
    queue = task_queue(unique("ack-up-to"))
    try:
        with Connection(amqp_url) as conn:
            channel = conn.channel()
            producer = Producer(channel)
            for text in ("one", "two", "three"):
                producer.publish(text, routing_key=queue.name, declare=[queue], delivery_mode=2)
            received = []
            consumer = Consumer(channel, [queue], on_message=received.append, prefetch_count=3, accept=["text/plain"])
            with consumer:
                wait_for(lambda: conn.drain_events(timeout=1) or len(received) == 3, message="three deliveries")
                sent = conn.connection.bytes_sent

                # When the second is acked with those before it
                ack_up_to(received[1])

                # Then py-amqp counted it as sent, so that no heartbeat is owed for the moment, and the
                # broker took the frame: a synchronous call on the channel still answers
                assert conn.connection.bytes_sent == sent + 1
                assert queue(channel).queue_declare(passive=True).message_count == 0
                assert received[1].acknowledged
        # Once the connection is gone, only the third comes back
        with Connection(amqp_url) as conn:
            assert wait_for(lambda: queue(conn.channel()).queue_declare(passive=True).message_count == 1)
            assert conn.SimpleQueue(queue).get(timeout=5).payload == "three"
    finally:
        delete_queues(amqp_url, queue.name, f"{queue.name}.dead")
