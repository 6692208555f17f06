"""A runner holding thousands of builders: steady pinging, then a reconnect storm.

Setup (all loopback, fresh processes): the real queue runner (default options: SQLite with its
safety settings, ``--builder-timeout 30``) and ``--clients`` client processes (default 4) that
simulate ``--builders`` builders between them (default 2,000).  A simulated builder speaks the
real protocol with the project's own protocol code (``Connection`` + ``FramedChannel``):
challenge, ``Hello`` (its own machine id, ``ping_interval`` 1 s), then a ``Ping`` every second
with the fields a real builder fills in; it reconnects after a lost connection with the real
builder's ``Backoff`` (base 1 s, cap 60 s, full jitter).  It runs no builds: this measures the
cost of holding and watching connections.

Phases:

1. **connect**: every simulated builder dials; the phase ends when ``GET /status`` lists them
   all connected (its duration is reported).
2. **steady** (``--steady`` seconds, default 30): the runner's CPU (``utime + stime`` from
   ``/proc/<pid>/stat`` over the phase, as % of one core), its RSS (``VmRSS``) minus its RSS
   before any builder connected, divided by the builders; ``GET /status`` once a second: the
   largest ``sinceLastPing`` of any machine, and the call's latency.
3. **storm**: the runner is killed (``SIGKILL``) and started again at once on the same state
   dir and ports.  Every builder sees its connection end and reconnects by its backoff.
   Measured: the time from the new runner answering ``/status`` until every builder is
   connected again (goal since issue 22: within 30 s); connections the new runner closed
   before their handshake completed (refused for overload by its ``--max-unauthenticated``
   gate; goal: none); ``GET /status`` latency every 100 ms during the storm (goal since
   issue 22: p99 < 100 ms).

**Baseline**, in the same run before the runner phases: a bare trio server (4-byte length
prefix + msgpack map per frame, answering each ping map with a pong map, no validation, no
state) with the same number of connections from the same client processes pinging once a
second; its CPU % and RSS per connection over the same ``--steady`` window.

Goals (issue 9): runner < 50 % of one core and < 100 KiB RSS per builder with 2,000 builders
pinging every second, every ``sinceLastPing`` < 2 s throughout; the storm as above.

    .venv/bin/python benchmarks/scale_bench.py                 # 2,000 builders, 30 s steady
    .venv/bin/python benchmarks/scale_bench.py --quick         # 200 builders, 10 s steady
    .venv/bin/python benchmarks/scale_bench.py --json /tmp/scale.json

Only processes started here are signalled, through their ``Popen`` handles; every wait is
bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import daemons
import figures
import httpx
import msgpack
import trio
from figures import Figure, Goal

from hydra_trio import net
from hydra_trio.builder.backoff import Backoff
from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.messages import (
    PROTOCOL_VERSION,
    Challenge,
    Hello,
    Role,
    Welcome,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
HEADER = struct.Struct(">I")
#: every builder connected again within 30 s after a runner restart (issue 22)
STORM_GOAL_SECONDS = 30
#: GET /status p99 during that storm (issue 22)
STORM_STATUS_GOAL_MS = 100


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------------------------------------
# Client processes: simulated builders (or bare pingers for the baseline).


class Tally:
    def __init__(self) -> None:
        self.sessions = 0  # handshakes completed
        self.refused = 0  # connect() refused: nobody listening (the runner is down)
        self.dropped = 0  # closed before the Welcome: refused for overload
        self.lost = 0  # established sessions that ended


async def ping_forever(conn: Connection, channel: net.FramedChannel) -> None:
    """A real builder's pings: on the connection's schedule, with its fields filled in."""
    while True:
        await trio.sleep_until(conn.next_ping_at)
        await channel.send(conn.make_ping(trio.current_time(), load=0.5, disk_free=10**11))


async def simulated_builder(
    index: int, host: str, port: int, interval: float, tally: Tally, prefix: str
) -> None:
    backoff = Backoff(rng=random.Random(index))
    machine_id = f"{prefix}-{index}"
    while True:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            tally.refused += 1
        else:
            welcomed = False
            try:
                net.configure_keepalive(stream, 3 * interval)
                conn = Connection(
                    Role.BUILDER, now=trio.current_time(), peer_timeout=30.0, ping_interval=interval
                )
                channel = net.FramedChannel(stream, conn)
                with trio.fail_after(30):
                    challenge = await channel.receive()
                    assert isinstance(challenge, Challenge)
                    await channel.send(
                        Hello(
                            protocol_version=PROTOCOL_VERSION,
                            machine_id=machine_id,
                            hostname=machine_id,
                            systems=("x86_64-linux",),
                            ping_interval=interval,
                        )
                    )
                    welcome = await channel.receive()
                assert isinstance(welcome, Welcome)
                welcomed = True
                tally.sessions += 1
                backoff.reset()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ping_forever, conn, channel)
                    while True:
                        await channel.receive()
            except* (net.ConnectionLost, OSError, trio.TooSlowError, AssertionError):
                if welcomed:
                    tally.lost += 1
                else:
                    tally.dropped += 1
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()
        await trio.sleep(backoff.next_delay())


async def read_frame(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    """The next length-prefixed frame's body from ``stream`` (``buffer`` keeps the rest)."""
    while True:
        if len(buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer)
            if len(buffer) >= HEADER.size + length:
                body = bytes(buffer[HEADER.size : HEADER.size + length])
                del buffer[: HEADER.size + length]
                return body
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data


