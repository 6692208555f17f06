"""The chaos suite's farm: real daemons, each builder behind its own faultable link.

``chaos_farm(tmp_path, backend)`` is an async context manager around ``procs.real_farm``: every
process (runner generations, builders, helpers) runs in that farm's nursery and is stopped by
its own handle when the block exits; then, on the ``netns`` backend, every namespace and veth
pair created for it is deleted (shielded, also after a failure).

Every daemon logs JSON lines (``--log-format json``), so the moments that matter are read from
the daemons' own clocks (the wall clock, as ``time.time()`` in the test):

- the runner detects a lost builder: ``builder NAME (ID) disconnected: REASON ...``;
- a builder detects a lost runner: ``REASON; reconnecting in X s``;
- a build runs elsewhere: ``build ID attempt N assigned to NAME``;
- a result is committed: ``build ID finished: STATUS``.

``check_invariants`` is what every scenario asserts at its end, through the HTTP API, the
state dir and the builders' work dirs; ``check_database`` reads the database once the runner
has stopped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from ..helpers.procs import POLL, Daemon, RealFarm, daemon_env, free_port, real_farm
from .network import Link, NetnsNetwork, ProxyNetwork, free_subnet

#: The aggressive settings of the goals: ping every 1 s, give up after 3 s, on both sides.
PING_INTERVAL, PING_TIMEOUT, BUILDER_TIMEOUT = 1.0, 3.0, 3.0
#: A daemon gets this long to exit after SIGINT before it is killed.
STOP_GRACE = 5.0
#: Every scenario asserts these on every silent fault (docs/reliability.md).
GOAL_DETECT = 4.0
GOAL_RESCHEDULE = 0.5


async def stop_process(process: trio.Process) -> None:
    """``deliver_cancel``: resume (it may be frozen), interrupt, kill if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGINT)
    with trio.move_on_after(STOP_GRACE):
        await process.wait()
        return
    process.kill()


# ---------------------------------------------------------------------------------------------
# Logs.


@attrs.frozen
class Event:
    time: float
    message: str


def events(daemon: Daemon) -> list[Event]:
    """The JSON log lines of ``daemon`` (other lines, e.g. a traceback, are skipped)."""
    found = []
    for line in daemon.log().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError, KeyError):
                record = json.loads(line)
                found.append(Event(float(record["time"]), str(record["message"])))
    return found


_DETACHED = re.compile(r"^builder (\S+) \(\S+\) disconnected: (.*) \(last ping [\d.]+ s ago\)")
_ASSIGNED = re.compile(r"^build (\S+) attempt (\d+) assigned to (\S+)$")
_FINISHED = re.compile(r"^build (\S+) finished: (\S+)")
_RECONNECTING = re.compile(r"^(.*); reconnecting in ([\d.]+) s$")


@attrs.frozen
class Detection:
    time: float
    reason: str


# ---------------------------------------------------------------------------------------------
# The farm.


