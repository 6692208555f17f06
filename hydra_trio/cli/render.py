"""What the client commands print: the ``status`` table, ``show``'s lines, ``--wait``'s
progress.  Pure functions from the API's JSON to text; the commands do the printing."""

from __future__ import annotations

import math
import re
import shlex
import time
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
                # an operator's drain lasts until undrain, whatever the connection does
                m["state"] + (" (drained)" if m.get("drainRequested") else ""),
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


def command_text(argv: list[str]) -> str:
    """A command as a shell would take it back."""
    return shlex.join(str(a) for a in argv)


def when(timestamp: float | None) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS``."""
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def show_lines(data: dict[str, Any]) -> list[str]:
    """``GET /builds/{id}`` as ``key: value`` lines: what it is, why it waits or how it
    ended, its dependencies and times, then its store paths and outputs."""
    lines = []
    for key in ("id", "name", "drv", "state", "status", "attempts", "machine", "exitCode", "error"):
        if data.get(key) is not None:
            lines.append(f"{key}: {data[key]}")
    if data.get("waitingReason") and data.get("state") == "queued":
        lines.append(f"waiting: {data['waitingReason']}")
    if data.get("command"):
        lines.append(f"command: {command_text(data['command'])}")
    if data.get("system"):
        lines.append(f"system: {data['system']}")
    if data.get("requiredFeatures"):
        lines.append(f"features: {', '.join(data['requiredFeatures'])}")
    if data.get("after"):
        lines.append(f"after: {' '.join(data['after'])}")
    if data.get("waitingFor"):
        lines.append(f"waiting for: {' '.join(data['waitingFor'])}")
    for key, label in (("timeout", "timeout"), ("maxSilent", "max silent")):
        if data.get(key) is not None:
            lines.append(f"{label}: {data[key]:g}s")
    for key, label in (
        ("submittedAt", "submitted"),
        ("startedAt", "started"),
        ("finishedAt", "finished"),
    ):
        if data.get(key) is not None:
            lines.append(f"{label}: {when(data[key])}")
    if data.get("startedAt") is not None and data.get("finishedAt") is not None:
        lines.append(f"took: {data['finishedAt'] - data['startedAt']:.1f}s")
    timings = data.get("timings") or {}
    if timings:
        lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    for output_name, store_path in (data.get("storePaths") or {}).items():
        lines.append(f"store path: {store_path} ({output_name})")
    for output in data.get("outputs", []):
        lines.append(f"output: {output['path']} ({output['size']} bytes)")
    return lines


def builds_lines(builds: list[dict[str, Any]], now: float) -> list[str]:
    """``GET /builds``'s builds as a table: id, state (or how it ended), name, machine, age,
    command."""
    rows = [("ID", "STATE", "NAME", "MACHINE", "AGE", "COMMAND")]
    for b in builds:
        state = b["state"] if b["state"] in ("queued", "running") else b.get("status") or b["state"]
        rows.append(
            (
                b["id"],
                state,
                b.get("name") or "-",
                b.get("machine") or "-",
                age(now - b["submittedAt"]) if b.get("submittedAt") else "-",
                command_text(b.get("command") or [])[:80],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def progress_line(build: dict[str, Any], elapsed: float, label: str = "") -> str:
    """``[  12.3s] running (building) on b1 attempt 1``; with ``label`` (a graph build's
    name), ``[  12.3s] test: queued (waiting for ...)``.  A build that never ran says why:
    the reason it waits, or ``dependency-failed`` instead of ``failed attempt 0``."""
    name = f"{label}: " if label else ""
    where = f" on {build['machine']}" if build.get("machine") else ""
    phase = f" ({build['phase']})" if build.get("phase") else ""
    if build["state"] == "queued" and build.get("waitingReason"):
        why = f" ({build['waitingReason']})"
        return f"[{elapsed:6.1f}s] {name}queued{why} attempt {build['attempts']}"
    if build["state"] in FINISHED and not build["attempts"] and build.get("status"):
        return f"[{elapsed:6.1f}s] {name}{build['state']}: {build['status']}"
    return f"[{elapsed:6.1f}s] {name}{build['state']}{phase}{where} attempt {build['attempts']}"


def progress_key(build: dict[str, Any]) -> tuple[Any, ...]:
    """What a plain (not a terminal's) progress display shows a new line for when it changes."""
    return (
        build["state"],
        build.get("phase"),
        build.get("machine"),
        build["attempts"],
        build.get("waitingReason") if build["state"] == "queued" else None,
    )


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
