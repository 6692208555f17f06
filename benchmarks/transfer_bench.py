"""1 GiB output: upload to the runner, fetch by a dependent build on another builder.

Setup per repetition (fresh processes, state and work dirs each time; all loopback): one queue
runner (default options, SQLite, ``--log-level info`` to a file) and two builders, ``bA`` and
``bB``, each ``--max-jobs 1 --ping-interval 1`` and with a mandatory feature of its own
(``side-a`` / ``side-b``) so that build A can only run on bA and build B only on bB: the
fetch crosses the network.  One graph is submitted:

- **A** (``requiredFeatures: [side-a]``): writes ``$OUT/big``, ``--size`` bytes (default
  1 GiB), a random 1 MiB block repeated (as incompressible for this path as ``/dev/urandom``,
  which would take ~10 s on the project's VM);
- **B** (``after: [A]``, ``requiredFeatures: [side-b]``): ``sha256sum $IN/A/big`` (the script
  checks the hash it logs against A's output).

Measured:

- **upload MB/s** = size / A's ``timings.upload`` (the builder's own measure: first
  ``UploadData`` to the last one handed to the socket; hashing the output before and the
  runner's check + fsync + rename after are not in it); **fetch MB/s** = size / B's
  ``timings.fetch`` (first ``FetchRequest`` to the file verified in bB's cache and linked into
  ``$IN``).  MB = 10^6 bytes.
- **CPU seconds per GiB** (printed per run, no goal): the runner's and bA's CPU over A's
  ``uploading`` phase, the runner's and bB's over B's ``fetching`` phase (``/proc/<pid>/stat``
  read when the 100 ms polls first see a phase and see it over: the upload phase includes the
  runner's commit), and each baseline process's own over its copy (``getrusage``): where the
  farm spends more than the naive loops doing the same hashing, writing and copying.
- **RSS**: ``VmRSS`` of the runner, bA and bB sampled every 100 ms, and ``VmHWM`` (the kernel's
  peak) read just before they are stopped.
- **liveness**: ``GET /status`` every 100 ms; the largest ``sinceLastPing`` of bA while A is
  running (build, upload, and the runner's commit of the upload) and of bB while B is running
  (fetch, build).  With ``--ping-interval 1`` it should stay below about 2 s.  Also the time
  from A's phase leaving ``uploading`` to A ``succeeded`` (the runner's commit: hash check,
  fsync of the file, rename; 100 ms resolution).
- **baselines** in the same repetition, each between two fresh processes over loopback:
  a raw trio socket copy of the same number of bytes (this script in ``--source`` / ``--sink``
  mode: ``send_all`` of 256 KiB ``bytes`` / ``receive_some(256 KiB)`` discarded; no disk, no
  framing); the **naive receive-write-hash loop** (``--naive-sink``: plain blocking Python,
  ``recv_into`` a reused 1 MiB buffer, write to a new file and SHA-256 in the same thread;
  the source sends from memory), the work of an upload's receiving end; the same loop
  writing **around the page cache** (``--naive-direct-sink``: each 1 MiB gathered in a
  page-aligned buffer and written with ``O_DIRECT``, as the runner writes a large upload,
  ``diskio.DirectFile``; reported beside the goal, not part of it); and the **naive
  read-hash-send -> receive-write-hash** pair (the source reads a file of the same bytes in
  1 MiB pieces and hashes them before sending), the work of a fetch end to end.
- **page state**: on the project's VM (a custom ``page_reporting`` module: virtio-balloon free
  page reporting) memory freed is handed back to the host over the next seconds, and writing
  a new file into such pages costs ~1.7 s of kernel CPU per GiB against ~0.2 s for pages
  freed a moment ago.  Measured here with a plain 1 GiB write loop after a pause following
  the deletion of the previous 1 GiB file: 0.2 s -> 4,000-4,400 MiB/s, 1 s -> 2,500-4,800,
  4 s -> 1,150-1,300, 10 s -> 600.  The farm's transfers always write into such cold pages
  (the daemons start and the build runs first; since 2026-12-08 the runner writes a large
  upload around the page cache, bB still writes a fetched input through it), while a
  baseline run just after the previous one's file was deleted wrote at up to twice their
  rate.  So each naive baseline runs after ``PAGE_SETTLE`` seconds of quiet: the same work in
  the same conditions.

Goals: upload >= 1.0x the naive receive-write-hash loop, fetch >= 1.0x the naive
read-hash-send -> receive-write-hash pair (the ratios to the raw copy are reported too);
runner and builder RSS < 150 MiB.

    .venv/bin/python benchmarks/transfer_bench.py                  # 3 repetitions of 1 GiB
    .venv/bin/python benchmarks/transfer_bench.py --quick          # 1 x 128 MiB
    .venv/bin/python benchmarks/transfer_bench.py --profile /tmp/tp --repeat 1

With ``--profile DIR`` the runner and both builders run under ``cProfile`` (slower; it shows
what dominates, not the figures; only the event-loop thread is profiled).

The work dirs are in a temporary directory on the same disk and removed afterwards (the 1 GiB
files with them).  Only the processes this script starts are ever signalled, through their
``Popen`` handles; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
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

import attrs
import figures
from daemons import Daemons, cpu_model, own_cpu, print_profiles, process_cpu
from figures import Figure, Goal

PING_INTERVAL = 1.0
SAMPLE = 0.1
CHUNK = 256 * 1024
#: goal: upload and fetch at least as fast as the naive single-thread loops doing the same work.
GOAL_NAIVE = 1.0
GOAL_RSS_MIB = 150
#: seconds of quiet before each naive baseline, so that it too writes into pages the kernel
#: has to get back from the host (see the docstring).
PAGE_SETTLE = 10.0
#: the longest one repetition's transfer may take before the script gives up.
RUN_TIMEOUT = 600.0
GENERATE = (
    "import os\n"
    "block = os.urandom(1 << 20)\n"
    "size = int(os.environ['BENCH_SIZE'])\n"
    "with open(os.path.join(os.environ['OUT'], 'big'), 'wb') as f:\n"
    "    while size > 0:\n"
    "        f.write(block[: min(size, len(block))])\n"
    "        size -= len(block)\n"
)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB (empty once it is gone)."""
    found = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


