"""Dead letters one at a time, on a real sqlite:// file: each found again by its key, none lost when a move fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Queue

from kqueue import admin
from kqueue import message as wire
from kqueue.brokers import connect
from kqueue.errors import PublishFailed
from kqueue.producer import Outgoing, Sender
from kqueue.queues import dead_letter_queue, task_queue


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[Connection]:
    opened = connect(f"sqlite:///{tmp_path / 'queues.db'}")
    yield opened
    opened.release()


def bury(conn: Connection, queue: Queue, *texts: str) -> None:
    """Put `texts` in the dead letters of `queue`, as a worker leaves them."""
    headers = {wire.REASON: "failed", wire.ERROR: "RuntimeError: no", wire.ORIGIN: queue.name, wire.ATTEMPT: 1}
    with Sender(conn, dead_letter_queue(queue)) as sender:
        sender.publish([Outgoing(text.encode(), dead_letter_queue(queue).name, headers=headers) for text in texts])


def texts(conn: Connection, queue: Queue) -> list[str]:
    return [letter.text for letter in admin.dead_letters(conn, queue)]


def test_a_dead_letter_keeps_its_key_from_one_reading_to_the_next(conn: Connection) -> None:
    # Given two dead letters, read twice (the file counts each reading as a delivery)
    queue = task_queue("jobs")
    bury(conn, queue, "one", "two")
    first, second = admin.dead_letters(conn, queue), admin.dead_letters(conn, queue)

    # Then each has the same key both times, and the two keys differ
    assert [letter.key for letter in first] == [letter.key for letter in second]
    assert first[0].key != first[1].key


def test_one_dead_letter_is_replayed_or_deleted_by_its_key_and_the_others_stay_in_order(conn: Connection) -> None:
    queue = task_queue("jobs")
    bury(conn, queue, "one", "two", "three")
    keys = {letter.text: letter.key for letter in admin.dead_letters(conn, queue)}

    assert admin.retry_dead(conn, queue, key=keys["two"]) == 1
    assert admin.delete_dead(conn, queue, keys["three"]) == 1
    assert admin.delete_dead(conn, queue, keys["three"]) == 0  # gone already

    assert texts(conn, queue) == ["one"]
    assert admin.queue_stats(conn, queue)[0].ready == 1


def test_a_replay_whose_publish_fails_leaves_the_dead_letter_where_it_was(
    conn: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a dead letter, and a broker that confirms nothing
    queue = task_queue("jobs")
    bury(conn, queue, "keep me")
    (letter,) = admin.dead_letters(conn, queue)

    def refused(self: Sender, messages: object, on_confirmed: object = None) -> int:
        raise PublishFailed("not confirmed", 0)

    monkeypatch.setattr(Sender, "publish", refused)

    # When it is replayed, one by its key and then all
    with pytest.raises(PublishFailed):
        admin.retry_dead(conn, queue, key=letter.key)
    with pytest.raises(PublishFailed):
        admin.retry_dead(conn, queue)

    # Then it is still a dead letter, ready, none held unacknowledged
    dead = admin.queue_stats(conn, queue)[1]
    assert (dead.ready, dead.unacked) == (1, 0)
    monkeypatch.undo()
    assert texts(conn, queue) == ["keep me"]
