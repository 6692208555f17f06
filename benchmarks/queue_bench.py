"""The queue at 100,000 builds: enqueue time, runner memory, dispatch latency, restart time.

For each store (SQLite in the state dir; PostgreSQL in a throwaway cluster from
``tests/helpers/pg.py`` when PostgreSQL is installed, else one line saying it is skipped):

1. A real queue runner is started as a subprocess (``python -m hydra_trio queue-runner``, the
   default ``--log-level info``, its log written to a file), on free loopback ports.
2. **enqueue**: one ``POST /builds`` with a graph of ``--builds`` builds (default 100,000, the
   most one graph may hold): 90 % independent, 10 % in chains of 10.  Timed from sending the
   request to the ``201`` (the runner answers once the graph is committed to the database).
   Meanwhile an idle fake builder (of a system no build has) pings every 10 ms: the longest
   ping round trip is how long the runner's event loop was blocked by the submission, i.e.
   how long every builder's pings (and every HTTP request) went unanswered.
3. **RSS**: the runner's ``VmRSS`` (and peak ``VmHWM``) from ``/proc/<pid>/status``, before the
   submission, after it, and after the dispatch phase.
4. **dispatch**: ONE fake builder (in this process: the real protocol, ``FramedChannel`` +
   ``Connection(Role.BUILDER)``, one job slot) answers every ``Assign`` at once with a success
   ``Result`` (no outputs).  Dispatch latency = from the builder handing its ``Result`` to the
   socket to the next ``Assign`` arriving: the runner receiving and committing the result,
   waking the dispatcher, picking the next build among the ~100,000 queued, and sending it,
   plus one loopback round trip.  ``--dispatches`` of them (default 2,000) are measured after
   ``--warmup`` (default 50); p50 / p99 / max are reported.  Nothing is being built, so this
   is the runner's own cost, not process spawning.
5. **restart**: the runner is stopped (SIGINT) and started again on the same state: time until
   its HTTP API answers with the whole queue loaded, and its RSS then.

Goals: enqueue < 30 s, dispatch p99 < 20 ms with 100,000 queued, runner RSS < 400 MiB.

    .venv/bin/python benchmarks/queue_bench.py                       # both stores
    .venv/bin/python benchmarks/queue_bench.py --store sqlite --builds 10000 --dispatches 500
    .venv/bin/python benchmarks/queue_bench.py --profile /tmp/prof   # runner under cProfile

With ``--profile DIR`` the runner runs under ``cProfile`` (much slower: use it to see what
dominates, not for the figures); its profile is written to ``DIR/<store>.prof`` when it stops
and the top functions by cumulative and by own time are printed.

Only the processes this script starts are ever signalled, through their ``Popen`` handles;
every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import figures
import httpx
import trio
from figures import Figure, Goal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hydra_trio.net import FramedChannel  # noqa: E402
from hydra_trio.protocol.connection import Connection  # noqa: E402
from hydra_trio.protocol.messages import (  # noqa: E402
    PROTOCOL_VERSION,
    Assign,
    BuildStatus,
    Challenge,
    Hello,
    Pong,
    Result,
    Role,
    Welcome,
)
from hydra_trio.system import default_system  # noqa: E402

GOAL_ENQUEUE = 30.0
GOAL_P99_MS = 20.0
GOAL_RSS_MIB = 400.0
#: Seconds to wait for the runner's HTTP API after starting it (a restart loads the queue).
START_TIMEOUT = 300.0
#: Seconds the runner gets to exit after SIGINT before it is killed.
STOP_GRACE = 60.0
CHAIN = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def graph(count: int) -> dict[str, Any]:
    """``count`` builds: the first 90 % independent, the rest in chains of CHAIN."""
    chained = (count // 10) // CHAIN * CHAIN
    builds: list[dict[str, Any]] = [
        {"name": f"b{i}", "command": ["true", str(i)]} for i in range(count - chained)
    ]
    for i in range(chained):
        entry: dict[str, Any] = {"name": f"c{i}", "command": ["true", f"c{i}"]}
        if i % CHAIN:
            entry["after"] = [f"c{i - 1}"]
        builds.append(entry)
    return {"builds": builds}


class Runner:
    """One queue runner subprocess on the given state and ports."""

    def __init__(
        self, state: Path, db: str | None, log: Path, ports: tuple[int, int], profile: Path | None
    ) -> None:
        self.builder_port, self.http_port = ports
        self.url = f"http://127.0.0.1:{self.http_port}"
        command = [sys.executable]
        if profile is not None:
            command += ["-m", "cProfile", "-o", str(profile)]
        command += ["-m", "hydra_trio", "queue-runner", "--state-dir", str(state)]
        command += ["--listen", f"127.0.0.1:{self.builder_port}"]
        command += ["--http", f"127.0.0.1:{self.http_port}"]
        if db is not None:
            command += ["--db", db]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_TRIO_")}
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )
        self.log = log

    def wait_ready(self, client: httpx.Client) -> float:
        """Seconds until ``GET /status`` answers."""
        start = time.monotonic()
        while time.monotonic() - start < START_TIMEOUT:
            if self.process.poll() is not None:
                raise RuntimeError(f"the runner exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{self.url}/status", timeout=5).status_code == 200:
                    return time.monotonic() - start
            time.sleep(0.05)
        raise RuntimeError(f"the runner did not answer within {START_TIMEOUT:g} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@contextlib.contextmanager
def runner(
    state: Path,
    db: str | None,
    log: Path,
    client: httpx.Client,
    profile: Path | None,
    ports: tuple[int, int] | None = None,
) -> Iterator[tuple[Runner, float]]:
    """A started runner and how long it took to answer; stopped on leaving."""
    for _ in range(5):
        started = Runner(state, db, log, ports or (free_port(), free_port()), profile)
        try:
            ready = started.wait_ready(client)
        except RuntimeError:
            started.stop()
            if ports is None and "cannot listen" in log.read_text():
                continue  # a port picked as free was taken in between
            raise
        try:
            yield started, ready
        finally:
            started.stop()
        return
    raise RuntimeError("no free pair of ports in 5 attempts")


async def _connect(port: int, systems: tuple[str, ...], hostname: str) -> FramedChannel:
    """A builder connection past its handshake (TCP_NODELAY, as the real builder's is not:
    here every frame is latency)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(Role.BUILDER, now=trio.current_time(), peer_timeout=600, ping_interval=5)
    channel = FramedChannel(stream, conn)
    challenge = await channel.receive()  # the runner speaks first
    assert isinstance(challenge, Challenge), challenge
    await channel.send(
        Hello(
            protocol_version=PROTOCOL_VERSION,
            machine_id=str(uuid.uuid4()),
            hostname=hostname,
            systems=systems,
            max_jobs=1,
            ping_interval=5,
        )
    )
    welcome = await channel.receive()
    assert isinstance(welcome, Welcome), welcome
    return channel


