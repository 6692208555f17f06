"""One row per measured figure: the project's value, its baseline's in the same run, the goal.

Every benchmark script builds a list of `Figure`s from its own results, prints them with
`print_table`, and with ``--figures FILE`` writes them as JSON; ``run_all.py`` (``make bench``)
gathers those files and prints one table for the whole run.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Goal:
    """``value <op> limit``; with ``of_baseline`` the ratio value/baseline is compared instead."""

    op: str
    limit: float
    of_baseline: bool = False

    def __post_init__(self) -> None:
        if self.op not in _COMPARE:
            raise ValueError(f"unknown comparison {self.op!r}")

    def __str__(self) -> str:
        return f"{self.op} {self.limit:g}{'x' if self.of_baseline else ''}"


@dataclass(frozen=True)
class Figure:
    figure: str
    value: float
    unit: str = ""
    baseline: float | None = None
    baseline_name: str = ""
    goal: Goal | None = None
    #: median of per-repetition ratios, when project and baseline ran in pairs (else the
    #: ratio of the two medians is shown)
    paired_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.paired_ratio is not None:
            return self.paired_ratio
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        measured = self.ratio if self.goal.of_baseline else self.value
        if measured is None:
            return False
        return _COMPARE[self.goal.op](measured, self.goal.limit)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": self.ratio, "met": self.met}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Figure:
        goal = data.get("goal")
        return cls(
            figure=data["figure"],
            value=data["value"],
            unit=data.get("unit", ""),
            baseline=data.get("baseline"),
            baseline_name=data.get("baseline_name", ""),
            goal=Goal(**goal) if goal else None,
            paired_ratio=data.get("paired_ratio"),
        )


def _number(value: float | None) -> str:
    if value is None:
        return ""
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def rows(figures: Iterable[Figure], source: str | None = None) -> list[tuple[str, ...]]:
    out = []
    for f in figures:
        met = {None: "", True: "met", False: "MISSED"}[f.met]
        baseline = _number(f.baseline) + (f" ({f.baseline_name})" if f.baseline_name else "")
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x"
        cells = (f.figure, f"{_number(f.value)} {f.unit}".strip(), baseline, ratio)
        goal = "" if f.goal is None else str(f.goal)
        if f.goal is not None and not f.goal.of_baseline and f.unit:
            goal += f" {f.unit}"
        out.append(((source,) if source is not None else ()) + cells + (goal, met))
    return out


def format_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in (header, *body)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


HEADER = ("figure", "hydra-trio", "baseline (same run)", "ratio", "goal", "")


def print_table(figures: Sequence[Figure]) -> None:
    print(format_table(HEADER, rows(figures)))


def write(path: Path | None, figures: Sequence[Figure]) -> None:
    if path is not None:
        path.write_text(json.dumps([f.to_json() for f in figures], indent=1))


def read(path: Path) -> list[Figure]:
    return [Figure.from_json(item) for item in json.loads(path.read_text())]
