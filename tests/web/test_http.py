"""`kqueue web` over plain HTTP, as a real process: what it refuses, and what it never shows."""

from __future__ import annotations

import html
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kqueue.web.board import REFRESH, Board
from tests.broker.procs import run_send, tool
from tests.conftest import wait_for
from tests.web.conftest import WebProcess


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    return fetch(urllib.request.Request(url, headers=headers or {}))


def post(url: str, body: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    return fetch(urllib.request.Request(url, data=body.encode(), headers=headers or {}, method="POST"))


def fetch(request: urllib.request.Request) -> tuple[int, str]:
    """The status and the body of the reply, an error's included."""
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def csrf_of(page: str) -> str:
    return page.split('"X-KQueue-CSRF": "', 1)[1].split('"', 1)[0]


def run_web(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("kqueue"), "web", *args], capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})}
    )


def one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("kqueue: broker ")]
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert all(word in lines[0] for word in words), lines[0]


def test_another_address_than_loopback_is_refused_without_a_token(tmp_path: Path) -> None:
    result = run_web("--broker", f"sqlite:///{tmp_path / 'q.db'}", "--host", "0.0.0.0", "--port", "0")

    one_line(result, 2, "--host 0.0.0.0 is reachable from other machines", "--token or KQUEUE_WEB_TOKEN")


def test_a_port_taken_is_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_web("--broker", f"sqlite:///{tmp_path / 'q.db'}", "--port", str(port))

    one_line(result, 1, f"cannot listen on 127.0.0.1:{port}", "in use")


def test_without_the_web_extra_it_says_what_to_install(tmp_path: Path) -> None:
    # Given an interpreter where Starlette cannot be imported, as without the extra
    code = "import sys; sys.modules['starlette'] = None; from kqueue.cli import admin_main; admin_main()"
    result = subprocess.run(
        [sys.executable, "-c", code, "web", "--broker", f"sqlite:///{tmp_path / 'q.db'}"],
        capture_output=True,
        text=True,
        timeout=30,
    )

    one_line(result, 1, "kqueue web needs starlette", "pip install 'kqueue[web]'")


