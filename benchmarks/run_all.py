"""Run every benchmark in turn and print their tables (``make bench``).

    .venv/bin/python benchmarks/run_all.py            # full runs (a few minutes)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke test of every script

Each benchmark runs as its own process (so neither inherits the other's imports or heap); a
benchmark that fails or exceeds its time limit makes this script exit non-zero.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (script, time limit in seconds for a full run)
BENCHMARKS = (
    ("codec_bench.py", 900),
    ("pingpong_bench.py", 1800),
    ("builds_bench.py", 900),
    ("transfer_bench.py", 1800),
    ("scale_bench.py", 900),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    args = parser.parse_args()
    failed = []
    for script, limit in BENCHMARKS:
        command = [sys.executable, str(HERE / script)] + (["--quick"] if args.quick else [])
        print(f"\n=== {script} ===", flush=True)
        start = time.monotonic()
        proc = subprocess.Popen(command, cwd=HERE.parent)
        try:
            status = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.terminate()  # pingpong_bench stops its own server/client on SIGTERM
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            status = -1
            print(f"{script}: exceeded {limit} s, stopped", file=sys.stderr)
        print(f"({script}: {time.monotonic() - start:.0f} s, exit status {status})", flush=True)
        if status != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
