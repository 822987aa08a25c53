"""The docs run as written: every Python sample, and the console blocks of the tools, on a ``sqlite://`` file.

What runs, page by page (``docs/**/*.md`` and ``README.md``):

- every ```` ```python ```` block, exec'd in a temporary folder with ``KQUEUE_BROKER_URL`` on a
  ``sqlite://`` file there (samples read it, as the tools do, and fall back to RabbitMQ); the
  ``test_*`` functions a block defines are called. ``myapp.tasks``, the handler module the docs
  name, is a stub here.
- every ```` ```console ```` block whose commands are all kqueue's tools, with no shell syntax: the
  blocks of one page are one session on one fresh ``sqlite://`` file, run in order. A one-shot
  command (``kqueue-send``, ``kqueue``, ``kqueue-work --burst``) runs to its end; what it prints
  must be the lines under it: its standard output, and its ``<tool>: error:`` line, with which it
  must exit non-zero (the log and the default broker's name on standard error are not shown).
  A ``kqueue-work`` that keeps running is started in the background (``shell1$``, ``shell2$``:
  one per shell); a later block of the same shell shows what it has printed by then, and the
  test waits for those lines. At the end of the page, Ctrl+C stops it. Workers get
  ``--dot-seconds 0.05`` unless the command says otherwise.

A block that must not run (it needs RabbitMQ, or your own module) carries an HTML comment right
before its fence, ``<!-- not run: why -->``, and the why is required.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
BIN = Path(sys.executable).parent
TOOLS = {"kqueue-send", "kqueue-work", "kqueue"}
#: Seconds of fake work per dot for the docs' workers: the tutorial's one second would take half a minute.
DOT_SECONDS = "0.05"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run(?::\s*(?P<why>.*?))?\s*-->\s*$")
PROMPT = re.compile(r"^(?P<shell>[\w-]*)\$ (?P<command>.*)$")
SHELL_SYNTAX = re.compile(r"[&|;<>`$()]")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the comment before the fence: None if there is none, "" if it gives no reason

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> Iterator[Block]:
    """The fenced blocks of a page, with the ``not run`` comment right before each, if any."""
    lines = page.read_text(encoding="utf-8").splitlines()
    number = 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        if opening is None or not opening.group("lang"):
            number += 1
            continue
        indent = len(opening.group("indent"))
        start = number
        number += 1
        body = []
        while number < len(lines) and not FENCE.match(lines[number]):
            body.append(lines[number][indent:])
            number += 1
        before = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = NOT_RUN.match(before)
        not_run = None if marker is None else (marker.group("why") or "")
        yield Block(page, start + 1, opening.group("lang"), "\n".join(body) + "\n", not_run)
        number += 1


def all_blocks(lang: str) -> list[Block]:
    return [block for page in PAGES for block in blocks(page) if block.lang == lang]


# -- console blocks -----------------------------------------------------------------------------


@dataclass
class Step:
    shell: str
    args: list[str]
    expected: list[str]


def steps(block: Block) -> list[Step] | None:
    """The commands of a console block with the lines each prints; None unless all are kqueue's tools."""
    found: list[Step] = []
    for line in block.text.splitlines():
        prompt = PROMPT.match(line)
        if prompt is not None:
            command = prompt.group("command")
            if SHELL_SYNTAX.search(re.sub(r"'[^']*'", "", command)):  # shell syntax outside single quotes
                return None
            args = shlex.split(command)
            if not args or args[0] not in TOOLS:
                return None
            found.append(Step(prompt.group("shell"), args, []))
        elif found:
            found[-1].expected.append(line)
        elif line.strip():
            return None  # output with no command before it
    return found or None


def runs_in_background(args: list[str]) -> bool:
    return args[0] == "kqueue-work" and not {"--burst", "--max-tasks", "-h", "--help", "--version"} & set(args)


def with_dots(args: list[str]) -> list[str]:
    if args[0] == "kqueue-work" and not any(arg.startswith("--dot-seconds") for arg in args):
        return [*args, "--dot-seconds", DOT_SECONDS]
    return args


