"""What a fault run's processes were told and what they did, and the checks that nothing was lost.

A run keeps its history in one folder:

- each batch a sender sends is a file of task ids, one per line; the sender's
  exit code and output say how many of them the broker confirmed;
- every handler run appends ``start ID PID TIME`` and ``done ID PID TIME`` to
  ``runs.log`` with one ``O_APPEND`` write each (`tests.faults.handlers`);
- the test notes each disruption it caused (a kill, a stop, a cut connection)
  and the workers' own logs add the losses they noticed.

`History.check` then asserts the promises: every confirmed task done at least
once; nothing done that was never sent; a task run twice only if a process
running it was disrupted while it ran; every count a tool printed equal to
the history.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

__all__ = ["Batch", "History", "Summary"]

SENT = re.compile(r" \[x\] Sent (\d+) messages?")
CONFIRMED = re.compile(r"confirmed (\d+) of (\d+) messages?")
#: What a sender logs when it lost the broker and sends its unconfirmed messages again.
RESENT = re.compile(r"sending the (\d+) unconfirmed messages? again")
#: How a summary names the repeats `_resent` accounts for.
RESENT_WHY = "sent twice by a sender that lost its connection"
#: What a worker logs when it loses the broker; the tasks it was running may come again.
LOSSES = ("lost the connection", "lost the channel", "consumer_timeout", "was removed or replaced")


@dataclass
class Batch:
    """One ``kqueue-send --file`` run: its task ids, and what it said once it exited."""

    name: str
    ids: list[str]
    code: int | None = None
    out: str = ""
    err: str = ""

    @property
    def confirmed(self) -> int:
        """How many messages the sender said the broker confirmed."""
        if self.code == 0:
            match = SENT.search(self.out)
            assert match is not None, f"{self.name}: exit 0 without a count:\n{self.out}{self.err}"
            return int(match.group(1))
        match = CONFIRMED.search(self.err)
        return int(match.group(1)) if match else 0


@dataclass(frozen=True)
class Disruption:
    """Something that may make a worker's running tasks come again: from `start` to `end` (epoch seconds)."""

    pid: int | None  # None: every process
    start: float
    end: float
    why: str


@dataclass
class Summary:
    """The figures of one run, for a test's message and the soak's table."""

    sent: int = 0
    confirmed: int = 0
    done: int = 0
    duplicated: dict[str, int] = field(default_factory=dict)  # why -> tasks
    lost: int = 0
    faults: Counter[str] = field(default_factory=Counter)

    def row(self) -> str:
        twice = sum(self.duplicated.values())
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.duplicated.items())) or "-"
        return f"confirmed {self.confirmed}, done {self.done}, ran twice {twice} ({why}), lost {self.lost}"


