"""``kqueue-send``: the tutorial's new_task.py, every message confirmed."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from kqueue.cli.common import CONTEXT, Command, broker_options, connect_queue
from kqueue.errors import KQueueError, PublishFailed
from kqueue.logs import configure


@click.command("kqueue-send", cls=Command, context_settings=CONTEXT)
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
@click.option(
    "--confirm-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the broker's confirms (e.g. while a resource alarm blocks it) before giving up.",
)
@broker_options
def send_main(
    words: tuple[str, ...],
    path: Any,
    retry_for: float,
    confirm_timeout: float,
    broker_url: str | None,
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
    conn, queue = connect_queue(broker_url, queue_name, queue_type)
    with conn, Sender(conn, queue, reconnect_for=retry_for, confirm_timeout=confirm_timeout) as sender:
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
        if sent != len(texts):  # never: every message is confirmed, or PublishFailed says how many were
            raise KQueueError(f"the broker confirmed {sent} of {len(texts)} messages")
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