async def enqueue_while_pinging(port: int, url: str, body: bytes) -> dict[str, Any]:
    """POST the graph (from a worker thread) while an idle builder (a system no build has)
    pings every 10 ms: the longest ping round trip is how long the runner's event loop stalled,
    i.e. how long every builder's pings went unanswered."""
    channel = await _connect(port, ("bench-idle-system",), "idle-pinger")
    rtts: list[float] = []
    out: dict[str, Any] = {}

    async def pinger() -> None:
        conn = channel.connection
        while True:
            sent = time.perf_counter()
            await channel.send(conn.make_ping(trio.current_time()))
            while not isinstance(await channel.receive(), Pong):
                pass
            rtts.append(time.perf_counter() - sent)
            await trio.sleep(0.01)

    def post() -> None:
        with httpx.Client() as client:
            start = time.perf_counter()
            response = client.post(
                f"{url}/builds",
                content=body,
                headers={"content-type": "application/json"},
                timeout=600,
            )
            out["enqueue_s"] = time.perf_counter() - start
        if response.status_code != 201:
            raise RuntimeError(f"POST /builds: {response.status_code} {response.text[:500]}")
        out["ids"] = len(response.json()["ids"])

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pinger)
            await trio.sleep(0.1)
            with trio.fail_after(900):
                await trio.to_thread.run_sync(post)
            await trio.sleep(0.1)  # the ping that was stalled comes back
            nursery.cancel_scope.cancel()
    finally:
        await channel.aclose()
    out["stall_max_s"] = max(rtts)
    out["stall_over_1s"] = sum(r for r in rtts if r > 1.0)
    return out