class Background:
    """A kqueue-work left running, as in a shell of its own; its lines are read as they come."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [str(BIN / args[0]), *with_dots(args)[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.interrupted = False
        self._readers = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: IO[str], into: list[str]) -> None:
        with stream:
            for line in stream:
                into.append(line.rstrip("\n"))

    def wait_for(self, what: str, ready: Callable[[], object], timeout: float = 20.0) -> None:
        """Poll `ready` until it is true; fail with the worker's output if it exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{shlex.join(self.args)}: no {what} (exit status {self.proc.poll()})\n"
                    f"stdout:\n" + "\n".join(self.out) + "\nstderr:\n" + "\n".join(self.err)
                )
            time.sleep(0.01)

    def interrupt(self) -> None:
        """Ctrl+C, once, as the tutorial says: a second one would mean "stop at once"."""
        if self.proc.poll() is None and not self.interrupted:
            self.interrupted = True
            self.proc.send_signal(signal.SIGINT)

    def stop(self) -> int:
        """Ctrl+C; the exit status."""
        self.interrupt()
        try:
            return self.proc.wait(timeout=20)
        finally:
            self.kill()

    def kill(self) -> None:
        """Make sure it is gone, and its pipes read to their end and closed."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=10)


@dataclass
class Session:
    """One page's console blocks, in order, on one sqlite:// file."""

    env: dict[str, str]
    cwd: Path
    workers: dict[str, Background] = field(default_factory=dict)
    settled: bool = True

    def run(self, step: Step, where: str) -> None:
        if runs_in_background(step.args):
            self.background(step, where)
        else:
            self.one_shot(step, where)

    def one_shot(self, step: Step, where: str) -> None:
        self.settle()
        done = subprocess.run(
            [str(BIN / step.args[0]), *with_dots(step.args)[1:]],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.cwd,
            timeout=60,
        )
        errors = [line for line in done.stderr.splitlines() if ": error: " in line]
        printed = done.stdout.splitlines() + errors
        assert printed == step.expected, f"{where}: {shlex.join(step.args)} printed:\n{done.stdout}{done.stderr}"
        failing = any(": error: " in line for line in step.expected)
        assert (done.returncode != 0) == failing, f"{where}: {shlex.join(step.args)} exited {done.returncode}"

    def background(self, step: Step, where: str) -> None:
        worker = self.workers.get(step.shell)
        if worker is None:
            worker = self.workers[step.shell] = Background(step.args, self.env, self.cwd)
            worker.wait_for("'consuming' log line", lambda: any(" consuming " in line for line in worker.err))
            self.settled = False
        assert worker.args == step.args, f"{where}: {step.shell} already runs {shlex.join(worker.args)}"
        worker.wait_for(f"{len(step.expected)} lines", lambda: len(worker.out) >= len(step.expected))
        assert worker.out[: len(step.expected)] == step.expected, f"{where}: {step.shell} printed:\n" + "\n".join(
            worker.out
        )

    def settle(self) -> None:
        """Wait until every worker started has looked for a task.

        Workers take turns once they have looked, which a reader's workers did long before the
        first send: so must these, or the first task goes to whichever wakes first. They look
        within a second of starting; waiting here, not as each starts, lets them start together.
        """
        if not self.settled and len(self.workers) > 1:  # a worker alone takes every task anyway
            for worker in self.workers.values():
                worker.wait_for("look for a task", lambda: self.waiting() >= len(self.workers))
            self.settled = True

    def waiting(self) -> int:
        """Consumers of the sqlite:// file that wait for a task, as its turns count them."""
        path = self.env["KQUEUE_BROKER_URL"].removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
            return int(db.execute("SELECT COUNT(*) FROM consumers WHERE waiting = 1").fetchone()[0])

    def close(self, shown: dict[str, list[str]]) -> None:
        """Ctrl+C every worker; each exits 0, having printed exactly what its last block shows."""
        for worker in self.workers.values():
            worker.interrupt()
        for shell, worker in self.workers.items():
            status = worker.stop()
            assert status == 0, f"{shell}: {shlex.join(worker.args)} exited {status}:\n" + "\n".join(worker.err)
            assert worker.out == shown[shell], f"{shell} printed more than its last block shows:\n" + "\n".join(
                worker.out
            )


