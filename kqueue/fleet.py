"""Several worker processes under one command: start them, replace one that dies, pass a stop on to each.

The parent holds no broker connection: each worker process is a fresh
interpreter (``subprocess``, never a fork) that connects on its own. The
parent talks to each through its standard input, a line per request
(``stop SIGTERM``, ``now SIGINT``); a worker process whose standard input
closes has lost its parent, and stops as if asked (`follow_parent`). A stop
asked that way is not a signal, so a worker process that gets the same
Ctrl+C from the terminal, or the same SIGTERM from systemd, still counts one
stop, not two.

With metrics, the parent makes a temporary `Folder` where each worker
process leaves its snapshot; a lock file in it, held by every process of
the fleet, tells a later fleet whether this one is gone (`sweep`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kqueue.logs import fields
from kqueue.metrics import Exposition, Member, MetricsServer, Outage, Reports, Snapshot, judge

__all__ = ["Fleet", "Folder", "child_command", "follow_parent", "serve_fleet", "sweep"]

log = logging.getLogger("kqueue.fleet")

#: Seconds before a worker process that died is replaced; doubled at each death in a row, up to `RESTART_MAX`.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
#: A worker process that ran this long before it died is replaced after `RESTART_FIRST` again.
STEADY_AFTER = 60.0
#: How a fleet's folder is named in the temporary directory, where `sweep` looks for those of fleets that are gone.
FOLDER_PREFIX = "kqueue-fleet-"
#: Seconds between two sweeps by a running parent, for the folders of fleets whose worker processes outlived it.
SWEEP_EVERY = 60.0


@dataclass(eq=False)
class Slot:
    """One place in the fleet, 0 to N-1, and the worker process holding it, if any."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None
    delay: float = RESTART_FIRST
    finished: bool = False  # exited 0 after its work (burst, max tasks): not replaced
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None else None


