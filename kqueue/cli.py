"""The command-line tools: ``kqueue-send``, ``kqueue-work`` and ``kqueue``; a thin layer over the library."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click

from kqueue import __version__
from kqueue.brokers import DEFAULT_HEARTBEAT, DEFAULT_URL, connect, open_connection
from kqueue.errors import KQueueError, PublishFailed
from kqueue.handlers import Handler, dot_handler, load_handler
from kqueue.logs import configure
from kqueue.queues import DEFAULT_QUEUE, QueueType, declare, task_queue

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("kqueue.cli")


def _one_line_main(command: click.Command, args: Sequence[str] | None, prog_name: str | None, extra: Any) -> Any:
    """Run a click command so that bad input is one line on standard error, never a traceback."""
    prog = prog_name or command.name or "kqueue"
    try:
        return click.Command.main(command, args, prog_name, standalone_mode=False, **extra)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        _fail(prog, exc.format_message(), 2)
    except click.ClickException as exc:
        _fail(prog, exc.format_message(), exc.exit_code)
    except click.Abort:
        _fail(prog, "aborted", 130)
    except KQueueError as exc:
        _fail(prog, str(exc), 1)
    except Exception as exc:  # the last line of defence against a traceback
        log.debug("unexpected error", exc_info=True)
        _fail(prog, f"{type(exc).__name__}: {exc} (run with -v for the traceback)", 1)


def _fail(prog: str, message: str, code: int) -> NoReturn:
    click.echo(f"{prog}: error: {message}", err=True)
    sys.exit(code)


class Command(click.Command):
    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        return _one_line_main(self, args, prog_name, extra)


class Group(click.Group):
    command_class = Command
    group_class = type

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        return _one_line_main(self, args, prog_name, extra)


def broker_options(func: F) -> F:
    """The options every tool shares: broker, queue, queue type, logging."""
    decorators = [
        click.option(
            "--broker",
            "broker_url",
            envvar="KQUEUE_BROKER_URL",
            default=DEFAULT_URL,
            show_default=True,
            metavar="URL",
            help="Broker URL (env KQUEUE_BROKER_URL), e.g. amqp://user:pass@host:5672// or redis://host:6379/0.",
        ),
        click.option(
            "--queue",
            "queue_name",
            envvar="KQUEUE_QUEUE",
            default=DEFAULT_QUEUE,
            show_default=True,
            metavar="NAME",
            help="Queue name (env KQUEUE_QUEUE).",
        ),
        click.option(
            "--queue-type",
            envvar="KQUEUE_QUEUE_TYPE",
            type=click.Choice([t.value for t in QueueType]),
            default=QueueType.CLASSIC.value,
            show_default=True,
            help="RabbitMQ queue type (env KQUEUE_QUEUE_TYPE); must match an existing queue.",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Debug logging."),
        click.version_option(__version__, "--version", prog_name="kqueue"),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


#: The tools refuse memory://, whose queues die with the process. Tests that run
#: the tools in-process (click's CliRunner) lift this.
REFUSE_MEMORY = True


def _connect(broker_url: str, queue_name: str, queue_type: str, heartbeat: float | None = None) -> tuple[Any, Any]:
    """Connect and declare the queue, or fail with one line."""
    if REFUSE_MEMORY and broker_url.split("://", 1)[0] == "memory":
        raise click.UsageError(
            "memory:// lives inside one process: a message sent to it is gone when the process exits; "
            "use it from Python (kqueue.testing), and amqp:// or redis:// from the command line"
        )
    if not queue_name.strip():
        raise click.UsageError("--queue must not be empty")
    conn = open_connection(connect(broker_url, heartbeat=heartbeat))
    queue = task_queue(queue_name, QueueType(queue_type))
    declare(conn, queue)
    return conn, queue


# -- kqueue-send --------------------------------------------------------------------


@click.command("kqueue-send", cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("words", nargs=-1)
@click.option(
    "--file",
    "path",
    type=click.File("r", encoding="utf-8"),
    metavar="PATH",
    help="Send one message per line of PATH ('-' for standard input); blank lines are skipped.",
)
@click.option(
    "--retry-for",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="If the broker goes away mid-batch, how long to keep reconnecting before giving up.",
)
@broker_options
def send_main(
    words: tuple[str, ...],
    path: Any,
    retry_for: float,
    broker_url: str,
    queue_name: str,
    queue_type: str,
    verbose: bool,
) -> None:
    """Send a task: the WORDS joined by spaces, or 'Hello World!'.

    Exits 0 only once the broker has confirmed every message.
    """
    from kqueue.producer import Sender

    configure(logging.DEBUG if verbose else logging.WARNING)
    if path is not None and words:
        raise click.UsageError("give either WORDS or --file, not both")
    conn, queue = _connect(broker_url, queue_name, queue_type)
    with conn, Sender(conn, queue, reconnect_for=retry_for) as sender:
        if path is None:
            message = " ".join(words) or "Hello World!"
            try:
                sender.send(message)
            except PublishFailed as exc:
                raise KQueueError(f"{exc}: {message!r} was not confirmed") from None
            click.echo(f" [x] Sent {message!r}")
            return
        lines = [line.rstrip("\r\n") for line in path]
        texts = [line for line in lines if line.strip()]
        try:
            with _progress(len(texts)) as progress:
                sent = sender.send_many(texts, on_confirmed=progress)
        except PublishFailed as exc:
            raise KQueueError(f"{exc}; confirmed {exc.confirmed} of {len(texts)} messages") from None
        click.echo(f" [x] Sent {sent} messages to {queue.name!r}")


class _progress:
    """A progress bar on standard error while it is a terminal; a no-op otherwise."""

    def __init__(self, total: int) -> None:
        self._bar: Any = None
        self._shown = 0
        if sys.stderr.isatty() and total > 1:
            self._bar = click.progressbar(length=total, label="Sending", file=sys.stderr)

    def __enter__(self) -> Callable[[int], None]:
        if self._bar is not None:
            self._bar.__enter__()
        return self._update

    def __exit__(self, *exc_info: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc_info)

    def _update(self, confirmed: int) -> None:
        if self._bar is not None:
            self._bar.update(confirmed - self._shown)
            self._shown = confirmed


# -- kqueue-work --------------------------------------------------------------------


@click.command("kqueue-work", cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--handler", "handler_path", metavar="MODULE:FUNCTION", help="Run this callable with each task's text.")
@click.option(
    "--dot-seconds",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Without --handler: seconds of fake work per '.' in the task (the tutorial's worker).",
)
@click.option(
    "--concurrency", type=click.IntRange(min=1), default=1, show_default=True, help="Tasks run at once (threads)."
)
@click.option(
    "--prefetch",
    type=click.IntRange(min=1),
    default=None,
    help="Unacknowledged messages the broker may hand this worker  [default: --concurrency].",
)
@click.option("--burst", is_flag=True, help="Exit once the queue is empty and nothing is in flight.")
@click.option("--max-tasks", type=click.IntRange(min=1), default=None, metavar="N", help="Exit after running N tasks.")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="On SIGTERM or Ctrl+C, how long running tasks get to finish before they are requeued.",
)
@click.option(
    "--max-retries",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Retries of a task whose handler raised.",
)
@click.option(
    "--retry-delay",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Delay before the first retry; each next one waits twice as long.",
)
@click.option(
    "--delivery-limit",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Deliveries without an ack (a worker killed mid-task) before a task is dead-lettered.",
)
@click.option(
    "--heartbeat",
    type=click.FloatRange(min=0),
    default=DEFAULT_HEARTBEAT,
    show_default=True,
    metavar="SECONDS",
    help="AMQP heartbeat; 0 turns it off. ?heartbeat=N in the broker URL wins.",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No line per task, on standard output or in the log: only what needs attention.",
)
@broker_options
def work_main(
    handler_path: str | None,
    dot_seconds: float,
    concurrency: int,
    prefetch: int | None,
    burst: bool,
    max_tasks: int | None,
    grace: float,
    max_retries: int,
    retry_delay: float,
    delivery_limit: int,
    heartbeat: float,
    log_format: str,
    quiet: bool,
    broker_url: str,
    queue_name: str,
    queue_type: str,
    verbose: bool,
) -> None:
    """Work the tasks of a queue, acknowledging each once its handler returned."""
    from kqueue.worker import Worker, WorkerSettings

    configure(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO, log_format)
    handler = _handler(handler_path, dot_seconds)
    settings = WorkerSettings(
        concurrency=concurrency,
        prefetch=prefetch,
        max_tasks=max_tasks,
        burst=burst,
        grace=grace,
        max_retries=max_retries,
        retry_delay=retry_delay,
        delivery_limit=delivery_limit,
    ).validate()
    conn, queue = _connect(broker_url, queue_name, queue_type, heartbeat)
    conn.release()
    worker = (Worker if quiet else _console_worker(Worker))(conn, queue, handler, settings)
    click.echo(" [*] Waiting for messages. To exit press CTRL+C")
    with _stop_on_signals(worker):
        worker.run()
    worker.close()


def _handler(path: str | None, dot_seconds: float) -> Handler:
    if path is None:
        return dot_handler(dot_seconds)
    # As with `python -m`, the user's own modules in the current folder import.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return load_handler(path)
    except KQueueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--handler'") from None


def _console_worker(base: type) -> type:
    class ConsoleWorker(base):  # type: ignore[valid-type,misc]
        """Prints the tutorial's lines as each task starts and ends."""

        def on_task_start(self, task: Any) -> None:
            _say(f" [x] Received {task.text!r}")

        def on_task_done(self, task: Any) -> None:
            if task.error is None:
                _say(" [x] Done")
            else:
                _say(f" [!] Failed: {type(task.error).__name__}: {task.error}")

    return ConsoleWorker