def console_pages() -> list[Path]:
    return [page for page in PAGES if any(runnable(block) for block in blocks(page) if block.lang == "console")]


def runnable(block: Block) -> bool:
    return block.not_run is None and steps(block) is not None


@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    """The environment of the docs' commands: a sqlite:// file of this test's own, and a home of its own."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("KQUEUE_")}
    env.update(
        KQUEUE_BROKER_URL=f"sqlite:///{tmp_path / 'queues.db'}",
        HOME=str(tmp_path),
        XDG_DATA_HOME=str(tmp_path / "data"),
    )
    return env


@pytest.mark.parametrize("page", console_pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_console_blocks_run_as_written(page: Path, sqlite_env: dict[str, str], tmp_path: Path) -> None:
    # Given: the page's runnable console blocks, one session on a fresh sqlite:// file
    session = Session(sqlite_env, tmp_path)
    shown: dict[str, list[str]] = {}
    try:
        # When: each command runs in turn
        for block in blocks(page):
            if block.lang != "console" or not runnable(block):
                continue
            for step in steps(block) or []:
                session.run(step, block.where)
                if runs_in_background(step.args):
                    shown[step.shell] = step.expected
        # Then: every worker stops on Ctrl+C, having printed what its last block shows
        session.close(shown)
    finally:
        for worker in session.workers.values():
            worker.kill()


def test_the_tutorial_and_the_readme_are_run() -> None:
    """A change of format that made these pages' blocks look unrunnable would otherwise pass silently."""
    pages = {str(page.relative_to(ROOT)) for page in console_pages()}
    assert {"README.md", "docs/getting-started/tutorial.md", "docs/getting-started/quickstart.md"} <= pages
    tutorial = [block for block in blocks(ROOT / "docs/getting-started/tutorial.md") if block.lang == "console"]
    assert sum(runnable(block) for block in tutorial) >= 6


# -- Python blocks ------------------------------------------------------------------------------


def _resize(text: str) -> None:
    """The docs' ``myapp.tasks:resize``: a handler that does nothing, successfully."""


@pytest.fixture
def myapp(monkeypatch: pytest.MonkeyPatch) -> None:
    package = types.ModuleType("myapp")
    tasks = types.ModuleType("myapp.tasks")
    tasks.resize = _resize  # type: ignore[attr-defined]
    package.tasks = tasks  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "myapp", package)
    monkeypatch.setitem(sys.modules, "myapp.tasks", tasks)


PYTHON = [block for block in all_blocks("python") if block.not_run is None]


@pytest.mark.parametrize("block", PYTHON, ids=lambda block: block.where)
@pytest.mark.usefixtures("myapp")
def test_python_samples_run(
    block: Block, sqlite_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given: the sample's broker, a sqlite:// file in a folder of its own
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KQUEUE_BROKER_URL", sqlite_env["KQUEUE_BROKER_URL"])
    namespace: dict[str, object] = {"__name__": "docs_sample"}
    # When: it runs, and so do the tests it defines
    exec(compile(block.text, block.where, "exec"), namespace)
    for name, value in list(namespace.items()):
        if name.startswith("test_") and callable(value):
            value()
    # Then: it raised nothing


# -- what is not run, and the README ------------------------------------------------------------


def test_every_block_left_out_says_why() -> None:
    unexplained = [block.where for page in PAGES for block in blocks(page) if block.not_run == ""]
    assert not unexplained, f"<!-- not run: ... --> without a reason at {unexplained}"


def test_the_docs_have_python_samples_to_run() -> None:
    assert len(PYTHON) >= 4


def test_readme_links_resolve() -> None:
    """MkDocs checks the links of docs/; the README is outside it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", readme)
    local = [target for target in targets if "://" not in target]
    missing = [target for target in local if not (ROOT / target).exists()]
    assert local and not missing, f"README links to missing files: {missing}"


def test_readme_is_a_landing_page_with_the_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    # CI runs the README's test command: `pytest`, alone.
    assert "\n$ pytest\n" in readme
    assert 'pytest -m "not broker and not faults"' in readme
