"""Build throughput and dispatch latency through a real farm, against bare ``trio.run_process``.

Setup (all loopback, every daemon its own process, fresh state): one queue runner (default
options: SQLite in the state dir, ``--log-level info`` written to a file) and ``--builders``
builders (default 4) with ``--max-jobs 2 --ping-interval 1``.

1. **throughput**: one graph of ``--count`` independent no-op builds (default 2,000, command
   ``["true", "<n>"]``) in one ``POST /builds {"builds": [...]}``; timed from sending the POST
   until ``GET /status`` (polled every 50 ms) counts all of them succeeded.  Baseline, in the
   same run and interleaved with it: this script running ``trio.run_process(["true"])`` the same
   number of times with ``builders x max-jobs`` (8) in flight; and a second baseline, the
   builder's unavoidable work done by a plain trio loop (a fresh directory per build, the child
   with its output on a pipe copied into a log file there, the directory removed).  Repeated
   ``--repeat`` times (bare, work, farm, bare, work, farm, ...); medians and the median of the
   per-repetition ratios.  Around each timed phase the CPU time of the runner and of the
   builders (utime + stime of the processes themselves, from ``/proc/<pid>/stat``; their
   children not included) and of the whole machine (``/proc/stat``) are read.
2. **latency**: ``--latency`` single builds (default 200, after 10 warm-up), one at a time so a
   builder is always free, each ``POST /builds {"command": ["date", "+%s.%N"]}``.  ``date``
   reads the clock as soon as it runs and prints it to its log; latency = that time minus the
   wall clock just before the POST was sent (same machine, same clock).  It includes the exec
   of ``date`` itself (dynamic loading before ``main``): that cost is measured on its own in the
   same run (this script ``trio.run_process``-ing the same ``date`` command) and reported as
   the floor.  Also reported: POST -> ``startedAt`` (the runner's wall clock when it assigned
   the build) and the POST round trip (until the ``201``).
3. **sparse latency**: ``--sparse`` more single builds (default 50), each POSTed ``--gap``
   seconds (default 0.05) after the last one ended, as builds come to a quiet farm; its floor
   is ``trio.run_process`` of ``date`` with the same gap.  A machine idle for a few ms is
   slower to wake (the floor rises), and a build's first move into its cgroup after a quiet
   spell waited for an RCU grace period (10-13 ms here, ``builder/standby.py``).

Goals: farm throughput >= 50 % of bare; POST -> child started p50 < 5 ms, p99 < 20 ms.

    .venv/bin/python benchmarks/builds_bench.py                    # 3 x 2,000 builds, 200 latencies
    .venv/bin/python benchmarks/builds_bench.py --quick            # 1 x 300, 50 latencies
    .venv/bin/python benchmarks/builds_bench.py --profile /tmp/bp  # runner and b1 in cProfile

With ``--profile DIR`` the runner and the first builder run under ``cProfile`` (slower: use it
to see what dominates, not for the figures); the profiles are written to ``DIR/*.prof`` when
they stop and their top functions printed.

Only the processes this script starts are ever signalled, through their ``Popen`` handles;
every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import figures
import trio
from daemons import Daemons, cpu_model, print_profiles, process_cpu
from figures import Figure, Goal

ROOT = Path(__file__).resolve().parent.parent
POLL = 0.02
#: GET /status polls while a throughput graph runs (each one costs the runner a scan of all
#: builds: kept sparse so the poll does not weigh on what it measures).
THROUGHPUT_POLL = 0.05
PING_INTERVAL = 1.0
GOAL_RATIO = 0.5
GOAL_P50 = 0.005
GOAL_P99 = 0.020
#: the longest any one timed phase may take before the script gives up.
PHASE_TIMEOUT = 600.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Farm(Daemons):
    """A runner and builders as subprocesses, and an HTTP client."""

    def __init__(self, workdir: Path, profile: Path | None) -> None:
        super().__init__(workdir, client_timeout=30.0, profile=profile, profiled=("runner", "b1"))

    def start_builders(self, count: int, max_jobs: int) -> None:
        for index in range(1, count + 1):
            name = f"b{index}"
            self.daemon(
                name,
                "builder",
                "--server",
                f"127.0.0.1:{self.port}",
                "--ping-interval",
                f"{PING_INTERVAL:g}",
                "--max-jobs",
                str(max_jobs),
                "--hostname",
                name,
                "--work-dir",
                str(self.workdir / name),
            )
        self.wait(
            f"{count} builders connected",
            lambda: sum(m["state"] == "connected" for m in self.status()["machines"]) == count,
        )

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.client.get(f"{self.url}/status").json()
        return result

    def build(self, build_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.client.get(f"{self.url}/builds/{build_id}").json()
        return result

    def wait(self, what: str, predicate: Any, timeout: float = 30.0, poll: float = POLL) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what} (logs in {self.workdir})")
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}); see {self.workdir}")
            time.sleep(poll)

    def cpu(self) -> dict[str, float]:
        return {name: process_cpu(p.pid) for name, p in self.processes.items()}


# ---------------------------------------------------------------------------------------------
# Baselines (in this process).


async def _bare_batch(count: int, parallel: int) -> None:
    limiter = trio.CapacityLimiter(parallel)

    async def one() -> None:
        async with limiter:
            await trio.run_process(["true"], stdin=subprocess.DEVNULL)

    with trio.fail_after(PHASE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)


def bare_throughput(count: int, parallel: int) -> float:
    start = time.monotonic()
    trio.run(_bare_batch, count, parallel)
    return time.monotonic() - start


async def _work_batch(count: int, parallel: int, root: Path) -> None:
    """What any builder must do per build besides the farm's own bookkeeping: a fresh directory,
    the child with its output on a pipe, the pipe copied into a log file there, the directory
    removed.  Written as plainly as a script would (one thread hop for the directory, one for
    its removal), no protocol, no database."""
    limiter = trio.CapacityLimiter(parallel)

    def prepare(path: str) -> int:
        os.mkdir(path)
        return os.open(os.path.join(path, "log"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def remove(path: str) -> None:
        os.unlink(os.path.join(path, "log"))
        os.rmdir(path)

    async def one(index: int) -> None:
        async with limiter:
            path = os.path.join(root, str(index))
            log = await trio.to_thread.run_sync(prepare, path)
            try:
                process = await trio.lowlevel.open_process(
                    ["true", str(index)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    cwd=path,
                )
                assert process.stdout is not None
                async with process.stdout:
                    while data := await process.stdout.receive_some(65536):
                        os.write(log, data)
                await process.wait()
            finally:
                os.close(log)
            await trio.to_thread.run_sync(remove, path)

    with trio.fail_after(PHASE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)


def work_throughput(count: int, parallel: int, root: Path) -> float:
    """Seconds for ``count`` builds of `_work_batch` (``root`` must exist and is left empty)."""
    start = time.monotonic()
    trio.run(_work_batch, count, parallel, root)
    return time.monotonic() - start


async def _exec_floor(count: int, gap: float = 0.0) -> list[float]:
    """Seconds from just before ``trio.run_process(["date", "+%s.%N"])`` to the time it prints,
    ``gap`` seconds after the last one ended."""
    samples = []
    for _ in range(count):
        await trio.sleep(gap)
        before = time.time()
        with trio.fail_after(10):
            done = await trio.run_process(["date", "+%s.%N"], capture_stdout=True)
        samples.append(float(done.stdout) - before)
    return samples


# ---------------------------------------------------------------------------------------------
# The measurements.


def farm_throughput(farm: Farm, count: int, tag: str) -> dict[str, float]:
    graph = {"builds": [{"name": f"{tag}-{i}", "command": ["true", str(i)]} for i in range(count)]}
    body = json.dumps(graph).encode()
    before = farm.status()["queue"]
    target = before["succeeded"] + count
    cpu0, busy0 = farm.cpu(), machine_busy()
    start = time.monotonic()
    response = farm.client.post(
        f"{farm.url}/builds", content=body, headers={"content-type": "application/json"}
    )
    posted = time.monotonic() - start
    assert response.status_code == 201, response.text
    last: dict[str, Any] = {}

    def done() -> bool:
        nonlocal last
        last = farm.status()["queue"]
        if last["failed"] != before["failed"]:
            raise RuntimeError(f"builds failed: {last} (logs in {farm.workdir})")
        return bool(last["succeeded"] >= target)

    farm.wait(f"{count} builds succeeded", done, timeout=PHASE_TIMEOUT, poll=THROUGHPUT_POLL)
    elapsed = time.monotonic() - start
    cpu1, busy1 = farm.cpu(), machine_busy()
    builders = sum(cpu1[n] - cpu0[n] for n in cpu1 if n != "runner")
    return {
        "seconds": elapsed,
        "post": posted,
        "runner_cpu": cpu1["runner"] - cpu0["runner"],
        "builders_cpu": builders,
        "machine_busy": (busy1[0] - busy0[0]) / max(1e-9, elapsed),
    }


def farm_latency(farm: Farm, count: int, warmup: int, gap: float = 0.0) -> dict[str, list[float]]:
    child: list[float] = []
    dispatched: list[float] = []
    roundtrip: list[float] = []
    for index in range(warmup + count):
        time.sleep(gap)
        sent = time.time()
        response = farm.client.post(f"{farm.url}/builds", json={"command": ["date", "+%s.%N"]})
        answered = time.time()
        assert response.status_code == 201, response.text
        build_id = response.json()["id"]
        build: dict[str, Any] = {}

        def finished(build_id: str = build_id) -> bool:
            nonlocal build
            build = farm.build(build_id)
            return build["state"] in ("succeeded", "failed", "cancelled")

        farm.wait(f"build {build_id}", finished, poll=0.005)
        assert build["state"] == "succeeded", build
        log = farm.client.get(f"{farm.url}/builds/{build_id}/log").text
        if index < warmup:
            continue
        child.append(float(log.strip()) - sent)
        dispatched.append(float(build["startedAt"]) - sent)
        roundtrip.append(answered - sent)
    return {"child": child, "dispatched": dispatched, "roundtrip": roundtrip}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="builds per throughput run")
    parser.add_argument("--repeat", type=int, default=3, help="throughput repetitions")
    parser.add_argument("--builders", type=int, default=4)
    parser.add_argument("--max-jobs", type=int, default=2)
    parser.add_argument("--latency", type=int, default=200, help="single builds timed")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--sparse", type=int, default=50, help="single builds timed a --gap after the last"
    )
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between sparse POSTs")
    parser.add_argument("--quick", action="store_true", help="1 x 300 builds, 50 latencies")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile runner and b1")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, state)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--figures", type=Path, help="write the summary figures here (run_all)")
    args = parser.parse_args()
    # run_all.py stops an overrunning benchmark with SIGTERM: exit through the `finally`
    # blocks, which stop the daemons this script started and remove its work dir.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.quick:
        args.count, args.repeat, args.latency, args.warmup, args.sparse = 300, 1, 50, 5, 20
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    parallel = args.builders * args.max_jobs

    tmp = Path(tempfile.mkdtemp(prefix="builds-bench-"))
    farm = Farm(tmp, args.profile)
    runs: list[dict[str, float]] = []
    try:
        farm.start_runner()
        farm.start_builders(args.builders, args.max_jobs)
        farm_throughput(farm, min(100, args.count), "warmup")
        bare_throughput(min(100, args.count), parallel)
        work_root = tmp / "work"
        work_root.mkdir()
        work_throughput(min(100, args.count), parallel, work_root)
        for index in range(args.repeat):
            busy0 = machine_busy()
            bare = bare_throughput(args.count, parallel)
            busy1 = machine_busy()
            work = work_throughput(args.count, parallel, work_root)
            result = farm_throughput(farm, args.count, f"r{index}")
            result["bare"] = bare
            result["work"] = work
            result["bare_busy"] = (busy1[0] - busy0[0]) / bare
            runs.append(result)
            print(
                f"run {index + 1}: bare {args.count / bare:,.0f} builds/s, builder's work "
                f"{args.count / work:,.0f} builds/s, farm "
                f"{args.count / result['seconds']:,.0f} builds/s "
                f"(ratio {bare / result['seconds']:.2f} of bare, "
                f"{work / result['seconds']:.2f} of the work); runner CPU "
                f"{result['runner_cpu']:.1f} s,"
                f" builders CPU {result['builders_cpu']:.1f} s, machine busy "
                f"{result['machine_busy']:.2f} CPUs",
                flush=True,
            )
        floor = trio.run(_exec_floor, args.latency)
        latency = farm_latency(farm, args.latency, args.warmup)
        sparse_floor = trio.run(_exec_floor, args.sparse, args.gap)
        sparse = farm_latency(farm, args.sparse, args.warmup, args.gap)
    finally:
        farm.close()
        if args.keep:
            print(f"work dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    farm_rates = [args.count / r["seconds"] for r in runs]
    bare_rates = [args.count / r["bare"] for r in runs]
    ratios = [r["bare"] / r["seconds"] for r in runs]
    work_rates = [args.count / r["work"] for r in runs]
    work_ratios = [r["work"] / r["seconds"] for r in runs]
    ms = 1000.0
    print()
    print(
        f"machine: nproc {os.cpu_count()} ({cpu_model()}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )
    print(
        f"farm: runner + {args.builders} builders x {args.max_jobs} slots, --ping-interval "
        f"{PING_INTERVAL:g}; {args.repeat} x {args.count} no-op builds in one graph"
    )
    print(
        f"throughput: farm {statistics.median(farm_rates):,.0f} builds/s "
        f"({' / '.join(f'{r:,.0f}' for r in farm_rates)}), bare trio.run_process x{parallel} "
        f"{statistics.median(bare_rates):,.0f} builds/s "
        f"({' / '.join(f'{r:,.0f}' for r in bare_rates)})"
    )
    ratio = statistics.median(ratios)
    work_ratio = statistics.median(work_ratios)
    print(
        f"builder's unavoidable work (dir, child, log pipe) x{parallel}: "
        f"{statistics.median(work_rates):,.0f} builds/s; farm/work {work_ratio:.2f} "
        f"({' / '.join(f'{r:.2f}' for r in work_ratios)})"
    )
    print(
        f"ratio farm/bare: {ratio:.2f} ({' / '.join(f'{r:.2f}' for r in ratios)}); goal >= "
        f"{GOAL_RATIO:.0%}: {'met' if ratio >= GOAL_RATIO else 'NOT met'}"
    )
    per_build = statistics.median([r["runner_cpu"] / args.count for r in runs]) * 1e6
    per_build_b = statistics.median([r["builders_cpu"] / args.count for r in runs]) * 1e6
    print(
        f"CPU per build: runner {per_build:,.0f} µs, builders {per_build_b:,.0f} µs (median); "
        f"machine busy during farm runs {statistics.median([r['machine_busy'] for r in runs]):.2f}"
        f" CPUs, during bare runs {statistics.median([r['bare_busy'] for r in runs]):.2f} CPUs"
    )
    for name, values in (
        ("POST -> child process running (date's clock)", latency["child"]),
        ("POST -> startedAt (runner assigned it)", latency["dispatched"]),
        ("POST -> 201 answer", latency["roundtrip"]),
        ("floor: run_process(date) -> date's clock", floor),
        (f"a POST every {args.gap * ms:g} ms: POST -> child process running", sparse["child"]),
        (f"a run_process(date) every {args.gap * ms:g} ms: floor", sparse_floor),
    ):
        print(
            f"{name}: p50 {pct(values, 0.5) * ms:.2f} ms, p99 {pct(values, 0.99) * ms:.2f} ms, "
            f"max {max(values) * ms:.2f} ms (n={len(values)})"
        )
    p50, p99 = pct(latency["child"], 0.5), pct(latency["child"], 0.99)
    print(
        f"goal p50 < {GOAL_P50 * ms:g} ms / p99 < {GOAL_P99 * ms:g} ms: "
        f"{'met' if p50 < GOAL_P50 and p99 < GOAL_P99 else 'NOT met'}"
    )
    summary = [
        Figure(
            f"no-op builds/s, {args.builders} builders x {args.max_jobs} slots",
            statistics.median(farm_rates),
            "builds/s",
            statistics.median(bare_rates),
            f"trio.run_process x{parallel}",
            Goal(">=", GOAL_RATIO, of_baseline=True),
            paired_ratio=ratio,
        ),
        Figure(
            f"no-op builds/s vs the builder's unavoidable work x{parallel}",
            statistics.median(farm_rates),
            "builds/s",
            statistics.median(work_rates),
            "dir + child + log pipe",
            paired_ratio=work_ratio,
        ),
        Figure(
            "POST /builds -> child running, p50",
            p50 * ms,
            "ms",
            pct(floor, 0.5) * ms,
            "run_process floor",
            Goal("<", GOAL_P50 * ms),
        ),
        Figure(
            "POST /builds -> child running, p99",
            p99 * ms,
            "ms",
            pct(floor, 0.99) * ms,
            "run_process floor",
            Goal("<", GOAL_P99 * ms),
        ),
        Figure(
            f"POST -> child running, p50, a POST every {args.gap * ms:g} ms",
            pct(sparse["child"], 0.5) * ms,
            "ms",
            pct(sparse_floor, 0.5) * ms,
            f"run_process floor, every {args.gap * ms:g} ms",
        ),
    ]
    print()
    figures.print_table(summary)
    figures.write(args.figures, summary)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "runs": runs,
                    "latency": latency,
                    "floor": floor,
                    "sparse": sparse,
                    "sparse_floor": sparse_floor,
                },
                indent=2,
            )
        )
    if args.profile is not None:
        print_profiles(args.profile, 25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
