"""Ping round trips over loopback TCP between two processes: hydra-trio vs bare trio vs grpc.aio.

Contestants (each sends one ping, waits for its pong, then sends the next):

- ``hydra``: the real protocol layer.  Builder side: ``FramedChannel`` +
  ``Connection(Role.BUILDER)`` receives the runner's ``Challenge``, sends ``Hello`` (no token,
  so empty credentials), waits for ``Welcome``, then
  ``Connection.make_ping`` -> ``Ping(seq)``; runner side: the queue runner's own per-builder
  handler, ``runner.session.serve_builder``, over a real farm.
  Every frame is validated and passes the state machine on both sides.
- ``bare``: trio streams + ``msgpack`` + a 4-byte length prefix carrying the same maps, no
  validation, no message objects: the upper bound for this transport.
- ``grpc``: ``grpc.aio`` bidirectional stream (generic handlers, no codegen) carrying the same
  maps, msgpack-serialized: the client ``write``s a ping and ``read``s the pong; the server is an
  async-generator handler yielding one pong per ping.

Process layout: this script is the orchestrator.  For each repetition it starts, per contestant,
a server (``--serve NAME``: binds 127.0.0.1 port 0, prints ``PORT <n>``, serves one connection,
exits) and a client (``--client NAME``) as subprocesses, so every contestant gets fresh
interpreters.  Each client warms up, then the contestants take turns doing blocks of ``--block``
round trips until each has done ``--count``: on this noisy 2-core VM a slow phase then hits all
contestants alike instead of whichever ran at the time.  Around each block the client reads the
server's CPU time (utime+stime of all its threads, ``/proc/<pid>/stat``), its own, and the
whole machine's (``/proc/stat``: CPU used by other processes is reported as ``bg load``).
Every loop is bounded by a count and by time; the orchestrator only ever signals the processes
it started.

The whole comparison is repeated ``--repeat`` times; the table shows medians, and ratios vs
grpc are medians of per-repetition ratios (same-run pairs).

    .venv/bin/python benchmarks/pingpong_bench.py              # 3 x 20,000 round trips each
    .venv/bin/python benchmarks/pingpong_bench.py --quick      # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import figures
from figures import Figure, Goal

CONTESTANTS = ("hydra", "bare", "grpc")
HEADER = struct.Struct(">I")
RECEIVE_SIZE = 256 * 1024
GRPC_METHOD = "/hydra.bench.PingPong/Stream"
TARGET_RATIO = 1.8
TARGET_CPU_RATIO = 0.6

REPO = Path(__file__).resolve().parent.parent
#: import ``hydra_trio`` from here; a variant contestant (``--variant DIR``) points it at a
#: modified copy of the package, so a proposed change is measured in the same run as the original.
HYDRA_PATH = os.environ.get("HYDRA_BENCH_PATH", str(REPO))
sys.path.insert(0, HYDRA_PATH)


def ping_map(seq: int) -> dict[str, Any]:
    """The wire map of ``Ping(seq=seq)``: what hydra sends, and what bare/grpc carry."""
    return {"type": "ping", "seq": seq, "load": 0.0, "disk_free": 0, "running": []}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, summed over CPUs (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def announce_port(port: int) -> None:
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# Servers (one connection each, then exit).


async def trio_serve_one(handler: Callable[[Any], Awaitable[None]], lifetime: float) -> None:
    import trio

    with trio.move_on_after(lifetime):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        listener = listeners[0]
        announce_port(listener.socket.getsockname()[1])
        stream = await listener.accept()
        await listener.aclose()
        async with stream:
            await handler(stream)


async def hydra_server(stream: Any) -> None:
    """The queue runner's real per-builder handler (``serve_builder``) over a real farm:
    handshake, watchdog, liveness bookkeeping and the Pong, exactly as the daemon runs them."""
    import tempfile
    from pathlib import Path

    from hydra_trio.runner.blobs import Storage
    from hydra_trio.runner.daemon import RunnerConfig, make_farm
    from hydra_trio.runner.session import SessionConfig, serve_builder

    farm, _ = make_farm(RunnerConfig(), persisted=False)
    with tempfile.TemporaryDirectory(prefix="hydra-trio-bench-") as state:
        storage = Storage.in_dir(Path(state))
        await serve_builder(farm, SessionConfig(builder_timeout=3600.0), storage, stream)


async def bare_server(stream: Any) -> None:
    import msgpack

    pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
    unpackb = msgpack.unpackb
    unpack_header = HEADER.unpack_from
    pack_header = HEADER.pack
    buffer = bytearray()
    while True:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            return
        buffer += data
        out = []
        while len(buffer) >= 4:
            (length,) = unpack_header(buffer, 0)
            if len(buffer) - 4 < length:
                break
            message = unpackb(buffer[4 : 4 + length])
            del buffer[: 4 + length]
            if message["type"] == "ping":
                body = pack({"type": "pong", "seq": message["seq"]})
                out.append(pack_header(len(body)) + body)
        if out:
            await stream.send_all(b"".join(out))


async def grpc_serve_one(lifetime: float) -> None:
    import asyncio

    import grpc
    import msgpack

    finished = asyncio.Event()

    async def stream_handler(requests: Any, context: Any) -> Any:
        try:
            async for message in requests:
                if message["type"] == "ping":
                    yield {"type": "pong", "seq": message["seq"]}
        finally:
            finished.set()

    handler = grpc.method_handlers_generic_handler(
        GRPC_METHOD.split("/")[1],
        {
            GRPC_METHOD.split("/")[2]: grpc.stream_stream_rpc_method_handler(
                stream_handler,
                request_deserializer=msgpack.unpackb,
                response_serializer=msgpack.Packer(use_bin_type=True, autoreset=True).pack,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    announce_port(port)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(finished.wait(), lifetime)
    await server.stop(grace=1.0)


def serve(name: str, lifetime: float) -> None:
    # Every server gets the collector settings the hydra-trio daemons run with (their command
    # line calls tune_gc), so that no contestant is measured with a different collector.  A
    # --variant older than tune_gc runs with Python's defaults, as its daemons did.
    try:
        from hydra_trio.system import tune_gc
    except ImportError:
        pass
    else:
        tune_gc()
    if name == "grpc":
        import asyncio

        asyncio.run(grpc_serve_one(lifetime))
    else:
        import trio

        trio.run(trio_serve_one, {"hydra": hydra_server, "bare": bare_server}[name], lifetime)


# ---------------------------------------------------------------------------------------------
# Clients: connect, warm up, print READY; then run blocks of round trips on command.
#
# Client protocol on stdin/stdout (one line each): the orchestrator writes ``RUN <n>``, the
# client does up to n round trips (bounded by --max-seconds) and answers one JSON line with the
# block's wall time, round trips done, and CPU deltas; ``STOP`` or EOF ends the session.  The
# orchestrator interleaves blocks of all contestants, so slow and fast phases of a noisy
# machine are shared out among them instead of hitting whichever ran at the time.


def block_snapshot(server_pid: int) -> tuple[float, float, float, float]:
    busy, steal = machine_cpu_seconds()
    return cpu_seconds(server_pid), own_cpu_seconds(), busy, steal


async def run_loop(
    one: Callable[[int], Awaitable[None]], start: int, count: int, max_seconds: float
) -> int:
    """Call ``one(seq)`` up to ``count`` times, stopping early after ``max_seconds``."""
    clock = time.perf_counter
    deadline = clock() + max_seconds
    for i in range(count):
        await one(start + i)
        if clock() >= deadline:
            return i + 1
    return count


async def client_session(one: Callable[[int], Awaitable[None]], args: argparse.Namespace) -> None:
    seq = await run_loop(one, 0, args.warmup, args.max_seconds)
    print("READY", flush=True)
    while True:
        # Blocking read on purpose: between blocks nothing is outstanding, and the event loop
        # must not run anything of its own during a measurement anyway.
        command = sys.stdin.readline().split()
        if not command or command[0] != "RUN":
            return
        count = int(command[1])
        server0, client0, busy0, steal0 = block_snapshot(args.server_pid)
        start = time.perf_counter()
        done = await run_loop(one, seq, count, args.max_seconds)
        wall = time.perf_counter() - start
        server1, client1, busy1, steal1 = block_snapshot(args.server_pid)
        seq += done
        block = {
            "round_trips": done,
            "seconds": wall,
            "server_cpu": server1 - server0,
            "client_cpu": client1 - client0,
            # CPU the rest of the machine used meanwhile, and CPU stolen by the hypervisor.
            "other_cpu": max(0.0, busy1 - busy0 - (server1 - server0) - (client1 - client0)),
            "steal": steal1 - steal0,
        }
        print(json.dumps(block), flush=True)


async def trio_client(name: str, port: int, args: argparse.Namespace) -> None:
    import trio

    with trio.fail_after(args.lifetime):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            if name == "hydra":
                one, close = await hydra_client_setup(stream)
            else:
                one, close = bare_client_setup(stream)
            await client_session(one, args)
            await close()


async def hydra_client_setup(stream: Any) -> tuple[Any, Any]:
    import trio

    from hydra_trio.net import FramedChannel
    from hydra_trio.protocol.connection import Connection
    from hydra_trio.protocol.messages import (
        PROTOCOL_VERSION,
        Challenge,
        Goodbye,
        Hello,
        Pong,
        Role,
        Welcome,
    )

    # Generous timeouts: the peer is idle between blocks; nothing here checks them anyway.
    connection = Connection(
        Role.BUILDER, now=trio.current_time(), peer_timeout=3600.0, ping_interval=10.0
    )
    channel = FramedChannel(stream, connection)
    challenge = await channel.receive()  # the runner speaks first
    if type(challenge) is not Challenge:
        raise RuntimeError(f"expected challenge, got {challenge!r}")
    await channel.send(
        Hello(
            protocol_version=PROTOCOL_VERSION,
            machine_id="bench-builder",
            hostname="localhost",
            systems=("x86_64-linux",),
        )
    )
    welcome = await channel.receive()
    if type(welcome) is not Welcome:
        raise RuntimeError(f"expected welcome, got {welcome!r}")
    make_ping = connection.make_ping
    send = channel.send
    receive = channel.receive
    current_time = trio.current_time

    async def one(_: int) -> None:
        ping = make_ping(current_time())
        await send(ping)
        pong = await receive()
        if type(pong) is not Pong or pong.seq != ping.seq:
            raise RuntimeError(f"expected pong {ping.seq}, got {pong!r}")

    async def close() -> None:
        await channel.send(Goodbye(reason="benchmark done"))

    return one, close


def bare_client_setup(stream: Any) -> tuple[Any, Any]:
    import msgpack

    pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
    unpackb = msgpack.unpackb
    unpack_header = HEADER.unpack_from
    pack_header = HEADER.pack
    buffer = bytearray()

    async def one(seq: int) -> None:
        body = pack(ping_map(seq))
        await stream.send_all(pack_header(len(body)) + body)
        while True:
            if len(buffer) >= 4:
                (length,) = unpack_header(buffer, 0)
                if len(buffer) - 4 >= length:
                    pong = unpackb(buffer[4 : 4 + length])
                    del buffer[: 4 + length]
                    break
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise RuntimeError("server closed the connection")
            buffer.extend(data)
        if pong["type"] != "pong" or pong["seq"] != seq:
            raise RuntimeError(f"expected pong {seq}, got {pong!r}")

    async def close() -> None:
        pass

    return one, close


async def grpc_client(port: int, args: argparse.Namespace) -> None:
    import asyncio

    import grpc
    import msgpack

    async with asyncio.timeout(args.lifetime):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = channel.stream_stream(
                GRPC_METHOD,
                request_serializer=msgpack.Packer(use_bin_type=True, autoreset=True).pack,
                response_deserializer=msgpack.unpackb,
            )
            call = method()

            async def one(seq: int) -> None:
                await call.write(ping_map(seq))
                pong = await call.read()
                if pong is grpc.aio.EOF or pong["type"] != "pong" or pong["seq"] != seq:
                    raise RuntimeError(f"expected pong {seq}, got {pong!r}")

            await client_session(one, args)
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass


def client(name: str, port: int, args: argparse.Namespace) -> None:
    if name == "grpc":
        import asyncio

        asyncio.run(grpc_client(port, args))
    else:
        import trio

        trio.run(trio_client, name, port, args)


# ---------------------------------------------------------------------------------------------
# Orchestrator.


def read_line(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    """The next line ``proc`` prints, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError(f"{what}: no answer within {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what}: exited early (status {proc.wait(5)})")
    return line.strip()


