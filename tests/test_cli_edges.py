"""The rough edges a newcomer met with the tools, each as the installed command shows it."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from kombu import Connection

from kqueue.producer import Sender
from kqueue.queues import task_queue
from tests.broker.procs import Worker, tool
from tests.conftest import wait_for


def run(*args: str | bytes, cwd: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(str(args[0])), *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        **kwargs,  # type: ignore[call-overload]
    )


def rows(path: Path) -> list[str]:
    """The tasks in a sqlite:// file, oldest first, read without kqueue (Kombu keeps bodies in base64)."""
    db = sqlite3.connect(path)
    try:
        payloads = [json.loads(p)["body"] for (p,) in db.execute("SELECT payload FROM messages ORDER BY id")]
    finally:
        db.close()
    return [base64.b64decode(body).decode() for body in payloads]


def one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'queues.db'}"


# -- kqueue-send --file ------------------------------------------------------------------------


def test_the_progress_of_a_batch_moves_as_sqlite_commits_it(url: str) -> None:
    # Given a batch bigger than a commit, on sqlite://, whose confirms come as it commits
    seen: list[int] = []
    with Connection(f"{url}?confirm_batch=100") as conn, Sender(conn, task_queue("t")) as sender:
        # When it is sent
        sender.send_many([f"task {n}" for n in range(1000)], on_confirmed=seen.append)

    # Then the progress callback moved with every commit, not once at the end
    assert seen[0] == 100 and seen[-1] == 1000 and len(seen) >= 10
    assert seen == sorted(seen)


