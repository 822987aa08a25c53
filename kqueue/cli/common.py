"""What every tool shares: one-line errors, the broker options, connecting, logging."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click
from click.core import ParameterSource

from kqueue import __version__
from kqueue.brokers import connect, default_url, open_connection
from kqueue.errors import KQueueError
from kqueue.queues import DEFAULT_QUEUE, QueueType, declare, task_queue

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("kqueue.cli")

CONTEXT = {"help_option_names": ["-h", "--help"]}


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
    """The options every tool shares: broker, queue, queue type, logging; and --version."""
    return _apply([*_shared(), click.version_option(__version__, "--version", prog_name="kqueue")], func)


def broker_options_but_queue(func: F) -> F:
    """`broker_options` for a command that names its queues its own way."""
    shared = [option for option in _shared() if "queue_name" not in _names(option)]
    return _apply([*shared, click.version_option(__version__, "--version", prog_name="kqueue")], func)


def _names(decorator: Callable[[Any], Any]) -> tuple[str, ...]:
    probe = decorator(lambda: None)
    return tuple(param.name or "" for param in getattr(probe, "__click_params__", []))


def group_options(func: F) -> F:
    """The shared options on ``kqueue`` itself, before its subcommand: each subcommand reads them (`from_group`)."""
    return _apply(_shared(), func)


def from_group(**values: Any) -> dict[str, Any]:
    """A subcommand's shared options, each the group's where it was given there and not after the subcommand."""
    ctx = click.get_current_context()
    root = ctx.find_root()
    for name in values:
        given_here = ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
        if not given_here and root.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            values[name] = root.params[name]
    return values


def _apply(decorators: list[Callable[[Any], Any]], func: F) -> F:
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def _shared() -> list[Callable[[Any], Any]]:
    return [
        click.option(
            "--broker",
            "broker_url",
            envvar="KQUEUE_BROKER_URL",
            default=None,
            metavar="URL",
            help=(
                "Broker URL (env KQUEUE_BROKER_URL), e.g. amqp://user:pass@host:5672//, redis://host:6379/0 "
                "or sqlite:////path/to/queues.db  [default: a SQLite file in your data directory, "
                "$XDG_DATA_HOME/kqueue/queues.db, ~/.local/share/kqueue/queues.db if unset]"
            ),
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
    ]


#: The tools refuse memory://, whose queues die with the process. Tests that run
#: the tools in-process (click's CliRunner) lift this.
REFUSE_MEMORY = True


#: Characters of a task shown on the tools' ``Received`` and ``Sent`` lines; the rest is counted, not shown.
SHOWN = 200


def shown(text: str, *, quoted: bool = True) -> str:
    """A task as the tools print it: quoted (a text task; not a call), cut short past `SHOWN` characters."""
    show = repr if quoted else str
    if len(text) <= SHOWN:
        return show(text)
    return f"{show(text[:SHOWN])}... ({len(text):,} characters)"


def plural(count: int, word: str) -> str:
    """``1 message``, ``2 messages``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _local_url(url: str) -> str:
    """A ``sqlite://`` URL with its file made absolute, so that every process and every line names the same file.

    Raises:
        click.UsageError: the URL names an in-memory database, which no other process can share.
    """
    from kqueue.sqlite.options import path_of

    try:
        path = path_of(url.split("?", 1)[0])
    except KQueueError as exc:
        raise click.UsageError(str(exc)) from None
    query = url.partition("?")[2]
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


default_broker_url = default_url


def connect_queue(
    broker_url: str | None,
    queue_name: str,
    queue_type: str,
    heartbeat: float | None = None,
    *,
    declared: bool = True,
) -> tuple[Any, Any]:
    """Connect and declare the queue (unless not `declared`), or fail with one line.

    No URL: the default broker, named on stderr.
    """
    if not queue_name.strip():
        raise click.UsageError("--queue must not be empty")
    url = broker_url or default_broker_url()
    scheme = url.split("://", 1)[0]
    if REFUSE_MEMORY and scheme == "memory":
        raise click.UsageError(
            "memory:// lives inside one process: a message sent to it is gone when the process exits; "
            "use it from Python (kqueue.testing), and sqlite://, amqp:// or redis:// from the command line"
        )
    if scheme == "sqlite":
        url = _local_url(url)
    conn = open_connection(connect(url, heartbeat=heartbeat))
    queue = task_queue(queue_name, QueueType(queue_type))
    if declared:
        declare(conn, queue)
    prog = click.get_current_context().find_root().info_name
    if broker_url is None:
        click.echo(f"{prog}: broker {url} (the default; --broker or KQUEUE_BROKER_URL for another)", err=True)
    elif url != broker_url:
        click.echo(f"{prog}: broker {url} (the file {broker_url!r} names from this folder)", err=True)
    return conn, queue