def stop(proc: subprocess.Popen[str]) -> None:
    """Wait a little for a process we started, then terminate it, then kill it."""
    for action in (None, proc.terminate, proc.kill):
        if proc.poll() is not None:
            return
        if action is not None:
            action()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue


def wait_for_quiet(threshold: float, max_wait: float) -> tuple[bool, float]:
    """Wait (at most ``max_wait`` s) until the machine's busy CPU, sampled over 0.25 s windows,
    is below ``threshold`` CPUs (other engineers' test runs share this machine).  Returns
    (quiet, seconds waited); after ``max_wait`` the measurement proceeds anyway, flagged."""
    start = time.monotonic()
    while True:
        busy0, _ = machine_cpu_seconds()
        time.sleep(0.25)
        busy1, _ = machine_cpu_seconds()
        waited = time.monotonic() - start
        if (busy1 - busy0) / 0.25 < threshold:
            return True, waited
        if waited >= max_wait:
            return False, waited


class Pair:
    """One contestant's server and client processes (started by us, stopped by ``close``)."""

    def __init__(self, contestant: str, args: argparse.Namespace, lifetime: float) -> None:
        self.contestant = contestant
        self.args = args
        script = str(Path(__file__).resolve())
        env = dict(os.environ)
        name = contestant
        if contestant.startswith("variant"):  # hydra's code, from the --variant directory
            name = "hydra"
            env["HYDRA_BENCH_PATH"] = str(Path(variants(args)[contestant]).resolve())
        common = {"stdout": subprocess.PIPE, "text": True, "cwd": REPO, "env": env}
        self.server = subprocess.Popen(
            [sys.executable, script, "--serve", name, "--lifetime", str(lifetime)], **common
        )
        self.client: subprocess.Popen[str] | None = None
        line = read_line(self.server, 30, f"{contestant} server")
        if not line.startswith("PORT "):
            raise RuntimeError(f"{contestant} server: unexpected {line!r}")
        self.client = subprocess.Popen(
            [
                sys.executable,
                script,
                "--client",
                name,
                "--port",
                line.split()[1],
                "--server-pid",
                str(self.server.pid),
                "--warmup",
                str(args.warmup),
                "--max-seconds",
                str(args.max_seconds),
                "--lifetime",
                str(lifetime),
            ],
            stdin=subprocess.PIPE,
            **common,
        )
        line = read_line(self.client, args.max_seconds + 30, f"{contestant} client")
        if line != "READY":
            raise RuntimeError(f"{contestant} client: unexpected {line!r}")

    def run_block(self, count: int) -> dict[str, Any]:
        assert self.client is not None and self.client.stdin is not None
        self.client.stdin.write(f"RUN {count}\n")
        self.client.stdin.flush()
        line = read_line(self.client, self.args.max_seconds + 30, f"{self.contestant} client")
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.client is not None:
            if self.client.stdin is not None and self.client.poll() is None:
                with contextlib.suppress(OSError):
                    self.client.stdin.write("STOP\n")
                    self.client.stdin.close()
            stop(self.client)
        stop(self.server)