async def bare_pinger(host: str, port: int, interval: float, tally: Tally) -> None:
    """The baseline's client: a ping map, wait for the pong map, sleep, again."""
    stream = await trio.open_tcp_stream(host, port)
    tally.sessions += 1
    buffer = bytearray()
    seq = 0
    while True:
        body = msgpack.packb({"t": "ping", "seq": seq})
        await stream.send_all(HEADER.pack(len(body)) + body)
        if await read_frame(stream, buffer) is None:
            return
        seq += 1
        await trio.sleep(interval)


async def run_clients(args: argparse.Namespace) -> None:
    raise_fd_limit()
    tally = Tally()
    host, port = args.server.rsplit(":", 1)
    with trio.CancelScope() as scope:

        def stop(*_: Any) -> None:
            scope.cancel()

        signal.signal(signal.SIGTERM, stop)
        async with trio.open_nursery() as nursery:
            for offset in range(args.count):
                index = args.first + offset
                if args.bare:
                    nursery.start_soon(bare_pinger, host, int(port), 1.0, tally)
                else:
                    nursery.start_soon(
                        simulated_builder, index, host, int(port), 1.0, tally, args.prefix
                    )
                if offset % 50 == 49:
                    await trio.sleep(0.01)  # dial in bursts of 50: no SYN flood on ourselves
    print(json.dumps(vars(tally)), flush=True)


# ---------------------------------------------------------------------------------------------
# The bare baseline server.


