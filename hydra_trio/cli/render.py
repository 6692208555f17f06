"""What the client commands print: the ``status`` table, ``show``'s lines, ``--wait``'s
progress.  Pure functions from the API's JSON to text; the commands do the printing."""

from __future__ import annotations

import math
import re
from typing import Any

#: Terminal escape sequences (colours, cursor moves) that builds print.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

#: The states a build ends in.
FINISHED = ("succeeded", "failed", "cancelled")


def age(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def status_lines(data: dict[str, Any]) -> list[str]:
    """``GET /status`` as a table of machines, a blank line and the queue counts."""
    rows = [("HOSTNAME", "STATE", "JOBS", "SINCE PING", "OK/FAILED/LOST")]
    for m in data["machines"]:
        rows.append(
            (
                m["hostname"],
                m["state"],
                f"{m['currentJobs']}/{m['maxJobs']}",
                age(m["sinceLastPing"]),
                f"{m['succeededBuilds']}/{m['failedBuilds']}/{m['lostBuilds']}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    q = data["queue"]
    return [*lines, "\nqueue: " + ", ".join(f"{q[k]} {k}" for k in q)]


def show_lines(data: dict[str, Any]) -> list[str]:
    """``GET /builds/{id}`` as ``key: value`` lines, then its store paths and outputs."""
    lines = []
    for key in ("id", "name", "drv", "state", "status", "attempts", "machine", "exitCode", "error"):
        if data.get(key) is not None:
            lines.append(f"{key}: {data[key]}")
    for output_name, store_path in (data.get("storePaths") or {}).items():
        lines.append(f"store path: {store_path} ({output_name})")
    for output in data.get("outputs", []):
        lines.append(f"output: {output['path']} ({output['size']} bytes)")
    return lines


def progress_line(build: dict[str, Any], elapsed: float) -> str:
    """``[  12.3s] running (building) on b1 attempt 1``."""
    where = f" on {build['machine']}" if build.get("machine") else ""
    phase = f" ({build['phase']})" if build.get("phase") else ""
    return f"[{elapsed:6.1f}s] {build['state']}{phase}{where} attempt {build['attempts']}"


def progress_key(build: dict[str, Any]) -> tuple[Any, ...]:
    """What a plain (not a terminal's) progress display shows a new line for when it changes."""
    return (build["state"], build.get("phase"), build.get("machine"), build["attempts"])


def failure_line(build_id: str, build: dict[str, Any]) -> str:
    """Why a finished build did not succeed."""
    error = f" ({build['error']})" if build.get("error") else ""
    return f"build {build_id} {build['state']}: {build['status']}{error}"


def last_line(log: object) -> str:
    """The last non-empty line of a log tail, printable (control characters dropped)."""
    text = _ANSI.sub("", log) if isinstance(log, str) else ""
    for line in reversed(text.splitlines()):
        shown = "".join(c for c in line if c.isprintable()).strip()
        if shown:
            return shown
    return ""