class Fleet:
    """The parent of N worker processes.

    Parameters:
        command: the command line of the worker process in a slot (its index).
        processes: how many to keep running.
        finite: the worker processes exit 0 once their work is done (``--burst``,
            ``--max-tasks``): one that does is not replaced, and the fleet ends
            when all have. Otherwise any exit but in a stop is a death.
        env: the worker processes' environment.
        on_exit: called in the parent's loop with the pid of each worker process that exited.
        folder: the fleet's folder, if any: each worker process inherits its
            lock, and the loop makes it again if it is removed.
    """

    def __init__(
        self,
        command: Callable[[int], list[str]],
        processes: int,
        *,
        finite: bool,
        env: dict[str, str] | None = None,
        on_exit: Callable[[int], None] = lambda pid: None,
        folder: Folder | None = None,
    ) -> None:
        self.slots = [Slot(index) for index in range(processes)]
        self._command = command
        self._finite = finite
        self._env = env
        self._on_exit = on_exit
        self._folder = folder
        self._signals = 0  # written only by the signal handler
        self._signal_name = ""
        self._acted = 0
        self._unclean = 0
        self._wakeup_r = -1

    @property
    def stopping(self) -> bool:
        return self._acted > 0

    @property
    def restarts(self) -> int:
        return sum(slot.restarts for slot in self.slots)

    def run(self) -> int:
        """Run until stopped, or until every worker process finished its work; the number that did not end cleanly."""
        with self._signals_caught():
            for slot in self.slots:
                self._start(slot)
            while True:
                self._act_on_signals()
                self._reap()
                self._restart_due()
                if self._folder is not None:
                    self._folder.keep()
                if self._over():
                    break
                self._wait(self._timeout())
        return self._unclean

    # -- signals --------------------------------------------------------------

    @contextmanager
    def _signals_caught(self) -> Iterator[None]:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self._wakeup_r = read
        previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        previous = {
            signum: signal.signal(signum, self._on_signal if signum != signal.SIGCHLD else _wake_only)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)
        }
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(previous_fd)
            os.close(read)
            os.close(write)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Python runs this between two bytecodes of the main thread, which may
        # hold a lock or be writing a log line: count it, and let the loop act.
        self._signal_name = signal.Signals(signum).name
        self._signals += 1

    def _act_on_signals(self) -> None:
        seen = self._signals
        if seen == self._acted:
            return
        now = seen > 1
        self._acted = seen
        name = self._signal_name
        if now:
            log.warning("%s again: worker processes requeue their running tasks and exit now", name)
        else:
            live = sum(slot.proc is not None for slot in self.slots)
            log.warning("%s: stopping %d worker processes; each finishes its running tasks first", name, live)
        for slot in self.slots:
            slot.restart_at = None
            self._tell(slot, f"{'now' if now else 'stop'} {name}")

    def _tell(self, slot: Slot, line: str) -> None:
        proc = slot.proc
        if proc is None or proc.stdin is None:
            return
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except OSError:  # it has just exited: the loop reaps it
            pass

    # -- worker processes --------------------------------------------------------

    def _start(self, slot: Slot) -> None:
        slot.restart_at = None
        slot.started = time.monotonic()
        # The folder's lock goes with each worker process: it stays held for as long as any of them runs.
        inherit = (self._folder.fd,) if self._folder is not None else ()
        slot.proc = subprocess.Popen(self._command(slot.index), stdin=subprocess.PIPE, env=self._env, pass_fds=inherit)
        log.info("started worker process %d", slot.index, extra=fields(pid=slot.proc.pid))

    def _reap(self) -> None:
        for slot in self.slots:
            proc = slot.proc
            if proc is None or (code := proc.poll()) is None:
                continue
            slot.proc = None
            _close(proc.stdin)
            self._on_exit(proc.pid)
            if self.stopping:
                self._stopped(slot, proc.pid, code)
            elif code == 0 and self._finite:
                slot.finished = True
                log.info("worker process %d finished its work", slot.index, extra=fields(pid=proc.pid))
            else:
                self._died(slot, proc.pid, code)

    def _stopped(self, slot: Slot, pid: int, code: int) -> None:
        if code == 0:
            log.info("worker process %d stopped", slot.index, extra=fields(pid=pid))
        else:
            self._unclean += 1
            log.error("worker process %d %s while stopping", slot.index, _exit(code), extra=fields(pid=pid))

    def _died(self, slot: Slot, pid: int, code: int) -> None:
        now = time.monotonic()
        ran = now - slot.started
        if ran >= STEADY_AFTER:
            slot.delay = RESTART_FIRST
        log.error(
            "worker process %d %s after %.1fs; starting another in %.1fs",
            slot.index,
            _exit(code),
            ran,
            slot.delay,
            extra=fields(pid=pid),
        )
        slot.restart_at = now + slot.delay
        slot.delay = min(slot.delay * 2, RESTART_MAX)

    def _restart_due(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is None and slot.restart_at is not None and slot.restart_at <= now:
                slot.restarts += 1
                self._start(slot)

    def _over(self) -> bool:
        if any(slot.proc is not None for slot in self.slots):
            return False
        return self.stopping or all(slot.finished for slot in self.slots)

    # -- waiting -----------------------------------------------------------------

    def _timeout(self) -> float:
        """Until the next restart is due, or a second: a signal (SIGCHLD included) wakes the wait sooner."""
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        return max(0.0, min([1.0, *(at - time.monotonic() for at in due)]))

    def _wait(self, timeout: float) -> None:
        ready, _, _ = select.select([self._wakeup_r], [], [], timeout)
        if ready:
            try:
                while os.read(self._wakeup_r, 512):
                    pass
            except BlockingIOError:
                pass


def _wake_only(signum: int, frame: Any) -> None:
    """SIGCHLD: its only job is to write to the wakeup pipe, which Python does before calling this."""


def _exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _close(stream: IO[bytes] | None) -> None:
    if stream is not None:
        try:
            stream.close()
        except OSError:
            pass


class Folder:
    """The fleet's temporary folder, where its worker processes leave their metrics snapshots.

    The parent makes it, makes it again if it is removed, and removes it as
    it exits. A SIGKILLed parent cannot, so a lock file in it tells a later
    fleet whether it is abandoned: the parent holds a flock on ``owner.lock``
    and each worker process inherits it, and the kernel releases it once the
    last of them is gone, however they ended. A pid written in a file could
    not say as much: the pid of a dead parent may be another process's now.

    Attributes:
        path: the folder.
        fd: the lock file, held; each worker process gets it (``pass_fds``).
    """

    LOCK = "owner.lock"

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self._outage = Outage(f"make the fleet's folder {path}")
        self._next_sweep = time.monotonic() + SWEEP_EVERY

    @classmethod
    def make(cls, parent: Path | None = None) -> Folder:
        """Remove the abandoned folders in `parent` (the temporary directory by default), then make one, held."""
        parent = parent or Path(tempfile.gettempdir())
        sweep(parent)
        path = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=parent))
        return cls(path, _hold(path))

    def keep(self) -> None:
        """At each turn of the parent's loop: make the folder again if it was removed; sweep now and then."""
        if not (self.path / self.LOCK).exists():
            self._remake()
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_EVERY
            sweep(self.path.parent)

    def _remake(self) -> None:
        try:
            self.path.mkdir(mode=0o700, exist_ok=True)
            fd = _hold(self.path)
        except OSError as exc:
            self._outage.failed(exc)
            return
        # Same number, new lock: worker processes started from now on inherit this one.
        os.dup2(fd, self.fd, inheritable=False)
        os.close(fd)
        if not self._outage.worked():
            log.warning("the fleet's folder %s was removed; made it again", self.path)

    def close(self) -> None:
        """Remove the folder, once every worker process has exited."""
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self.fd)


