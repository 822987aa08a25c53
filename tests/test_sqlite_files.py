"""The queue file itself: whose it is, who may use it, how it shrinks, and how owners appear in it."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Producer, Queue

from kqueue.sqlite.options import Options
from kqueue.sqlite.owners import alive
from kqueue.sqlite.schema import APPLICATION_ID, SCHEMA_VERSION, prepare
from kqueue.sqlite.store import Store
from tests.broker.procs import tool


def task_queue(name: str = "tasks") -> Queue:
    return Queue(name, exchange=Exchange(""), routing_key=name, durable=True)


def send(url: str, count: int) -> None:
    with Connection(url) as conn:
        channel = conn.channel()
        channel.confirm_select()
        producer = Producer(channel)
        for n in range(count):
            producer.publish(f"task {n} " + "x" * 200, routing_key="tasks", serializer="json", declare=[task_queue()])
        channel.flush()


def header(path: Path) -> tuple[int, int, str, set[str]]:
    """application_id, user_version, journal mode and table names, read without kqueue."""
    db = sqlite3.connect(path)
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        app, version = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("application_id", "user_version"))
        return app, version, db.execute("PRAGMA journal_mode").fetchone()[0], tables
    finally:
        db.close()


def run_tool(*args: str, user: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [tool(args[0]), *args[1:]]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd)


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(word in lines[0] for word in words), lines[0]


# -- whose file -----------------------------------------------------------------------------


def test_another_applications_database_is_refused_in_one_line_and_left_untouched(tmp_path: Path) -> None:
    # Given an application's database, not in WAL mode, with a schema version of its own
    path = tmp_path / "app.db"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE users (name TEXT); PRAGMA user_version = 3;")
    db.close()
    before = header(path)

    # When kqueue-send is pointed at it
    result = run_tool("kqueue-send", "--broker", f"sqlite:///{path}", "hello")

    # Then it says the file is not a queue file, and the file is as it was
    one_line_error(result, str(path), "is not a kqueue queue file", "users")
    assert header(path) == before == (0, 3, "delete", {"users"})
    assert not Path(f"{path}-wal").exists()


def test_a_database_with_no_version_but_tables_of_its_own_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE orders (id INTEGER)")
    db.close()

    result = run_tool("kqueue", "stat", "--broker", f"sqlite:///{path}")

    one_line_error(result, "is not a kqueue queue file", "orders")
    assert header(path) == (0, 0, "delete", {"orders"})


def test_a_queue_file_of_a_newer_kqueue_is_refused_and_names_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queues.db'}"
    send(url, 1)
    db = sqlite3.connect(tmp_path / "queues.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()

    result = run_tool("kqueue-work", "--broker", url, "--burst")

    one_line_error(result, "made by a newer kqueue", f"schema {SCHEMA_VERSION + 1}")


def file_of_an_earlier_schema(tmp_path: Path, script: str) -> str:
    """A queue file holding three tasks, taken back to an earlier schema by `script`; its URL."""
    url = f"sqlite:///{tmp_path / 'queues.db'}"
    send(url, 3)
    db = sqlite3.connect(tmp_path / "queues.db")
    db.executescript(script)
    db.close()
    return url


def test_a_queue_file_of_the_first_schema_is_upgraded_with_its_tasks(tmp_path: Path) -> None:
    # Given a file as kqueue's first schema left it: the tables, user_version 1, no application id
    url = file_of_an_earlier_schema(
        tmp_path, "DROP TABLE delayed; DROP TABLE tallies; PRAGMA application_id = 0; PRAGMA user_version = 1;"
    )

    # When a worker opens it
    result = run_tool("kqueue-work", "--broker", url, "--queue", "tasks", "--burst", "--dot-seconds", "0")

    # Then it is kqueue's, of this version, and its tasks were done
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("[x] Done") == 3
    assert header(tmp_path / "queues.db")[:2] == (APPLICATION_ID, SCHEMA_VERSION)


def test_a_queue_file_of_the_second_schema_gets_the_delayed_table_and_keeps_its_tasks(tmp_path: Path) -> None:
    # Given a file as kqueue 0.1 left it: schema 2, no table of delayed tasks
    url = file_of_an_earlier_schema(tmp_path, "DROP TABLE delayed; DROP TABLE tallies; PRAGMA user_version = 2;")

    # When a task is sent with a delay, and a worker runs four tasks
    sent = run_tool("kqueue-send", "--broker", url, "--queue", "tasks", "--delay", "0.3", "later")
    assert sent.returncode == 0, sent.stderr
    result = run_tool("kqueue-work", "--broker", url, "--queue", "tasks", "--max-tasks", "4", "--dot-seconds", "0")

    # Then the file is of this version, and the three tasks and the delayed one were done
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("[x] Done") == 4
    assert header(tmp_path / "queues.db")[:2] == (APPLICATION_ID, SCHEMA_VERSION)


# -- who may use it ---------------------------------------------------------------------------


@pytest.fixture
def other_user() -> int:
    """The uid of 'nobody', for running a tool as another OS user (root only)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running a tool as another user needs root and setpriv")
    return 65534


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder every user may write, as a shared queue's is (pytest's own temporary folders are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="kqueue-shared-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_a_read_only_queue_file_is_one_line_and_leaves_nothing_behind(other_user: int, shared: Path) -> None:
    # Given a queue file of another user's, which this one may only read
    url = f"sqlite:///{shared / 'queues.db'}"
    assert run_tool("kqueue-send", "--broker", url, "first", user=other_user).returncode == 0
    (shared / "queues.db").chmod(0o444)

    # When it sends, it is refused in one line naming the file and what to do, and no -wal or -shm is left
    result = run_tool("kqueue-send", "--broker", url, "second", user=other_user)
    one_line_error(result, "is not writable by this user", "queues.db")
    assert sorted(p.name for p in shared.iterdir()) == ["queues.db"]

    # And once the file is writable again, it works at once
    (shared / "queues.db").chmod(0o644)
    assert run_tool("kqueue-send", "--broker", url, "third", user=other_user).returncode == 0


