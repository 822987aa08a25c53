"""``kqueue-send``: the tutorial's new_task.py, every message confirmed."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

import click

from kqueue.cli.common import CONTEXT, Command, broker_options, connect_queue, plural, shown
from kqueue.delays import check_delay
from kqueue.errors import KQueueError, PublishFailed
from kqueue.logs import configure

_BOM = "\ufeff"


@click.command("kqueue-send", cls=Command, context_settings=CONTEXT)
@click.argument("words", nargs=-1)
@click.option(
    "--file",
    "path",
    type=click.File("rb"),
    metavar="PATH",
    help="Send one message per line of PATH ('-' for standard input), UTF-8; blank lines are skipped.",
)
@click.option(
    "--skip",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="With --file: leave out its first N messages (blank lines do not count), sent already by a run "
    "that stopped half-way, as its last line says.",
)
@click.option(
    "--delay",
    type=float,
    default=0.0,
    callback=lambda ctx, param, value: _delay(value),
    metavar="SECONDS",
    help="Run no earlier than SECONDS from now; the broker keeps the task meanwhile (up to 49 days).",
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
    path: IO[bytes] | None,
    skip: int,
    delay: float,
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
    if skip and path is None:
        raise click.UsageError("--skip goes with --file")
    texts = _read(path, skip) if path is not None else [_text(words)]
    conn, queue = connect_queue(broker_url, queue_name, queue_type)
    with conn, Sender(conn, queue, reconnect_for=retry_for, confirm_timeout=confirm_timeout) as sender:
        if path is None:
            try:
                sender.send(texts[0], delay=delay)
            except PublishFailed as exc:
                raise KQueueError(f"{exc}: {shown(texts[0])} was not confirmed") from None
            click.echo(f" [x] Sent {shown(texts[0])}{_when(delay)}")
            return
        _send_file(sender, queue, texts, skip, delay)


def _delay(seconds: float) -> float:
    try:
        return check_delay(seconds)
    except KQueueError as exc:
        raise click.BadParameter(str(exc)) from None


def _when(delay: float) -> str:
    return f", to run in {delay:g}s" if delay else ""


def _text(words: tuple[str, ...]) -> str:
    """The task the WORDS make; a word that is not UTF-8 (the shell passed other bytes) is bad usage."""
    for number, word in enumerate(words, 1):
        try:
            word.encode("utf-8")
        except UnicodeEncodeError as exc:
            byte = word[exc.start].encode("utf-8", "surrogateescape")
            raise click.UsageError(
                f"word {number} is not UTF-8 (byte {byte!r}): tasks are sent as UTF-8 text"
            ) from None
    return " ".join(words) or "Hello World!"


def _read(source: IO[bytes], skip: int) -> list[str]:
    """The non-blank lines of `source`, all of them read and decoded before anything is sent, less the first `skip`."""
    name = getattr(source, "name", "-")
    name = "standard input" if name in ("<stdin>", "-") else name
    texts = []
    for number, raw in enumerate(source, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = raw[exc.start : exc.start + 1]
            raise KQueueError(
                f"{name}: line {number} is not UTF-8 (byte {exc.start + 1} of the line is {bad!r}): nothing was sent"
            ) from None
        if number == 1:
            line = line.removeprefix(_BOM)
        line = line.rstrip("\r\n")
        if line.strip():
            texts.append(line)
    if skip > len(texts):
        raise click.UsageError(f"--skip {skip}, but {name} has only {plural(len(texts), 'message')}")
    return texts[skip:]


def _send_file(sender: Any, queue: Any, texts: list[str], skip: int, delay: float) -> None:
    """Send every line; stopped half-way (Ctrl+C, the broker gone), say how many were confirmed and how to resume."""
    from kqueue.producer import Outgoing

    went = [0]  # messages the sender has taken in (published, or on their way again)

    def messages() -> Iterator[Outgoing]:
        for seq, text in enumerate(texts):
            yield Outgoing.task(text, queue, seq, delay)
            went[0] = seq + 1  # runs once the sender asks for the next: this one is in its book

    try:
        with _progress(len(texts)) as progress:
            sent = sender.publish(messages(), on_confirmed=progress)
    except (PublishFailed, KeyboardInterrupt) as exc:
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
        _stopped(why, sender, len(texts), skip, went[0], code)
    if sent != len(texts):  # never: every message is confirmed, or PublishFailed says how many were
        raise KQueueError(f"the broker confirmed {sent} of {plural(len(texts), 'message')}")
    click.echo(f" [x] Sent {plural(sent, 'message')} to {queue.name!r}{_when(delay)}")


def _stopped(why: str, sender: Any, total: int, skip: int, went: int, code: int) -> None:
    """One line: how many were confirmed, and the --skip that sends the rest and nothing confirmed twice over."""
    first_in_doubt = min((message.seq for message in sender.pending()), default=went)
    resume = skip + first_in_doubt
    hint = (
        f"; the first {resume} are all confirmed: send the rest with --skip {resume}" if resume < skip + total else ""
    )
    click.echo(f"kqueue-send: error: {why}; confirmed {sender.confirmed} of {plural(total, 'message')}{hint}", err=True)
    sys.exit(code)


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
