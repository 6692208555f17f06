"""Failover time: from blackholing a builder's link to its build running on another builder.

Setup per repetition (fresh processes and state each time), all on loopback:

    builder A --TCP--> proxy --TCP--> queue runner <--TCP-- builder B
                       (this script, --proxy mode, its own process)

- queue runner: ``--builder-timeout 3``; builders: ``--ping-interval 1 --ping-timeout 3
  --max-jobs 1``; every daemon logs JSON lines (``--log-format json``) to a file.
- Only A is started first; a long build (``sleep 30``) is submitted and lands on A; then B is
  started and connects directly.  After a random pause in [0, 1) s (so the blackhole falls at a
  uniformly random point of A's 1 s ping cycle), the proxy is told (SIGUSR1) to blackhole: it
  keeps both sockets of every connection open and keeps reading them, but discards the bytes in
  both directions (no FIN, no RST, and the kernel still ACKs everything: TCP keepalive and
  ``TCP_USER_TIMEOUT`` see a healthy connection, only the application pings can tell).  New
  connections through the proxy are accepted and blackholed too.
- The script polls ``GET /builds/{id}`` every 20 ms until ``attempts == 2``, ``state ==
  running`` and ``machine == bB``: that moment minus the moment the blackhole was switched on
  is the failover time.  From the daemons' logs it also reads when the runner declared A silent
  and when A noticed (its ``no frame from the runner`` line).

Expected: the runner's watchdog fires ``builder-timeout`` after the last frame from A, so the
failover time is 3 s minus the time since A's last ping, i.e. in (2, 3] s plus dispatch and
polling; A notices ``ping-timeout`` after the last frame from the runner (its last pong).

    .venv/bin/python benchmarks/failover_bench.py               # 5 repetitions
    .venv/bin/python benchmarks/failover_bench.py --repeat 1    # smoke test

Only the processes this script starts are ever signalled, through their ``Popen`` handles.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import select
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import figures
from daemons import Daemons, cpu_model
from figures import Figure, Goal

PING_INTERVAL = 1.0
PING_TIMEOUT = 3.0
BUILDER_TIMEOUT = 3.0
GOAL = 4.0
POLL = 0.02
STOP_GRACE = 5.0
REFERENCES = [
    ("Hydra today", "never (the build stays assigned to the dead machine)"),
    ("proposed Hydra fix", "90 s"),
    ("Kubernetes (node-monitor-grace-period + eviction)", "50 s + 300 s"),
]


# ---------------------------------------------------------------------------------------------
# The proxy (``--proxy UPSTREAM_PORT``): forwards until SIGUSR1, then blackholes.


async def proxy_main(upstream_port: int) -> None:
    import trio

    blackholed = False
    #: every socket the proxy ever opened stays open (and referenced) until it exits.
    held: list[trio.SocketStream] = []

    async def pump(source: trio.SocketStream, sink: trio.SocketStream | None) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while data := await source.receive_some(65536):
                if not blackholed and sink is not None:
                    await sink.send_all(data)
        # EOF or error: propagate it only while forwarding (a blackhole sends no FIN)
        if not blackholed and sink is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await sink.send_eof()

    async def handle(client: trio.SocketStream) -> None:
        held.append(client)
        upstream: trio.SocketStream | None = None
        if not blackholed:
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", upstream_port)
            except OSError:
                await client.aclose()
                return
            held.append(upstream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream)
            if upstream is not None:
                nursery.start_soon(pump, upstream, client)
        # both directions ended; the sockets stay open in ``held``

    async def control(cancel_scope: trio.CancelScope) -> None:
        nonlocal blackholed
        with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if signum != signal.SIGUSR1:
                    cancel_scope.cancel()
                    return
                blackholed = True
                print(f"BLACKHOLED {time.time():.6f}", flush=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(control, nursery.cancel_scope)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(f"PORT {listeners[0].socket.getsockname()[1]}", flush=True)
        await trio.serve_listeners(handle, listeners)


# ---------------------------------------------------------------------------------------------
# The orchestrator.


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no line from pid {process.pid} within {timeout} s")
    return process.stdout.readline().strip()


def json_log(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "message" in record:
                records.append(record)
    return records


def first_time(path: Path, needle: str) -> float | None:
    for record in json_log(path):
        if needle in record["message"]:
            return float(record["time"])
    return None


class Run(Daemons):
    """One repetition's processes, state dir and HTTP client."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(
            workdir,
            client_timeout=5.0,
            stop_grace=STOP_GRACE,
            daemon_args=("--log-format", "json"),
        )

    def start_builder(self, hostname: str, server_port: int) -> subprocess.Popen[Any]:
        builder = self.daemon(
            hostname,
            "builder",
            "--server",
            f"127.0.0.1:{server_port}",
            "--ping-interval",
            f"{PING_INTERVAL:g}",
            "--ping-timeout",
            f"{PING_TIMEOUT:g}",
            "--max-jobs",
            "1",
            "--hostname",
            hostname,
            "--work-dir",
            str(self.workdir / hostname),
        )
        self.wait(f"{hostname} connected", lambda: self.machine_state(hostname) == "connected")
        return builder

    def machine_state(self, hostname: str) -> str | None:
        for machine in self.client.get(f"{self.url}/status").json()["machines"]:
            if machine["hostname"] == hostname:
                return str(machine["state"])
        return None

    def build(self, build_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.client.get(f"{self.url}/builds/{build_id}").json()
        return result

    def wait(self, what: str, predicate: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what} (logs in {self.workdir})")
            time.sleep(POLL)


def one_run(workdir: Path, rng: random.Random) -> dict[str, float]:
    run = Run(workdir)
    try:
        run.start_runner("--builder-timeout", f"{BUILDER_TIMEOUT:g}")
        proxy = run.spawn("proxy", __file__, "--proxy", str(run.port), pipe=True)
        line = read_line(proxy, 20)
        assert line.startswith("PORT "), line
        run.start_builder("bA", int(line.split()[1]))
        build_id = run.client.post(
            f"{run.url}/builds", json={"command": ["sh", "-c", "sleep 30"]}
        ).json()["id"]
        run.wait("the build running on bA", lambda: run.build(build_id)["machine"] == "bA")
        run.start_builder("bB", run.port)
        time.sleep(rng.random() * PING_INTERVAL)

        t0_wall, t0 = time.time(), time.monotonic()
        proxy.send_signal(signal.SIGUSR1)
        ack = read_line(proxy, 5)
        assert ack.startswith("BLACKHOLED"), ack

        def moved() -> bool:
            build = run.build(build_id)
            return (build["attempts"], build["state"], build["machine"]) == (2, "running", "bB")

        run.wait("the build running on bB", moved, timeout=30)
        failover = time.monotonic() - t0
        run.wait(
            "bA noticing",
            lambda: first_time(workdir / "bA.log", "no frame from the runner") is not None,
            timeout=10,
        )
        noticed = first_time(workdir / "bA.log", "no frame from the runner")
        declared = next(
            (
                float(r["time"])
                for r in json_log(workdir / "runner.log")
                if "disconnected: silent" in r["message"]
            ),
            None,
        )
        assert noticed is not None and declared is not None
        return {
            "failover": failover,
            "runner_declared": declared - t0_wall,
            "builder_noticed": noticed - t0_wall,
        }
    finally:
        run.close()


def summary(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):.2f} s, "
        f"min {min(values):.2f} s, max {max(values):.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (fresh processes)")
    parser.add_argument("--seed", type=int, default=1, help="seeds the blackhole's ping phase")
    parser.add_argument("--keep", action="store_true", help="keep the work dirs (logs)")
    parser.add_argument("--proxy", type=int, metavar="UPSTREAM_PORT", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="2 runs")
    parser.add_argument("--figures", type=Path, help="write the summary figures here (run_all)")
    args = parser.parse_args()
    if args.quick:
        args.repeat = 2
    if args.proxy is not None:
        import trio

        trio.run(proxy_main, args.proxy)
        return

    rng = random.Random(args.seed)
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="failover-bench-"))
    try:
        for index in range(args.repeat):
            workdir = tmp / f"run{index + 1}"
            workdir.mkdir()
            result = one_run(workdir, rng)
            results.append(result)
            print(
                f"run {index + 1}: build running on bB after {result['failover']:.3f} s; "
                f"runner declared bA silent at {result['runner_declared']:.3f} s, "
                f"bA noticed at {result['builder_noticed']:.3f} s",
                flush=True,
            )
    finally:
        if args.keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    failovers = [r["failover"] for r in results]
    print()
    print(
        f"machine: {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )
    print(
        f"settings: --ping-interval {PING_INTERVAL:g} --ping-timeout {PING_TIMEOUT:g} "
        f"--builder-timeout {BUILDER_TIMEOUT:g}; {len(results)} runs"
    )
    print(f"blackhole -> build running on another builder: {summary(failovers)}")
    declared = summary([r["runner_declared"] for r in results])
    noticed = summary([r["builder_noticed"] for r in results])
    print(f"blackhole -> runner declares A silent:          {declared}")
    print(f"blackhole -> A notices (no frame from runner):  {noticed}")
    verdict = "met" if max(failovers) < GOAL else "NOT met"
    print(f"goal < {GOAL:g} s: {verdict} (worst run {max(failovers):.2f} s)")
    for name, figure in REFERENCES:
        print(f"reference, {name}: {figure}")
    summary_figures = [
        Figure(
            "blackholed builder -> its build running elsewhere, worst run",
            max(failovers),
            "s",
            goal=Goal("<", GOAL),
        ),
        Figure(
            "blackholed builder -> its build running elsewhere, median",
            statistics.median(failovers),
            "s",
        ),
    ]
    print()
    figures.print_table(summary_figures)
    figures.write(args.figures, summary_figures)


if __name__ == "__main__":
    main()
