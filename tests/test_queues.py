"""The queue's one definition, and how a broker's refusal of it is told to the user."""

from __future__ import annotations

from kombu import Connection

from kqueue.errors import QueueMismatch, is_ack_timeout, queue_mismatch
from kqueue.producer import send
from kqueue.queues import QueueType, dead_letter_queue, declare, messages_ready, task_queue


def test_classic_queue_is_the_tutorials_durable_queue_on_the_default_exchange() -> None:
    queue = task_queue("task_queue")

    assert queue.durable is True
    assert queue.auto_delete is False
    assert queue.exchange.name == ""
    assert queue.routing_key == "task_queue"
    # No arguments at all, so a queue declared by the tutorial's own code is the same queue.
    assert not queue.queue_arguments


def test_quorum_queue_carries_its_type() -> None:
    queue = task_queue("jobs", QueueType.QUORUM)

    assert queue.durable is True
    assert queue.queue_arguments == {"x-queue-type": "quorum"}


def test_dead_letter_queue_is_named_after_its_queue_and_of_the_same_type() -> None:
    dead = dead_letter_queue(task_queue("jobs", QueueType.QUORUM))

    assert dead.name == "jobs.dead"
    assert dead.durable is True
    assert dead.queue_arguments == {"x-queue-type": "quorum"}


def test_declare_and_count_on_memory(memory_conn: Connection) -> None:
    queue = task_queue("declared-once")
    declare(memory_conn, queue)
    send(memory_conn, queue, ["a", "b"])

    assert messages_ready(memory_conn.default_channel, queue) == 2


def test_a_non_durable_queue_is_named_with_the_way_out() -> None:
    refusal = Exception(
        "Queue.declare: (406) PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'hello' "
        "in vhost '/': received 'true' but current is 'false'"
    )

    mismatch = queue_mismatch(refusal)

    assert isinstance(mismatch, QueueMismatch)
    assert "'hello' already exists and is not durable" in str(mismatch)
    assert "rabbitmqctl delete_queue hello" in str(mismatch)


def test_a_quorum_queue_points_to_the_matching_option() -> None:
    refusal = Exception(
        "Queue.declare: (406) PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue "
        "'task_queue' in vhost '/': received none but current is the value 'quorum' of type 'longstr'"
    )

    assert "use --queue-type quorum" in str(queue_mismatch(refusal))


def test_a_classic_queue_points_to_the_matching_option() -> None:
    refusal = Exception(
        "Queue.declare: (406) PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue "
        "'jobs' in vhost '/': received the value 'quorum' of type 'longstr' but current is none"
    )

    message = str(queue_mismatch(refusal))
    assert "already exists as a classic queue" in message
    assert "use --queue-type classic" in message


def test_another_argument_is_named() -> None:
    refusal = Exception(
        "Queue.declare: (406) PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue "
        "'jobs' in vhost '/': received none but current is the value '10' of type 'signedint'"
    )

    assert "x-max-length=10" in str(queue_mismatch(refusal))


def test_the_ack_timeout_is_not_a_mismatch() -> None:
    timeout = Exception(
        "Basic.ack: (406) PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. "
        "Timeout value used: 1800000 ms. This timeout value can be configured, see consumers doc "
        "guide to learn more"
    )

    assert queue_mismatch(timeout) is None
    assert is_ack_timeout(timeout)
    assert not is_ack_timeout(Exception("inequivalent arg 'durable'"))
