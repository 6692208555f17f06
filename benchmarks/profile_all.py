"""Flame graphs of the benchmarks' processes (``make profile``; not part of ``make test``).

    .venv/bin/python benchmarks/profile_all.py                      # every benchmark below
    .venv/bin/python benchmarks/profile_all.py --only builds_bench.py
    .venv/bin/python benchmarks/profile_all.py --full --only transfer_bench.py  # full size

Each benchmark runs at its smoke size (``--quick``) under ``py-spy record --subprocesses``,
which samples the script and every process it starts (the runner, the builders, the
baselines' processes) 200 times a second while they are on a CPU, and writes one SVG per
benchmark to ``docs/profiles/<name>.svg``: each process is a root of its own, named by its
command line, so the hot one is the widest.  Only the event-loop threads and worker threads
of Python processes show; a child like ``true`` or ``sha256sum`` does not.  A benchmark that
fails or runs past its time limit is reported and the others still run.

py-spy is in the ``bench`` extra (``pip install -e '.[bench]'``); it attaches with
``ptrace``, which needs root or ``kernel.yama.ptrace_scope`` = 0 for the processes it starts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "docs" / "profiles"

#: (script, extra arguments, time limit in seconds)
PROFILED: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("pingpong_bench.py", ("--quick",), 300),
    ("builds_bench.py", ("--quick",), 300),
    ("transfer_bench.py", ("--quick",), 300),
    ("scale_bench.py", ("--quick",), 300),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="SCRIPT", help="repeatable")
    parser.add_argument("--out", type=Path, default=OUT, help="where the SVGs go")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument(
        "--full", action="store_true", help="the scripts' full sizes (each up to 30 min)"
    )
    args = parser.parse_args()
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        parser.error("py-spy is not installed: pip install -e '.[bench]'")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for script, extra, limit in PROFILED:
        if args.only and script not in args.only:
            continue
        svg = args.out / f"{script.removesuffix('.py')}.svg"
        if args.full:
            extra, limit = (), 1800
        command = [
            spy,
            "record",
            "--subprocesses",
            "--rate",
            str(args.rate),
            "--format",
            "flamegraph",
            "--output",
            str(svg),
            "--",
            sys.executable,
            str(HERE / script),
            *extra,
        ]
        print(f"=== {script} -> {svg}", flush=True)
        # its own process group, holding only py-spy and the benchmark it starts
        spying = subprocess.Popen(command, cwd=HERE.parent, start_new_session=True)
        try:
            status = spying.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            # SIGINT to that group: py-spy writes what it has, and the benchmark unwinds its
            # `finally` blocks, which stop the daemons it started.
            os.killpg(spying.pid, signal.SIGINT)
            try:
                spying.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spying.kill()
                spying.wait()
            status = -1
        if status != 0:
            failed.append(script)
            print(f"{script}: exit status {status}", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