class History:
    """A run's folder of records (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.runs = root / "runs.log"
        self.runs.touch()
        self.batches: list[Batch] = []
        self.disruptions: list[Disruption] = []
        self.faults: Counter[str] = Counter()

    # -- recording ---------------------------------------------------------------

    def batch(self, name: str, count: int, *, seconds: float = 0.0) -> tuple[Batch, Path]:
        """A new batch of `count` task ids and the file to send; each task runs `seconds` in its handler."""
        suffix = f"~{seconds:g}" if seconds else ""
        batch = Batch(name, [f"{name}-{n}{suffix}" for n in range(count)])
        path = self.root / f"{name}.txt"
        path.write_text("".join(f"{task}\n" for task in batch.ids), encoding="utf-8")
        self.batches.append(batch)
        return batch, path

    def disrupted(self, pid: int | None, why: str, start: float, end: float = math.inf) -> None:
        """Tasks that `pid` (every process if None) started before `end` may run again."""
        self.disruptions.append(Disruption(pid, start, end, why))
        self.faults[why] += 1

    def worker_log(self, pid: int, lines: list[str]) -> None:
        """A worker's JSON log lines: each loss of the broker it noticed is a disruption up to that moment."""
        for line in lines:
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if any(loss in entry.get("message", "") for loss in LOSSES):
                when = datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
                self.disruptions.append(Disruption(pid, when, when + 0.001, "lost its connection"))

    # -- reading -------------------------------------------------------------------

    def starts(self) -> dict[str, list[tuple[int, float]]]:
        return self._events("start")

    def done(self) -> dict[str, list[tuple[int, float]]]:
        return self._events("done")

    def _events(self, kind: str) -> dict[str, list[tuple[int, float]]]:
        found: dict[str, list[tuple[int, float]]] = defaultdict(list)
        text = self.runs.read_text(encoding="utf-8")
        # Whole lines only: a handler's line that crosses a page of the file can be read half written.
        for line in text[: text.rfind("\n") + 1].splitlines():
            what, task, pid, when = line.split(" ")
            if what == kind:
                found[task].append((int(pid), float(when)))
        return found

    def missing(self) -> list[str]:
        """Confirmed tasks not done yet. Of a batch that failed, which were confirmed is not known:
        all of it is missing while fewer of its tasks are done than it said were confirmed."""
        done = self.done()
        missing = []
        for batch in self.batches:
            if batch.code is None:
                continue
            undone = [task for task in batch.ids if task not in done]
            if batch.code == 0 or len(batch.ids) - len(undone) < batch.confirmed:
                missing.extend(undone)
        return missing

    # -- the checks ------------------------------------------------------------------

    def summary(self) -> Summary:
        """The figures of the run, without asserting anything: what the soak prints before it checks."""
        starts, done = self.starts(), self.done()
        summary = Summary(faults=self.faults)
        for batch in self.batches:
            summary.sent += len(batch.ids)
            summary.confirmed += batch.confirmed
            finished = sum(task in done for task in batch.ids)
            summary.lost += len(batch.ids) - finished if batch.code == 0 else max(0, batch.confirmed - finished)
        summary.done = len(done)
        summary.duplicated = self._repeats(starts, strict=False)
        return summary

    def check(self) -> Summary:
        """Assert every promise over the whole history; return its figures."""
        starts, done = self.starts(), self.done()
        sent = {task for batch in self.batches for task in batch.ids}
        never_sent = sorted(set(starts) - sent)
        assert not never_sent, f"ran tasks that were never sent: {never_sent[:10]}"
        summary = Summary(faults=self.faults)
        for batch in self.batches:
            assert batch.code is not None, f"{batch.name}: the sender's exit was not recorded"
            summary.sent += len(batch.ids)
            summary.confirmed += self._check_batch(batch, done)
        summary.done = len(done)
        summary.duplicated = self._repeats(starts, strict=True)
        return summary

    def _check_batch(self, batch: Batch, done: dict[str, list[tuple[int, float]]]) -> int:
        confirmed = batch.confirmed
        finished = [task for task in batch.ids if task in done]
        if batch.code == 0:
            assert confirmed == len(batch.ids), f"{batch.name}: said it sent {confirmed} of {len(batch.ids)}"
            missing = [task for task in batch.ids if task not in done]
            assert not missing, f"{batch.name}: {len(missing)} confirmed tasks never done, e.g. {missing[:5]}"
        else:
            # A failed batch says how many were confirmed; at least that many must be done.
            assert len(finished) >= confirmed, (
                f"{batch.name}: said {confirmed} were confirmed, but only {len(finished)} were done:\n{batch.err}"
            )
        return confirmed

    def _repeats(self, starts: dict[str, list[tuple[int, float]]], *, strict: bool) -> dict[str, int]:
        """Tasks run more than once, counted by why; with `strict`, assert each has a why.

        A run followed by another is excused by a disruption of its process
        while it ran; what no disruption explains, by a sender that lost its
        connection and sent its unconfirmed messages again (`_resent`).
        """
        unexplained = {task for task, runs in starts.items() if not self._explained(runs)}
        resent: set[str] = set()
        for batch in self.batches:
            resent |= _resent(batch, unexplained, strict=strict)
        why: Counter[str] = Counter()
        for task, runs in starts.items():
            if task in resent:
                why[RESENT_WHY] += 1
                continue
            for pid, when in sorted(runs, key=lambda run: run[1])[:-1]:
                excuse = self._excuse(pid, when)
                assert excuse is not None or not strict, (
                    f"{task} ran again after a run by {pid} at {when:.3f} that nothing disrupted"
                )
                why[excuse or "NOTHING DISRUPTED IT"] += 1
        return dict(why)

    def _explained(self, runs: list[tuple[int, float]]) -> bool:
        """Whether every run of a task but its last was disrupted (True for a task run once)."""
        earlier = sorted(runs, key=lambda run: run[1])[:-1]
        return all(self._excuse(pid, when) is not None for pid, when in earlier)

    def _excuse(self, pid: int, when: float) -> str | None:
        for disruption in self.disruptions:
            if disruption.pid in (None, pid) and disruption.end >= when:
                return disruption.why
        return None


def _resent(batch: Batch, repeated: set[str], *, strict: bool) -> set[str]:
    """The `repeated` tasks of `batch` that its sender may have sent twice; with `strict`, assert its bound.

    A sender that loses its connection sends again every message the broker
    had not confirmed: the broker may have had some already, so those tasks
    are queued twice and run twice, by workers nothing disrupted. That is
    at-least-once, and bounded: each loss resends the unconfirmed messages,
    which the sender counts in its log (``sending the N unconfirmed messages
    again``), the last ones it sent, consecutive lines of its batch.
    """
    counts = [int(n) for n in RESENT.findall(batch.err)]
    positions = [n for n, task in enumerate(batch.ids) if task in repeated]
    if not counts or not positions:
        return set()
    bound = sum(counts)
    if strict:
        assert len(positions) <= bound, (
            f"{batch.name}: {len(positions)} tasks ran twice, but its sender sent only {bound} again:\n{batch.err}"
        )
        span = positions[-1] - positions[0] + 1
        assert len(counts) > 1 or span <= bound, (
            f"{batch.name}: tasks that ran twice span {span} lines (from line {positions[0]}), "
            f"more than the {bound} its sender sent again"
        )
    return {batch.ids[n] for n in positions}
