#!/usr/bin/env python3
"""Print the chaos suite's results as the Markdown table of docs/reliability.md.

    HYDRA_TRIO_CHAOS_REPORT=run1.json make chaos
    HYDRA_TRIO_CHAOS_REPORT=run2.json make chaos
    scripts/chaos-table.py run1.json run2.json

With several runs, each cell holds every run's value, separated by " / " (in the order of
the files given).  Times are seconds.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def cell(values: list[Any]) -> str:
    def one(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    shown = [one(v) for v in values]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown)


def main() -> None:
    runs = []
    for path in sys.argv[1:]:
        with open(path) as f:
            runs.append(json.load(f))
    if not runs:
        sys.exit(__doc__)
    for run in runs:
        print(f"<!-- network: {run['network'].get('backend')}: {run['network'].get('why')} -->")
    scenarios: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        for row in run["results"]:
            scenarios.setdefault(row["scenario"], []).append(row)
    columns = [
        ("fault", None),
        ("injected with", "mechanism"),
        ("what detected it (runner / builder)", None),
        ("runner detects", "runner_detect_s"),
        ("builder detects", "builder_detect_s"),
        ("detection -> running elsewhere", "reschedule_s"),
        ("fault -> running elsewhere", "elsewhere_s"),
        ("builds lost", "lost"),
        ("double-committed", "double_committed"),
    ]
    print("| " + " | ".join(title for title, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for name, rows in scenarios.items():
        detected = f"{rows[0].get('runner_detected_by') or '-'} / "
        detected += rows[0].get("builder_detected_by") or "-"
        cells = [name, rows[0].get("mechanism", ""), detected]
        cells += [cell([r.get(key) for r in rows]) for _, key in columns[3:] if key]
        print("| " + " | ".join(cells) + " |")
    print()
    for name, rows in scenarios.items():
        notes = [r.get("notes") for r in rows if r.get("notes")]
        if notes:
            print(f"- {name}: " + " // ".join(notes))


if __name__ == "__main__":
    main()
