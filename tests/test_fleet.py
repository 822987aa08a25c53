"""The fleet: counting, the health verdict, the exposition, the parent's loop, its folder; whole fleets on sqlite://.

The whole fleets here inject real faults (a removed folder, a full disk, a
SIGKILLed parent) into real ``kqueue-work --processes 2`` command lines, on
sqlite://, which needs no server.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kqueue import metrics
from kqueue.cli.work import _child_args, work_main
from kqueue.errors import KQueueError
from kqueue.fleet import Fleet, Folder, follow_parent, sweep
from kqueue.metrics import STALE_AFTER, Exposition, Member, MetricsServer, Reports, Snapshot, Tally, judge

from .broker.procs import Worker, run_send
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


def test_a_snapshot_that_cannot_be_written_is_logged_once_per_outage_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker process's snapshot file, written once
    caplog.set_level(logging.INFO, logger="kqueue.metrics")
    folder = tmp_path / "fleet"
    folder.mkdir()
    write = Reports(folder, "q").writer()
    write(Snapshot(queue="q", received=1))

    # When its folder is removed under it, and it goes on reporting
    shutil.rmtree(folder)
    for received in range(2, 6):
        write(Snapshot(queue="q", received=received))

    # Then one line says so, and nothing was raised
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        f"cannot write the metrics snapshot to {folder}: No such file or directory; tasks go on, and it is tried again"
    ]

    # And once the folder is back, the next write works, and says so
    folder.mkdir()
    write(Snapshot(queue="q", received=6))
    assert Reports(folder, "q").read(os.getpid()) == Snapshot(queue="q", received=6)
    assert caplog.records[-1].getMessage().startswith(f"could write the metrics snapshot to {folder} again, after ")
    assert len(caplog.records) == 2


def test_the_parent_keeps_a_processs_last_counts_while_its_file_is_missing(tmp_path: Path) -> None:
    # Given a worker process's snapshot, read once by the parent
    reports = Reports(tmp_path, "q")
    reports.writer()(Snapshot(queue="q", pid=os.getpid(), received=7, done=7, connected=True))
    assert reports.read(os.getpid()) is not None

    # When its file goes away (the folder removed)
    (tmp_path / f"{os.getpid()}.json").unlink()

    # Then the counts stay where they were, rather than drop to nothing, and are kept once it exits
    assert [s.done for s in reports.gather([os.getpid()])[1]] == [7]
    reports.retire(os.getpid())
    assert reports.gather([os.getpid()]) == (Snapshot(queue="q", received=7, done=7), [])


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


def test_a_process_that_turns_but_cannot_write_is_healthy_and_the_line_says_so() -> None:
    # Given a process whose last snapshot is 12 s old, but whose file was touched a moment ago (a full disk)
    now = 1000.0
    frozen = Member(1, 11, Snapshot(queue="q", connected=True, last_turn=now - 12), seen=now - 0.2)

    ok, reason = judge([Member(0, 10, Snapshot(queue="q", connected=True, last_turn=now - 0.1)), frozen], now)

    # Then it counts as healthy, and the line names it and how old what is known of it is
    assert ok
    assert reason == (
        "ok: 2 worker processes connected and turning; worker process 1 (pid 11) cannot write its metrics "
        "snapshot: its loop turns, and it was last known connected 12.0s ago"
    )
    # But without that sign of life it is stuck, as before
    assert judge([replace(frozen, seen=now - 12)], now) == (
        False,
        "worker process 1 (pid 11) is stuck: its loop last turned 12.0s ago",
    )


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """The samples of one scrape, as 'name{label="value",...}' (labels sorted, queue left out) -> value."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k != "queue")
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def notes(pids: Path, what: str) -> dict[str, int]:
    """Task -> pid of the 'start' or 'done' lines tests.handlers:record_pid wrote."""
    if not pids.exists():
        return {}
    found = {}
    for line in pids.read_text().splitlines():
        kind, text, pid = line.split(" ")
        if kind == what:
            found[text] = int(pid)
    return found


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


