"""The page in a real browser, against a real `kqueue web` process, on sqlite:// and RabbitMQ."""

from __future__ import annotations

import subprocess
from typing import Any

from playwright.sync_api import expect

from tests.broker.procs import ROOT, Worker, run_send, tool
from tests.web.conftest import ON_PAGE, WebProcess

FAIL = ("--handler", "tests.handlers:fail")
SCRIPT = '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2">'


def row(page: Any, queue: str, cell: str) -> Any:
    return page.locator(f'tr.queue[data-queue="{queue}"] td.{cell}')


def send(url: str, queue: str, *texts: str) -> None:
    """Send each of `texts` as a task of its own."""
    sent = run_send(url, queue, "--file", "-", input="".join(f"{text}\n" for text in texts))
    assert sent.returncode == 0, sent.stderr


def dead_letters(url: str, queue: str, *texts: str) -> None:
    """Send `texts` and let a worker fail each once for good, so that each is a dead letter of `queue`."""
    send(url, queue, *texts)
    worked = subprocess.run(
        [tool("kqueue-work"), "--broker", url, "--queue", queue, "--burst", "--max-retries", "0", *FAIL],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert worked.returncode == 0, worked.stderr


def test_the_counts_change_on_the_page_while_tasks_are_sent_and_worked(
    page: Any, web: WebProcess, web_broker: tuple[str, str]
) -> None:
    url, queue = web_broker
    page.goto(web.url)
    page.evaluate("window.notReloaded = true")
    expect(row(page, queue, "ready")).to_have_text("0")

    # When five tasks are sent, the page shows them ready, without a reload
    send(url, queue, *[f"task {n}" for n in range(5)])
    expect(row(page, queue, "ready")).to_have_text("5")

    # When a worker consumes, the page names it: host, pid, prefetch, concurrency
    worker = Worker(url, queue, "--dot-seconds", "0", "--concurrency", "2")
    try:
        worker.wait_for("[x] Done", count=5)
        expect(row(page, queue, "ready")).to_have_text("0")
        expect(page.locator(f'tr.workers[data-queue="{queue}"] li.worker')).to_contain_text(
            f"pid {worker.proc.pid} · prefetch 2 · concurrency 2"
        )
        expect(row(page, queue, "consumers")).to_have_text("1")
    finally:
        worker.stop()

    # Then the worker gone, the page says so, still without a reload
    expect(page.locator(f'tr.workers[data-queue="{queue}"]')).to_contain_text(f"no worker consumes {queue}")
    assert page.evaluate("window.notReloaded") is True


def test_a_dead_letter_replayed_from_the_page_is_then_done_by_a_worker(
    page: Any, web: WebProcess, web_broker: tuple[str, str]
) -> None:
    url, queue = web_broker
    dead_letters(url, queue, "resize photo 7", "resize photo 8")
    page.goto(web.url)
    letters = page.locator(f'section.dead[data-queue="{queue}"] tr.letter')
    expect(letters).to_have_count(2)
    expect(letters.first).to_contain_text("RuntimeError: cannot handle 'resize photo 7'")
    expect(letters.first.locator("td").nth(1)).to_have_text("failed")

    # When one is replayed from the page
    letters.first.locator("button.replay").click()

    # Then the page says what it did, the letter has left the list, and the task is back in the queue
    expect(page.locator("#said")).to_have_text(f"moved 1 dead letter back to {queue}")
    expect(letters).to_have_count(1)
    expect(row(page, queue, "ready")).to_have_text("1")
    expect(row(page, queue, "dead-count")).to_have_text("1")

    # And a worker, its cause fixed, does it
    worker = Worker(url, queue, "--burst", "--dot-seconds", "0")
    worker.wait_for("[x] Done")
    assert worker.wait(30) == 0
    assert any("resize photo 7" in line for line in worker.out), worker.transcript()
    assert not any("resize photo 8" in line for line in worker.out), worker.transcript()


def test_purge_and_delete_ask_first_and_do_nothing_when_refused(
    page: Any, web: WebProcess, web_broker: tuple[str, str]
) -> None:
    url, queue = web_broker
    dead_letters(url, queue, "old report")
    send(url, queue, "a", "b", "c")
    page.goto(web.url)
    expect(row(page, queue, "ready")).to_have_text("3")
    asked: list[str] = []
    posts: list[str] = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)

    # When purge is clicked and the confirmation refused
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    row(page, queue, "buttons").locator("button.purge").click()

    # Then it asked, sent nothing, and the next reading still shows the three tasks
    assert len(asked) == 1 and "Delete the 3 waiting tasks" in asked[0], asked
    with page.expect_response(lambda response: "/parts/queues" in response.url):
        pass
    expect(row(page, queue, "ready")).to_have_text("3")
    assert posts == []

    # When it is accepted
    page.once("dialog", lambda dialog: dialog.accept())
    row(page, queue, "buttons").locator("button.purge").click()
    expect(page.locator("#said")).to_have_text(f"purged 3 messages from {queue}")
    expect(row(page, queue, "ready")).to_have_text("0")

    # And deleting a dead letter asks too, then deletes it
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept()))
    page.locator(f'section.dead[data-queue="{queue}"] button.delete').click()
    expect(page.locator("#said")).to_have_text(f"deleted 1 dead letter of {queue}")
    expect(page.locator(f'section.dead[data-queue="{queue}"]')).to_contain_text("none:")
    assert "for good" in asked[-1]


def test_a_task_that_is_a_script_is_shown_as_text_and_runs_nothing(
    page: Any, web: WebProcess, web_broker: tuple[str, str]
) -> None:
    url, queue = web_broker
    dead_letters(url, queue, SCRIPT)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # The page's policy would block an injected script: count what it blocked, so that markup let
    # through is caught even though it could not run.
    page.add_init_script(
        "window.blocked = []; document.addEventListener('securitypolicyviolation', "
        "event => window.blocked.push(event.violatedDirective + ' ' + event.blockedURI))"
    )

    page.goto(web.url)

    letter = page.locator(f'section.dead[data-queue="{queue}"] tr.letter td.text code')
    expect(letter).to_have_text(SCRIPT)
    assert page.evaluate("window.blocked") == []
    assert page.evaluate("window.pwned") is None
    assert (
        page.locator(f'section.dead[data-queue="{queue}"] img, section.dead[data-queue="{queue}"] script').count() == 0
    )
    assert errors == []


def test_a_page_on_another_address_than_loopback_needs_its_token(page: Any, web_broker: tuple[str, str]) -> None:
    url, queue = web_broker
    web = WebProcess("--broker", url, "--queue", queue, "--host", "0.0.0.0", env={"KQUEUE_WEB_TOKEN": "s3cret-token"})
    try:
        port = web.url.rsplit(":", 1)[1].strip("/")
        home = f"http://127.0.0.1:{port}/"

        # Without the token: refused, saying how to get in
        reply = page.goto(home)
        assert reply is not None and reply.status == 401
        expect(page.locator("body")).to_contain_text("this page needs its token")

        # With it once: the page, and its parts refresh with the cookie it left, out of the address bar
        page.goto(f"{home}?token=s3cret-token")
        assert page.url == home
        expect(row(page, queue, "ready")).to_have_text("0", timeout=ON_PAGE)
        send(url, queue, "after login")
        expect(row(page, queue, "ready")).to_have_text("1")

        # A wrong token gets nothing
        other = page.context.browser.new_context()
        try:
            refused = other.new_page().goto(f"{home}?token=guess")
            assert refused is not None and refused.status == 401
        finally:
            other.close()
    finally:
        web.stop()