def _say(line: str) -> None:
    """A line on standard output at once, pipe or not; lighter than click.echo, once per task."""
    stream = sys.stdout
    stream.write(line + "\n")
    stream.flush()


class _stop_on_signals:
    """The first SIGTERM or SIGINT stops taking tasks; a second one stops at once."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.signals = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def __exit__(self, *exc_info: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signals += 1
        now = self.signals > 1
        log.warning(
            "%s: %s",
            signal.Signals(signum).name,
            "requeueing running tasks and exiting" if now else "finishing running tasks, taking no more",
        )
        self.worker.stop(now=now)


# -- kqueue (admin) ---------------------------------------------------------------------


@click.group("kqueue", cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="kqueue")
def admin_main() -> None:
    """Inspect and look after kqueue's queues."""


@admin_main.command("stat")
@click.option(
    "--management-url",
    envvar="KQUEUE_MANAGEMENT_URL",
    metavar="URL",
    help="RabbitMQ management API, for unacknowledged counts  [default: the broker's host, port 15672].",
)
@broker_options
def stat_command(management_url: str | None, broker_url: str, queue_name: str, queue_type: str, verbose: bool) -> None:
    """Messages ready, unacknowledged and consumers, for the queue and its dead letters.

    '?' where the broker cannot tell.
    """
    from kqueue.admin import queue_stats

    conn, queue = _admin_connect(broker_url, queue_name, queue_type, verbose)
    with conn:
        rows = queue_stats(conn, queue, management_url)
    width = max(len("queue"), *(len(row.name) for row in rows))
    click.echo(f"{'queue':<{width}}  {'ready':>7}  {'unacked':>7}  {'consumers':>9}")
    for row in rows:
        click.echo(f"{row.name:<{width}}  {row.ready:>7}  {_count(row.unacked):>7}  {_count(row.consumers):>9}")


