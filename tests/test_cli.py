"""The command-line tools, run in-process with click's CliRunner."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from kqueue import cli
from kqueue.brokers import connect
from kqueue.queues import messages_ready, task_queue


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """memory:// allowed, since the tools run in this process; a queue of the test's own."""
    monkeypatch.setattr(cli.common, "REFUSE_MEMORY", False)
    yield f"cli-{uuid.uuid4().hex[:10]}"


def send(runner: CliRunner, queue: str, *args: str) -> Result:
    return runner.invoke(cli.send_main, ["--broker", "memory://", "--queue", queue, *args])


def work(runner: CliRunner, queue: str, *args: str) -> Result:
    return runner.invoke(cli.work_main, ["--broker", "memory://", "--queue", queue, "--burst", *args])


def ready(queue: str) -> int:
    conn = connect("memory://")
    return messages_ready(conn.default_channel, task_queue(queue))


def test_send_prints_the_tutorials_line(runner: CliRunner, in_process: str) -> None:
    result = send(runner, in_process, "First", "message.")

    assert result.exit_code == 0, result.output
    assert result.stdout == " [x] Sent 'First message.'\n"
    assert ready(in_process) == 1


def test_send_without_words_sends_hello_world(runner: CliRunner, in_process: str) -> None:
    result = send(runner, in_process)

    assert result.stdout == " [x] Sent 'Hello World!'\n"


def test_send_file_sends_a_message_per_line(runner: CliRunner, in_process: str) -> None:
    result = runner.invoke(
        cli.send_main,
        ["--broker", "memory://", "--queue", in_process, "--file", "-"],
        input="one.\ntwo..\n\nthree...\n",
    )

    assert result.exit_code == 0, result.output
    assert result.stdout == f" [x] Sent 3 messages to {in_process!r}\n"
    assert ready(in_process) == 3


def test_work_prints_received_and_done_for_each_task(runner: CliRunner, in_process: str) -> None:
    send(runner, in_process, "First message.")
    send(runner, in_process, "Second message..")

    result = work(runner, in_process, "--dot-seconds", "0")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        " [*] Waiting for messages. To exit press CTRL+C",
        " [x] Received 'First message.'",
        " [x] Done",
        " [x] Received 'Second message..'",
        " [x] Done",
    ]
    assert ready(in_process) == 0


def test_work_runs_a_handler_given_by_its_path(runner: CliRunner, in_process: str) -> None:
    send(runner, in_process, "shout")

    result = work(runner, in_process, "--handler", "tests.handlers:record")

    from tests import handlers

    assert result.exit_code == 0, result.output
    assert "shout" in handlers.SEEN


def test_work_max_tasks_leaves_the_rest(runner: CliRunner, in_process: str) -> None:
    for word in ("a", "b", "c"):
        send(runner, in_process, word)

    result = runner.invoke(
        cli.work_main, ["--broker", "memory://", "--queue", in_process, "--max-tasks", "2", "--dot-seconds", "0"]
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.count(" [x] Done") == 2
    assert ready(in_process) == 1


def one_error_line(result: Result, code: int, *fragments: str) -> None:
    lines = result.stderr.splitlines()
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("tool", [cli.send_main, cli.work_main])
def test_memory_is_refused_with_the_reason(runner: CliRunner, tool: object) -> None:
    result = runner.invoke(tool, ["--broker", "memory://"])  # type: ignore[arg-type]

    one_error_line(result, 2, "memory://", "gone when the process exits")


@pytest.mark.parametrize("tool", [cli.send_main, cli.work_main])
@pytest.mark.parametrize(
    ("url", "fragments"),
    [
        ("nosuch://host", ["unknown broker URL scheme 'nosuch'"]),
        ("amqp://guest:s3cret@localhost:notaport//", ["malformed broker URL", "guest:**@"]),
        ("redis://localhost:6379/0?visibility_timeout=soon", ["visibility_timeout", "not a number"]),
    ],
)
def test_bad_broker_urls_get_one_line(runner: CliRunner, tool: object, url: str, fragments: list[str]) -> None:
    result = runner.invoke(tool, ["--broker", url])  # type: ignore[arg-type]

    one_error_line(result, 1, *fragments)
    assert "s3cret" not in result.output


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("tool", [cli.send_main, cli.work_main])
def test_an_unreachable_broker_is_named_with_its_password_masked(
    runner: CliRunner, tool: object, closed_port: int
) -> None:
    result = runner.invoke(tool, ["--broker", f"amqp://guest:s3cret@127.0.0.1:{closed_port}//"])  # type: ignore[arg-type]

    one_error_line(result, 1, "cannot connect to broker", f"amqp://guest:**@127.0.0.1:{closed_port}//", "refused")
    assert "s3cret" not in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--prefetch", "0"], "'--prefetch': 0 is not in the range x>=1"),
        (["--prefetch", ""], "'--prefetch'"),
        (["--concurrency", "many"], "'--concurrency'"),
        (["--dot-seconds", "-1"], "'--dot-seconds': -1.0 is not in the range x>=0"),
        (["--handler", "no_such_module:run"], "'no_such_module' does not import"),
        (["--handler", "os:no_such_function"], "has no 'no_such_function'"),
        (["--handler", "just-a-name"], "not of the form module:function"),
        (["--queue-type", "stream"], "'--queue-type'"),
        (["--log-format", "xml"], "'--log-format'"),
    ],
)
def test_work_usage_errors_get_one_line(runner: CliRunner, args: list[str], fragment: str) -> None:
    result = runner.invoke(cli.work_main, args)

    one_error_line(result, 2, "kqueue-work: error:", fragment)


def test_send_refuses_words_and_file_together(runner: CliRunner, in_process: str) -> None:
    result = runner.invoke(cli.send_main, ["--broker", "memory://", "--file", "-", "hello"], input="x\n")

    one_error_line(result, 2, "either WORDS or --file")


def test_an_empty_queue_name_is_refused(runner: CliRunner) -> None:
    result = runner.invoke(cli.send_main, ["--queue", "", "hello"])

    one_error_line(result, 2, "--queue must not be empty")


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(cli.work_main, ["--version"])

    assert result.exit_code == 0
    assert "kqueue, version" in result.output


def test_work_quiet_prints_no_line_per_task(runner: CliRunner, in_process: str) -> None:
    send(runner, in_process, "First message.")

    result = work(runner, in_process, "--dot-seconds", "0", "--quiet")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [" [*] Waiting for messages. To exit press CTRL+C"]
    assert "task done" not in result.stderr
    assert ready(in_process) == 0


def test_without_a_broker_the_tools_use_a_sqlite_file_in_the_data_directory_and_say_so(
    runner: CliRunner, tmp_path: Path
) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path), "KQUEUE_BROKER_URL": None}
    expected = f"sqlite:///{tmp_path / 'kqueue' / 'queues.db'}"

    sent = runner.invoke(cli.send_main, ["First message."], env=env)
    worked = runner.invoke(cli.work_main, ["--burst", "--dot-seconds", "0"], env=env)

    assert sent.exit_code == 0, sent.output
    assert sent.stdout == " [x] Sent 'First message.'\n"
    assert sent.stderr.splitlines() == [
        f"kqueue-send: broker {expected} (the default; --broker or KQUEUE_BROKER_URL for another)"
    ]
    assert (tmp_path / "kqueue" / "queues.db").exists()
    assert worked.exit_code == 0, worked.output
    assert " [x] Received 'First message.'" in worked.stdout
    assert expected in worked.stderr
    assert "a SQLite file in your data directory" in " ".join(runner.invoke(cli.send_main, ["--help"]).stdout.split())
