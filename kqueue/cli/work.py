"""``kqueue-work``: the tutorial's worker.py; options become `WorkerSettings` here and nowhere else."""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from kqueue.brokers import DEFAULT_HEARTBEAT
from kqueue.cli.common import CONTEXT, Command, broker_options, connect_queue, default_broker_url, plural, shown
from kqueue.errors import KQueueError
from kqueue.handlers import Handler, dot_handler, load_app, load_handler
from kqueue.logs import configure

if TYPE_CHECKING:
    from kqueue.app import App
    from kqueue.worker import WorkerSettings


@click.command("kqueue-work", cls=Command, context_settings=CONTEXT)
@click.option(
    "--app",
    "app_path",
    metavar="MODULE[:NAME]",
    help="Run the function tasks of this kqueue.App (the one in MODULE, or MODULE:NAME), on its queue "
    "unless --queue says otherwise; text tasks still go to --handler or the dots.",
)
@click.option(
    "--handler", "handler_path", metavar="MODULE:FUNCTION", help="Run this callable with each text task's text."
)
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
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    envvar="KQUEUE_PROCESSES",
    help="Worker processes (env KQUEUE_PROCESSES), each with its own connection and --concurrency threads.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    envvar="KQUEUE_METRICS_PORT",
    metavar="PORT",
    help="Serve Prometheus metrics on /metrics and a health check on /healthz (env KQUEUE_METRICS_PORT).",
)
# Set by the parent of a fleet on each of its worker processes.
@click.option("--fleet-index", type=click.IntRange(min=0), default=None, hidden=True)
@click.option("--fleet-dir", type=click.Path(file_okay=False, path_type=Path), default=None, hidden=True)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="One log line per event on standard error: text, or a JSON object with the same fields.",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No line per task, on standard output or in the log: only what needs attention.",
)
@broker_options
def work_main(
    app_path: str | None,
    handler_path: str | None,
    dot_seconds: float,
    heartbeat: float,
    log_format: str,
    quiet: bool,
    broker_url: str | None,
    queue_name: str,
    queue_type: str,
    verbose: bool,
    processes: int,
    metrics_port: int | None,
    fleet_index: int | None,
    fleet_dir: Path | None,
    **options: Any,
) -> None:
    """Work the tasks of a queue, acknowledging each once its handler returned."""
    from kqueue.worker import Worker

    configure(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO, log_format)
    handler = _handler(handler_path, dot_seconds)
    app = _app(app_path)
    if app is not None:
        queue_name, queue_type = _app_queue(app, queue_name, queue_type)
    settings = worker_settings(options)
    conn, queue = connect_queue(broker_url, queue_name, queue_type, heartbeat)
    conn.release()
    if processes > 1 and fleet_index is None:
        finite = settings.burst or settings.max_tasks is not None
        _run_fleet(processes, metrics_port, queue.name, default_broker=broker_url is None, finite=finite)
        return
    with ExitStack() as stack:
        base = Worker if quiet else _console_worker(Worker)
        worker_class = _metered(stack, base, queue.name, metrics_port, fleet_index, fleet_dir)
        worker = worker_class(conn, queue, handler, settings, tasks=app.tasks if app is not None else None)
        if fleet_index is None:
            click.echo(" [*] Waiting for messages. To exit press CTRL+C")
        else:  # a worker process of a fleet: its parent passes stops on, and may go away
            from kqueue.fleet import follow_parent

            follow_parent(worker)
        with _stop_on_signals(worker):
            worker.run()
        worker.close()
    unfinished = worker.dispatcher.requeued_unfinished
    if unfinished and worker.lifecycle.aborted:
        # A second signal cut tasks short: say so in the exit status, as an interrupted command does
        # (128 + SIGINT). A grace that ran out is the stop asked for, and exits 0.
        click.echo(f"kqueue-work: stopped at once: {plural(unfinished, 'task')} given back unfinished", err=True)
        sys.exit(130)