# -- the fleet's folder ------------------------------------------------------------------


def test_a_sweep_removes_a_folder_once_every_process_of_its_fleet_is_gone(tmp_path: Path) -> None:
    # Given a live fleet's folder, and one whose parent is gone but whose worker process, which inherited the lock, runs
    live = Folder.make(tmp_path)
    orphaned = Folder.make(tmp_path)
    child = subprocess.Popen(python("import sys; sys.stdin.read()"), stdin=subprocess.PIPE, pass_fds=(orphaned.fd,))
    os.close(orphaned.fd)
    # And a folder without a lock file (one being made, or an older kqueue's)
    unknown = tmp_path / "kqueue-fleet-unknown"
    unknown.mkdir()
    try:
        # When another fleet sweeps, nothing is removed
        assert sweep(tmp_path) == []
    finally:
        child.communicate(timeout=10)  # its standard input closes: it exits

    # Then once that worker process has exited, its folder is removed, and only it
    assert sweep(tmp_path) == [orphaned.path]
    assert live.path.exists() and unknown.exists()
    live.close()
    assert not live.path.exists()


def test_a_removed_folder_is_made_again_with_a_lock_held(tmp_path: Path) -> None:
    folder = Folder.make(tmp_path)
    shutil.rmtree(folder.path)

    folder.keep()

    assert (folder.path / Folder.LOCK).exists()
    assert sweep(tmp_path) == []
    folder.close()


# -- whole fleets, real faults ---------------------------------------------------------------


def children(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is `pid`, from /proc."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rpartition(")")[2].split()[:2]
        except OSError:  # exited meanwhile
            continue
        if int(ppid) == pid and state != "Z":
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Whether any thread of `pid` has yet to exit: its files (and their locks) go with the last one."""
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
        return any((thread / "stat").read_text().rpartition(")")[2].split()[0] != "Z" for thread in threads)
    except OSError:
        return False


@pytest.fixture
def fleets() -> Iterator[list[Worker]]:
    """Fleets a test starts; SIGKILLed at the end with their worker processes, if still running."""
    started: list[Worker] = []
    yield started
    for parent in started:
        if parent.proc.poll() is None:
            for pid in children(parent.proc.pid):
                os.kill(pid, signal.SIGKILL)
        parent.stop()


def start_fleet(fleets: list[Worker], home: Path, tmpdir: Path, port: int) -> Worker:
    """``kqueue-work --processes 2 --metrics-port PORT`` on sqlite:// in `home`, with TMPDIR `tmpdir`; once healthy."""
    parent = Worker(
        f"sqlite:///{home / 'queues.db'}",
        "jobs",
        "--processes",
        "2",
        "--metrics-port",
        str(port),
        "--handler",
        "tests.handlers:record_pid",
        env={"TMPDIR": str(tmpdir), "KQUEUE_TEST_PIDS": str(home / "pids")},
    )
    fleets.append(parent)
    parent.wait_for("consuming", count=2, stream="err")
    wait_for(lambda: get(port, "/healthz")[0] == 200, 30, "a healthy fleet")
    return parent


def send_all(home: Path, texts: list[str]) -> None:
    sent = run_send(f"sqlite:///{home / 'queues.db'}", "jobs", "--file", "-", input="".join(f"{t}\n" for t in texts))
    assert sent.returncode == 0, sent.stderr


def done_by(home: Path, texts: list[str]) -> dict[str, int]:
    """Once every one of `texts` was done: task -> pid of the process that did it."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: set(texts) <= set(done := notes(home / "pids", "done")) and done, 30, f"{len(texts)} tasks done"
    )


def said(parent: Worker, text: str, pid: int) -> int:
    """Lines of the fleet's standard error from worker process `pid` that contain `text`."""
    return sum(text in line and f"pid={pid}" in line for line in list(parent.err))


def outages(parent: Worker, pid: int) -> tuple[int, int]:
    """How many times worker process `pid` said it cannot write its snapshot, and that it could again."""
    return said(parent, "cannot write the metrics snapshot", pid), said(parent, "could write the metrics snapshot", pid)


