"""Run every benchmark in turn, then print one table of all their figures (``make bench``).

    .venv/bin/python benchmarks/run_all.py            # full runs (about 25 minutes)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke test of every script
    .venv/bin/python benchmarks/run_all.py --only transfer_bench.py --only scale_bench.py

Each benchmark runs as its own process (so neither inherits the other's imports or heap) and
prints its own detailed output; with ``--figures FILE`` it also writes its summary figures
(`figures.Figure`: value, the baseline measured in the same run, goal), which this script
gathers into the final table: figure, hydra-trio's value, the baseline's, the ratio, the goal
and whether it is met.  ``--json FILE`` writes that table as JSON too.  A benchmark that fails
or exceeds its time limit makes this script exit non-zero (its row says so).
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import figures

HERE = Path(__file__).resolve().parent

#: (script, time limit in seconds for a full run, extra arguments, extra arguments with --quick)
BENCHMARKS: tuple[tuple[str, int, tuple[str, ...], tuple[str, ...]], ...] = (
    ("codec_bench.py", 900, (), ("--quick",)),
    ("pingpong_bench.py", 1800, (), ("--quick",)),
    ("builds_bench.py", 900, (), ("--quick",)),
    ("transfer_bench.py", 1800, (), ("--quick",)),
    ("scale_bench.py", 900, (), ("--quick",)),
    ("failover_bench.py", 600, (), ("--quick",)),
    ("runner_failover_bench.py", 900, (), ("--quick",)),
    ("dispatch_bench.py", 600, (), ("--quick",)),
    ("hydra_bench.py", 1500, (), ("--quick",)),
    # on a new file system where one can be made (root): see shapes_bench.fresh_fs
    ("shapes_bench.py", 2400, ("--fresh-fs", "16"), ("--quick",)),
    # SQLite only: the PostgreSQL figures need a throwaway cluster (run queue_bench.py alone)
    (
        "queue_bench.py",
        1800,
        ("--store", "sqlite"),
        ("--store", "sqlite", "--builds", "10000", "--dispatches", "300"),
    ),
)


def run_one(command: list[str], limit: int) -> int:
    proc = subprocess.Popen(command, cwd=HERE.parent)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        # SIGINT first: KeyboardInterrupt unwinds the script's `finally` blocks, which stop
        # the daemons it started and remove its work dir.
        for stop in (functools.partial(proc.send_signal, signal.SIGINT), proc.terminate):
            stop()
            try:
                proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            proc.kill()
            proc.wait()
        print(f"{command[1]}: exceeded {limit} s, stopped", file=sys.stderr)
        return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of every benchmark")
    parser.add_argument(
        "--only", action="append", metavar="SCRIPT", help="run only this script (repeatable)"
    )
    parser.add_argument("--json", type=Path, help="also write the final table here")
    args = parser.parse_args()
    known = [name for name, *_ in BENCHMARKS]
    for name in args.only or ():
        if name not in known:
            parser.error(f"unknown benchmark {name!r}; known: {', '.join(known)}")
    failed = []
    body: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory(prefix="run-all-") as tmp:
        for script, limit, extra, quick in BENCHMARKS:
            if args.only and script not in args.only:
                continue
            out = Path(tmp) / f"{script}.json"
            command = [sys.executable, str(HERE / script), "--figures", str(out)]
            command += list(quick if args.quick else extra)
            print(f"\n=== {script} ===", flush=True)
            start = time.monotonic()
            status = run_one(command, limit)
            print(f"({script}: {time.monotonic() - start:.0f} s, exit status {status})", flush=True)
            name = script.removesuffix("_bench.py")
            if status != 0 or not out.exists():
                failed.append(script)
                body.append((name, f"FAILED (exit status {status})", "", "", "", "", ""))
                continue
            body += figures.rows(figures.read(out), source=name)
    print(f"\n=== all figures{' (--quick: smoke sizes, not the goals)' if args.quick else ''} ===")
    print(figures.format_table(("bench", *figures.HEADER), body))
    missed = sum(1 for row in body if row[-1] == "MISSED")
    met = sum(1 for row in body if row[-1] == "met")
    failures = f"; failed: {', '.join(failed)}" if failed else ""
    print(f"goals: {met} met, {missed} missed{failures}")
    if args.json is not None:
        keys = ("bench", "figure", "value", "baseline", "ratio", "goal", "met")
        args.json.write_text(json.dumps([dict(zip(keys, row, strict=True)) for row in body]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