def contestant_names(args: argparse.Namespace) -> tuple[str, ...]:
    return (*CONTESTANTS, *variants(args))


def variants(args: argparse.Namespace) -> dict[str, str]:
    """Contestant name -> directory, for each ``--variant DIR`` (variant1, variant2, ...)."""
    return {f"variant{i}": path for i, path in enumerate(args.variant or (), 1)}


def repetition(args: argparse.Namespace, rep: int) -> dict[str, dict[str, Any]]:
    """One comparison: every contestant does ``args.count`` timed round trips, in blocks of
    ``args.block`` interleaved with the other contestants' (order rotated every block)."""
    contestants = contestant_names(args)
    blocks = -(-args.count // args.block)
    lifetime = blocks * len(contestants) * (args.max_seconds + args.quiet_wait + 10) + 120
    pairs: dict[str, Pair] = {}
    totals = {
        name: {
            k: 0.0
            for k in (
                "round_trips",
                "seconds",
                "server_cpu",
                "client_cpu",
                "other_cpu",
                "steal",
                "busy_blocks",
            )
        }
        for name in contestants
    }
    try:
        for name in contestants:
            pairs[name] = Pair(name, args, lifetime)
        for b in range(blocks):
            count = min(args.block, args.count - b * args.block)
            shift = (rep + b) % len(contestants)
            for name in contestants[shift:] + contestants[:shift]:
                quiet, _ = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
                block = pairs[name].run_block(count)
                for key, value in block.items():
                    totals[name][key] += value
                totals[name]["busy_blocks"] += not quiet
    finally:
        for pair in pairs.values():
            pair.close()
    results = {}
    for name, t in totals.items():
        n = t["round_trips"]
        results[name] = {
            "round_trips": int(n),
            "capped": n < args.count,
            "seconds": t["seconds"],
            "rate": n / t["seconds"],
            "server_cpu_us": t["server_cpu"] / n * 1e6,
            "client_cpu_us": t["client_cpu"] / n * 1e6,
            "other_load": t["other_cpu"] / t["seconds"],
            "steal": t["steal"] / t["seconds"],
            "blocks_started_busy": int(t["busy_blocks"]),
        }
    return results


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    contestants = contestant_names(args)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contestants}
    for rep in range(args.repeat):
        results = repetition(args, rep)
        for name in contestants:
            result = results[name]
            runs[name].append(result)
            print(
                f"  repetition {rep + 1}/{args.repeat} {name:<8} {result['rate']:>7,.0f} rt/s  "
                f"server {result['server_cpu_us']:6.1f} us/rt  "
                f"client {result['client_cpu_us']:6.1f} us/rt  "
                f"other load {result['other_load']:4.2f} CPUs, steal {result['steal']:4.2f}"
                + (
                    f"  ({result['blocks_started_busy']} blocks started on a busy machine)"
                    if result["blocks_started_busy"]
                    else ""
                )
                + ("  (time cap hit)" if result["capped"] else ""),
                file=sys.stderr,
                flush=True,
            )
    summary: dict[str, Any] = {}
    for name in contestants:
        rates = [r["rate"] for r in runs[name]]
        ratios = [r["rate"] / g["rate"] for r, g in zip(runs[name], runs["grpc"], strict=True)]
        summary[name] = {
            "rate": statistics.median(rates),
            "rates": rates,
            "server_cpu_us": statistics.median(r["server_cpu_us"] for r in runs[name]),
            "client_cpu_us": statistics.median(r["client_cpu_us"] for r in runs[name]),
            "other_load": statistics.median(r["other_load"] for r in runs[name]),
            "ratio_vs_grpc": statistics.median(ratios),
            "ratios_vs_grpc": ratios,
        }
    return {"runs": runs, "summary": summary}


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    summary = results["summary"]
    print(
        f"ping/pong over loopback TCP: medians of {args.repeat} repetitions x "
        f"{args.count:,} sequential round trips (after {args.warmup:,} warm-up)"
    )
    header = (
        f"{'contestant':<12} {'round trips/s':>13} {'server CPU us/rt':>16} "
        f"{'client CPU us/rt':>16} {'vs grpc.aio':>11} {'bg load':>7}   per-repetition rt/s"
    )
    print(header)
    print("-" * len(header))
    labels = {"hydra": "hydra-trio", "bare": "bare trio", "grpc": "grpc.aio"}
    for name in contestant_names(args):
        s = summary[name]
        print(
            f"{labels.get(name, name):<12} {s['rate']:>13,.0f} {s['server_cpu_us']:>16.1f} "
            f"{s['client_cpu_us']:>16.1f} {s['ratio_vs_grpc']:>10.2f}x {s['other_load']:>7.2f}   "
            + ", ".join(f"{r:,.0f}" for r in s["rates"])
        )
    hydra = summary["hydra"]["ratio_vs_grpc"]
    verdict = "meets" if hydra >= TARGET_RATIO else "MISSES"
    print(
        f"(vs grpc.aio: median of per-repetition ratios.  hydra-trio at {hydra:.2f}x {verdict} "
        f"the {TARGET_RATIO}x goal; hydra-trio/bare = "
        f"{summary['hydra']['rate'] / summary['bare']['rate']:.2f}.  bg load: median CPUs used by"
        f" other processes during the timed loops)"
    )
    runs = results["runs"]
    for name, path in variants(args).items():
        ratios = [v["rate"] / h["rate"] for v, h in zip(runs[name], runs["hydra"], strict=True)]
        cpu = [
            v["server_cpu_us"] - h["server_cpu_us"]
            for v, h in zip(runs[name], runs["hydra"], strict=True)
        ]
        print(
            f"({name} = {path}: {statistics.median(ratios):.2f}x hydra-trio's round trips/s, "
            f"server CPU {statistics.median(cpu):+.1f} us/rt; medians of per-repetition pairs)"
        )