def _metered(
    stack: ExitStack, base: type, queue: str, port: int | None, fleet_index: int | None, fleet_dir: Path | None
) -> type:
    """`base`, counting for Prometheus if asked: served here (one process), or reported to the fleet's parent."""
    if port is None and fleet_dir is None:
        return base
    from kqueue import metrics

    metrics.require_prometheus()
    tally = metrics.Tally(queue, fleet_index or 0)
    if fleet_dir is not None:
        return metrics.metered(base, tally, metrics.Reports(fleet_dir, queue).writer())
    assert port is not None
    stack.callback(metrics.serve_worker(port, tally).close)
    return metrics.metered(base, tally)


def _run_fleet(processes: int, port: int | None, queue: str, *, default_broker: bool, finite: bool) -> None:
    """Run `processes` worker processes of this very command line, and serve their metrics here if asked."""
    from kqueue import fleet, metrics

    if port is not None:
        metrics.require_prometheus()
    args = _child_args(click.get_current_context())
    if default_broker:  # named once, here, rather than by each worker process
        args += ["--broker", default_broker_url()]
    # The worker processes get the options given on the command line; the
    # environment passes the others on, less what makes this the parent.
    env = {key: value for key, value in os.environ.items() if key not in ("KQUEUE_PROCESSES", "KQUEUE_METRICS_PORT")}
    with ExitStack() as stack:
        folder = fleet.Folder.make() if port else None
        if folder is not None:
            stack.callback(folder.close)
        reports = metrics.Reports(folder.path, queue) if folder is not None else None
        extra = ["--fleet-dir", str(folder.path)] if folder is not None else []

        def command(index: int) -> list[str]:
            return fleet.child_command([*args, "--fleet-index", str(index), *extra])

        parent = fleet.Fleet(
            command,
            processes,
            finite=finite,
            env=env,
            on_exit=reports.retire if reports else lambda pid: None,
            folder=folder,
        )
        if port is not None and reports is not None:
            stack.callback(fleet.serve_fleet(port, parent, reports).close)
        click.echo(" [*] Waiting for messages. To exit press CTRL+C")
        unclean = parent.run()
    if unclean:
        raise KQueueError(f"{unclean} of {processes} worker processes did not stop cleanly")


#: Options that make a process the parent of a fleet, or that the parent sets itself.
_PARENT_ONLY = {"processes", "metrics_port", "fleet_index", "fleet_dir"}


def _child_args(ctx: click.Context) -> list[str]:
    """The options given on this command line, as a worker process of the fleet is given them."""
    args: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if not isinstance(param, click.Option) or not param.expose_value or name is None or name in _PARENT_ONLY:
            continue
        if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            continue
        flag = max(param.opts, key=len)
        value = ctx.params[name]
        if param.is_flag:
            args += [flag] if value else []
        else:
            args += [flag, str(value)]
    return args


def worker_settings(options: dict[str, Any]) -> WorkerSettings:
    """The one place where command-line options become `WorkerSettings`: the option names are its fields."""
    from kqueue.worker import WorkerSettings

    return WorkerSettings(**options).validate()


def _handler(path: str | None, dot_seconds: float) -> Handler:
    if path is None:
        return dot_handler(dot_seconds)
    try:
        return load_handler(path)
    except KQueueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--handler'") from None


def _app(path: str | None) -> App | None:
    if path is None:
        return None
    try:
        app = load_app(path)
    except KQueueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--app'") from None
    if not app.tasks:
        raise click.BadParameter(f"app {path!r} registers no task", param_hint="'--app'")
    return app


def _app_queue(app: App, queue_name: str, queue_type: str) -> tuple[str, str]:
    """The app's queue and queue type, where the command line and the environment name none."""
    ctx = click.get_current_context()
    given = {ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT}
    if ctx.get_parameter_source("queue_name") not in given:
        queue_name = app.queue.name
    if ctx.get_parameter_source("queue_type") not in given:
        queue_type = app.queue_type.value
    return queue_name, queue_type


def _console_worker(base: type) -> type:
    class ConsoleWorker(base):  # type: ignore[valid-type,misc]
        """Prints the tutorial's lines as each task starts and ends."""

        def on_task_start(self, task: Any) -> None:
            _say(f" [x] Received {shown(task.text, quoted=task.call is None)}")

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
        # Python runs this between any two bytecodes of the main thread, which
        # may hold a lock or be writing a log line: record and wake, nothing
        # more. The worker's loop logs the signal and acts on it.
        self.signals += 1
        self.worker.stop(now=self.signals > 1, reason=signal.Signals(signum).name)