async def fake_builder(port: int, measured: int, warmup: int) -> dict[str, Any]:
    """Connect as a one-slot builder, answer each Assign with success at once; returns the
    latencies (seconds) from each Result sent to the next Assign received."""
    hello_at = time.perf_counter()
    channel = await _connect(port, (default_system(),), "fake-builder")
    conn = channel.connection
    latencies: list[float] = []
    first_assign = None
    sent_at = hello_at
    try:
        with trio.fail_after(600):
            while len(latencies) < warmup + measured:
                message = await channel.receive()
                if isinstance(message, Assign):
                    arrived = time.perf_counter()
                    if first_assign is None:
                        first_assign = arrived - hello_at
                    else:
                        latencies.append(arrived - sent_at)
                    result = Result(
                        build_id=message.build_id,
                        attempt=message.attempt,
                        status=BuildStatus.SUCCESS,
                        exit_code=0,
                    )
                    sent_at = time.perf_counter()
                    await channel.send(result)
                if conn.ping_due(trio.current_time()):
                    await channel.send(conn.make_ping(trio.current_time()))
    finally:
        await channel.aclose()
    kept = sorted(latencies[warmup:])
    return {
        "first_assign_s": first_assign,
        "n": len(kept),
        "p50_ms": 1000 * kept[len(kept) // 2],
        "p99_ms": 1000 * kept[min(len(kept) - 1, int(len(kept) * 0.99))],
        "max_ms": 1000 * kept[-1],
        "mean_ms": 1000 * statistics.fmean(kept),
        "rate_per_s": len(kept) / sum(kept),
    }


def bench_store(store: str, db: str | None, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    state = work / f"state-{store}"
    log = work / f"runner-{store}.log"
    profile = args.profile / f"{store}.prof" if args.profile else None
    body = json.dumps(graph(args.builds)).encode()
    out: dict[str, Any] = {"store": store, "builds": args.builds, "body_mib": len(body) / 2**20}
    with httpx.Client() as client:
        with runner(state, db, log, client, profile) as (proc, _):
            pid = proc.process.pid
            out["rss_idle_mib"] = rss_mib(pid)[0]
            enqueue = trio.run(enqueue_while_pinging, proc.builder_port, proc.url, body)
            assert enqueue.pop("ids") == args.builds
            out.update(enqueue)
            out["rss_after_enqueue_mib"], out["hwm_after_enqueue_mib"] = rss_mib(pid)
            start = time.perf_counter()
            status = client.get(f"{proc.url}/status", timeout=60).json()
            out["status_s"] = time.perf_counter() - start
            assert status["queue"]["queued"] == args.builds, status["queue"]
            out["dispatch"] = trio.run(
                fake_builder, proc.builder_port, args.dispatches, args.warmup
            )
            out["rss_after_dispatch_mib"], out["hwm_mib"] = rss_mib(pid)
            ports = (proc.builder_port, proc.http_port)
        if profile is not None:
            out["profile"] = str(profile)
            return out
        with runner(state, db, log, client, None, ports) as (proc, ready):
            out["restart_s"] = ready
            out["rss_after_restart_mib"], out["hwm_after_restart_mib"] = rss_mib(proc.process.pid)
            queue = client.get(f"{proc.url}/status", timeout=60).json()["queue"]
            done = args.warmup + args.dispatches + 1
            assert queue["succeeded"] == done and queue["queued"] == args.builds - done, queue
    return out


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"nproc {os.cpu_count()}, {model}, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def table(results: list[dict[str, Any]]) -> str:
    def ok(good: bool) -> str:
        return "yes" if good else "**no**"

    lines = [
        f"| store | enqueue {results[0]['builds']:,} (one POST) | longest ping RTT during it | "
        "RSS idle / after enqueue / peak | dispatch p50 / p99 / max | dispatches/s | "
        "restart (load queue) | goals met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d = r["dispatch"]
        peak = max(r["hwm_mib"], r.get("hwm_after_restart_mib", 0))
        goals = (
            ok(r["enqueue_s"] < GOAL_ENQUEUE)
            + " / "
            + ok(d["p99_ms"] < GOAL_P99_MS)
            + " / "
            + ok(peak < GOAL_RSS_MIB)
        )
        restart = (
            f"{r['restart_s']:.1f} s, {r['rss_after_restart_mib']:.0f} MiB"
            if "restart_s" in r
            else "-"
        )
        lines.append(
            f"| {r['store']} | {r['enqueue_s']:.1f} s | {r['stall_max_s']:.1f} s | "
            f"{r['rss_idle_mib']:.0f} / "
            f"{r['rss_after_enqueue_mib']:.0f} / {peak:.0f} MiB | {d['p50_ms']:.2f} / "
            f"{d['p99_ms']:.2f} / {d['max_ms']:.1f} ms | {d['rate_per_s']:.0f} | {restart} | "
            f"{goals} |"
        )
    return "\n".join(lines)


def figures_of(results: list[dict[str, Any]]) -> list[Figure]:
    out = []
    for r in results:
        n, store = f"{r['builds']:,}", r["store"]
        peak = max(r["hwm_mib"], r.get("hwm_after_restart_mib", 0))
        out += [
            Figure(
                f"{store}: enqueue {n} builds, one call",
                r["enqueue_s"],
                "s",
                goal=Goal("<", GOAL_ENQUEUE),
            ),
            Figure(
                f"{store}: dispatch p99 with {n} queued",
                r["dispatch"]["p99_ms"],
                "ms",
                goal=Goal("<", GOAL_P99_MS),
            ),
            Figure(
                f"{store}: runner peak RSS with {n} queued",
                peak,
                "MiB",
                goal=Goal("<", GOAL_RSS_MIB),
            ),
        ]
    return out


def print_profile(path: Path) -> None:
    stats = pstats.Stats(str(path))
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(25)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--builds", type=int, default=100_000)
    parser.add_argument("--dispatches", type=int, default=2_000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--profile", type=Path, default=None, help="run the runner in cProfile")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--figures", type=Path, help="write the summary figures here (run_all)")
    parser.add_argument("--keep", action="store_true", help="keep the state dirs and logs")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    print(machine(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="hydra-trio-queue-bench-"))
    results = []
    try:
        if args.store in ("sqlite", "both"):
            results.append(bench_store("sqlite", None, work, args))
            print(json.dumps(results[-1]), flush=True)
        if args.store in ("postgresql", "both"):
            from tests.helpers.pg import Cluster, find_bindir

            bindir = find_bindir()
            if bindir is None:
                print("PostgreSQL is not installed: skipped the PostgreSQL run")
            else:
                cluster = Cluster.start(bindir)
                try:
                    results.append(bench_store("postgresql", cluster.new_database(), work, args))
                    print(json.dumps(results[-1]), flush=True)
                finally:
                    cluster.stop()
    finally:
        if args.keep:
            print(f"state dirs and runner logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    if results:
        print(table(results))
        print()
        figures.print_table(figures_of(results))
        figures.write(args.figures, figures_of(results))
    if args.profile:
        for r in results:
            print(f"\n===== {r['store']}: {r['profile']} =====")
            print_profile(Path(r["profile"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