def test_a_fleet_whose_folder_is_removed_works_on_and_reports_again(tmp_path: Path, fleets: list[Worker]) -> None:
    # Given a healthy fleet of two, which has done a task
    port = free_port()
    parent = start_fleet(fleets, tmp_path, tmp_path, port)
    workers = children(parent.proc.pid)
    [folder] = tmp_path.glob("kqueue-fleet-*")
    send_all(tmp_path, ["before"])
    wait_for(lambda: scrape(port)["kqueue_tasks_done_total"] == 1, 30, "the first task counted")
    counted = [1.0]

    # When its folder is removed, as rm -rf would, again each time the parent makes it again,
    # until both worker processes found it gone
    def removed_under_both() -> bool:
        shutil.rmtree(folder, ignore_errors=True)
        counted.append(scrape(port)["kqueue_tasks_done_total"])
        return all(outages(parent, pid)[0] for pid in workers)

    wait_for(removed_under_both, 30, "both worker processes to find their folder gone")

    # Then tasks sent afterwards are all done, by the same two worker processes: neither was restarted
    texts = [f"after{i}" for i in range(20)]
    send_all(tmp_path, texts)
    assert set(done_by(tmp_path, texts)[text] for text in texts) <= workers
    assert children(parent.proc.pid) == workers
    assert not any("starting another" in line for line in parent.err)

    # And the parent made the folder again: the counts rise on from where they were, never back, and /healthz is 200
    def counted_all() -> bool:
        counted.append(scrape(port)["kqueue_tasks_done_total"])
        return counted[-1] == 21

    wait_for(counted_all, 30, "21 tasks counted")
    assert counted == sorted(counted)
    wait_for(lambda: get(port, "/healthz") == (200, "ok: 2 worker processes connected and turning\n"), 10, "ok")
    assert (folder / "owner.lock").exists()
    # And each worker process said in a line when it could not write, and in another when it could again
    wait_for(lambda: all(0 < (o := outages(parent, pid))[0] == o[1] for pid in workers), 10, "each outage over")

    # And it stops cleanly, its folder removed
    parent.signal(signal.SIGTERM)
    assert parent.wait(30) == 0, parent.transcript()
    assert not folder.exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of the test's own, to fill; unmounted (lazily, should a process still use it) afterwards.

    Whether it can be had is found out by trying: `mount` needs root (or
    CAP_SYS_ADMIN, which a container may lack). Not root: skipped. Root, but
    the mount fails: skipped, except under CI, where it fails the test.
    """
    if os.geteuid() != 0:
        pytest.skip("filling a disk needs a small tmpfs, and mounting one needs root")
    where = tmp_path / "disk"
    where.mkdir()
    try:
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True, text=True, timeout=30
        )
        failure = " ".join(mount.stderr.split()) if mount.returncode else ""
    except OSError as error:  # no mount command
        failure = str(error)
    if failure:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"cannot mount a tmpfs as root: {failure}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


def fill(fd: int) -> None:
    """Write to `fd` until its disk is full (ENOSPC)."""
    while True:
        try:
            os.write(fd, bytes(65536))
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            return


def test_a_fleet_works_on_while_its_disk_is_full_and_reports_again_once_there_is_room(
    tmp_path: Path, small_disk: Path, fleets: list[Worker]
) -> None:
    # Given a healthy fleet of two whose temporary directory is a small disk of its own
    port = free_port()
    parent = start_fleet(fleets, tmp_path, small_disk, port)
    workers = children(parent.proc.pid)
    filler = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        # When a file fills that disk (topped up with what a worker process frees as it replaces its file),
        # until both worker processes found it full
        def full_for_both() -> bool:
            fill(filler)
            return all((o := outages(parent, pid))[0] > o[1] for pid in workers)

        wait_for(full_for_both, 30, "both worker processes to find the disk full")

        # Then tasks go on, done by the same two worker processes
        texts = [f"full{i}" for i in range(10)]
        send_all(tmp_path, texts)
        assert set(done_by(tmp_path, texts)[text] for text in texts) <= workers

        # And /healthz stays 200, saying, once their snapshots are old, which processes cannot write them
        wait_for(lambda: get(port, "/healthz")[1].count("cannot write its metrics snapshot") == 2, STALE_AFTER + 10)
        status, line = get(port, "/healthz")
        assert status == 200
        assert line.startswith("ok: 2 worker processes connected and turning; worker process ")
    finally:
        os.close(filler)

    # When the space is freed
    (small_disk / "filler").unlink()

    # Then the snapshots are written again: /healthz says ok alone, and the scrape counts the tasks done meanwhile
    wait_for(lambda: get(port, "/healthz") == (200, "ok: 2 worker processes connected and turning\n"), 10, "ok")
    wait_for(lambda: scrape(port)["kqueue_tasks_done_total"] == 10, 10, "10 tasks counted")
    # And each worker process said once that it could not write, and once that it could again; none was restarted
    wait_for(lambda: all(outages(parent, pid)[1] for pid in workers), 10, "writing again")
    assert [outages(parent, pid) for pid in workers] == [(1, 1), (1, 1)]
    assert children(parent.proc.pid) == workers
    assert not any("starting another" in line for line in parent.err)
    parent.signal(signal.SIGTERM)
    assert parent.wait(30) == 0, parent.transcript()


def test_the_next_fleet_removes_the_folder_a_sigkilled_one_left_and_no_other(
    tmp_path: Path, fleets: list[Worker]
) -> None:
    # Given a running fleet, and one whose parent and worker processes were all SIGKILLed, which left its folder behind
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    running = start_fleet(fleets, tmp_path, tmpdir, free_port())
    [kept] = tmpdir.glob("kqueue-fleet-*")
    killed = start_fleet(fleets, tmp_path, tmpdir, free_port())
    [stale] = set(tmpdir.glob("kqueue-fleet-*")) - {kept}
    doomed = [killed.proc.pid, *children(killed.proc.pid)]
    for pid in doomed:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in doomed), 10, "the killed fleet gone")
    assert stale.exists()

    # When the next fleet starts there
    following = start_fleet(fleets, tmp_path, tmpdir, free_port())

    # Then the stale folder is gone, said in a line; the running fleet's folder and the new one's are there
    [own] = set(tmpdir.glob("kqueue-fleet-*")) - {kept}
    assert own != stale
    assert (kept / "owner.lock").exists() and (own / "owner.lock").exists()
    assert any(f"removed {stale}, left by a fleet whose processes are all gone" in line for line in following.err)
    # And both stop cleanly, removing their own
    for parent in (running, following):
        parent.signal(signal.SIGTERM)
        assert parent.wait(30) == 0, parent.transcript()
    assert list(tmpdir.iterdir()) == []


def test_a_sigkilled_parents_folder_stays_while_its_worker_processes_finish_and_goes_after(
    tmp_path: Path, fleets: list[Worker]
) -> None:
    # Given a fleet, one of whose worker processes runs a task of two seconds
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    parent = start_fleet(fleets, tmp_path, tmpdir, free_port())
    [folder] = tmpdir.glob("kqueue-fleet-*")
    orphans = children(parent.proc.pid)
    long = "long" + "." * 20
    send_all(tmp_path, [long])
    wait_for(lambda: long in notes(tmp_path / "pids", "start"), 30, "the long task to start")

    # When only the parent is SIGKILLed
    parent.proc.kill()
    parent.proc.wait(10)

    # Then while its worker processes finish their tasks (they hold the folder's lock), a sweep leaves it alone
    assert sweep(tmpdir) == []
    # And once they have exited, the next sweep removes it
    wait_for(lambda: not any(alive(pid) for pid in orphans), 30, "the worker processes to finish and exit")
    assert long in notes(tmp_path / "pids", "done")
    assert sweep(tmpdir) == [folder]