async def bare_server(port: int) -> None:
    raise_fd_limit()

    async def handle(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        with contextlib.suppress(trio.BrokenResourceError):
            while (body := await read_frame(stream, buffer)) is not None:
                ping = msgpack.unpackb(body)
                pong = msgpack.packb({"t": "pong", "seq": ping["seq"]})
                await stream.send_all(HEADER.pack(len(pong)) + pong)

    await trio.serve_tcp(handle, port, host="127.0.0.1")


# ---------------------------------------------------------------------------------------------
# The orchestrator.


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def spawn_clients(
    run: daemons.Daemons, args: argparse.Namespace, port: int, *, bare: bool, tag: str
) -> list[subprocess.Popen[Any]]:
    per = args.builders // args.clients
    clients = []
    for n in range(args.clients):
        count = per if n < args.clients - 1 else args.builders - per * (args.clients - 1)
        extra = ["--bare"] if bare else []
        clients.append(
            run.spawn(
                f"{tag}-client{n}",
                str(Path(__file__).resolve()),
                "--client",
                "--server",
                f"127.0.0.1:{port}",
                "--count",
                str(count),
                "--first",
                str(n * per),
                "--prefix",
                f"sim{n}",
                *extra,
                pipe=True,
            )
        )
    return clients


def stop_clients(clients: list[subprocess.Popen[Any]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for client in clients:
        if client.poll() is None:
            client.send_signal(signal.SIGTERM)
    for client in clients:
        try:
            out, _ = client.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            client.kill()
            out, _ = client.communicate(timeout=10)
        for line in (out or "").splitlines():
            with contextlib.suppress(ValueError):
                for key, value in json.loads(line).items():
                    totals[key] = totals.get(key, 0) + value
    return totals


def connected(client: httpx.Client, url: str) -> tuple[int, float, float]:
    """(machines connected, largest sinceLastPing among them, the call's latency in s)."""
    start = time.perf_counter()
    status = client.get(f"{url}/status").json()
    latency = time.perf_counter() - start
    live = [m for m in status["machines"] if m["connected"]]
    return len(live), max((m["sinceLastPing"] for m in live), default=0.0), latency


def wait_connected(
    client: httpx.Client, url: str, want: int, limit: float, samples: list[float] | None = None
) -> float:
    """Seconds until ``want`` machines are connected; polls every 100 ms."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            count, _, latency = connected(client, url)
        except httpx.TransportError:
            count, latency = 0, None
        if samples is not None and latency is not None:
            samples.append(latency)
        if count >= want:
            return time.monotonic() - start
        time.sleep(0.1)
    raise RuntimeError(f"only {count} of {want} builders connected after {limit:.0f} s")


def steady(pid: int, rss_before: int, builders: int, seconds: float, poll: Any) -> dict[str, float]:
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    worst_since, latencies = 0.0, []
    while time.monotonic() - t0 < seconds:
        since, latency = poll()
        worst_since = max(worst_since, since)
        latencies.append(latency)
        time.sleep(1.0)
    cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    rss = rss_kib(pid)
    return {
        "cpu_percent": 100 * cpu,
        "rss_kib": rss,
        "rss_kib_per_builder": (rss - rss_before) / builders,
        "worst_since_last_ping": worst_since,
        "status_p50_ms": 1000 * statistics.median(latencies) if latencies else 0.0,
    }


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"builders": args.builders, "clients": args.clients}
    run = daemons.Daemons(
        workdir, client_timeout=30, profile=args.profile, profiled={"runner-restarted"}
    )
    try:
        # Baseline: the bare server.
        port = daemons.free_port()
        server = run.spawn("bare-server", str(Path(__file__).resolve()), "--bare-server", str(port))
        time.sleep(1.0)
        rss_before = rss_kib(server.pid)
        clients = spawn_clients(run, args, port, bare=True, tag="bare")
        time.sleep(max(5.0, args.builders / 200))  # all dialled and pinging
        results["bare"] = steady(
            server.pid, rss_before, args.builders, args.steady, lambda: (0.0, 0.0)
        )
        results["bare"]["clients"] = stop_clients(clients)
        run.stop(server)

        # The runner: connect, steady.
        run.start_runner()
        runner = run.processes["runner"]
        rss_before = rss_kib(runner.pid)
        clients = spawn_clients(run, args, run.port, bare=False, tag="sim")
        results["connect_seconds"] = wait_connected(run.client, run.url, args.builders, 300)

        def poll() -> tuple[float, float]:
            _, since, latency = connected(run.client, run.url)
            return since, latency

        results["runner"] = steady(runner.pid, rss_before, args.builders, args.steady, poll)

        # The storm: kill -9, restart on the same ports and state dir.
        runner.kill()
        runner.wait(10)
        http_port = int(run.url.rsplit(":", 1)[1])
        run.daemon(
            "runner-restarted",
            "queue-runner",
            "--listen",
            f"127.0.0.1:{run.port}",
            "--http",
            f"127.0.0.1:{http_port}",
            "--state-dir",
            str(workdir / "state"),
        )
        latencies: list[float] = []
        start = time.monotonic()
        while True:  # until the new runner answers
            with contextlib.suppress(httpx.TransportError):
                run.client.get(f"{run.url}/status")
                break
            if time.monotonic() - start > 60:
                raise RuntimeError("the restarted runner did not answer within 60 s")
            time.sleep(0.05)
        results["restart_seconds"] = time.monotonic() - start
        results["storm_seconds"] = wait_connected(
            run.client, run.url, args.builders, 2 * 60 + 30, latencies
        )
        restarted = run.processes["runner-restarted"]
        status = run.client.get(f"{run.url}/status").json()
        results["storm_counters"] = status.get("counters", {})
        results["storm_status_p99_ms"] = 1000 * quantile(latencies, 0.99)
        results["storm_status_p50_ms"] = 1000 * statistics.median(latencies)
        results["storm_status_samples"] = len(latencies)
        results["storm_runner_rss_kib"] = rss_kib(restarted.pid)
        results["sim"] = stop_clients(clients)
    finally:
        run.close()
    return results


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def figures_of(results: dict[str, Any]) -> list[Figure]:
    bare, runner, sim = results["bare"], results["runner"], results["sim"]
    n = results["builders"]
    return [
        Figure(
            f"runner CPU, {n} builders pinging 1/s",
            runner["cpu_percent"],
            "% of a core",
            bare["cpu_percent"],
            "bare trio server",
            Goal("<", 50),
        ),
        Figure(
            f"runner RSS per builder, {n} builders",
            runner["rss_kib_per_builder"],
            "KiB",
            bare["rss_kib_per_builder"],
            "bare trio server",
            Goal("<", 100),
        ),
        Figure(
            "largest sinceLastPing in steady state",
            runner["worst_since_last_ping"],
            "s",
            goal=Goal("<", 2),
        ),
        Figure("initial connect of all builders", results["connect_seconds"], "s"),
        Figure("runner restart until /status answers", results["restart_seconds"], "s"),
        Figure(
            "storm: all reconnected after the restart",
            results["storm_seconds"],
            "s",
            goal=Goal("<", STORM_GOAL_SECONDS),
        ),
        Figure(
            "storm: closed before the handshake (overload)",
            sim.get("dropped", 0),
            goal=Goal("==", 0),
        ),
        Figure(
            "storm: /status p99 latency",
            results["storm_status_p99_ms"],
            "ms",
            goal=Goal("<", STORM_STATUS_GOAL_MS),
        ),
    ]


def report(results: dict[str, Any]) -> None:
    sim = results["sim"]
    figures.print_table(figures_of(results))
    print(
        f"\nsimulated builders: {sim.get('sessions', 0)} sessions, {sim.get('refused', 0)} "
        f"connects refused (runner down), {sim.get('dropped', 0)} closed before the welcome, "
        f"{sim.get('lost', 0)} sessions lost; runner counters after the storm: "
        f"{results['storm_counters']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builders", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--steady", type=float, default=30.0, help="seconds of steady state")
    parser.add_argument("--quick", action="store_true", help="200 builders, 10 s steady")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--figures", type=Path, help="write the summary figures here (run_all)")
    parser.add_argument(
        "--profile", type=Path, help="cProfile the restarted runner (the storm) into this dir"
    )
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="sim", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        trio.run(run_clients, args)
        return 0
    if args.bare_server is not None:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(bare_server, args.bare_server)
        return 0
    if args.quick:
        args.builders, args.steady = 200, 10.0
    raise_fd_limit()
    print(
        f"machine: {os.cpu_count()} CPUs ({daemons.cpu_model()}), Python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        results = measure(args, Path(tmp))
    report(results)
    if args.profile is not None:
        daemons.print_profiles(args.profile, 30)
    figures.write(args.figures, figures_of(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