# ---------------------------------------------------------------------------------------------
# The raw baseline: --sink and --source, two processes.


async def sink_main(lifetime: float) -> None:
    import trio

    with trio.move_on_after(lifetime):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(f"PORT {listeners[0].socket.getsockname()[1]}", flush=True)
        stream = await listeners[0].accept()
        begun = own_cpu()
        total = 0
        while data := await stream.receive_some(CHUNK):
            total += len(data)
        await stream.send_all(total.to_bytes(8, "big"))
        await stream.aclose()
        print(f"CPU {own_cpu() - begun:.6f}", flush=True)


async def source_main(port: int, size: int, lifetime: float) -> None:
    import trio

    with trio.fail_after(lifetime):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        block = os.urandom(CHUNK)
        start, begun = time.monotonic(), own_cpu()
        sent = 0
        while sent < size:
            piece = block if size - sent >= CHUNK else block[: size - sent]
            await stream.send_all(piece)
            sent += len(piece)
        await stream.send_eof()
        reply = b""
        while len(reply) < 8:
            data = await stream.receive_some(8)
            if not data:
                break
            reply += data
        elapsed = time.monotonic() - start
        await stream.aclose()
    assert int.from_bytes(reply, "big") == size, reply
    print(f"ELAPSED {elapsed:.6f}\nCPU {own_cpu() - begun:.6f}", flush=True)


@attrs.frozen
class Copy:
    """One baseline's run: the seconds its source reports, and each end's CPU seconds over the
    copy (the sink's from the accepted connection on, the source's from its first byte)."""

    seconds: float
    sink_cpu: float
    source_cpu: float

    @property
    def cpu(self) -> float:
        return self.sink_cpu + self.source_cpu


def raw_copy(size: int) -> Copy:
    """``size`` bytes over loopback between two fresh processes."""
    return pair(["--sink"], ["--size", str(size), "--source"], lifetime=120.0)


