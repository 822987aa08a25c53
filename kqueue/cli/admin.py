"""``kqueue``: inspect and look after queues (stat, dead letters, purge)."""

from __future__ import annotations

import logging
from typing import Any

import click
from click.core import ParameterSource

from kqueue import __version__
from kqueue.cli.common import (
    CONTEXT,
    Group,
    broker_options,
    broker_options_but_queue,
    connect_queue,
    from_group,
    group_options,
    plural,
)
from kqueue.logs import configure
from kqueue.queues import declare


@click.group("kqueue", cls=Group, context_settings=CONTEXT, invoke_without_command=True, no_args_is_help=False)
@click.version_option(__version__, "--version", prog_name="kqueue")
@group_options
@click.pass_context
def admin_main(ctx: click.Context, /, **shared: Any) -> None:
    """Inspect and look after kqueue's queues.

    The broker options may come before the command (kqueue --broker URL stat) or after it.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@admin_main.command("stat")
@click.option(
    "--management-url",
    envvar="KQUEUE_MANAGEMENT_URL",
    metavar="URL",
    help="RabbitMQ management API, for unacknowledged counts  [default: the broker's host, port 15672].",
)
@broker_options
def stat_command(
    management_url: str | None, broker_url: str | None, queue_name: str, queue_type: str, verbose: bool
) -> None:
    """Messages ready and unacknowledged, consumers, and messages delayed, for the queue and its dead letters.

    '?' where the broker cannot tell.
    """
    from kqueue.admin import queue_stats
    from kqueue.brokers import is_amqp

    conn, queue = _admin_connect(broker_url, queue_name, queue_type, verbose)
    with conn:
        rows = queue_stats(conn, queue, management_url)
        shared = is_amqp(conn) and bool(rows[0].delayed)
    width = max(len("queue"), *(len(row.name) for row in rows))
    click.echo(f"{'queue':<{width}}  {'ready':>7}  {'unacked':>7}  {'consumers':>9}  {'delayed':>7}")
    for row in rows:
        delayed = _count(row.delayed) + ("*" if shared and row is rows[0] else "")
        click.echo(
            f"{row.name:<{width}}  {row.ready:>7}  {_count(row.unacked):>7}  {_count(row.consumers):>9}  {delayed:>7}"
        )
    if shared:
        click.echo("* delayed tasks of every queue on this virtual host: RabbitMQ keeps them in one chain of queues")


def _admin_connect(broker_url: str | None, queue_name: str, queue_type: str, verbose: bool) -> tuple[Any, Any]:
    """What every admin command starts with: the group's options, quiet logs unless -v, then connect and declare."""
    given = from_group(broker_url=broker_url, queue_name=queue_name, queue_type=queue_type, verbose=verbose)
    configure(logging.DEBUG if given["verbose"] else logging.WARNING)
    return connect_queue(given["broker_url"], given["queue_name"], given["queue_type"])


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


@admin_main.group("dead")
def dead_group() -> None:
    """The tasks in the queue's dead letters (QUEUE.dead): failed or delivered too often, or undecodable."""


@dead_group.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N", help="Show at most N.")
@broker_options
def dead_list_command(
    limit: int | None, broker_url: str | None, queue_name: str, queue_type: str, verbose: bool
) -> None:
    """Show the dead letters, oldest first; they stay where they are."""
    from kqueue.admin import dead_letters

    conn, queue = _admin_connect(broker_url, queue_name, queue_type, verbose)
    with conn:
        letters = dead_letters(conn, queue, limit)
    for letter in letters:
        shown = letter.text if letter.task is not None else repr(letter.text)
        click.echo(f"{shown}  reason={letter.reason} attempts={letter.attempts} error={letter.error}")
    click.echo(f"{plural(len(letters), 'dead letter')} in {queue.name}.dead")


@dead_group.command("retry")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N", help="Move at most N.")
@broker_options
def dead_retry_command(
    limit: int | None, broker_url: str | None, queue_name: str, queue_type: str, verbose: bool
) -> None:
    """Move dead letters back to the queue, for a fresh start once their cause is fixed."""
    from kqueue.admin import retry_dead

    conn, queue = _admin_connect(broker_url, queue_name, queue_type, verbose)
    with conn:
        moved = retry_dead(conn, queue, limit)
    click.echo(f"moved {plural(moved, 'dead letter')} back to {queue.name}")


@admin_main.command("purge")
@click.option("--dead", is_flag=True, help="Purge <queue>.dead instead of the queue.")
@click.option("--yes", is_flag=True, help="Do it: the tasks are gone for good.")
@broker_options
def purge_command(
    dead: bool, yes: bool, broker_url: str | None, queue_name: str, queue_type: str, verbose: bool
) -> None:
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
    click.echo(f"purged {plural(count, 'message')} from {target.name}")


@admin_main.command("web")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8181, show_default=True, help="Port; 0 for any free one."
)
@click.option(
    "--token",
    envvar="KQUEUE_WEB_TOKEN",
    default=None,
    metavar="SECRET",
    help="Every request must carry it (open /?token=SECRET once); needed for any address but loopback.",
)
@click.option(
    "--queue",
    "queue_names",
    envvar="KQUEUE_QUEUE",
    multiple=True,
    metavar="NAME",
    help="A queue to show; repeat for more  [default: every kqueue queue the broker lists, else task_queue].",
)
@click.option(
    "--management-url",
    envvar="KQUEUE_MANAGEMENT_URL",
    metavar="URL",
    help="RabbitMQ management API  [default: the broker's host, port 15672].",
)
@broker_options_but_queue
def web_command(
    host: str,
    port: int,
    token: str | None,
    queue_names: tuple[str, ...],
    management_url: str | None,
    broker_url: str | None,
    queue_type: str,
    verbose: bool,
) -> None:
    """Serve a live page of the queues, their workers and dead letters, with replay and purge.

    Needs the web extra: pip install 'kqueue[web]'.
    """
    from kqueue import web
    from kqueue.brokers import mask

    web.require_web()
    given = from_group(broker_url=broker_url, queue_type=queue_type, verbose=verbose)
    root = click.get_current_context().find_root()
    if not queue_names and root.get_parameter_source("queue_name") is ParameterSource.COMMANDLINE:
        queue_names = (root.params["queue_name"],)  # kqueue --queue NAME web
    if token is not None and not token.strip():
        raise click.UsageError("--token must not be empty")
    if not web.is_loopback(host) and token is None:
        raise click.UsageError(
            f"--host {host} is reachable from other machines: give a token (--token or KQUEUE_WEB_TOKEN)"
        )
    # Connected once here, to fail at once in one line (and to name the default broker); the page declares nothing.
    configure(logging.DEBUG if given["verbose"] else logging.WARNING)
    conn, _ = connect_queue(given["broker_url"], "task_queue", given["queue_type"], declared=False)
    # The URL as connected (the default file, a sqlite:// path made absolute), or as given where it names
    # several nodes of a cluster, which the connection's own URL would reduce to the first.
    given_url = given["broker_url"] or ""
    url = given_url if ";" in given_url else conn.as_uri(include_password=True)
    conn.release()
    sock = web.listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    address = f"http://{shown_host}:{bound_port}/"

    def ready() -> None:
        click.echo(f"kqueue web: {address} for {mask(url)}; Ctrl+C to stop", err=True)

    web.serve(
        sock,
        url,
        queue_names,
        token=token,
        queue_type=given["queue_type"],
        management_url=management_url,
        on_ready=ready,
    )
