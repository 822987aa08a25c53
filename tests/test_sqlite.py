"""The sqlite:// transport: Kombu's API on one file, with RabbitMQ's promises across processes."""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import ChannelError

from kqueue.brokers import connect
from kqueue.errors import KQueueError
from kqueue.sqlite import DatabaseBusy, path_of, queue_stats, wake_fd
from tests.conftest import ROOT, wait_for

# -- helpers ----------------------------------------------------------------------------


def task_queue(name: str = "tasks") -> Queue:
    return Queue(name, exchange=Exchange(""), routing_key=name, durable=True)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/queues.db"


def simple_queue(conn: Connection) -> Any:
    """Kombu's SimpleQueue at prefetch 1: without it, a consumer may hold every ready message."""
    simple = conn.SimpleQueue(task_queue())
    simple.consumer.qos(prefetch_count=1)
    return simple


def rows_in_file(url: str) -> int:
    with sqlite3.connect(path_of(url)) as db:
        return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])


def publish(url: str, *bodies: str, name: str = "tasks") -> None:
    with Connection(url) as conn:
        producer = Producer(conn)
        for body in bodies:
            producer.publish(body, routing_key=name, serializer="json", declare=[task_queue(name)])


class Proc:
    """A process of tests.sqlite_procs whose output lines a test waits for, each with a deadline."""

    def __init__(self, *args: object) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.sqlite_procs", *map(str, args)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, prefix: str, timeout: float = 10.0) -> str:
        """The next line that starts with `prefix`; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line {prefix!r} within {timeout}s; stderr: {self.stderr()}") from None
            if line.startswith(prefix):
                return line

    def nothing(self, prefix: str, within: float) -> None:
        """No line starting with `prefix` comes within `within` seconds."""
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return
            assert not line.startswith(prefix), f"unexpected {line!r}"

    def rest(self) -> list[str]:
        """Every line not yet taken, once the process has exited."""
        self.popen.wait(10)
        self._reader.join(10)
        lines = []
        while not self.lines.empty():
            lines.append(self.lines.get())
        return lines

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def finish(self, timeout: float = 20.0) -> str:
        """Wait for a clean exit; return its standard error."""
        self.popen.wait(timeout)
        err = self.stderr()
        assert self.popen.returncode == 0, err
        return err

    def stderr(self) -> str:
        if self.popen.poll() is None:
            return "(still running)"
        assert self.popen.stderr is not None
        return self.popen.stderr.read()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        if proc.popen.poll() is None:
            proc.kill()
        for stream in (proc.popen.stdout, proc.popen.stderr):
            if stream is not None:
                stream.close()


def start(procs: list[Proc], *args: object) -> Proc:
    proc = Proc(*args)
    procs.append(proc)
    return proc


def parse_got(line: str) -> tuple[str, bool, int, float]:
    _, body, redelivered, count, at = line.split(" ")
    return body.strip('"'), redelivered == "True", int(count), float(at)


# -- URLs -------------------------------------------------------------------------------


def test_url_forms_name_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert path_of("sqlite:///relative.db") == tmp_path / "relative.db"
    assert path_of("sqlite:////abs/path/queues.db") == Path("/abs/path/queues.db")
    for url in ("sqlite:///relative.db", f"sqlite:///{tmp_path}/abs.db?busy_timeout=2.5"):
        with Connection(url) as conn:
            conn.ensure_connection(max_retries=1)
            assert conn.transport.driver_type == "sqlite"
    assert (tmp_path / "relative.db").exists() and (tmp_path / "abs.db").exists()
    assert connect(f"sqlite:///{tmp_path}/abs.db?busy_timeout=2.5").transport.options.busy_timeout == 2.5


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite://", "no database file other processes can share"),
        ("sqlite:///", "no database file other processes can share"),
        ("sqlite:///:memory:", "no database file other processes can share"),
        ("sqlite:///file::memory:?cache=shared", "no database file other processes can share"),
        ("sqlite:///x.db?mode=memory", "no database file other processes can share"),
        ("sqlite://localhost/x.db", "names a host"),
        ("sqlite:///x.db?bogus=1", "unknown option bogus"),
        ("sqlite:///x.db?busy_timeout=soon", "not a number"),
        ("sqlite:///x.db?busy_timeout=0", "must be positive"),
    ],
)
def test_url_forms_that_cannot_be_shared_are_refused_in_one_line(url: str, says: str) -> None:
    with pytest.raises(KQueueError, match=says) as refused:
        connect(url)
    assert "\n" not in str(refused.value)
    with pytest.raises(KQueueError):
        Connection(url).transport  # noqa: B018 - the transport is made on first use


def test_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(KQueueError, match="folder does not exist"), Connection(f"sqlite:///{tmp_path}/no/q.db") as conn:
        conn.ensure_connection(max_retries=1)


# -- queues through plain Kombu -----------------------------------------------------------


def test_messages_come_in_order_and_stay_until_acked(url: str) -> None:
    publish(url, "a", "b", "c")
    with Connection(url) as conn:
        simple = simple_queue(conn)
        first = simple.get(timeout=1)
        assert first.payload == "a"
        assert first.delivery_info["redelivered"] is False
        assert rows_in_file(url) == 3  # fetched, not deleted
        first.ack()
        assert queue_stats(conn, "tasks") == (2, 0, 1)  # the ack is written before any count
        assert rows_in_file(url) == 2
        second = simple.get(timeout=1)
        second.ack()
        third = simple.get(timeout=1)
        third.ack()
        assert (second.payload, third.payload) == ("b", "c")
        assert queue_stats(conn, "tasks") == (0, 0, 1)


def test_named_exchanges_route_across_connections(url: str) -> None:
    with Connection(url) as consumer_conn, Connection(url) as producer_conn:
        simple = consumer_conn.SimpleQueue("news")  # declares exchange "news" and its binding
        Producer(producer_conn).publish("hello", exchange="news", routing_key="news", serializer="json")
        message = simple.get(timeout=1)
        assert message.payload == "hello"
        message.ack()


def test_queue_declare_size_purge_and_delete_agree(url: str) -> None:
    with Connection(url) as conn:
        channel = conn.channel()
        with pytest.raises(ChannelError, match="NOT_FOUND"):
            channel.queue_declare("missing", passive=True)
        assert channel.queue_declare("tasks", durable=True).message_count == 0
        publish(url, "a", "b", "c")
        assert channel.queue_declare("tasks", passive=True).message_count == 3
        assert channel.basic_get("tasks") is not None
        assert channel._size("tasks") == 2
        assert channel.queue_purge("tasks") == 2
        assert queue_stats(conn, "tasks") == (0, 1, 0)  # purge leaves the unacked one
        channel.queue_delete("tasks")
        assert rows_in_file(url) == 0
        with pytest.raises(ChannelError, match="NOT_FOUND"):
            conn.channel().queue_declare("tasks", passive=True)


# -- acks, rejects, prefetch --------------------------------------------------------------


def collect(conn: Connection, received: list[Any], timeout: float) -> bool:
    """Drain one event into `received`; False on timeout."""
    try:
        conn.drain_events(timeout=timeout)
    except TimeoutError:
        return False
    return True


def test_prefetch_is_honoured_and_stats_are_exact(url: str) -> None:
    publish(url, *"abcdefghij")
    with Connection(url) as one, Connection(url) as three:
        held: list[Any] = []
        with Consumer(one, [task_queue()], callbacks=[lambda b, m: held.append(m)], prefetch_count=1):
            assert collect(one, held, 1)
            # Given one unacked message at prefetch 1, when we drain again, then nothing more comes.
            assert not collect(one, held, 0.2)
            assert [m.payload for m in held] == ["a"]
            assert queue_stats(one, "tasks") == (9, 1, 1)
            with Consumer(three, [task_queue()], callbacks=[lambda b, m: held.append(m)], prefetch_count=3):
                while collect(three, held, 0.2):
                    pass
                assert [m.payload for m in held] == ["a", "b", "c", "d"]
                assert queue_stats(three, "tasks") == (6, 4, 2)
                held[0].ack()
                assert collect(one, held, 1)
                assert held[-1].payload == "e"
                assert queue_stats(one, "tasks") == (5, 4, 2)
        assert queue_stats(three, "tasks") == (5, 4, 0)  # a cancel, as on AMQP, keeps what was delivered
        one.close()
        assert queue_stats(three, "tasks") == (6, 3, 0)  # a close gives "e" back


def test_multiple_ack_acks_every_earlier_delivery(url: str) -> None:
    publish(url, "a", "b", "c")
    with Connection(url) as conn:
        channel = conn.channel()
        tags = [channel.basic_get("tasks").delivery_tag for _ in range(3)]
        channel.basic_ack(tags[1], multiple=True)
        assert queue_stats(conn, "tasks") == (0, 1, 0)


def test_reject_with_requeue_gives_it_back_at_once_in_its_place(url: str) -> None:
    publish(url, "a", "b")
    with Connection(url) as one, Connection(url) as two:
        first = simple_queue(one).get(timeout=1)
        assert first.payload == "a"
        first.reject(requeue=True)
        # Then the next consumer gets "a" again, before "b", flagged and counted.
        again = simple_queue(two).get(timeout=1)
        assert (again.payload, again.delivery_info["redelivered"], again.headers["x-delivery-count"]) == ("a", True, 1)
        again.reject(requeue=False)
        assert queue_stats(two, "tasks") == (1, 0, 2)
        assert rows_in_file(url) == 1


def test_a_clean_close_gives_unacked_messages_back_at_once(url: str) -> None:
    publish(url, "a")
    with Connection(url) as one:
        assert one.SimpleQueue(task_queue()).get(timeout=1).payload == "a"
    with Connection(url) as two:
        assert queue_stats(two, "tasks") == (1, 0, 0)
        message = two.SimpleQueue(task_queue()).get(timeout=0.1)
        assert message.delivery_info["redelivered"] is True


# -- publishing --------------------------------------------------------------------------


def test_confirms_come_after_the_commit(url: str) -> None:
    with Connection(f"{url}?confirm_batch=3") as conn:
        channel = conn.channel()
        task_queue()(channel).declare()
        acks: list[tuple[int, bool, int]] = []
        channel.confirm_select()
        channel.events["basic_ack"].add(lambda tag, multiple: acks.append((tag, multiple, rows_in_file(url))))
        producer = Producer(channel)
        for body in "ab":
            producer.publish(body, routing_key="tasks", serializer="json")
        assert acks == [] and rows_in_file(url) == 0  # not on disk, not confirmed
        producer.publish("c", routing_key="tasks", serializer="json")
        assert acks == [(3, True, 3)]  # a full batch commits at once
        producer.publish("d", routing_key="tasks", serializer="json")
        conn.drain_events(timeout=1)  # a confirm is an event: it returns at once
        assert acks == [(3, True, 3), (4, True, 4)]
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.05)


def test_a_publish_that_waited_too_long_raises_one_line_and_is_not_stored(url: str) -> None:
    publish(url, "first")
    blocker = sqlite3.connect(path_of(url), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with Connection(f"{url}?busy_timeout=0.2") as conn:
            with pytest.raises(DatabaseBusy, match=r"stayed locked .*busy_timeout") as busy:
                Producer(conn).publish("lost?", routing_key="tasks", serializer="json")
            assert "\n" not in str(busy.value) and "queues.db" in str(busy.value)
            blocker.execute("ROLLBACK")
            Producer(conn).publish("second", routing_key="tasks", serializer="json")
    finally:
        blocker.close()
    with sqlite3.connect(path_of(url)) as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2


@pytest.mark.parametrize("confirm", [False, True])
def test_a_publish_reported_sent_is_in_the_file_even_if_the_publisher_is_killed(
    url: str, procs: list[Proc], confirm: bool
) -> None:
    flags = ["--confirm"] if confirm else []
    publisher = start(procs, "publish", url, "tasks", "--count", 1, *flags)
    publisher.expect("sent 1")
    publisher.kill()
    assert rows_in_file(url) == 1


# -- across processes --------------------------------------------------------------------


def test_two_consuming_processes_share_the_work(url: str, procs: list[Proc]) -> None:
    workers = [start(procs, "consume", url, "tasks", "--hold", 0.1) for _ in range(2)]
    for worker in workers:
        worker.expect("ready")
    bodies = [f"t{n}" for n in range(6)]
    publish(url, *bodies)
    got = [[parse_got(w.expect("got"))[0] for _ in range(3)] for w in workers]
    assert sorted(got[0] + got[1]) == bodies
    with Connection(url) as conn:
        wait_for(lambda: queue_stats(conn, "tasks") == (0, 0, 2), 5, "every task acked")


def test_an_idle_consumer_in_another_process_wakes_at_once(url: str, procs: list[Proc]) -> None:
    worker = start(procs, "consume", url, "tasks")
    worker.expect("ready")
    latencies = []
    for n in range(3):
        sent = time.time()
        publish(url, f"x{n}")
        latencies.append(parse_got(worker.expect("got"))[3] - sent)
    assert min(latencies) < 0.2  # a poll would take up to 0.5 s


def test_a_killed_consumers_task_goes_to_another_within_a_second(url: str, procs: list[Proc]) -> None:
    doomed = start(procs, "consume", url, "tasks", "--hold", -1)
    doomed.expect("ready")
    publish(url, "precious")
    assert parse_got(doomed.expect("got"))[:3] == ("precious", False, 0)
    survivor = start(procs, "consume", url, "tasks")
    survivor.expect("ready")
    survivor.nothing("got", 0.2)
    # When the first is killed mid-task, then the survivor gets the task, flagged and counted.
    doomed.kill()
    killed_at = time.time()
    body, redelivered, count, at = parse_got(survivor.expect("got", timeout=5))
    assert (body, redelivered, count) == ("precious", True, 1)
    assert at - killed_at < 1.2


def test_a_slow_live_consumer_is_never_robbed(url: str, procs: list[Proc]) -> None:
    slow = start(procs, "consume", url, "tasks", "--hold", -1)
    slow.expect("ready")
    publish(url, "long task")
    slow.expect("got")
    with Connection(url) as conn:
        received: list[Any] = []
        with Consumer(conn, [task_queue()], callbacks=[lambda b, m: received.append(m)], prefetch_count=1):
            # Several looks for dead owners pass, and the live one keeps its task.
            assert not collect(conn, received, 1.2)
            assert queue_stats(conn, "tasks") == (0, 1, 2)
            slow.kill()
            assert collect(conn, received, 2)
            assert queue_stats(conn, "tasks") == (0, 1, 1)


def test_wake_fd_turns_readable_when_a_message_is_published(url: str) -> None:
    import select

    with Connection(url) as conn:
        received: list[Any] = []
        with Consumer(conn, [task_queue()], callbacks=[lambda b, m: received.append(b)], prefetch_count=1):
            fd = wake_fd(conn)
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=0)
            assert select.select([fd], [], [], 0)[0] == []
            publish(url, "ping")
            assert select.select([fd], [], [], 1)[0] == [fd]
            conn.drain_events(timeout=0)
            assert received == ["ping"]


def test_many_processes_publishing_and_consuming_never_see_a_locked_database(url: str, procs: list[Proc]) -> None:
    per, publishers = 150, 4
    consumers = [start(procs, "consume", url, "tasks", "--prefetch", p) for p in (1, 10, 100)]
    for consumer in consumers:
        consumer.expect("ready")
    senders = [
        start(procs, "publish", url, "tasks", "--count", per, "--prefix", f"p{n}-", *(["--confirm"] * (n % 2)))
        for n in range(publishers)
    ]
    for sender in senders:
        assert "locked" not in sender.finish()
    with Connection(url) as conn:
        wait_for(lambda: queue_stats(conn, "tasks")[:2] == (0, 0), 10, "every task consumed")
    for consumer in consumers:
        consumer.popen.send_signal(signal.SIGTERM)
    got = [parse_got(line)[0] for consumer in consumers for line in consumer.rest() if line.startswith("got")]
    assert not any("locked" in consumer.stderr() for consumer in consumers)
    assert sorted(got) == sorted(f"p{n}-{i}" for n in range(publishers) for i in range(1, per + 1))
    assert os.path.getsize(path_of(url)) > 0