# ---------------------------------------------------------------------------------------------
# The naive baselines: plain blocking Python that does a transfer's work, one thread per side.
#
# --naive-sink: accept one connection, `recv_into` a reused 1 MiB buffer, write each piece to
#   a new file and feed it to SHA-256 in the same thread, then answer the digest (no fsync,
#   as the builders' `timings.upload` does not include the runner's).
# --naive-source: connect, then either send ``--size`` bytes of a 1 MiB block from memory, or
#   (``--from FILE``) read the file in 1 MiB pieces, hash each and send it.
NAIVE_CHUNK = 1 << 20


def naive_sink(lifetime: float, target: str, direct: bool = False) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(lifetime)
        print(f"PORT {server.getsockname()[1]}", flush=True)
        conn, _ = server.accept()
        begun = own_cpu()
        with conn:
            conn.settimeout(lifetime)
            receive = _receive_direct if direct else _receive_buffered
            digest = receive(conn, target)
            conn.sendall(digest)
        os.unlink(target)
        print(f"CPU {own_cpu() - begun:.6f}", flush=True)


def _receive_buffered(conn: Any, target: str) -> bytes:
    import hashlib

    with open(target, "xb", buffering=0) as out:
        digest = hashlib.sha256()
        buffer = bytearray(NAIVE_CHUNK)
        view = memoryview(buffer)
        while got := conn.recv_into(buffer):
            out.write(view[:got])
            digest.update(view[:got])
    return digest.digest()


def _receive_direct(conn: Any, target: str) -> bytes:
    """``_receive_buffered`` around the page cache: each 1 MiB gathered in a page-aligned
    buffer, written with ``O_DIRECT``; the last partial block through the page cache."""
    import fcntl
    import hashlib
    import mmap

    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    digest = hashlib.sha256()
    buffer = mmap.mmap(-1, NAIVE_CHUNK)
    with memoryview(buffer) as view:
        try:
            while True:
                filled = 0
                while filled < NAIVE_CHUNK and (got := conn.recv_into(view[filled:])):
                    filled += got
                digest.update(view[:filled])
                if filled < NAIVE_CHUNK:
                    whole = filled - filled % 4096
                    if whole:
                        os.write(fd, view[:whole])
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    os.write(fd, view[whole:filled])
                    return digest.digest()
                os.write(fd, view)
        finally:
            os.close(fd)


def naive_source(port: int, size: int, lifetime: float, source: str | None) -> None:
    import hashlib
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=lifetime) as conn:
        digest = hashlib.sha256()
        start, begun = time.monotonic(), own_cpu()
        if source is None:
            block = os.urandom(NAIVE_CHUNK)
            sent = 0
            while sent < size:
                piece = block if size - sent >= len(block) else block[: size - sent]
                conn.sendall(piece)
                digest.update(piece)
                sent += len(piece)
        else:
            with open(source, "rb", buffering=0) as f:
                while piece := f.read(NAIVE_CHUNK):
                    digest.update(piece)
                    conn.sendall(piece)
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 32 and (data := conn.recv(32)):
            reply += data
        elapsed = time.monotonic() - start
    assert reply == digest.digest(), "the sink's hash differs"
    print(f"ELAPSED {elapsed:.6f}\nCPU {own_cpu() - begun:.6f}", flush=True)