def _hold(folder: Path) -> int:
    """A new lock file in `folder`, locked before it takes its name, so that no sweep ever finds it free."""
    fd, temp = tempfile.mkstemp(prefix=".owner-", dir=folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(temp, folder / Folder.LOCK)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return fd


def sweep(parent: Path) -> list[Path]:
    """Remove the fleets' folders in `parent` whose lock nobody holds: every process of their fleet is gone.

    A folder without a lock file is left alone: it is being made (the lock
    comes a moment later), or was made by an older kqueue, whose fleet may
    still run. So is one of another user's.
    """
    removed = [path for path in sorted(parent.glob(FOLDER_PREFIX + "*")) if _remove_abandoned(path)]
    for path in removed:
        log.info("removed %s, left by a fleet whose processes are all gone", path)
    return removed


def _remove_abandoned(path: Path) -> bool:
    try:
        if path.lstat().st_uid != os.getuid():
            return False
        fd = os.open(path / Folder.LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held through the removal: no other sweep races this one
        shutil.rmtree(path)  # refuses a symbolic link
    except OSError:  # held: a process of that fleet still runs; or it could not be removed
        return False
    finally:
        os.close(fd)
    return True


def child_command(args: list[str]) -> list[str]:
    """The command line of a worker process: this interpreter, ``kqueue-work`` with `args`."""
    return [sys.executable, "-c", "from kqueue.cli.work import work_main; work_main(prog_name='kqueue-work')", *args]


def follow_parent(worker: Any, fd: int = 0) -> threading.Thread:
    """In a worker process: act on the parent's requests (``stop REASON``, ``now REASON``) on standard input.

    Its end (the parent is gone) stops the worker as a first signal would.
    Read with `os.read`, not through `sys.stdin`: a daemon thread blocked in a
    buffered reader holds its lock, and the interpreter aborts at exit.
    """

    def listen() -> None:
        pending = b""
        while chunk := os.read(fd, 4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                word, _, reason = line.decode(errors="replace").strip().partition(" ")
                if word in ("stop", "now"):
                    worker.stop(now=word == "now", reason=reason or "the parent process asked")
        worker.stop(reason="the parent process is gone")

    thread = threading.Thread(target=listen, name="kqueue-parent", daemon=True)
    thread.start()
    return thread


def serve_fleet(port: int, fleet: Fleet, reports: Reports) -> MetricsServer:
    """Serve the metrics of the whole fleet, and its health: every slot's worker process connected and turning."""

    def gather() -> tuple[Snapshot | None, list[Snapshot]]:
        pids = [pid for slot in fleet.slots if (pid := slot.pid) is not None]
        return reports.gather(pids)

    def health() -> tuple[bool, str]:
        members = []
        for slot in fleet.slots:
            pid = slot.pid
            if slot.finished:
                continue  # its work is done
            if pid is None:
                members.append(Member(slot.index, None, note=_absence(slot)))
            else:
                snapshot, seen = reports.look(pid)
                members.append(Member(slot.index, pid, snapshot, seen=seen))
        return judge(members, time.time())

    return MetricsServer(port, Exposition(reports.queue, gather, lambda: fleet.restarts), health)


def _absence(slot: Slot) -> str:
    due = slot.restart_at
    if due is None:
        return "stopped"
    return f"it died; another starts in {max(0.0, due - time.monotonic()):.1f}s"
