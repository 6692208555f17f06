"""Builds of real shapes (issue 18): 100,000 small files as outputs, then as inputs.

Setup per repetition (fresh processes, state and work dirs each time; all loopback): one queue
runner (``--builder-timeout 3``, SQLite) and two builders, ``bA`` and ``bB``, each
``--max-jobs 1 --ping-interval 1 --ping-timeout 3`` with a mandatory feature of its own, so
that build A runs on bA and build B on bB and the files cross the network.  One graph:

- **A** writes ``--files`` files (default 100,000) of ~10 bytes each, 1,000 a directory, into
  ``$OUT``;
- **B** (``after: [A]``) runs ``true``: its inputs are all of A's files under ``$IN/A``.

Measured (seconds; the median of ``--repeat`` runs, and the median of the per-run ratios):

- **commit of N outputs** = A's ``finishedAt - startedAt`` less its ``timings.build`` (and
  ``timings.fetch``): the builder's scan and hash of ``$OUT``, the uploads, the listing in
  pieces, the runner's check and commit of every file, the result in the database.
- **dispatch + fetch of N inputs** = B's ``startedAt`` after A's ``finishedAt`` (dispatch) plus
  B's ``timings.fetch`` (the listing in pieces, every file fetched, verified, cached and placed
  under ``$IN``).
- **baseline** in the same repetition: ``tar c`` of the same tree (written by the same
  script) piped over a loopback TCP socket into ``tar x`` in a fresh directory (each tar's
  stdin/stdout is the socket itself), start to both exited.  Goal: within 2x of it.  The
  script that writes the files ends with ``sync`` (A's and the baseline's alike), so neither
  the commit nor the baseline starts with the write-back of 100,000 fresh files still to do
  (without it the baseline swung from 0.4 to 7.8 s at 10,000 files in one hour).  ``tar x``
  makes nothing durable; the commit makes every file durable before the result is kept.
- **Python floors** in the same repetition, on the same tree, each one plain loop in one
  process with nothing but the system calls and hashing every design must do per file: the
  builder's side of a commit (``os.walk``, open + read + close + SHA-256 of each file), and the
  builder's side of a fetch of small files (create + write + close of each file where it goes
  in ``$IN``, and the bytes of each 512 written into one pack file, as ``builder/packs.py``
  keeps them).  No network, no framing, no runner, no database: what 2x of tar leaves for
  everything else.  For the record, the design before packs (create + write + close of each
  file in a content-addressed cache of 256 directories, then a hard link of it into a
  second directory, as ``$IN`` is still made for files over 16 KiB).
- **longest gap between two pongs**: a probe (this script with ``--probe``) connects to the
  runner as a builder of a system nothing is built for and pings every 10 ms for the whole
  run; the longest time between two pongs it receives is the longest the runner's event loop
  was kept from answering.  Goal: < 100 ms.

    .venv/bin/python benchmarks/shapes_bench.py                 # 3 repetitions of 100,000
    .venv/bin/python benchmarks/shapes_bench.py --quick         # 1 x 10,000

Only the processes this script starts are ever signalled, through their ``Popen`` handles;
every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import figures
from daemons import Daemons
from figures import Figure, Goal

HERE = Path(__file__).resolve().parent

MAKE_FILES = (
    "import os, sys\n"
    "out, n = sys.argv[1], int(sys.argv[2])\n"
    "for i in range(n):\n"
    "    d = os.path.join(out, f'd{i // 1000}')\n"
    "    if i % 1000 == 0: os.mkdir(d)\n"
    "    with open(os.path.join(d, f'file-{i}'), 'w') as f: f.write(f'x {i}\\n')\n"
    "os.sync()\n"
)


def stamp(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp() if isinstance(text, str) else text


def wait_done(farm: Daemons, build_id: str, limit: float) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        build: dict[str, Any] = farm.client.get(f"{farm.url}/builds/{build_id}").json()
        if build["state"] not in ("queued", "running"):
            return build
        time.sleep(0.2)
    raise RuntimeError(f"build {build_id} not finished after {limit:g} s")


def tar_over_socket(src: Path, dst: Path) -> float:
    """Seconds for ``tar c -C src . | <loopback TCP> | tar x -C dst``."""
    dst.mkdir()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        accepted: list[socket.socket] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
        start = time.monotonic()
        thread.start()
        sender = socket.create_connection(listener.getsockname())
        thread.join(10)
        receiver = accepted[0]
        with sender, receiver:
            untar = subprocess.Popen(["tar", "x", "-C", str(dst)], stdin=receiver.fileno())
            tar = subprocess.Popen(["tar", "c", "-C", str(src), "."], stdout=sender.fileno())
            tar.wait(600)
            sender.shutdown(socket.SHUT_WR)
            sender.close()
            untar.wait(600)
        elapsed = time.monotonic() - start
    if tar.returncode or untar.returncode:
        raise RuntimeError("tar failed")
    return elapsed


def floor_scan(src: Path) -> tuple[float, list[tuple[str, bytes]]]:
    """Seconds to walk ``src`` and read and hash every file; (sha256, data) of each."""
    start = time.monotonic()
    found: list[tuple[str, bytes]] = []
    for root, _dirs, names in os.walk(src):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                data = os.read(fd, 1 << 20)
            finally:
                os.close(fd)
            found.append((hashlib.sha256(data).hexdigest(), data))
    return time.monotonic() - start, found


def floor_place(found: list[tuple[str, bytes]], dst: Path) -> float:
    """Seconds to write each file into a directory of inputs under ``dst`` and the bytes of
    each 512 into one pack file there (``builder/packs.py``)."""
    packs, inputs = dst / "packs", dst / "in"
    packs.mkdir(parents=True)
    inputs.mkdir()
    start = time.monotonic()
    for first in range(0, len(found), 512):
        batch = found[first : first + 512]
        for index, (_sha256, data) in enumerate(batch, first):
            fd = os.open(f"{inputs}/{index}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        fd = os.open(f"{packs}/{first}.pack", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            os.write(fd, b"".join(data for _, data in batch))
        finally:
            os.close(fd)
    return time.monotonic() - start


def floor_link(found: list[tuple[str, bytes]], dst: Path) -> float:
    """Seconds to write each file into a content-addressed cache under ``dst`` and link it
    into a directory of inputs there (the cache's 256 directories made beforehand)."""
    cache, inputs = dst / "cache", dst / "in"
    for index in range(256):
        (cache / f"{index:02x}").mkdir(parents=True)
    inputs.mkdir()
    start = time.monotonic()
    for index, (sha256, data) in enumerate(found):
        entry = f"{cache}/{sha256[:2]}/{sha256}-{index}"  # (the tree's files may repeat)
        fd = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.link(entry, f"{inputs}/{index}")
    return time.monotonic() - start


def one_run(tmp: Path, files: int, index: int, profile: Path | None) -> dict[str, float]:
    work = tmp / f"r{index}"
    work.mkdir()
    if profile is not None:
        profile = profile / f"r{index}"
        profile.mkdir(parents=True)
    farm = Daemons(work, client_timeout=60.0, profile=profile)
    probe: subprocess.Popen[Any] | None = None
    try:
        farm.start_runner("--builder-timeout", "3")
        for name in ("bA", "bB"):
            farm.daemon(
                name,
                "builder",
                "--server",
                f"127.0.0.1:{farm.port}",
                "--mandatory-features",
                f"side-{name[1].lower()}",
                "--features",
                f"side-{name[1].lower()}",
                "--ping-interval",
                "1",
                "--ping-timeout",
                "3",
                "--work-dir",
                str(work / name),
                "--hostname",
                name,
            )
        gaps = work / "gaps.json"
        probe = farm.spawn("probe", str(Path(__file__)), "--probe", str(farm.port), str(gaps))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            machines = farm.client.get(f"{farm.url}/status").json()["machines"]
            if sum(m["state"] == "connected" for m in machines) == 3:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the builders and the probe did not connect")
        graph = {
            "builds": [
                {
                    "name": "A",
                    # $OUT is expanded by a shell; the script is its $1
                    "command": [
                        "sh",
                        "-c",
                        f'exec "$0" -c "$1" "$OUT" {files}',
                        sys.executable,
                        MAKE_FILES,
                    ],
                    "requiredFeatures": ["side-a"],
                },
                {
                    "name": "B",
                    "command": ["true"],
                    "after": ["A"],
                    "requiredFeatures": ["side-b"],
                },
            ]
        }
        response = farm.client.post(f"{farm.url}/builds", json=graph)
        response.raise_for_status()
        ids = response.json()["ids"]
        a = wait_done(farm, ids["A"], 1200)
        b = wait_done(farm, ids["B"], 1200)
        if a["status"] != "success" or b["status"] != "success":
            raise RuntimeError(f"A {a['status']}, B {b['status']}; see {work}")
        a_timings, b_timings = a.get("timings") or {}, b.get("timings") or {}
        commit = (
            stamp(a["finishedAt"])
            - stamp(a["startedAt"])
            - a_timings.get("build", 0.0)
            - a_timings.get("fetch", 0.0)
        )
        fetch = (stamp(b["startedAt"]) - stamp(a["finishedAt"])) + b_timings.get("fetch", 0.0)
        probe.send_signal(signal.SIGINT)
        probe.wait(30)
        probed = json.loads(gaps.read_text())
        gap = probed["longest_gap"]
        if os.environ.get("SHAPES_SLOW_GAPS"):  # where to look for what held the runner
            print("gaps over 50 ms (wall time, seconds):", probed.get("slow"))
        src = work / "tree"
        src.mkdir()
        subprocess.run([sys.executable, "-c", MAKE_FILES, str(src), str(files)], check=True)
        baseline = tar_over_socket(src, work / "untarred")
        scan, found = floor_scan(src)
        place = floor_place(found, work / "placed")
        link = floor_link(found, work / "linked")
        return {
            "floor_scan": scan,
            "floor_place": place,
            "floor_link": link,
            "commit": commit,
            "fetch": fetch,
            "tar": baseline,
            "gap": gap,
            # the commit's parts: the builder's scan and upload, then the runner's check
            "upload": a_timings.get("upload", 0.0),
            "check": commit - a_timings.get("upload", 0.0),
            "b_fetch": b_timings.get("fetch", 0.0),
        }
    finally:
        farm.close()


async def _probe(port: int, out: Path) -> None:
    import trio

    from hydra_trio.protocol import codec
    from hydra_trio.protocol.messages import (
        PROTOCOL_VERSION,
        Challenge,
        Hello,
        Ping,
        Pong,
        Welcome,
    )

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    decoder = codec.FrameDecoder()
    inbox: list[Any] = []

    async def receive() -> Any:
        while not inbox:
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError
            inbox.extend(decoder.feed(data))
        return inbox.pop(0)

    assert isinstance(await receive(), Challenge)
    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        machine_id="probe",
        hostname="probe",
        systems=("probe-nothing",),
        ping_interval=1.0,
    )
    await stream.send_all(codec.encode(hello))
    assert isinstance(await receive(), Welcome)
    longest, last, pongs = 0.0, time.monotonic(), 0
    slow: list[tuple[float, float]] = []  # (wall time, gap) of every gap over 50 ms

    async def pinger() -> None:
        seq = 0
        while True:
            await stream.send_all(codec.encode(Ping(seq=seq)))
            seq += 1
            await trio.sleep(0.01)

    record = trio.Path(out)
    await record.write_text(json.dumps({"longest_gap": 0.0, "pongs": 0}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pinger)
        while True:
            message = await receive()
            if isinstance(message, Pong):
                now = time.monotonic()
                gap, last, pongs = now - last, now, pongs + 1
                if gap > 0.05:
                    slow.append((time.time(), gap))
                if gap > longest or pongs % 1000 == 0:
                    # the file always holds the longest so far: the probe ends by SIGINT
                    longest = max(longest, gap)
                    summary = {"longest_gap": longest, "pongs": pongs, "slow": slow[-50:]}
                    await record.write_text(json.dumps(summary))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 x 10,000 files")
    parser.add_argument("--figures", type=Path, help="write the summary figures here (run_all)")
    parser.add_argument(
        "--profile",
        type=Path,
        help="run the daemons under cProfile (their event loops), writing DIR/r<N>/<name>.prof",
    )
    parser.add_argument(
        "--fresh-fs",
        type=int,
        metavar="GIB",
        help="run each repetition on a new ext4 file system of GIB GiB (a loop mount; needs "
        "root; where it cannot be made, in TMPDIR as without it)",
    )
    parser.add_argument("--probe", nargs=2, metavar=("PORT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        import trio

        # The probe ends by SIGINT, which a script started in the background (``&`` in a
        # non-interactive shell) inherits ignored, and Python then leaves ignored: the probe
        # never ended and the run failed 30 s later.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt, EOFError):
            trio.run(_probe, int(args.probe[0]), Path(args.probe[1]))
        return 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.quick:
        args.files, args.repeat = 10_000, 1
    return report(args, repetitions(args))


@contextlib.contextmanager
def fresh_fs(gib: int) -> Iterator[Path]:
    """A new ext4 file system (with a journal, as ``mkfs.ext4`` makes it) of ``gib`` GiB,
    loop-mounted for the run and removed after it.  The runs on a file system in use vary
    with its history: this VM's root ext4 has no journal, and ext4 without one scans every
    inode freed in the last minutes on each file creation (``recently_deleted``), so
    ``tar x`` of 100,000 files took 3 to 16 s depending on what was deleted before."""
    work = Path(tempfile.mkdtemp(prefix="shapes-fs-"))
    image, mount = work / "fs.img", work / "mnt"
    mount.mkdir()
    try:
        with image.open("wb") as f:
            f.truncate(gib << 30)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-i", "4096", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], check=False, timeout=120)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def run_dir(gib: int) -> Iterator[Path]:
    """Where one repetition runs: on a new file system of ``gib`` GiB (``fresh_fs``) when
    asked for and one can be made, else in TMPDIR.  Each repetition gets its own: on one
    they shared, the second and third ran slower, tar and the farm alike (tar 3.2 s, then
    5.1 and 4.8 s)."""
    with contextlib.ExitStack() as stack:
        base = None
        if gib:
            try:
                base = stack.enter_context(fresh_fs(gib))
            except (OSError, subprocess.CalledProcessError) as exc:
                where = tempfile.gettempdir()
                print(f"shapes_bench: --fresh-fs: cannot make a file system ({exc}); in {where}")
        yield Path(tempfile.mkdtemp(prefix="shapes-bench-", dir=base))


def repetitions(args: argparse.Namespace) -> list[dict[str, float]]:
    runs = []
    for index in range(args.repeat):
        with run_dir(args.fresh_fs) as tmp:
            # on failure its logs stay in tmp (but for a fresh file system's, removed with it)
            run = one_run(tmp, args.files, index, args.profile)
            shutil.rmtree(tmp, ignore_errors=True)
        runs.append(run)
        print(
            f"run {index + 1}: {args.files:,} files: commit {run['commit']:.1f} s, "
            f"dispatch+fetch {run['fetch']:.1f} s, tar c | tar x {run['tar']:.1f} s, "
            f"longest pong gap {run['gap'] * 1000:.0f} ms (commit: builder's scan and upload "
            f"{run['upload']:.1f} s, then {run['check']:.1f} s; fetch on B "
            f"{run['b_fetch']:.1f} s); Python floors: scan {run['floor_scan']:.1f} s, "
            f"in place + packs {run['floor_place']:.1f} s (cache + link {run['floor_link']:.1f} s)",
            flush=True,
        )
    return runs


def report(args: argparse.Namespace, runs: list[dict[str, float]]) -> int:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    to_tar = Goal("<=", 2.0, of_baseline=True)
    # (name, key of the run's figure, goal): each against the tar baseline of its run
    against_tar: list[tuple[str, str, Goal | None]] = [
        (f"commit of {args.files:,} outputs", "commit", to_tar),
        (f"dispatch + fetch of {args.files:,} inputs", "fetch", to_tar),
        (f"Python floor: walk, read, hash {args.files:,} files", "floor_scan", None),
        (f"Python floor: write {args.files:,} files in place, and in packs", "floor_place", None),
        (f"(before packs) write {args.files:,} files into a cache, link each", "floor_link", None),
    ]
    summary = [
        Figure(
            name,
            med[key],
            "s",
            baseline=med["tar"],
            baseline_name="tar c | tar x over loopback",
            goal=goal,
            paired_ratio=statistics.median(r[key] / r["tar"] for r in runs),
        )
        for name, key, goal in against_tar
    ] + [
        Figure(
            "runner: longest gap between two pongs", med["gap"] * 1000, "ms", goal=Goal("<", 100)
        ),
    ]
    figures.print_table(summary)
    figures.write(args.figures, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