def pair(sink_args: list[str], source_args: list[str], lifetime: float = 300.0) -> Copy:
    """Start this script as ``--<sink>`` then ``--<source>``; the seconds the source reports,
    and the CPU seconds each end reports."""
    life = f"{lifetime:g}"
    sink = subprocess.Popen(
        [sys.executable, __file__, *sink_args, "--lifetime", f"{lifetime:g}"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    source: subprocess.Popen[str] | None = None
    try:
        assert sink.stdout is not None
        line = sink.stdout.readline().strip()  # the sink exits after `lifetime` in any case
        assert line.startswith("PORT "), line
        source = subprocess.Popen(
            [*[sys.executable, __file__, *source_args], line.split()[1], "--lifetime", life],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        out, _ = source.communicate(timeout=lifetime + 10)
        said = _reports(out)
        sink.wait(30)
        sink_said = _reports(sink.stdout.read())
        return Copy(said["ELAPSED"], sink_said["CPU"], said["CPU"])
    finally:
        for process in (source, sink):
            if process is not None and process.poll() is None:
                process.kill()
            if process is not None:
                process.wait(10)
                if process.stdout is not None:
                    process.stdout.close()


def _reports(out: str) -> dict[str, float]:
    """The ``NAME value`` lines a baseline process printed."""
    said = {}
    for line in out.splitlines():
        name, _, value = line.partition(" ")
        said[name] = float(value)
    assert "CPU" in said, out
    return said


def naive_receive(size: int, target: Path, *, direct: bool = False) -> Copy:
    """Seconds for memory -> socket -> new file + SHA-256 (the upload's runner side); with
    ``direct``, the file written around the page cache, as the runner writes a large upload."""
    sink = "--naive-direct-sink" if direct else "--naive-sink"
    return pair([sink, str(target)], ["--size", str(size), "--naive-source"])


def naive_file_to_file(source: Path, target: Path) -> Copy:
    """Seconds for file read + SHA-256 -> socket -> new file + SHA-256 (a fetch's whole work)."""
    return pair(["--naive-sink", str(target)], ["--from", str(source), "--naive-source"])


def make_source(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)


# ---------------------------------------------------------------------------------------------
# The farm.


class Farm(Daemons):
    def __init__(self, workdir: Path, profile: Path | None) -> None:
        super().__init__(workdir, client_timeout=10.0, profile=profile)

    def start(self) -> None:
        self.start_runner()
        for name, feature in (("bA", "side-a"), ("bB", "side-b")):
            self.daemon(
                name,
                "builder",
                "--server",
                f"127.0.0.1:{self.port}",
                "--ping-interval",
                f"{PING_INTERVAL:g}",
                "--max-jobs",
                "1",
                "--features",
                feature,
                "--mandatory-features",
                feature,
                "--hostname",
                name,
                "--work-dir",
                str(self.workdir / name),
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            machines = self.get("/status")["machines"]
            if sum(m["state"] == "connected" for m in machines) == 2:
                return
            time.sleep(0.05)
        raise TimeoutError(f"the builders did not connect; see {self.workdir}")

    def get(self, path: str) -> Any:
        return self.client.get(f"{self.url}{path}").json()


def one_run(workdir: Path, size: int, profile: Path | None) -> dict[str, Any]:
    farm = Farm(workdir, profile)
    try:
        farm.start()
        graph = {
            "builds": [
                {
                    "name": "A",
                    "command": [sys.executable, "-c", GENERATE],
                    "env": {"BENCH_SIZE": str(size)},
                    "requiredFeatures": ["side-a"],
                },
                {
                    "name": "B",
                    "command": ["sh", "-c", 'sha256sum "$IN/A/big"'],
                    "after": ["A"],
                    "requiredFeatures": ["side-b"],
                },
            ]
        }
        response = farm.client.post(f"{farm.url}/builds", json=graph)
        assert response.status_code == 201, response.text
        ids = response.json()["ids"]
        pids = {name: p.pid for name, p in farm.processes.items()}
        peak_rss = dict.fromkeys(pids, 0)
        since = {"bA": 0.0, "bB": 0.0}
        since_uploading = 0.0
        since_fetching = 0.0
        seen_uploading = False
        upload_left: float | None = None
        a_done: float | None = None
        phases_seen: list[tuple[float, str, str]] = []
        #: the daemons' CPU seconds when each phase was first seen (100 ms polls): A
        #: uploading, A no longer uploading, B fetching, B no longer fetching.
        marks: dict[str, dict[str, float]] = {}

        def mark(name: str) -> None:
            if name not in marks:
                marks[name] = {daemon: process_cpu(pid) for daemon, pid in pids.items()}

        start = time.monotonic()
        while True:
            now = time.monotonic() - start
            if now > RUN_TIMEOUT:
                raise TimeoutError(f"the transfer took over {RUN_TIMEOUT:g} s; see {workdir}")
            for name, pid in pids.items():
                peak_rss[name] = max(peak_rss[name], memory(pid).get("VmRSS", 0))
            machines = {m["hostname"]: m for m in farm.get("/status")["machines"]}
            a, b = farm.get(f"/builds/{ids['A']}"), farm.get(f"/builds/{ids['B']}")
            shown = (a["state"] + "/" + str(a["phase"]), b["state"] + "/" + str(b["phase"]))
            if not phases_seen or phases_seen[-1][1:] != shown:
                phases_seen.append((round(now, 2), *shown))
            if a["state"] == "running":
                since["bA"] = max(since["bA"], machines["bA"]["sinceLastPing"])
                if a["phase"] == "uploading":
                    mark("upload")
                    seen_uploading = True
                    since_uploading = max(since_uploading, machines["bA"]["sinceLastPing"])
                elif seen_uploading and upload_left is None:
                    upload_left = now
                    mark("upload over")
            elif seen_uploading and upload_left is None:
                upload_left = now
                mark("upload over")
            if a["state"] == "succeeded" and a_done is None:
                a_done = now
            if b["state"] == "running":
                since["bB"] = max(since["bB"], machines["bB"]["sinceLastPing"])
                if b["phase"] == "fetching":
                    mark("fetch")
                elif "fetch" in marks:
                    mark("fetch over")
                if b["phase"] == "fetching":
                    since_fetching = max(since_fetching, machines["bB"]["sinceLastPing"])
            for m in machines.values():
                if m["state"] != "connected":
                    raise RuntimeError(f"{m['hostname']} disconnected: {m['disconnectReason']}")
            if a["state"] in ("failed", "cancelled") or b["state"] in ("failed", "cancelled"):
                raise RuntimeError(f"A {a['state']} {a['status']}, B {b['state']} {b['status']}")
            if b["state"] == "succeeded":
                if "fetch" in marks:
                    mark("fetch over")
                break
            time.sleep(SAMPLE)
        hwm = {name: memory(pid).get("VmHWM", 0) for name, pid in pids.items()}
        logged = farm.client.get(f"{farm.url}/builds/{ids['B']}/log").text.split()[0]
        assert logged == a["outputs"][0]["sha256"], (logged, a["outputs"])
        attempts = (a["attempts"], b["attempts"])
        return {
            "upload": a["timings"]["upload"],
            "fetch": b["timings"]["fetch"],
            "a_build": a["timings"]["build"],
            "b_build": b["timings"]["build"],
            "commit": (a_done - upload_left) if (a_done is not None and upload_left) else None,
            "rss_peak_sampled_mib": {k: v / 1024 for k, v in peak_rss.items()},
            "hwm_mib": {k: v / 1024 for k, v in hwm.items()},
            "since_last_ping_max": since,
            "since_uploading": since_uploading,
            "since_fetching": since_fetching,
            "attempts": attempts,
            "phases": phases_seen,
            "cpu": {
                phase: {
                    daemon: marks[f"{phase} over"][daemon] - marks[phase][daemon] for daemon in pids
                }
                for phase in ("upload", "fetch")
                if phase in marks and f"{phase} over" in marks
            },
        }
    finally:
        farm.close()


def cpu_line(result: dict[str, Any], size: int) -> str:
    """CPU seconds per GiB moved: the farm's daemons in the phase (as the 100 ms polls saw it:
    the upload phase includes the runner's commit, mostly waiting for its fsync), and the
    naive baselines' two processes."""
    gib = size / (1 << 30)
    farm = result.get("cpu", {})
    base = result["baseline_cpu"]
    parts = []
    for phase, builder, naive, label in (
        ("upload", "bA", "naive_in", "naive receive-write-hash"),
        ("", "", "naive_direct", "its O_DIRECT version"),
        ("fetch", "bB", "naive_ff", "naive pair"),
    ):
        if phase in farm:
            parts.append(
                f"{phase} runner {farm[phase]['runner'] / gib:.2f} + {builder} "
                f"{farm[phase][builder] / gib:.2f}"
            )
        parts.append(
            f"{label} sink {base[naive]['sink'] / gib:.2f} + source "
            f"{base[naive]['source'] / gib:.2f}"
        )
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1 << 30, help="bytes of A's output")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (fresh processes)")
    parser.add_argument("--quick", action="store_true", help="1 x 128 MiB")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the daemons")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (1 GiB files!)")
    parser.add_argument(
        "--settle",
        type=float,
        default=PAGE_SETTLE,
        help="seconds of quiet before each naive baseline (0: an A/B of the farm alone)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--figures", type=Path, help="write the summary figures here (run_all)")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, default=120.0, help=argparse.SUPPRESS)
    parser.add_argument("--naive-sink", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--naive-direct-sink", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--naive-source", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--from", dest="source_file", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # run_all.py stops an overrunning benchmark with SIGTERM: exit through the `finally`
    # blocks, which stop the daemons this script started and remove its work dir.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.naive_sink is not None:
        naive_sink(args.lifetime, args.naive_sink)
        return 0
    if args.naive_direct_sink is not None:
        naive_sink(args.lifetime, args.naive_direct_sink, direct=True)
        return 0
    if args.naive_source is not None:
        naive_source(args.naive_source, args.size, args.lifetime, args.source_file)
        return 0
    if args.sink or args.source is not None:
        import trio

        if args.sink:
            trio.run(sink_main, args.lifetime)
        else:
            trio.run(source_main, args.source, args.size, args.lifetime)
        return 0
    if args.quick:
        args.size, args.repeat = 128 << 20, 1
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)

    mb = args.size / 1e6
    runs = []
    tmp = Path(tempfile.mkdtemp(prefix="transfer-bench-"))
    try:
        source_file = tmp / "source"
        make_source(source_file, args.size)
        for index in range(args.repeat):
            raw = raw_copy(args.size)
            time.sleep(args.settle)
            naive_in = naive_receive(args.size, tmp / "naive-in")
            time.sleep(args.settle)
            naive_direct = naive_receive(args.size, tmp / "naive-direct", direct=True)
            time.sleep(args.settle)
            naive_ff = naive_file_to_file(source_file, tmp / "naive-ff")
            workdir = tmp / f"run{index + 1}"
            workdir.mkdir()
            try:
                result = one_run(workdir, args.size, args.profile)
            finally:
                if not args.keep:
                    shutil.rmtree(workdir, ignore_errors=True)
            copies = {
                "raw": raw,
                "naive_in": naive_in,
                "naive_direct": naive_direct,
                "naive_ff": naive_ff,
            }
            result.update((name, copy.seconds) for name, copy in copies.items())
            result["baseline_cpu"] = {
                name: {"sink": copy.sink_cpu, "source": copy.source_cpu}
                for name, copy in copies.items()
            }
            runs.append(result)
            print(
                f"run {index + 1}: raw {mb / raw.seconds:,.0f} MB/s, naive receive-write-hash "
                f"{mb / naive_in.seconds:,.0f} MB/s (O_DIRECT {mb / naive_direct.seconds:,.0f}), "
                "naive read-hash-send -> receive-write-hash "
                f"{mb / naive_ff.seconds:,.0f} MB/s, upload {mb / result['upload']:,.0f}"
                f" MB/s, fetch {mb / result['fetch']:,.0f} MB/s; VmHWM "
                + ", ".join(f"{k} {v:.0f} MiB" for k, v in result["hwm_mib"].items())
                + "; max sinceLastPing "
                + ", ".join(f"{k} {v:.2f} s" for k, v in result["since_last_ping_max"].items())
                + (
                    f"; uploading -> A succeeded {result['commit']:.1f} s (100 ms polls)"
                    if result["commit"] is not None
                    else ""
                ),
                flush=True,
            )
            print(f"  CPU seconds per GiB: {cpu_line(result, args.size)}", flush=True)
    finally:
        if args.keep:
            print(f"work dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    raw_rates = [mb / r["raw"] for r in runs]
    up_rates = [mb / r["upload"] for r in runs]
    fetch_rates = [mb / r["fetch"] for r in runs]
    naive_in_rates = [mb / r["naive_in"] for r in runs]
    naive_ff_rates = [mb / r["naive_ff"] for r in runs]
    naive_direct_rates = [mb / r["naive_direct"] for r in runs]
    up_direct = med([r["naive_direct"] / r["upload"] for r in runs])
    up_ratio = med([r["raw"] / r["upload"] for r in runs])
    fetch_ratio = med([r["raw"] / r["fetch"] for r in runs])
    up_naive = med([r["naive_in"] / r["upload"] for r in runs])
    fetch_naive = med([r["naive_ff"] / r["fetch"] for r in runs])
    print()
    print(
        f"machine: nproc {os.cpu_count()} ({cpu_model()}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )
    print(f"{args.repeat} repetitions of {args.size:,} bytes ({args.size / (1 << 20):,.0f} MiB)")
    print(f"raw trio socket copy: {med(raw_rates):,.0f} MB/s")
    print(f"naive receive-write-hash: {med(naive_in_rates):,.0f} MB/s")
    print(f"naive receive-write-hash, O_DIRECT: {med(naive_direct_rates):,.0f} MB/s")
    print(f"naive read-hash-send -> receive-write-hash: {med(naive_ff_rates):,.0f} MB/s")
    print(
        f"upload:  {med(up_rates):,.0f} MB/s, {up_ratio:.2f} of raw, "
        f"{up_naive:.2f} of naive receive-write-hash, {up_direct:.2f} of its O_DIRECT version"
    )
    print(
        f"fetch:   {med(fetch_rates):,.0f} MB/s, {fetch_ratio:.2f} of raw, "
        f"{fetch_naive:.2f} of naive read-hash-send -> receive-write-hash"
    )
    for name in runs[0]["hwm_mib"]:
        print(
            f"{name}: VmHWM {med([r['hwm_mib'][name] for r in runs]):.0f} MiB, sampled VmRSS "
            f"peak {med([r['rss_peak_sampled_mib'][name] for r in runs]):.0f} MiB"
        )
    print(
        "max sinceLastPing: bA while A ran "
        f"{max(r['since_last_ping_max']['bA'] for r in runs):.2f} s "
        f"(while uploading {max(r['since_uploading'] for r in runs):.2f} s), bB while B ran "
        f"{max(r['since_last_ping_max']['bB'] for r in runs):.2f} s "
        f"(while fetching {max(r['since_fetching'] for r in runs):.2f} s)"
    )
    rss_ok = all(v < GOAL_RSS_MIB for r in runs for v in r["hwm_mib"].values())
    speed_ok = up_naive >= GOAL_NAIVE and fetch_naive >= GOAL_NAIVE
    print(
        f"goal >= {GOAL_NAIVE:g}x the naive loops: {'met' if speed_ok else 'NOT met'}; "
        f"RSS < {GOAL_RSS_MIB} MiB: {'met' if rss_ok else 'NOT met'}"
    )
    size = f"{args.size / (1 << 20):,.0f} MiB"
    summary = [
        Figure(
            f"upload {size} output, builder -> runner",
            med(up_rates),
            "MB/s",
            med(naive_in_rates),
            "naive receive-write-hash",
            Goal(">=", GOAL_NAIVE, of_baseline=True),
            paired_ratio=up_naive,
        ),
        Figure(
            f"upload {size} vs the naive loop writing around the page cache",
            med(up_rates),
            "MB/s",
            med(naive_direct_rates),
            "naive receive-write-hash, O_DIRECT",
            paired_ratio=up_direct,
        ),
        Figure(
            f"fetch {size} input, runner -> builder",
            med(fetch_rates),
            "MB/s",
            med(naive_ff_rates),
            "naive read-hash-send -> receive-write-hash",
            Goal(">=", GOAL_NAIVE, of_baseline=True),
            paired_ratio=fetch_naive,
        ),
        Figure(
            f"upload {size} vs a raw socket copy",
            med(up_rates),
            "MB/s",
            med(raw_rates),
            "raw trio socket copy",
            paired_ratio=up_ratio,
        ),
        Figure(
            f"fetch {size} vs a raw socket copy",
            med(fetch_rates),
            "MB/s",
            med(raw_rates),
            "raw trio socket copy",
            paired_ratio=fetch_ratio,
        ),
    ] + [
        Figure(
            f"peak RSS (VmHWM) of {name} during the transfers",
            max(r["hwm_mib"][name] for r in runs),
            "MiB",
            goal=Goal("<", GOAL_RSS_MIB),
        )
        for name in runs[0]["hwm_mib"]
    ]
    print()
    figures.print_table(summary)
    figures.write(args.figures, summary)
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=2))
    if args.profile is not None:
        print_profiles(args.profile, 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