@attrs.define(eq=False)
class ChaosFarm:
    real: RealFarm
    network: NetnsNetwork | ProxyNetwork
    tmp_path: Path
    runner_port: int
    http_port: int
    runners: list[Daemon] = attrs.field(factory=list)
    builders: dict[str, Daemon] = attrs.field(factory=dict)
    links: dict[str, Link] = attrs.field(factory=dict)
    builder_argv: dict[str, list[str]] = attrs.field(factory=dict)
    max_jobs: dict[str, int] = attrs.field(factory=dict)

    @property
    def backend(self) -> str:
        return self.network.backend

    @property
    def state(self) -> Path:
        return self.tmp_path / "state"

    @property
    def runner(self) -> Daemon:
        return self.runners[-1]

    def work_dir(self, name: str) -> Path:
        return self.tmp_path / "builders" / name

    async def spawn(self, name: str, argv: list[str]) -> Daemon:
        """Run ``argv`` in the farm's nursery as ``name``, output in ``<name>.log``."""
        log_path = self.tmp_path / f"{name}.log"
        with log_path.open("ab") as log_file:
            process: trio.Process = await self.real.nursery.start(
                functools.partial(
                    trio.run_process,
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=str(self.tmp_path),
                    env=daemon_env(),
                    check=False,
                    deliver_cancel=stop_process,
                )
            )
        daemon = Daemon(name=name, process=process, log_path=log_path)
        self.real.daemons.append(daemon)
        return daemon

    # -- the runner -------------------------------------------------------------------------

    async def start_runner(self, builder_timeout: float | None = BUILDER_TIMEOUT) -> Daemon:
        """Start (or restart, on the same ports and state dir) the queue runner; returns once
        its HTTP API answers.  ``None``: the default --builder-timeout."""
        listen = "0.0.0.0" if self.backend == "netns" else "127.0.0.1"
        argv = [sys.executable, "-m", "hydra_trio", "queue-runner", "--log-format", "json"]
        argv += ["--listen", f"{listen}:{self.runner_port}"]
        argv += ["--http", f"127.0.0.1:{self.http_port}", "--state-dir", str(self.state)]
        if builder_timeout is not None:
            argv += ["--builder-timeout", f"{builder_timeout:g}"]
        for _ in range(10):
            runner = await self.spawn(f"runner-{len(self.runners)}", argv)
            self.runners.append(runner)
            with trio.fail_after(20):
                while runner.process.returncode is None:
                    with contextlib.suppress(httpx.TransportError):
                        if (await self.real.client.get(f"{self.real.url}/status")).is_success:
                            return runner
                    await trio.sleep(POLL)
            if "cannot listen" not in runner.log():
                raise AssertionError(f"the queue runner exited:\n{runner.log()}")
            await trio.sleep(0.5)  # a killed runner's port, still held for a moment
        raise AssertionError("the runner's ports stayed held")

    async def kill_runner(self) -> None:
        self.runner.signal(signal.SIGKILL)
        with trio.fail_after(5):
            await self.runner.process.wait()

    def runner_events(self) -> list[Event]:
        return [e for runner in self.runners for e in events(runner)]

    # -- builders ---------------------------------------------------------------------------

    async def add_builder(
        self,
        name: str,
        *,
        max_jobs: int = 1,
        aggressive: bool = True,
        reconnect_max: float | None = 5.0,
        wait: bool = True,
    ) -> Daemon:
        """A builder behind a new link.  ``aggressive``: --ping-interval 1 --ping-timeout 3
        (else the defaults, as with ``reconnect_max=None``)."""
        link = await self.network.add_link(name)
        self.links[name] = link
        argv = [sys.executable, "-m", "hydra_trio", "builder", "--log-format", "json"]
        argv += ["--server", link.server, "--hostname", name, "--max-jobs", str(max_jobs)]
        argv += ["--work-dir", str(self.work_dir(name))]
        if aggressive:
            argv += ["--ping-interval", f"{PING_INTERVAL:g}", "--ping-timeout", f"{PING_TIMEOUT:g}"]
        if reconnect_max is not None:
            argv += ["--reconnect-max", f"{reconnect_max:g}"]
        self.builder_argv[name] = link.command(argv)
        self.max_jobs[name] = max_jobs
        self.builders[name] = await self.spawn(name, self.builder_argv[name])
        if wait:
            await self.wait_connected(name)
        return self.builders[name]

    async def restart_builder(self, name: str) -> Daemon:
        """Start ``name`` again (same link, work dir and so machine id)."""
        generation = sum(d.name.startswith(f"{name}.") for d in self.real.daemons) + 1
        self.builders[name] = await self.spawn(f"{name}.{generation}", self.builder_argv[name])
        return self.builders[name]

    async def wait_connected(self, *names: str) -> None:
        """Until every builder in ``names`` is connected (bounded: 30 s)."""
        with trio.fail_after(30):
            await self.real.wait_for(
                f"{', '.join(names)} connected",
                lambda machines: all(
                    any(m["hostname"] == n and m["state"] == "connected" for m in machines)
                    for n in names
                ),
                self.machines,
            )

    async def machines(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = (await self.real.status())["machines"]
        return found

    def builder_events(self, name: str) -> list[Event]:
        """Events of every process that ran as builder ``name``."""
        return [
            e
            for d in self.real.daemons
            if d.name == name or d.name.startswith(f"{name}.")
            for e in events(d)
        ]

    # -- what happened when -----------------------------------------------------------------

    def runner_detections(self, name: str, after: float) -> list[Detection]:
        """Every time the runner lost builder ``name`` since ``after``."""
        return [
            Detection(event.time, match[2])
            for event in self.runner_events()
            if (match := _DETACHED.match(event.message)) and match[1] == name
            if event.time >= after
        ]

    def builder_detections(self, name: str, after: float) -> list[Detection]:
        """Every time builder ``name`` lost the runner (or failed to reach it) since ``after``."""
        return [
            Detection(event.time, match[1])
            for event in self.builder_events(name)
            if (match := _RECONNECTING.match(event.message)) and event.time >= after
        ]

    def runner_detected(self, name: str, after: float) -> Detection | None:
        return next(iter(self.runner_detections(name, after)), None)

    def builder_detected(self, name: str, after: float) -> Detection | None:
        return next(iter(self.builder_detections(name, after)), None)

    def backoff_delays(self, name: str, after: float, before: float) -> list[float]:
        """The reconnect delays builder ``name`` drew between ``after`` and ``before``."""
        return [
            float(match[2])
            for event in self.builder_events(name)
            if after <= event.time < before and (match := _RECONNECTING.match(event.message))
        ]

    def reconnected(self, name: str, after: float) -> float | None:
        for event in self.builder_events(name):
            if event.message.startswith("connected to ") and event.time >= after:
                return event.time
        return None

    def assigned(self, build_id: str, attempt: int) -> tuple[float, str] | None:
        for event in self.runner_events():
            match = _ASSIGNED.match(event.message)
            if match and match[1] == build_id and int(match[2]) == attempt:
                return event.time, match[3]
        return None

    async def wait_until(self, what: str, check: Callable[[], Any]) -> Any:
        """Poll ``check()`` (logs) until it returns something truthy (callers bound it)."""
        while not (value := check()):
            await trio.sleep(POLL)
        print(f"{time.time():.3f} {what}: {value}")
        return value

    # -- builds -----------------------------------------------------------------------------

    async def submit(self, builds: list[dict[str, Any]]) -> dict[str, str]:
        """Submit a graph (``name``, ``command``, ``after``); returns name -> id."""
        response = await self.real.client.post(f"{self.real.url}/builds", json={"builds": builds})
        assert response.status_code == 201, response.text
        ids: dict[str, str] = response.json()["ids"]
        return ids

    async def wait_phase(
        self, build_id: str, phase: str, progress: Callable[[], int] | None = None
    ) -> dict[str, Any]:
        """Wait until the build is in ``phase`` and ``progress()`` (bytes moved) reached
        PHASE_BYTES; returns the build."""
        with trio.fail_after(60):
            build = await self.real.wait_build(
                build_id, f"in phase {phase}", lambda b: b["phase"] == phase
            )
            while progress is not None and progress() < PHASE_BYTES:
                await trio.sleep(0.005)
        return build

    def upload_bytes(self) -> int:
        """Bytes received so far by the runner's uploads in progress."""
        return max((f.stat().st_size for f in _files(self.state / "blobs" / "tmp")), default=0)

    def fetch_bytes(self, name: str) -> int:
        """Bytes fetched so far by builder ``name``'s fetches in progress."""
        return max(
            (f.stat().st_size for f in _files(self.work_dir(name) / "cache" / "tmp")), default=0
        )


#: A fetch or upload counts as under way once this much has crossed the link.
PHASE_BYTES = 2 * 1024 * 1024
#: The size of the big outputs (inputs of the fetch scenarios): at RATE a transfer takes
#: about 4 s, long enough to be hit in the middle.
BIG = 16 * 1024 * 1024
RATE = 4 * 1024 * 1024


def _files(directory: Path) -> list[Path]:
    try:
        return [p for p in directory.iterdir() if p.is_file()]
    except FileNotFoundError:
        return []


def marked(script: str) -> list[str]:
    """A build command: ``script``, then the build's id and attempt into ``$OUT/id`` (so the
    committed output says which attempt's result was committed)."""
    mark = 'echo "$HYDRA_TRIO_BUILD_ID $HYDRA_TRIO_ATTEMPT" > "$OUT/id"'
    return ["sh", "-c", f"{script}\n{mark}" if script else mark]


@contextlib.asynccontextmanager
async def chaos_farm(tmp_path: Path, backend: str) -> AsyncIterator[ChaosFarm]:
    """Daemons and links; all stopped and deleted when the block exits, however it exits."""
    runner_port, http_port = free_port(), free_port()
    network: NetnsNetwork | ProxyNetwork | None = None
    try:
        async with real_farm(tmp_path) as farm:
            farm.url = f"http://127.0.0.1:{http_port}"
            farm.builder_port = runner_port
            if backend == "netns":
                network = NetnsNetwork(runner_port, spawn=_unset, subnet=free_subnet())
            else:
                network = ProxyNetwork(runner_port, farm.nursery, tmp_path, stop_process)
            chaos = ChaosFarm(
                real=farm,
                network=network,
                tmp_path=tmp_path,
                runner_port=runner_port,
                http_port=http_port,
            )
            if isinstance(network, NetnsNetwork):
                network.spawn = chaos.spawn
            yield chaos
    finally:
        if network is not None:
            await network.close()


async def _unset(name: str, argv: list[str]) -> Daemon:
    raise AssertionError("spawn is set once the farm exists")


# ---------------------------------------------------------------------------------------------
# Invariants.


@attrs.define
class Tally:
    """What a scenario's end state says about its builds."""

    #: builds that did not end succeeded (must be 0).
    lost: int = 0
    #: builds with a result committed twice by one runner, or whose committed output is not
    #: their last attempt's (must be 0).
    double_committed: int = 0
    #: builds committed by a runner that was then killed before it made the commit durable,
    #: and committed again after the restart (each runner committed once).
    recommitted_after_restart: int = 0
    #: frames the runner refused as not current (fencing at work).
    stale_rejected: int = 0
    attempts: dict[str, int] = attrs.field(factory=dict)


async def get_json(chaos: ChaosFarm, path: str) -> Any:
    response = await chaos.real.client.get(f"{chaos.real.url}{path}")
    response.raise_for_status()
    return response.json()


async def check_invariants(
    chaos: ChaosFarm,
    ids: list[str],
    *,
    orphaned: tuple[str, ...] = (),
) -> Tally:
    """Wait for ``ids`` to finish, then check (and return the tally of):

    - every build succeeded, and its committed ``id`` output names its last attempt;
    - no runner generation committed a build twice;
    - every builder is connected with no job, the queue is empty, no partial upload is left
      in the state dir, every blob's content matches its name;
    - no build directory or partial fetch is left in a builder's work dir (but in
      ``orphaned`` ones': a builder killed with -9 cannot clean up after its build);
    - no slot leaked: as many 2 s builds as there are slots all run at once.
    """
    tally = Tally()
    with trio.fail_after(120):
        for build_id in ids:
            await chaos.real.wait_build(build_id, "finished", lambda b: b["finishedAt"] is not None)
    for build_id in ids:
        build = await chaos.real.build(build_id)
        tally.attempts[build_id] = build["attempts"]
        if (build["state"], build["status"]) != ("succeeded", "success"):
            print(f"LOST: {build}")
            tally.lost += 1
            continue
        response = await chaos.real.client.get(f"{chaos.real.url}/builds/{build_id}/outputs/id")
        if response.content.decode().split() != [build_id, str(build["attempts"])]:
            print(f"committed output of {build_id} is {response.content!r}, build {build}")
            tally.double_committed += 1
    per_runner: Counter[tuple[int, str]] = Counter()
    for generation, runner in enumerate(chaos.runners):
        for event in events(runner):
            match = _FINISHED.match(event.message)
            if match:
                per_runner[generation, match[1]] += 1
    committed_by: Counter[str] = Counter()
    for (_, build_id), count in per_runner.items():
        committed_by[build_id] += 1
        if count > 1 and build_id in ids:
            print(f"build {build_id} committed {count} times by one runner")
            tally.double_committed += 1
    tally.recommitted_after_restart = sum(1 for b in ids if committed_by[b] > 1)

    status = await chaos.real.status()
    tally.stale_rejected = status["counters"]["staleResultsRejected"]
    assert status["queue"]["running"] == status["queue"]["queued"] == 0, status["queue"]
    live = list(chaos.builders)
    await chaos.wait_connected(*live)
    for machine in await chaos.machines():
        assert machine["currentJobs"] == 0, machine
    assert not list((chaos.state / "blobs" / "tmp").glob("upload-*")), "a partial upload leaked"
    for blob in (chaos.state / "blobs").glob("??/*"):
        digest = await trio.to_thread.run_sync(_sha256, blob)
        assert digest == blob.name, f"{blob} holds other content"
    for name, data in await trio.to_thread.run_sync(packed_blobs, chaos.state / "blobs"):
        assert hashlib.sha256(data).hexdigest() == name, f"packed {name} holds other content"
    for name in (n for n in live if n not in orphaned):
        with trio.move_on_after(10):  # a build directory is removed just after its result
            while _leftovers(chaos.work_dir(name)):
                await trio.sleep(POLL)
        assert not (leftovers := _leftovers(chaos.work_dir(name))), f"{name} left {leftovers}"
    await slot_probe(chaos, live)
    return tally


def packed_blobs(blobs: Path) -> list[tuple[str, bytes]]:
    """(sha256, content) of each blob a published index file of the blob store ``blobs``
    names (``hydra_trio.runner.packs``), as the index places it: ``size`` bytes at
    ``offset`` of its pack.  Unpublished index files (``.*.idx``) name nothing."""
    found = []
    for index in (blobs / "packs").glob("*.idx"):
        if index.name.startswith("."):
            continue
        for line in index.read_text().splitlines():
            sha256, pack, offset, size = line.split()
            with (blobs / "packs" / pack).open("rb") as f:
                f.seek(int(offset))
                found.append((sha256, f.read(int(size))))
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _leftovers(work_dir: Path) -> list[str]:
    # spares are emptied build directories kept for reuse (executor._recycle), not leftovers
    found = [p.name for p in _dirs_and_files(work_dir / "builds")]
    found = [name for name in found if not name.startswith(".spare-")]
    return found + [f"cache/tmp/{p.name}" for p in _dirs_and_files(work_dir / "cache" / "tmp")]


def _dirs_and_files(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except FileNotFoundError:
        return []


async def slot_probe(chaos: ChaosFarm, names: list[str]) -> None:
    """As many 2 s builds as ``names`` have slots: all must run at the same time."""
    slots = sum(chaos.max_jobs[n] for n in names)
    ids = await chaos.submit(
        [{"name": f"probe-{i}", "command": marked("sleep 2")} for i in range(slots)]
    )

    async def running() -> int:
        listing = await get_json(chaos, "/builds?state=running&limit=500")
        return sum(1 for b in listing["builds"] if b["id"] in ids.values())

    with trio.fail_after(15):
        await chaos.real.wait_for(
            f"{slots} probe builds running at once", lambda n: n == slots, running
        )
    with trio.fail_after(30):
        for build_id in ids.values():
            build = await chaos.real.wait_build(
                build_id, "finished", lambda b: b["finishedAt"] is not None
            )
            assert build["status"] == "success", build


def check_database(state: Path, expected: dict[str, dict[str, Any]]) -> None:
    """Once the runner has stopped: each build in ``expected`` (id -> its API JSON) has the
    same state and outputs in the database."""
    with contextlib.closing(
        sqlite3.connect(f"file:{state / 'queue.sqlite'}?mode=ro", uri=True)
    ) as db:
        rows = {
            row[0]: row[1:]
            for row in db.execute("SELECT id, state, status, attempts, outputs FROM builds")
        }
    for build_id, build in expected.items():
        assert build_id in rows, f"{build_id} is not in the database"
        state_, status, attempts, outputs = rows[build_id]
        assert (state_, status, attempts) == (build["state"], build["status"], build["attempts"])
        for output in build["outputs"]:
            assert output["sha256"] in outputs, (build_id, output)