def _admin_connect(broker_url: str, queue_name: str, queue_type: str, verbose: bool) -> tuple[Any, Any]:
    """What every admin command starts with: quiet logs unless -v, then connect and declare."""
    configure(logging.DEBUG if verbose else logging.WARNING)
    return _connect(broker_url, queue_name, queue_type)


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


@admin_main.group("dead")
def dead_group() -> None:
    """The tasks that went to <queue>.dead: failed too often, undecodable, or delivered too often."""


@dead_group.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N", help="Show at most N.")
@broker_options
def dead_list_command(limit: int | None, broker_url: str, queue_name: str, queue_type: str, verbose: bool) -> None:
    """Show the dead letters, oldest first; they stay where they are."""
    from kqueue.admin import dead_letters

    conn, queue = _admin_connect(broker_url, queue_name, queue_type, verbose)
    with conn:
        letters = dead_letters(conn, queue, limit)
    for letter in letters:
        click.echo(f"{letter.text!r}  reason={letter.reason} attempts={letter.attempts} error={letter.error}")
    click.echo(f"{len(letters)} dead letters in {queue.name}.dead")


@dead_group.command("retry")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N", help="Move at most N.")
@broker_options
def dead_retry_command(limit: int | None, broker_url: str, queue_name: str, queue_type: str, verbose: bool) -> None:
    """Move dead letters back to the queue, for a fresh start once their cause is fixed."""
    from kqueue.admin import retry_dead

    conn, queue = _admin_connect(broker_url, queue_name, queue_type, verbose)
    with conn:
        moved = retry_dead(conn, queue, limit)
    click.echo(f"moved {moved} dead letters back to {queue.name}")


@admin_main.command("purge")
@click.option("--dead", is_flag=True, help="Purge <queue>.dead instead of the queue.")
@click.option("--yes", is_flag=True, help="Do it: the tasks are gone for good.")
@broker_options
def purge_command(dead: bool, yes: bool, broker_url: str, queue_name: str, queue_type: str, verbose: bool) -> None:
    """Delete every waiting task of the queue (or of its dead letters)."""
    from kqueue.admin import purge
    from kqueue.queues import dead_letter_queue

    if not yes:
        raise click.UsageError("purging deletes tasks for good: add --yes")
    conn, queue = _admin_connect(broker_url, queue_name, queue_type, verbose)
    with conn:
        target = dead_letter_queue(queue) if dead else queue
        declare(conn, target)
        count = purge(conn, target)
    click.echo(f"purged {count} messages from {target.name}")
