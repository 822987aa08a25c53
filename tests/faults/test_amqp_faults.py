"""The network between kqueue and RabbitMQ, cut or frozen for real by a TCP proxy (`tests.faults.proxy`).

Real kqueue-send and kqueue-work processes, some through the proxy and some
connected directly; each test ends with the history's check
(`tests.faults.history`): every confirmed task done, nothing done twice that
nothing disrupted, and nothing queued twice beyond what a sender that lost its
connection says it sent again (`tests.faults.resends`).

What the proxy's freeze is, and is not: it stops reading and writing, so the
peers hear nothing, but the kernel still acknowledges what fits in the proxy's
buffers. A client with data it cannot get rid of (a sender in mid-batch) is
then dropped by its own kernel after py-amqp's ``TCP_USER_TIMEOUT`` of 1 s; a
client with little to say (a worker sending heartbeats) is not, and only the
heartbeats tell it the broker is gone.

The last tests hold the library's `Sender` to the same promises where a
process's timing would leave them to chance.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from kqueue.brokers import connect
from kqueue.errors import PublishFailed
from kqueue.producer import Sender
from kqueue.queues import task_queue
from tests.broker.procs import Worker, ready
from tests.conftest import delete_queues, unique, wait_for
from tests.faults.history import RESENT_WHY, History
from tests.faults.procs import Run
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.broker

HEARTBEAT = 2.0
#: Seconds a worker's network stays frozen: more than two heartbeats, so that both sides give up on each other.
FREEZE = 8.0
#: Seconds a frozen sender waits for confirms.
CONFIRM_TIMEOUT = 3.0
#: Bytes a sender has sent through the proxy before the fault, of about 1.8 MB for 20,000 messages: more
#: than its window of 10,000 unconfirmed messages, so the broker has confirmed some and the sender taken them in.
UNDER_WAY = 1_000_000
#: A worker's log line once it consumes, at its start and after each reconnect.
CONSUMING = '"message": "consuming"'


class NetRun(Run):
    """A `Run` whose processes connect where the test says: through the proxy (`url`) or straight to the broker."""

    def __init__(self, history: History, url: str, queue: str, direct: str) -> None:
        super().__init__(history, url, queue)
        self.direct = direct

    @contextmanager
    def _direct(self) -> Iterator[None]:
        url, self.url = self.url, self.direct
        try:
            yield
        finally:
            self.url = url

    def worker_direct(self, *args: str) -> Worker:
        with self._direct():
            return self.worker(*args, ready=False)

    def send_direct(self, name: str, count: int, *args: str, seconds: float = 0.0) -> None:
        """Send a batch straight to the broker and wait until it is confirmed."""
        with self._direct():
            self.send(name, count, *args, seconds=seconds)
        (batch,) = self.sent()
        assert batch.code == 0, batch.err

    def stop(self) -> None:
        for _, proc in self.senders:  # a test that failed half-way may leave one
            proc.kill()
            proc.communicate(timeout=10)
        self.senders.clear()
        super().stop()


@pytest.fixture
def proxy(amqp_url: str) -> Iterator[Proxy]:
    parts = urlsplit(amqp_url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("the proxy forwards to loopback only")
    with Proxy(target=(parts.hostname, parts.port or 5672)) as proxy:
        yield proxy


@pytest.fixture
def run(amqp_url: str, proxy: Proxy, tmp_path: Path) -> Iterator[NetRun]:
    name = unique("net")
    run = NetRun(History(tmp_path / "history"), proxy.url(), name, amqp_url)
    try:
        yield run
    finally:
        # Workers stop politely; a network still frozen or refusing (a test that failed) would hold that up.
        proxy.thaw()
        proxy.refuse(False)
        run.stop()
        delete_queues(amqp_url, name, f"{name}.dead")


def logged_at(worker: Worker, *texts: str) -> list[float]:
    """When `worker` logged each JSON line containing every one of `texts` (epoch seconds)."""
    times = []
    for line in list(worker.err):
        if line.startswith("{") and all(text in line for text in texts):
            stamp = json.loads(line)["time"].replace("Z", "+00:00")
            times.append(datetime.fromisoformat(stamp).timestamp())
    return times


def running(run: Run, worker: Worker) -> bool:
    """Whether `worker` has a task started and not done."""
    done = run.history.done()
    pid = worker.proc.pid
    return any(
        sum(p == pid for p, _ in runs) > sum(p == pid for p, _ in done.get(task, ()))
        for task, runs in run.history.starts().items()
    )


def under_way(proxy: Proxy) -> None:
    """Wait until a sender through `proxy` is half-way through its batch, some of it confirmed."""
    wait_for(lambda: proxy.bytes_up > UNDER_WAY, message="the batch half sent")


# -- a worker's network ---------------------------------------------------------------------------


def test_a_worker_whose_network_is_cut_mid_task_reconnects_and_loses_nothing(run: NetRun, proxy: Proxy) -> None:
    # Given a worker through the proxy, in the middle of tasks of 0.2 s
    worker = run.worker()
    run.send_direct("tasks", 30, seconds=0.2)
    wait_for(lambda: len(run.history.done()) >= 3 and running(run, worker), message="a task running")

    # When its network path is cut, both ways at once
    cut_at = time.time()
    accepted = proxy.accepted
    proxy.cut()
    run.history.disrupted(worker.proc.pid, "network cut", cut_at, time.time())

    # Then it says so, reconnects through the proxy, and every task is done
    worker.wait_for("lost the connection", stream="err", timeout=5)
    worker.wait_for(CONSUMING, count=2, stream="err", timeout=10)
    run.wait_done(timeout=20)
    # (a second connection of its own publishes the redelivered task's copy, which carries its delivery count)
    assert proxy.accepted > accepted and proxy.connections >= 1
    run.stop()
    summary = run.history.check()
    # and only the task running when the path was cut ran again
    assert sum(summary.duplicated.values()) <= 1, summary.row()
    noticed = logged_at(worker, "lost the connection")[0] - cut_at
    back = logged_at(worker, CONSUMING)[-1] - cut_at
    print(f"cut: noticed after {noticed:.2f}s, consuming again after {back:.2f}s; {summary.row()}")


def test_a_worker_whose_network_freezes_notices_by_heartbeats_and_the_broker_gives_its_task_to_another(
    run: NetRun, proxy: Proxy
) -> None:
    # Given a worker through the proxy, heartbeats every 2 s, running a task of 6 s
    frozen = run.worker("--heartbeat", f"{HEARTBEAT:g}")
    run.send_direct("long", 1, seconds=6)
    (task,) = wait_for(lambda: list(run.history.starts()), message="the long task started")
    # and another worker connected straight to the broker
    other = run.worker_direct("--heartbeat", f"{HEARTBEAT:g}")

    # When the frozen worker's network freezes for longer than two heartbeats
    freeze_at = time.time()
    proxy.freeze()
    other.ready()

    # Then it notices the silent broker by its heartbeats while the network is still frozen
    wait_for(lambda: logged_at(frozen, "lost the connection"), timeout=FREEZE - 1, message="the loss noticed")
    noticed = logged_at(frozen, "lost the connection")[0] - freeze_at
    assert "heartbeats missed" in next(line for line in frozen.err if "lost the connection" in line)
    assert noticed <= 2 * HEARTBEAT + 1.5, f"noticed {noticed:.2f}s after the freeze"
    # and the broker notices the silent client, and hands its task to the other worker, before the thaw
    wait_for(
        lambda: len(run.history.starts()[task]) == 2,
        timeout=freeze_at + FREEZE - 0.2 - time.time(),
        message="the task handed to the other worker during the freeze",
    )
    redelivered = run.history.starts()[task][1][1] - freeze_at
    assert run.history.starts()[task][1][0] == other.proc.pid

    time.sleep(max(0.0, freeze_at + FREEZE - time.time()))  # the fault itself: the network stays frozen this long
    thaw_at = time.time()
    proxy.thaw()
    run.history.disrupted(frozen.proc.pid, "network frozen", freeze_at, thaw_at)

    # Then it reconnects once thawed, and does not ack its own run of the task on its new channel
    frozen.wait_for(CONSUMING, count=2, stream="err", timeout=15)
    frozen.wait_for("cannot be acked", stream="err", timeout=10)
    back = logged_at(frozen, CONSUMING)[-1] - thaw_at
    # and it works again: the other worker is busy with the long task, so these are all its
    run.send_direct("after", 10)
    run.wait_done(timeout=20)
    assert {pid for t, runs in run.history.starts().items() if t.startswith("after") for pid, _ in runs} == {
        frozen.proc.pid
    }
    run.stop()
    summary = run.history.check()
    assert sum(summary.duplicated.values()) == 1, summary.row()  # the long task, excused by the freeze
    assert sum("lost the" in line for line in frozen.err) == 1, frozen.transcript()  # no error on the new channel
    assert ready(run.direct, task_queue(run.queue)) == 0
    print(
        f"freeze: worker noticed after {noticed:.2f}s, broker redelivered after {redelivered:.2f}s, "
        f"consuming again {back:.2f}s after the thaw; {summary.row()}"
    )


# -- a sender's network -----------------------------------------------------------------------------


def test_a_sender_cut_mid_batch_reconnects_and_every_line_is_done(run: NetRun, proxy: Proxy) -> None:
    # Given a worker connected straight to the broker, and a batch of 20,000 sent through the proxy
    run.worker_direct("--prefetch", "100").ready()
    sender = run.send("batch", 20000)
    under_way(proxy)

    # When the sender's network is cut
    assert sender.poll() is None, "the batch ended before the cut"
    proxy.cut()
    (batch,) = run.sent(timeout=60)

    # Then it reconnects through the proxy, says it sent every line, and every line is done
    assert batch.code == 0, batch.err
    assert "lost the connection" in batch.err and "reconnected" in batch.err, batch.err
    assert proxy.accepted == 2
    run.wait_done(timeout=60)
    run.stop()
    summary = run.history.check()
    # and what ran twice is what it sent again
    assert set(summary.duplicated) <= {RESENT_WHY}, summary.row()
    print(f"sender cut: {summary.row()}")


def test_a_sender_cut_and_refused_past_its_retry_says_how_many_were_confirmed(run: NetRun, proxy: Proxy) -> None:
    # Given a worker connected straight to the broker, and a batch of 20,000 sent through the proxy
    run.worker_direct("--prefetch", "100").ready()
    sender = run.send("batch", 20000, "--retry-for", "1")
    under_way(proxy)

    # When its network is cut, and new connections refused until the sender has given up
    assert sender.poll() is None, "the batch ended before the cut"
    proxy.refuse(True)
    proxy.cut()
    (batch,) = run.sent(timeout=30)
    proxy.refuse(False)

    # Then it exits 1, saying in one line how many the broker confirmed, and at least those are done
    assert batch.code == 1, batch.out
    assert f"of {len(batch.ids)} messages" in batch.err and "within 1s" in batch.err, batch.err
    assert 0 < batch.confirmed < len(batch.ids)
    run.wait_done(timeout=60)
    run.stop()
    summary = run.history.check()
    assert not summary.duplicated, summary.row()
    print(f"sender cut past --retry-for: {summary.row()}")


def test_a_sender_whose_network_freezes_mid_batch_never_says_more_than_was_confirmed(run: NetRun, proxy: Proxy) -> None:
    # Given a worker connected straight to the broker, and a batch sent through the proxy
    run.worker_direct("--prefetch", "100").ready()
    sender = run.send("batch", 20000, "--confirm-timeout", f"{CONFIRM_TIMEOUT:g}")
    under_way(proxy)

    # When the sender's network freezes for twice its --confirm-timeout
    assert sender.poll() is None, "the batch ended before the freeze"
    freeze_at = time.time()
    proxy.freeze()
    exited = math.inf
    while time.time() < freeze_at + 2 * CONFIRM_TIMEOUT:  # the fault itself: the network stays frozen this long
        if exited == math.inf and sender.poll() is not None:
            exited = time.time() - freeze_at
        time.sleep(0.01)
    thaw_at = time.time()
    proxy.thaw()
    (batch,) = run.sent(timeout=60)
    if exited == math.inf:
        exited = time.time() - freeze_at

    # Then it either gave up within its --confirm-timeout, while the network was still frozen, saying
    # how many were confirmed; or, dropped by its own kernel (py-amqp's TCP_USER_TIMEOUT), it
    # reconnected once the network was back, and sent every line
    if batch.code == 1:
        assert "did not confirm" in batch.err and f"of {len(batch.ids)} messages" in batch.err, batch.err
        assert exited < CONFIRM_TIMEOUT + 1.5, f"exited {exited:.1f}s after the freeze"
    else:
        assert batch.code == 0, batch.err
        assert "lost the connection" in batch.err and "reconnected" in batch.err, batch.err
        assert exited < thaw_at - freeze_at + 5, f"exited {exited:.1f}s after the freeze"
    run.wait_done(timeout=60)
    run.stop()
    summary = run.history.check()
    assert set(summary.duplicated) <= {RESENT_WHY}, summary.row()
    said = batch.err.strip().splitlines()[-1] if batch.code else batch.out.strip()
    print(f"sender frozen {thaw_at - freeze_at:.1f}s: exited after {exited:.2f}s, {said!r}; {summary.row()}")


# -- the sender's own promises, on the library --------------------------------------------------------------


def sending(sender: Sender, texts: list[str]) -> tuple[threading.Thread, list[int | BaseException]]:
    """`sender.send_many(texts)` on a thread of its own; what it returned or raised lands in the list."""
    outcome: list[int | BaseException] = []

    def send() -> None:
        try:
            outcome.append(sender.send_many(texts))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, outcome


def test_a_sender_cut_with_its_confirm_window_full_sends_it_all_again(amqp_url: str, proxy: Proxy) -> None:
    queue = task_queue(unique("window"))
    conn = connect(proxy.url())
    sender = Sender(conn, queue, window=100, confirm_timeout=5)
    try:
        sender.send("first")
        # Given a sender whose window is full: the network froze, no confirm comes back
        proxy.freeze()
        thread, sent = sending(sender, [f"task {n}" for n in range(300)])
        wait_for(lambda: sender.unconfirmed >= 100, message="the window full")

        # When the connection is cut, and the network comes back
        proxy.cut()
        proxy.thaw()
        thread.join(20)

        # Then the sender sends the whole window again, then the rest, and each is confirmed
        assert sent == [300], sent
        assert ready(amqp_url, queue) == 301  # what the freeze held never reached the broker: no duplicates
    finally:
        sender.close()
        conn.release()
        delete_queues(amqp_url, queue.name)


def test_a_sender_that_gives_up_on_a_frozen_network_closes_at_once(amqp_url: str, proxy: Proxy) -> None:
    queue = task_queue(unique("unanswered"))
    conn = connect(proxy.url())
    sender = Sender(conn, queue, confirm_timeout=1)
    try:
        sender.send("first")
        # Given a sender that gave up waiting for confirms on a frozen network
        proxy.freeze()
        with pytest.raises(PublishFailed, match="did not confirm 2 messages within 1s"):
            sender.send_many(["a", "b"])

        # When it closes, then its connection closes
        closing = threading.Thread(target=lambda: (sender.close(), conn.release()), daemon=True)
        closing.start()
        closing.join(2)

        # Then neither waits for the answer that cannot come
        assert not closing.is_alive(), "closing waits for the frozen broker"
    finally:
        proxy.thaw()
        delete_queues(amqp_url, queue.name)


def test_a_sender_that_misses_the_brokers_heartbeats_drops_the_connection_and_gives_up_in_time(
    amqp_url: str, proxy: Proxy
) -> None:
    queue = task_queue(unique("heartbeat"))
    # (a reconnect to the frozen network waits for its handshake as long as the connect timeout)
    conn = connect(proxy.url(), heartbeat=1, connect_timeout=2)
    sender = Sender(conn, queue, reconnect_for=1, confirm_timeout=30)
    try:
        sender.send("first")
        # Given a sender waiting for confirms on a network that froze: it hears no heartbeat either
        proxy.freeze()
        started = time.monotonic()
        thread, sent = sending(sender, ["a", "b"])

        # When two heartbeats are missed, then it has tried to reconnect for --retry-for
        thread.join(8)

        # Then it has given up, without waiting for the frozen broker to answer a polite close
        assert not thread.is_alive(), "the sender waits for the frozen broker"
        assert len(sent) == 1 and isinstance(sent[0], PublishFailed), sent
        print(f"sender with heartbeat 1s gave up {time.monotonic() - started:.1f}s into the freeze: {sent[0]}")
    finally:
        proxy.thaw()
        conn.release()
        delete_queues(amqp_url, queue.name)