def test_an_action_needs_the_page_s_csrf_token_and_its_origin(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    assert run_send(url, "jobs", "keep me").returncode == 0
    web = WebProcess("--broker", url, "--queue", "jobs")
    try:
        status, page = get(web.url)
        assert status == 200
        token = csrf_of(page)
        purge = f"{web.url}actions/purge"

        # A form posted from elsewhere: no token, or another site's origin with the right one
        assert post(purge, "queue=jobs")[0] == 403
        assert post(purge, "queue=jobs", {"X-KQueue-CSRF": "guess"})[0] == 403
        evil = {"X-KQueue-CSRF": token, "Origin": "http://evil.example"}
        assert post(purge, "queue=jobs", evil)[0] == 403
        # A queue that is not on the page
        status, said = post(purge, "queue=other", {"X-KQueue-CSRF": token})
        assert status == 200 and "no queue 'other' on this page" in html.unescape(said)
        assert get(f"{web.url}parts/dead?queue=other", {"X-KQueue-CSRF": token})[0] == 404
        # Reading the dead letters gives them back to the broker: not for a request of another site's
        assert get(f"{web.url}parts/dead?queue=jobs")[0] == 403
        assert get(f"{web.url}parts/queues")[0] == 403

        # Then nothing was purged; with the token from the page itself, it is
        assert "keep me" in run_tool_stat(url)
        status, said = post(purge, "queue=jobs", {"X-KQueue-CSRF": token})
        assert status == 200 and "purged 1 message from jobs" in said
    finally:
        assert web.stop() == 0


def run_tool_stat(url: str) -> str:
    """The queue's tasks as a worker would see them: peeked with kqueue's own reader."""
    from kqueue.brokers import connect
    from kqueue.queues import task_queue

    conn = connect(url)
    try:
        bound = task_queue("jobs")(conn.default_channel)
        message = bound.get(no_ack=False)
        if message is None:
            return ""
        message.requeue()
        return str(message.body)
    finally:
        conn.release()


def test_a_loopback_page_answers_only_to_loopback_names(tmp_path: Path) -> None:
    web = WebProcess("--broker", f"sqlite:///{tmp_path / 'q.db'}")
    try:
        # DNS rebinding: a name of the attacker's, pointed at 127.0.0.1
        assert get(web.url, {"Host": "evil.example"})[0] == 400
        assert get(web.url.replace("127.0.0.1", "localhost"))[0] == 200
    finally:
        web.stop()


def test_a_token_is_asked_of_every_request_and_taken_from_a_bearer_header(tmp_path: Path) -> None:
    web = WebProcess("--broker", f"sqlite:///{tmp_path / 'q.db'}", "--host", "0.0.0.0", "--token", "t0ken")
    try:
        port = web.url.rsplit(":", 1)[1].strip("/")
        home = f"http://127.0.0.1:{port}/"
        assert get(home)[0] == 401
        assert get(f"{home}parts/queues")[0] == 401
        assert get(f"{home}static/htmx.min.js")[0] == 401
        assert get(home, {"Authorization": "Bearer nope"})[0] == 401
        assert get(f"{home}?token=%C3%A9t%C3%A9")[0] == 401  # not ASCII: refused all the same
        assert get(home, {"Authorization": "Bearer t0ken"})[0] == 200
    finally:
        web.stop()


@pytest.mark.broker
def test_the_broker_s_password_is_never_on_the_page(amqp_url: str) -> None:
    web = WebProcess("--broker", amqp_url, "--queue", "kqueue-web-password")
    try:
        status, page = get(web.url)
        password = amqp_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
        assert status == 200 and ":**@" in page
        assert f":{password}@" not in page
        assert f":{password}@" not in "\n".join(web.err)
    finally:
        web.stop()
        from tests.conftest import delete_queues

        delete_queues(amqp_url, "kqueue-web-password", "kqueue-web-password.dead")


def test_on_a_fresh_machine_it_shows_the_default_queue_with_nothing_to_set_up(tmp_path: Path) -> None:
    # Given no broker URL, no queue, and a data directory with nothing in it
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    env.update({key: "" for key in ("KQUEUE_BROKER_URL", "KQUEUE_QUEUE")})
    clean = {k: v for k, v in {**os.environ, **env}.items() if v}
    web = WebProcess(env=clean)
    try:
        status, page = get(web.url)
        assert status == 200
        assert 'data-queue="task_queue"' in page
        assert str(tmp_path / "data" / "kqueue" / "queues.db") in page
    finally:
        web.stop()


def test_every_kqueue_queue_of_a_sqlite_file_is_found_and_its_rates_measured(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    for name in ("emails", "thumbnails"):
        assert run_send(url, name, "first").returncode == 0
    board = Board(url)
    try:
        # Then both queues are shown, and no other
        assert [row.name for row in board.read().rows] == ["emails", "thumbnails"]

        # When ten more tasks come to one, the next reading measures them coming in
        assert run_send(url, "emails", "--file", "-", input="".join(f"t{n}\n" for n in range(10))).returncode == 0

        def measured() -> float | None:
            emails = board.read().rows[0]
            return emails.rate_in

        rate = wait_for(measured, timeout=3 * REFRESH, message="a rate in")
        assert 0 < rate <= 10 / (REFRESH * 0.5)
        assert board.read().rows[0].ready == 11
    finally:
        board.close()


@pytest.mark.broker
def test_rabbitmq_s_delayed_tasks_are_counted_from_the_management_api_until_they_come_due(amqp_url: str) -> None:
    from tests.conftest import delete_queues, unique

    name = unique("web-delayed")
    board = Board(amqp_url, (name,))
    try:
        # Longer than the management API takes to update its counts (every 5 s), with room to see it
        assert run_send(amqp_url, name, "--delay", "15", "later").returncode == 0

        sent = time.monotonic()

        # While it waits in the chain, the page counts it; once due, it is in the queue. The chain's
        # count is the virtual host's, so the first wait may end at once; the second is timed from
        # the send: due at 15 s, then up to two of the management API's 5 s updates, with room.
        assert wait_for(lambda: (board.read().rows[0].delayed or 0) >= 1, timeout=14, message="delayed")
        left = sent + 15 + 2 * 5 + 10 - time.monotonic()
        wait_for(lambda: board.read().rows[0].ready == 1, timeout=left, message="the delayed task in its queue")
    finally:
        board.close()
        delete_queues(amqp_url, name, f"{name}.dead")