def test_ctrl_c_during_a_batch_says_how_many_were_confirmed_and_how_to_send_the_rest(tmp_path: Path) -> None:
    # Given a long batch on its way, a commit (and an fsync) every 20 messages
    db = tmp_path / "queues.db"
    lines = [f"task {n}" for n in range(20000)]
    batch = tmp_path / "batch.txt"
    batch.write_text("\n".join(lines) + "\n")
    sender = subprocess.Popen(
        [tool("kqueue-send"), "--broker", f"sqlite:///{db}?confirm_batch=20", "--file", str(batch)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: db.exists() and _count(db) >= 200, message="part of the batch stored")

    # When it gets Ctrl+C
    sender.send_signal(signal.SIGINT)
    _, err = sender.communicate(timeout=30)

    # Then it says how many were confirmed, and which --skip sends the rest
    assert sender.returncode in (0, 130), err
    if sender.returncode == 0:
        pytest.skip("the batch finished before the signal came")  # a fast machine: nothing to interrupt
    (line,) = err.strip().splitlines()
    assert line.startswith("kqueue-send: error: interrupted; confirmed ") and "of 20000 messages" in line, line
    skip = int(line.rsplit("--skip ", 1)[1])
    stored = _count(db)
    assert skip <= stored and rows(db)[:skip] == lines[:skip]

    # And the rest, sent with that --skip, completes the batch with nothing missing
    rest = run("kqueue-send", "--broker", f"sqlite:///{db}", "--file", str(batch), "--skip", str(skip))
    assert rest.returncode == 0, rest.stderr
    assert set(rows(db)) == set(lines)


def _count(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def test_a_line_that_is_not_utf8_is_named_by_its_number_and_nothing_is_sent(url: str, tmp_path: Path) -> None:
    batch = tmp_path / "batch.txt"
    batch.write_bytes(b"".join(b"fine %d\n" % n for n in range(5000)) + b"caf\xe9\n" + b"more\n")

    line = one_line(run("kqueue-send", "--broker", url, "--file", str(batch)), 1)

    assert (
        line
        == f"kqueue-send: error: {batch}: line 5001 is not UTF-8 (byte 4 of the line is b'\\xe9'): nothing was sent"
    )
    assert _count(tmp_path / "queues.db") == 0


def test_a_word_that_is_not_utf8_is_bad_usage(url: str) -> None:
    result = subprocess.run(
        [os.fsencode(tool("kqueue-send")), b"--broker", os.fsencode(url), b"caf\xe9"],
        capture_output=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert (
        result.stderr.decode()
        == "kqueue-send: error: word 1 is not UTF-8 (byte b'\\xe9'): tasks are sent as UTF-8 text\n"
    )


def test_a_byte_order_mark_does_not_reach_the_first_task(url: str, tmp_path: Path) -> None:
    batch = tmp_path / "batch.txt"
    batch.write_bytes("\ufefffirst\nsecond\n".encode())

    assert run("kqueue-send", "--broker", url, "--file", str(batch)).returncode == 0

    assert rows(tmp_path / "queues.db") == ["first", "second"]


def test_counts_are_said_in_the_singular_for_one(url: str, tmp_path: Path) -> None:
    batch = tmp_path / "one.txt"
    batch.write_text("only\n")

    assert run("kqueue-send", "--broker", url, "--file", str(batch)).stdout == " [x] Sent 1 message to 'task_queue'\n"
    assert run("kqueue", "dead", "list", "--broker", url).stdout == "0 dead letters in task_queue.dead\n"
    assert run("kqueue", "purge", "--yes", "--broker", url).stdout == "purged 1 message from task_queue\n"


def test_a_task_of_megabytes_is_shown_cut_short(url: str, tmp_path: Path) -> None:
    # A word of 3 MB is past what an argument list may hold: the word goes in a file, and is shown from the worker
    big = "x" * 3_000_000
    (tmp_path / "big.txt").write_text(big + "\n")
    long_word = "y" * 100_000

    sent = run("kqueue-send", "--broker", url, long_word)
    assert run("kqueue-send", "--broker", url, "--file", str(tmp_path / "big.txt")).returncode == 0
    worked = run("kqueue-work", "--broker", url, "--burst", "--dot-seconds", "0")

    assert sent.stdout == f" [x] Sent {'y' * 200!r}... (100,000 characters)\n"
    assert f" [x] Received {'x' * 200!r}... (3,000,000 characters)\n" in worked.stdout
    assert len(worked.stdout) < 1000


# -- kqueue-work --------------------------------------------------------------------------------


def test_verbose_shows_a_failing_handlers_traceback(url: str) -> None:
    assert run("kqueue-send", "--broker", url, "boom").returncode == 0

    worked = run(
        "kqueue-work", "--broker", url, "--burst", "-v", "--handler", "tests.handlers:fail", "--max-retries", "0"
    )

    assert "Traceback (most recent call last)" in worked.stderr
    assert 'tests/handlers.py", line' in worked.stderr and "RuntimeError: cannot handle 'boom'" in worked.stderr


def test_a_handler_module_that_fails_to_import_says_what_and_where(tmp_path: Path) -> None:
    (tmp_path / "broken_tasks.py").write_text("settings = {}\nmissing = settings['missing']\n")

    line = one_line(
        run("kqueue-work", "--broker", f"sqlite:///{tmp_path / 'q.db'}", "--handler", "broken_tasks:run", cwd=tmp_path),
        2,
    )

    assert "handler module 'broken_tasks' does not import: KeyError: 'missing'" in line
    assert f"(at {tmp_path / 'broken_tasks.py'}, line 2)" in line


def test_a_second_ctrl_c_that_cuts_a_task_short_exits_130(url: str) -> None:
    assert run("kqueue-send", "--broker", url, "long" + "." * 100).returncode == 0
    worker = Worker(url, "task_queue", "--dot-seconds", "1")
    try:
        worker.wait_for(" [x] Received")

        worker.signal(signal.SIGINT)
        worker.wait_for("finishing running tasks", stream="err")
        worker.signal(signal.SIGINT)

        assert worker.wait(30) == 130
        assert worker.err[-1] == "kqueue-work: stopped at once: 1 task given back unfinished"
    finally:
        worker.stop()


# -- the broker URL and the admin tool ------------------------------------------------------------


def test_a_relative_sqlite_url_is_named_as_the_absolute_file(tmp_path: Path) -> None:
    result = run("kqueue-send", "--broker", "sqlite:///rel.db", "hi", cwd=tmp_path)

    assert result.returncode == 0
    assert result.stderr == (
        f"kqueue-send: broker sqlite:///{tmp_path / 'rel.db'} (the file 'sqlite:///rel.db' names from this folder)\n"
    )


@pytest.mark.parametrize("broker", ["memory://", "sqlite://:memory:", "sqlite:///:memory:"])
def test_an_in_memory_broker_is_bad_usage_for_the_tools(broker: str) -> None:
    line = one_line(run("kqueue-send", "--broker", broker, "hi"), 2)

    assert line.startswith("kqueue-send: error: ")


def test_the_broker_options_may_come_before_the_admin_command(url: str) -> None:
    assert run("kqueue-send", "--broker", url, "--queue", "jobs", "hi").returncode == 0

    before = run("kqueue", "--broker", url, "--queue", "jobs", "stat")
    after = run("kqueue", "stat", "--broker", url, "--queue", "jobs")

    assert before.returncode == 0, before.stderr
    assert before.stdout == after.stdout
    assert before.stdout.splitlines()[1].split() == ["jobs", "1", "0", "0", "0"]


def test_kqueue_alone_prints_its_help() -> None:
    result = run("kqueue")

    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("Usage: kqueue [OPTIONS] [COMMAND] [ARGS]...")
    assert "stat" in result.stdout and "purge" in result.stdout


# -- function tasks and delays ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "app", "words"),
    [
        ({"jobs.py": "import kqueue\nsettings = {}\nx = settings['x']\n"}, "jobs", "app module 'jobs' does not import"),
        ({"jobs.py": "VALUE = 1\n"}, "jobs", "should hold one kqueue.App, and holds none"),
        (
            {"jobs.py": "import kqueue\na = kqueue.App()\nb = kqueue.App()\n"},
            "jobs",
            "holds 2 of them (a, b): name it (jobs:NAME)",
        ),
        ({"jobs.py": "VALUE = 1\n"}, "jobs:VALUE", "is a int, not a kqueue.App"),
        ({"jobs.py": "import kqueue\napp = kqueue.App()\n"}, "jobs", "registers no task"),
    ],
)
def test_an_app_that_cannot_be_run_is_one_line(tmp_path: Path, files: dict[str, str], app: str, words: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)

    line = one_line(run("kqueue-work", "--broker", f"sqlite:///{tmp_path / 'q.db'}", "--app", app, cwd=tmp_path), 2)

    assert "--app" in line and words in line


def test_an_apps_worker_takes_the_apps_queue_unless_told_another(tmp_path: Path) -> None:
    (tmp_path / "jobs.py").write_text("import kqueue\napp = kqueue.App(queue='jobs')\napp.task(print, name='say')\n")
    url = f"sqlite:///{tmp_path / 'q.db'}"
    with Connection(url) as conn, Sender(conn, task_queue("jobs")) as sender:
        sender.send("a text task on the apps queue")

    worked = run("kqueue-work", "--broker", url, "--app", "jobs", "--burst", "--dot-seconds", "0", cwd=tmp_path)

    assert worked.returncode == 0, worked.stderr
    assert " [x] Received 'a text task on the apps queue'" in worked.stdout
    assert "queue=jobs" in worked.stderr


@pytest.mark.parametrize(
    ("delay", "words"),
    [
        ("-1", "a delay cannot be negative"),
        ("5e9", "longer than the longest kqueue keeps"),
        ("soon", "is not a valid float"),
        ("nan", "a delay is a number of seconds"),
    ],
)
def test_a_delay_out_of_range_is_bad_usage(url: str, delay: str, words: str) -> None:
    line = one_line(run("kqueue-send", "--broker", url, "--delay", delay, "hi"), 2)

    assert "--delay" in line and words in line


def test_a_module_that_is_not_there_is_named_without_kqueues_own_lines(tmp_path: Path) -> None:
    line = one_line(
        run("kqueue-work", "--broker", f"sqlite:///{tmp_path / 'q.db'}", "--app", "nosuch", cwd=tmp_path), 2
    )

    assert line.endswith("app module 'nosuch' does not import: ModuleNotFoundError: No module named 'nosuch'"), line
