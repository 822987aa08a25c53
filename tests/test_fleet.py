"""The fleet's parts that need no broker: counting, the health verdict, the exposition, the parent's loop."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kqueue import metrics
from kqueue.cli.work import _child_args, work_main
from kqueue.errors import KQueueError
from kqueue.fleet import Fleet, follow_parent
from kqueue.metrics import Exposition, Member, MetricsServer, Reports, Snapshot, Tally, judge

from .conftest import wait_for


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return scrape[(name, frozenset(labels.items()))]


# -- counting -----------------------------------------------------------------------


def test_a_tally_adds_up_the_rows_of_every_handler_thread() -> None:
    tally = Tally("q")

    def work(ok: bool) -> None:
        for _ in range(1000):
            tally.started()
            tally.finished(ok, 0.002)

    threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    tally.started()  # one still running

    snapshot = tally.snapshot()
    assert (snapshot.received, snapshot.done, snapshot.failed, snapshot.running) == (4001, 2000, 2000, 1)
    assert snapshot.buckets[metrics.BUCKETS.index(0.005)] == 4000
    assert sum(snapshot.buckets) == 4000
    assert snapshot.duration_sum == pytest.approx(8.0)


def test_snapshots_survive_json_and_add_their_counters() -> None:
    one = Snapshot(queue="q", received=3, done=2, dead_lettered={"failed": 1}, running=1, last_finished=5.0)
    two = Snapshot(queue="q", received=1, done=1, dead_lettered={"failed": 2, "undecodable": 1}, last_finished=7.0)

    both = Snapshot.from_json(one.to_json()).plus(two)

    assert (both.received, both.done, both.last_finished) == (4, 3, 7.0)
    assert both.dead_lettered == {"failed": 3, "undecodable": 1}
    assert one.retired().running == 0


def test_reports_keep_a_dead_processs_counters_and_drop_its_file(tmp_path: Path) -> None:
    reports = Reports(tmp_path, "q")
    reports.writer()(Snapshot(queue="q", pid=os.getpid(), received=5, done=5, connected=True))
    reports.writer()(Snapshot(queue="q", pid=os.getpid(), received=7, done=6, running=1, connected=True))

    retired, live = reports.gather([os.getpid()])
    assert retired.received == 0
    assert [s.received for s in live] == [7]

    reports.retire(os.getpid())

    retired, live = reports.gather([os.getpid()])
    assert (retired.received, retired.done, retired.running, live) == (7, 6, 0, [])
    assert list(tmp_path.iterdir()) == []


# -- health ----------------------------------------------------------------------------


def test_health_is_ok_while_every_process_is_connected_and_turning() -> None:
    now = 1000.0
    healthy = Snapshot(queue="q", connected=True, last_turn=now - 1)

    ok, reason = judge([Member(0, 10, healthy), Member(1, 11, healthy)], now)

    assert ok
    assert reason == "ok: 2 worker processes connected and turning"


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (Member(1, None, note="it died; another starts in 2.0s"), "worker process 1 is not running (it died;"),
        (Member(1, 11), "worker process 1 (pid 11) has not started consuming yet"),
        (Member(1, 11, Snapshot(queue="q", last_turn=999.0)), "worker process 1 (pid 11) is not connected"),
        (
            Member(1, 11, Snapshot(queue="q", connected=True, last_turn=990.0)),
            "worker process 1 (pid 11) is stuck: its loop last turned 10.0s",
        ),
    ],
)
def test_health_names_the_first_process_in_trouble(member: Member, reason: str) -> None:
    healthy = Member(0, 10, Snapshot(queue="q", connected=True, last_turn=999.5))

    ok, said = judge([healthy, member], 1000.0)

    assert not ok
    assert said.startswith(reason)
    assert "\n" not in said


# -- serving -------------------------------------------------------------------------------


def get(port: int, path: str) -> tuple[int, str]:
    """Status and body of GET `path` on this machine's `port`; status 0 while nothing listens there."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:  # not listening yet
        return 0, str(error)


def test_the_server_gives_metrics_health_and_nothing_else() -> None:
    tally = Tally("jobs", process=0)
    tally.started()
    tally.finished(False, 0.3)
    tally.retried += 1
    tally.dead_letter("failed")
    server = metrics.serve_worker(0, tally)
    try:
        status, text = get(server.port, "/metrics")
        assert status == 200
        scrape = samples(text)
        assert value(scrape, "kqueue_tasks_received_total", queue="jobs") == 1
        assert value(scrape, "kqueue_tasks_failed_total", queue="jobs") == 1
        assert value(scrape, "kqueue_tasks_retried_total", queue="jobs") == 1
        assert value(scrape, "kqueue_tasks_dead_lettered_total", queue="jobs", reason="failed") == 1
        assert value(scrape, "kqueue_task_duration_seconds_bucket", queue="jobs", le="0.25") == 0
        assert value(scrape, "kqueue_task_duration_seconds_bucket", queue="jobs", le="0.5") == 1
        assert value(scrape, "kqueue_task_duration_seconds_count", queue="jobs") == 1
        assert value(scrape, "kqueue_broker_connected", queue="jobs", process="0") == 0

        assert get(server.port, "/healthz") == (
            503,
            f"worker process 0 (pid {os.getpid()}) is not connected to the broker\n",
        )
        tally.connected, tally.last_turn = True, time.time()
        assert get(server.port, "/healthz") == (200, "ok: 1 worker process connected and turning\n")
        assert get(server.port, "/nope")[0] == 404
    finally:
        server.close()


