"""Sending: persistent text/plain messages, one connection for many."""

from __future__ import annotations

import base64

from kombu import Connection, Queue

from kqueue.producer import Sender, send


def raw_messages(conn: Connection, queue: Queue) -> list[dict]:
    channel = conn.default_channel
    found = []
    while channel._size(queue.name):
        found.append(channel._get(queue.name))
    return found


def test_a_task_goes_out_persistent_as_utf8_text(memory_conn: Connection, queue: Queue) -> None:
    # Given a task with non-ASCII text
    # When it is sent
    send(memory_conn, queue, ["Résumé ..."])

    # Then the queue holds exactly its UTF-8 bytes, persistent and text/plain
    (message,) = raw_messages(memory_conn, queue)
    assert message["properties"]["delivery_mode"] == 2
    assert message["content-type"] == "text/plain"
    assert message["content-encoding"] == "utf-8"
    assert base64.b64decode(message["body"]) == "Résumé ...".encode()
    assert not message["headers"]


def test_many_tasks_over_one_connection_report_each_confirm(memory_conn: Connection, queue: Queue) -> None:
    seen: list[int] = []

    with Sender(memory_conn, queue) as sender:
        count = sender.send_many((f"task {i}" for i in range(50)), on_confirmed=seen.append)

    assert count == 50
    assert seen[-1] == 50
    bodies = [base64.b64decode(m["body"]).decode() for m in raw_messages(memory_conn, queue)]
    assert bodies == [f"task {i}" for i in range(50)]