def test_a_queue_shared_by_two_users_works_when_both_may_write_it(other_user: int, shared: Path) -> None:
    # Given a queue made by one user with a worker on it, the file writable by all (SQLite gives
    # its -wal and -shm files the file's mode) and the owners' folder too (umask 000)
    url = f"sqlite:///{shared / 'queues.db'}"
    old = os.umask(0)
    try:
        assert run_tool("kqueue-send", "--broker", url, "mine").returncode == 0
        (shared / "queues.db").chmod(0o666)
        worker = subprocess.Popen([tool("kqueue-work"), "--broker", url, "--dot-seconds", "0"], text=True)
        try:
            # When another user sends to it and looks at it
            sent = run_tool("kqueue-send", "--broker", url, "theirs", user=other_user)
            stat = run_tool("kqueue", "stat", "--broker", url, user=other_user)
        finally:
            worker.terminate()
            worker.wait(30)
    finally:
        os.umask(old)

    # Then both work, and the worker counts as a consumer for the other user too
    assert sent.returncode == 0, sent.stderr
    assert stat.returncode == 0, stat.stderr
    assert "task_queue" in stat.stdout


def test_a_queue_of_another_user_that_this_one_may_not_write_is_one_line(other_user: int, shared: Path) -> None:
    url = f"sqlite:///{shared / 'queues.db'}"
    old = os.umask(0o022)
    try:
        assert run_tool("kqueue-send", "--broker", url, "mine").returncode == 0
    finally:
        os.umask(old)

    one_line_error(run_tool("kqueue", "stat", "--broker", url, user=other_user), "is not writable by this user")


# -- how it shrinks -----------------------------------------------------------------------------


def test_a_purged_queue_gives_its_space_back_to_the_disk(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queues.db'}"
    send(url, 20000)
    full = os.path.getsize(tmp_path / "queues.db")

    result = run_tool("kqueue", "purge", "--yes", "--broker", url, "--queue", "tasks")

    assert result.returncode == 0, result.stderr
    assert full > 4 << 20 and os.path.getsize(tmp_path / "queues.db") < full // 10


def test_a_queue_worked_empty_gives_its_space_back_to_the_disk(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queues.db'}"
    send(url, 20000)
    full = os.path.getsize(tmp_path / "queues.db")

    result = run_tool("kqueue-work", "--broker", url, "--queue", "tasks", "--burst", "-q", "--prefetch", "100")

    assert result.returncode == 0, result.stderr
    assert os.path.getsize(tmp_path / "queues.db") < full // 10


# -- how owners appear ---------------------------------------------------------------------------


def test_a_new_owner_is_never_taken_for_dead(tmp_path: Path) -> None:
    # Given a prober that takes any owner's lock it can, as every idle consumer's look for dead owners does
    path = tmp_path / "queues.db"
    send(f"sqlite:///{path}", 1)
    owners_dir = Path(f"{path}.owners")
    owners_dir.mkdir()
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            for name in os.listdir(owners_dir):
                if name.endswith(".lock"):
                    alive(owners_dir, name[: -len(".lock")])

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        # When owners are made one after another beside it
        for _ in range(300):
            store = Store(path, Options())
            try:
                store.ensure_owner()
                assert store.owner is not None
                lock = owners_dir / f"{store.owner.id}.lock"
                # Then each one's lock file is the one it holds, under its name
                assert lock.exists() and os.stat(lock).st_ino == os.fstat(store.owner._fd).st_ino
                assert alive(owners_dir, store.owner.id)
            finally:
                store.close()
    finally:
        stop.set()
        prober.join(10)


def test_connections_opening_a_new_file_at_once_all_take_it_for_kqueues(tmp_path: Path) -> None:
    # Given several connections opening the same new file at the same moment, again and again
    errors: list[BaseException] = []

    def open_it(path: Path, start: threading.Barrier) -> None:
        start.wait()
        try:
            prepare(path, Options())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    for round_ in range(120):
        start = threading.Barrier(6)
        path = tmp_path / f"new-{round_}.db"
        threads = [threading.Thread(target=open_it, args=(path, start)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

        # Then none of them saw half of another's creation, and the file is kqueue's
        assert not errors, errors[0]
        assert header(path)[:2] == (APPLICATION_ID, SCHEMA_VERSION)


def test_a_queue_file_without_tallies_gets_them_and_counts_from_then_on(tmp_path: Path) -> None:
    # Given a file of this schema as a kqueue before tallies left it: no count of what was published
    url = file_of_an_earlier_schema(tmp_path, "DROP TABLE tallies; PRAGMA user_version = 3;")

    # When two more tasks are sent
    for text in ("a", "b"):
        sent = run_tool("kqueue-send", "--broker", url, "--queue", "tasks", text)
        assert sent.returncode == 0, sent.stderr

    # Then the file is of the same version (an earlier kqueue still opens it), counting the two sent since
    assert header(tmp_path / "queues.db")[:2] == (APPLICATION_ID, SCHEMA_VERSION)
    db = sqlite3.connect(tmp_path / "queues.db")
    try:
        assert db.execute("SELECT queue, published FROM tallies").fetchall() == [("tasks", 2)]
    finally:
        db.close()
