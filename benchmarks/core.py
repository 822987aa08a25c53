"""Figures, rounds and the table: each figure's steps run interleaved (A B A B ...) for several rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: A step measures one or more series once and returns {series: value}.
StepFn = Callable[[], dict[str, float]]


@dataclass(frozen=True)
class Target:
    """What a row must achieve.

    kind:
        ``ratio>=`` / ``ratio<=``: kqueue median over baseline median;
        ``kqueue<=``: kqueue's median itself (e.g. ms, % of a core);
        ``diff<=``: kqueue median minus baseline median (e.g. MB).
    """

    kind: str
    value: float

    def describe(self) -> str:
        if self.kind.startswith("ratio"):
            return f"{self.kind[5:]} {self.value:g}x"
        if self.kind == "kqueue<=":
            return f"kq <= {self.value:g}"
        return f"diff <= {self.value:g}"

    def met(self, kqueue: float, baseline: float | None) -> bool | None:
        if self.kind == "kqueue<=":
            return kqueue <= self.value
        if baseline is None or baseline == 0:
            return None
        if self.kind == "ratio>=":
            return kqueue / baseline >= self.value
        if self.kind == "ratio<=":
            return kqueue / baseline <= self.value
        if self.kind == "diff<=":
            return kqueue - baseline <= self.value
        raise ValueError(f"unknown target kind {self.kind!r}")


@dataclass(frozen=True)
class Row:
    """One line of the table: a kqueue series against its baseline series."""

    label: str
    unit: str
    kqueue: str
    baseline: str | None
    target: Target | None = None


@dataclass(frozen=True)
class Step:
    name: str
    run: StepFn


@dataclass
class Figure:
    """Steps run in order once per round (interleaving kqueue and baseline), and rows read off the series."""

    name: str
    steps: list[Step]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None


@dataclass(frozen=True)
class Stats:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats | None:
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values))


def run_figure(
    figure: Figure, rounds: int, log: Callable[[str], None], recover: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Run every step once per round; `recover` (e.g. wait for the broker) runs before a failed step is retried."""
    series: dict[str, list[float]] = {}
    if figure.setup is not None:
        figure.setup()
    try:
        for number in range(1, rounds + 1):
            for step in figure.steps:
                values = _attempt(step, log, recover)
                for name, value in values.items():
                    series.setdefault(name, []).append(value)
                shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
                log(f"  {figure.name} round {number}/{rounds} {step.name}: {shown}")
    finally:
        if figure.teardown is not None:
            figure.teardown()
    return series


#: Times a step is tried again after it failed (a broker restarted under us, say) before the run fails.
RETRIES = 3
#: Seconds to wait before trying a failed step again.
RETRY_AFTER = 10.0


def _attempt(step: Step, log: Callable[[str], None], recover: Callable[[], None] | None) -> dict[str, float]:
    for attempt in range(RETRIES + 1):
        try:
            return step.run()
        except Exception as exc:
            if attempt == RETRIES:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log(f"  {step.name} failed ({type(exc).__name__}: {first}); trying it again in {RETRY_AFTER:g} s")
            time.sleep(RETRY_AFTER)
            if recover is not None:
                recover()
    raise AssertionError("unreachable")


def row_result(row: Row, series: dict[str, list[float]]) -> dict[str, Any]:
    kq = Stats.of(series.get(row.kqueue, []))
    base = Stats.of(series.get(row.baseline, [])) if row.baseline else None
    ratio = kq.median / base.median if kq and base and base.median else None
    met = row.target.met(kq.median, base.median if base else None) if kq and row.target else None
    return {
        "label": row.label,
        "unit": row.unit,
        "kqueue_series": row.kqueue,
        "baseline_series": row.baseline,
        "kqueue": None if kq is None else vars(kq),
        "baseline": None if base is None else vars(base),
        "ratio": ratio,
        "target": None if row.target is None else row.target.describe(),
        "met": met,
    }


HEADER = (
    f"{'figure':<38} {'unit':<6} {'kqueue median [min..max]':>30} {'baseline median [min..max]':>30} "
    f"{'ratio':>7}  {'target':<14} {'met':<4}"
)


def _cell(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "-"
    return f"{_num(stats['median'])} [{_num(stats['low'])}..{_num(stats['high'])}]"


def _num(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    lines = [HEADER, "-" * len(HEADER)]
    for result in results:
        ratio = "-" if result["ratio"] is None else f"{result['ratio']:.2f}x"
        met = {True: "yes", False: "NO", None: "-"}[result["met"]]
        lines.append(
            f"{result['label']:<38} {result['unit']:<6} {_cell(result['kqueue']):>30} "
            f"{_cell(result['baseline']):>30} {ratio:>7}  {result['target'] or '-':<14} {met:<4}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Config:
    """What every figure is built from.

    On ``sqlite://`` the raw Kombu baselines run on `baseline_url` (Kombu's own
    ``sqla+sqlite://``, a file of its own), `plain_db` is the file of the plain
    ``sqlite3`` ceiling, and `reference_url` (RabbitMQ, or None) is where kqueue's
    own figures are measured again for comparison. Elsewhere the baselines run on `url`.
    """

    url: str
    scale: float
    queue_type: str = "classic"
    baseline_url: str | None = None
    reference_url: str | None = None
    plain_db: str | None = None

    def count(self, n: int, least: int = 1) -> int:
        """`n` messages at scale 1, scaled."""
        return max(least, round(n * self.scale))

    @property
    def amqp(self) -> bool:
        return self.url.split("://", 1)[0] in ("amqp", "pyamqp", "amqps")

    @property
    def sqlite(self) -> bool:
        return self.url.split("://", 1)[0] == "sqlite"

    @property
    def baseline(self) -> str:
        """Where the raw Kombu baselines run."""
        return self.baseline_url or self.url