def test_a_taken_port_is_one_line() -> None:
    first = metrics.serve_worker(0, Tally("q"))
    try:
        with pytest.raises(KQueueError, match=f"cannot serve metrics on port {first.port}: "):
            MetricsServer(first.port, Exposition("q", lambda: (None, [])), lambda: (True, "ok"))
    finally:
        first.close()


def test_without_prometheus_client_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)

    with pytest.raises(KQueueError, match=r"pip install 'kqueue\[metrics\]'"):
        metrics.require_prometheus()


# -- the parent ------------------------------------------------------------------------


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_finite_fleet_ends_when_every_process_exited_0_and_replaces_one_that_failed(tmp_path: Path) -> None:
    # Given worker processes that exit 0, except slot 1's first, which fails
    marker = tmp_path / "failed-once"
    code = f"import sys, pathlib; m = pathlib.Path({str(marker)!r}); sys.exit(0 if m.exists() else m.touch() or 3)"
    exited: list[int] = []

    def command(index: int) -> list[str]:
        return python(code if index == 1 else "pass")

    fleet = Fleet(command, 3, finite=True, on_exit=exited.append)

    # When the fleet runs
    unclean = fleet.run()

    # Then the failed one was replaced once, and the fleet ended cleanly
    assert unclean == 0
    assert fleet.restarts == 1
    assert len(exited) == 4
    assert all(slot.finished for slot in fleet.slots)


def test_a_stop_reaches_every_process_through_its_standard_input(tmp_path: Path) -> None:
    # Given worker processes that say they listen, then exit 0 on the parent's first line
    code = (
        "import sys, pathlib; "
        f"pathlib.Path({str(tmp_path)!r}, sys.argv[1]).touch(); "
        f"pathlib.Path({str(tmp_path)!r}, sys.argv[1] + '.said').write_text(sys.stdin.readline())"
    )
    fleet = Fleet(lambda index: [*python(code), str(index)], 2, finite=False)

    def signal_once_listening() -> None:
        wait_for(lambda: (tmp_path / "0").exists() and (tmp_path / "1").exists(), 30, "both processes")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_once_listening, daemon=True).start()

    # When SIGTERM reaches the parent
    unclean = fleet.run()

    # Then each process was told, exited 0, and none was replaced
    assert unclean == 0
    assert fleet.restarts == 0
    assert [(tmp_path / f"{i}.said").read_text() for i in range(2)] == ["stop SIGTERM\n"] * 2


def test_a_process_that_exits_outside_a_stop_is_replaced_after_a_growing_delay(tmp_path: Path) -> None:
    # Given a worker process that fails at once, three times, then waits for the stop
    count = tmp_path / "runs"
    code = (
        "import sys, pathlib; "
        f"p = pathlib.Path({str(count)!r}); n = len(p.read_text()) if p.exists() else 0; p.write_text('x' * (n + 1)); "
        "sys.exit(1) if n < 3 else sys.stdin.readline()"
    )
    fleet = Fleet(lambda index: python(code), 1, finite=False)

    def stop_when_steady() -> None:
        wait_for(lambda: count.exists() and len(count.read_text()) == 4, 30, "the fourth run")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_steady, daemon=True).start()
    started = time.monotonic()

    unclean = fleet.run()

    # Then it was replaced three times, 0.5 + 1 + 2 seconds apart
    assert (unclean, fleet.restarts) == (0, 3)
    assert time.monotonic() - started >= 3.5
    assert fleet.slots[0].delay == 4.0


def test_a_worker_process_stops_on_its_parents_word_or_when_the_parent_is_gone() -> None:
    class Stoppable:
        def __init__(self) -> None:
            self.asked: list[tuple[bool, str]] = []

        def stop(self, *, now: bool = False, reason: str = "") -> None:
            self.asked.append((now, reason))

    worker = Stoppable()
    read, write = os.pipe()
    thread = follow_parent(worker, read)

    os.write(write, b"stop SIGTERM\nnow SIG")
    os.write(write, b"INT\n")
    os.close(write)
    thread.join(10)
    os.close(read)

    assert worker.asked == [(False, "SIGTERM"), (True, "SIGINT"), (False, "the parent process is gone")]


def test_worker_processes_get_the_options_given_on_the_command_line() -> None:
    ctx = work_main.make_context(
        "kqueue-work",
        ["--queue", "jobs", "--processes", "3", "--metrics-port", "9100", "-q", "--grace", "5", "--burst"],
    )

    args = _child_args(ctx)

    assert sorted(args) == sorted(["--burst", "--grace", "5.0", "--quiet", "--queue", "jobs"])
    assert args[args.index("--grace") + 1] == "5.0"