def figures_of(results: dict[str, Any]) -> list[Figure]:
    hydra, grpc = results["summary"]["hydra"], results["summary"]["grpc"]
    runs = results["runs"]
    cpu_ratios = [
        h["server_cpu_us"] / g["server_cpu_us"]
        for h, g in zip(runs["hydra"], runs["grpc"], strict=True)
    ]
    return [
        Figure(
            "ping round trips/s, builder <-> runner process",
            hydra["rate"],
            "rt/s",
            grpc["rate"],
            "grpc.aio",
            Goal(">=", TARGET_RATIO, of_baseline=True),
            paired_ratio=hydra["ratio_vs_grpc"],
        ),
        Figure(
            "runner CPU per ping handled",
            hydra["server_cpu_us"],
            "µs",
            grpc["server_cpu_us"],
            "grpc.aio server",
            Goal("<=", TARGET_CPU_RATIO, of_baseline=True),
            paired_ratio=statistics.median(cpu_ratios),
        ),
        Figure(
            "ping round trips/s vs the bare trio loop",
            hydra["rate"],
            "rt/s",
            results["summary"]["bare"]["rate"],
            "bare trio",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=CONTESTANTS, help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=CONTESTANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, default=300.0, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of the comparison")
    parser.add_argument(
        "--count", type=int, default=20_000, help="timed round trips per contestant"
    )
    parser.add_argument(
        "--block", type=int, default=1_000, help="round trips per interleaved block"
    )
    parser.add_argument("--warmup", type=int, default=2_000, help="untimed round trips first")
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="time cap per loop (warm-up or block)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        metavar="DIR",
        help="also measure hydra-trio imported from DIR (a directory holding a modified copy of"
        " the hydra_trio package); repeatable: variant1, variant2, ...",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="before each block, wait up to this long for the machine to be idle (default 5)",
    )
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.3,
        metavar="CPUS",
        help="idle means less than this many CPUs busy (default 0.3)",
    )
    parser.add_argument("--quick", action="store_true", help="1 x 2,000 round trips (smoke)")
    parser.add_argument("--json", metavar="FILE", help="also write raw results as JSON")
    parser.add_argument("--figures", type=Path, help="write the summary figures here (run_all)")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.lifetime)
        return
    if args.client:
        client(args.client, args.port, args)
        return
    if args.quick:
        args.repeat, args.count, args.block, args.warmup = 1, 2_000, 500, 200
        args.quiet_wait = min(args.quiet_wait, 2.0)
    # On SIGTERM (e.g. from run_all.py's time limit) unwind, so `Pair.close` stops our children.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results = orchestrate(args)
    print_table(results, args)
    print()
    figures.print_table(figures_of(results))
    figures.write(args.figures, figures_of(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
