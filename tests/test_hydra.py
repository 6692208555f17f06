"""Hydra mode: hydra-trio as the queue runner of a Hydra database.

The database is a throwaway PostgreSQL (``tests/helpers/pg.py``) with the part of Hydra's schema
the runner uses (``tests/hydra_schema.sql``, checked here against Hydra's full schema when
it is at hand).  The writes are tested on their own against it; the end-to-end tests add a
real runner and Nix builders with chroot stores (as ``tests/test_nix.py``), insert a
project, a jobset and builds as Hydra's evaluator does, ``NOTIFY builds_added``, and read
back what Hydra's web UI and hydra-notify would."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import psutil
import psycopg
import pytest
import trio

from hydra_trio.builder.daemon import BuilderConfig, run_builder
from hydra_trio.hydra import codes, nixsupport
from hydra_trio.hydra.config import HydraConfig
from hydra_trio.hydra.db import HydraDB, QueuedBuild, StepRow, Success
from hydra_trio.hydra.queue import gc_roots_dir
from hydra_trio.nixstore import NixError, NixStore
from hydra_trio.protocol.messages import BuildStatus, Phase
from hydra_trio.runner.daemon import RunnerAddresses, RunnerConfig, make_farm, serve_runner
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.model import MachineState
from hydra_trio.system import default_system

from .helpers.pg import Cluster

SCHEMA = Path(__file__).with_name("hydra_schema.sql")
#: Hydra's full schema (sql/hydra.sql), where the project's reference copy is.
FULL_SCHEMA = Path(__file__).parents[3] / "shared" / "reference" / "hydra.sql"
SYSTEM = default_system()
LIMIT = 90.0


def _why_nix_cannot_build() -> str | None:
    """None where Nix builds a trivial derivation in a chroot store here, else why not."""
    if shutil.which("nix-store") is None or shutil.which("nix-instantiate") is None:
        return "Nix is not installed (apt-get install nix-bin): skipped the Hydra-mode builds"
    with tempfile.TemporaryDirectory(prefix="hydra-trio-nix-check-") as root:
        try:
            trio.run(NixStore(Path(root) / "store").check_can_build)
        except NixError as exc:
            return f"Nix cannot build here, skipped the Hydra-mode builds: {exc}"
    return None


_NO_NIX = _why_nix_cannot_build()
needs_nix = pytest.mark.skipif(_NO_NIX is not None, reason=str(_NO_NIX))


# -- the schema -------------------------------------------------------------------------------


def _statements(text: str) -> dict[str, str]:
    """``create ...`` statements by their first line, whitespace normalised."""
    text = re.sub(r"--[^\n]*", "", text)
    found = {}
    for statement in text.split(";"):
        words = " ".join(statement.split())
        if words.lower().startswith("create"):
            found[" ".join(words.split()[:3]).lower()] = words
    return found


def test_the_schema_is_hydras_own() -> None:
    """Every statement of tests/hydra_schema.sql is, word for word, one of Hydra's schema."""
    if not FULL_SCHEMA.exists():
        pytest.skip(f"{FULL_SCHEMA} is not here to compare with")
    ours = _statements(SCHEMA.read_text())
    full = _statements(FULL_SCHEMA.read_text())
    assert len(ours) >= 12
    for key, statement in ours.items():
        assert full.get(key) == statement, key


@pytest.fixture
def hydra_url(pg_cluster: Cluster | None) -> str:
    if pg_cluster is None:
        pytest.skip("PostgreSQL is not installed: skipped the Hydra-mode tests")
    url = pg_cluster.new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA.read_text())
        conn.execute("INSERT INTO schemaversion VALUES (87)")
    return url


def sql(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(query, args)
        return cur.fetchall() if cur.description else []


def make_jobset(url: str) -> int:
    """A user, project and jobset as Hydra's web UI creates them; the jobset's id."""
    sql(url, "INSERT INTO users (username, emailaddress, password) VALUES ('alice', 'a@x', '')")
    sql(url, "INSERT INTO projects (name, displayname, owner) VALUES ('p', 'P', 'alice')")
    rows = sql(
        url,
        "INSERT INTO jobsets (name, project, emailoverride, nixexprinput, nixexprpath)"
        " VALUES ('j', 'p', '', 'src', 'release.nix') RETURNING id",
    )
    return int(rows[0][0])


def queue_build(
    url: str, jobset: int, job: str, drv: str, outputs: dict[str, str], *, notify: bool = True
) -> int:
    """A build as hydra-eval-jobset inserts it (with its buildoutputs), then builds_added."""
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO builds (finished, timestamp, jobset_id, job, nixname, drvpath, system,"
            " maxsilent, timeout, priority, iscurrent, ischannel)"
            " VALUES (0, %s, %s, %s, %s, %s, %s, NULL, NULL, 100, 1, 0) RETURNING id",
            (int(time.time()), jobset, job, job, drv, SYSTEM),
        )
        row = cur.fetchone()
        assert row is not None
        build_id = int(row[0])
        for name, path in outputs.items():
            cur.execute(
                "INSERT INTO buildoutputs (build, name, path) VALUES (%s, %s, %s)",
                (build_id, name, path),
            )
        if notify:
            cur.execute("SELECT pg_notify('builds_added', %s)", (str(build_id),))
    return build_id


# -- the writes, against PostgreSQL (no Nix needed) --------------------------------------------


def _queued(url: str, jobset: int, drv: str) -> QueuedBuild:
    build_id = queue_build(url, jobset, "job", drv, {"out": drv.removesuffix(".drv")}, notify=False)
    db = HydraDB(url)
    try:
        return next(b for b in db.unfinished() if b.id == build_id)
    finally:
        db.close()


def test_a_step_row_goes_through_hydras_busy_codes(hydra_url: str) -> None:
    """A dispatched step's row: busy 1 with stepnr 1, then a phase, then final with status and
    stop time, and step_started, build_started, step_finished in that order."""
    jobset = make_jobset(hydra_url)
    build = _queued(hydra_url, jobset, "/nix/store/aaaa-x.drv")
    db = HydraDB(hydra_url)
    with psycopg.connect(hydra_url, autocommit=True) as listen:
        for channel in ("step_started", "build_started", "step_finished"):
            listen.execute(f"LISTEN {channel}")
        row = StepRow(
            build=build.id, drv=build.drv, system=SYSTEM, machine="one",
            outputs=(("out", "/nix/store/aaaa-x"),),
        )  # fmt: skip
        stepnr = db.start_step(row, 1000)
        assert stepnr == 1
        assert sql(hydra_url, "SELECT busy, status, starttime, stoptime FROM buildsteps") == [
            (1, None, 1000, None)
        ]
        db.set_busy(build.id, stepnr, codes.busy_of(Phase.BUILDING))
        assert sql(hydra_url, "SELECT busy FROM buildsteps") == [(30,)]
        db.finish_step(build.id, stepnr, codes.HydraStatus.FAILED, "exit 3", 1010, "/l", "one")
        assert sql(
            hydra_url, "SELECT busy, status, errormsg, stoptime, machine, system FROM buildsteps"
        ) == [(0, 1, "exit 3", 1010, "one", SYSTEM)]
        assert sql(hydra_url, "SELECT name, path FROM buildstepoutputs") == [
            ("out", "/nix/store/aaaa-x")
        ]
        got = [(n.channel, n.payload) for n in listen.notifies(timeout=1, stop_after=3)]
    assert got == [
        ("step_started", f"{build.id}\t1"),
        ("build_started", str(build.id)),
        ("step_finished", f"{build.id}\t1\t/l"),
    ]
    assert db.start_step(row, 1020) == 2
    db.close()


def test_clear_busy_aborts_what_a_dead_runner_left(hydra_url: str) -> None:
    """Rows left busy are aborted at start: busy 0, status 3, a stop time."""
    jobset = make_jobset(hydra_url)
    build = _queued(hydra_url, jobset, "/nix/store/aaaa-x.drv")
    db = HydraDB(hydra_url)
    db.start_step(StepRow(build=build.id, drv=build.drv, system=SYSTEM, machine="m", outputs=()), 5)
    assert db.clear_busy(7) == 1
    assert sql(hydra_url, "SELECT busy, status, stoptime FROM buildsteps") == [(0, 3, 7)]
    assert db.clear_busy(8) == 0
    db.close()


def test_a_failure_propagates_to_every_build_needing_the_step(hydra_url: str) -> None:
    """The attributed build keeps its real row and gets status 1; a build needing the failed
    step gets a propagated row and status 2; one build_finished names them all."""
    jobset = make_jobset(hydra_url)
    top = _queued(hydra_url, jobset, "/nix/store/aaaa-broken.drv")
    dependent = _queued(hydra_url, jobset, "/nix/store/bbbb-after.drv")
    db = HydraDB(hydra_url)
    row = StepRow(build=top.id, drv=top.drv, system=SYSTEM, machine="one", outputs=())
    stepnr = db.start_step(row, 100)
    db.finish_step(top.id, stepnr, codes.HydraStatus.FAILED, "x", 110, "/l", "one")
    with psycopg.connect(hydra_url, autocommit=True) as listen:
        listen.execute("LISTEN build_finished")
        failed = db.fail_builds(
            top.id, row, [(top.id, True), (dependent.id, False)], codes.HydraStatus.FAILED,
            "x", 100, 110,
        )  # fmt: skip
        got = [n.payload for n in listen.notifies(timeout=1, stop_after=1)]
    assert failed == [top.id, dependent.id]
    assert got == [f"{top.id}\t{top.id}\t{dependent.id}"]
    assert sql(
        hydra_url,
        "SELECT id, finished, buildstatus, starttime, stoptime, iscachedbuild,"
        " notificationpendingsince FROM builds ORDER BY id",
    ) == [(top.id, 1, 1, 100, 110, 0, 110), (dependent.id, 1, 2, 100, 110, 0, 110)]
    assert sql(
        hydra_url,
        "SELECT build, stepnr, busy, status, propagatedfrom, starttime FROM buildsteps"
        " ORDER BY build, stepnr",
    ) == [(top.id, 1, 0, 1, None, 100), (dependent.id, 1, 0, 1, top.id, None)]
    db.close()


def test_a_success_writes_outputs_products_and_metrics(hydra_url: str) -> None:
    """The success transaction: status, times, sizes, buildoutputs.path, products, metrics
    (with the build's project, jobset, job and timestamp), notificationpendingsince."""
    jobset = make_jobset(hydra_url)
    build = _queued(hydra_url, jobset, "/nix/store/aaaa-x.drv")
    facts = nixsupport.OutputFacts(
        products=(
            nixsupport.Product(type="nix-build", subtype="", path="/nix/store/cccc-x", name="x"),
        ),
        metrics=(nixsupport.Metric(name="time", value=1.5, unit="s"),),
        release_name="x-1.0",
    )
    result = Success(
        start=10, stop=20, size=100, closure_size=300,
        outputs=(("out", "/nix/store/cccc-x"),), facts=facts,
    )  # fmt: skip
    db = HydraDB(hydra_url)
    assert db.succeed_builds([(build, False)], result, notify_inside=False) == [build.id]
    assert db.succeed_builds([(build, False)], result, notify_inside=False) == []
    assert sql(
        hydra_url,
        "SELECT finished, buildstatus, starttime, stoptime, size, closuresize, releasename,"
        " iscachedbuild, notificationpendingsince FROM builds",
    ) == [(1, 0, 10, 20, 100, 300, "x-1.0", 0, 20)]
    assert sql(hydra_url, "SELECT name, path FROM buildoutputs") == [("out", "/nix/store/cccc-x")]
    assert sql(
        hydra_url,
        "SELECT productnr, type, subtype, filesize, sha256hash, path, name, defaultpath"
        " FROM buildproducts",
    ) == [(1, "nix-build", "", None, None, "/nix/store/cccc-x", "x", "")]
    assert sql(
        hydra_url, "SELECT name, unit, value, project, jobset, job, timestamp FROM buildmetrics"
    ) == [("time", "s", 1.5, "p", "j", "job", build.timestamp)]
    db.close()


def test_nix_support_files_are_read_as_hydra_reads_them(tmp_path: Path) -> None:
    """hydra-build-products (a file with size and hash, the output itself, a missing path
    skipped), hydra-metrics (last one wins, bad unit dropped), release name, failed."""
    out = "/nix/store/0000-pkg-1.0"
    disk = tmp_path / out.lstrip("/")
    (disk / "nix-support").mkdir(parents=True)
    (disk / "doc.pdf").write_bytes(b"pdf")
    (disk / "nix-support" / "hydra-build-products").write_text(
        f'doc pdf {out}/doc.pdf\nfile source-dist "{out}" index.html\n'
        f"file missing {out}/nope\nbad line\nfile x /etc/passwd\n"
    )
    (disk / "nix-support" / "hydra-metrics").write_text("size 10 B\nsize 12 B\ntime 3 s/$$\n")
    (disk / "nix-support" / "hydra-release-name").write_text("pkg-1.0\n")
    (disk / "nix-support" / "failed").write_text("")
    facts = nixsupport.read_outputs([("out", out)], lambda p: tmp_path / p.lstrip("/"))
    assert facts.products == (
        nixsupport.Product(
            type="doc", subtype="pdf", path=f"{out}/doc.pdf", name="doc.pdf", file_size=3,
            sha256=hashlib.sha256(b"pdf").hexdigest(),
        ),
        nixsupport.Product(
            type="file", subtype="source-dist", path=out, name="", default_path="index.html"
        ),
    )  # fmt: skip
    assert facts.metrics == (
        nixsupport.Metric(name="size", value=12.0, unit="B"),
        nixsupport.Metric(name="time", value=3.0, unit=None),
    )
    assert facts.release_name == "pkg-1.0"
    assert facts.failed
    plain = tmp_path / "nix/store/1111-dir"
    plain.mkdir()
    facts = nixsupport.read_outputs(
        [("out", "/nix/store/1111-dir")], lambda p: tmp_path / p.lstrip("/")
    )
    assert facts.products == (
        nixsupport.Product(type="nix-build", subtype="", path="/nix/store/1111-dir", name="dir"),
    )
    assert not facts.failed and facts.release_name is None


def test_hydras_codes() -> None:
    """Statuses map to Hydra's codes; a dependency's plain failure is 2 for its dependents,
    its timeout stays 7; logs go under build-logs/<2 chars>/<rest>."""
    assert codes.step_status(BuildStatus.BUILD_FAILED) is codes.HydraStatus.FAILED
    assert codes.step_status(BuildStatus.BUILDER_LOST) is codes.HydraStatus.ABORTED
    assert codes.step_status(BuildStatus.SILENT_TOO_LONG) is codes.HydraStatus.TIMED_OUT
    assert codes.build_status(codes.HydraStatus.FAILED, False) is codes.HydraStatus.DEP_FAILED
    assert codes.build_status(codes.HydraStatus.FAILED, True) is codes.HydraStatus.FAILED
    assert codes.build_status(codes.HydraStatus.TIMED_OUT, False) is codes.HydraStatus.TIMED_OUT
    assert codes.log_path(Path("/var/lib/hydra"), "/nix/store/abcd-foo.drv") == Path(
        "/var/lib/hydra/build-logs/ab/cd-foo.drv"
    )


# -- end to end: a runner and Nix builders on a Hydra database ---------------------------------

#: Derivations with /bin/sh as builder (no nixpkgs).  ``c`` leaves products and metrics;
#: ``x1`` and ``x2`` share the step ``s``.
GRAPH = r"""
let
  mk = name: deps: script: builtins.derivation {
    inherit name deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/bin:/usr/bin";
  };
  a = mk "a" [] "echo building a; echo A > $out";
  b = mk "b" [a] "echo B > $out; cat ${a} >> $out";
  c = mk "c" [b] ''
    mkdir -p $out/nix-support; cat ${b} > $out/result; echo 'a report' > $out/report.txt
    echo "file report $out/report.txt" > $out/nix-support/hydra-build-products
    echo "lines 3 count" > $out/nix-support/hydra-metrics
    echo building c
  '';
  broken = mk "broken" [a] "echo this one fails; exit 3";
  after-broken = mk "after-broken" [broken] "echo > $out";
  s = mk "s" [] "echo building s @MARKER@; sleep 1; echo S > $out";
  x1 = mk "x1" [s] "cat ${s} > $out; echo 1 >> $out";
  x2 = mk "x2" [s] "cat ${s} > $out; echo 2 >> $out";
  sleeper = mk "sleeper" [] "echo sleeping @MARKER@; sleep 120; echo > $out";
  slow = mk "slow" [] "echo slow @MARKER@; sleep 4; echo > $out";
in { inherit a b c broken after-broken s x1 x2 sleeper slow; }
"""
NAMES = ("a", "b", "c", "broken", "after-broken", "s", "x1", "x2", "sleeper", "slow")


def _nix_env() -> dict[str, str]:
    return {**os.environ, "NIX_REMOTE": "local"}


def marker(tmp_path: Path) -> str:
    return f"hydra-marker-{os.getpid()}-{tmp_path.name}"


def processes_with(word: str) -> list[int]:
    """Pids of the processes whose command line holds ``word``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(word in arg for arg in process.info["cmdline"] or ()):
            found.append(process.pid)
    return found


@attrs.frozen
class Drv:
    path: str
    outputs: dict[str, str]


def instantiate(tmp_path: Path, store: Path) -> dict[str, Drv]:
    source = tmp_path / "release.nix"
    source.write_text(GRAPH.replace("@MARKER@", marker(tmp_path)))
    found = {}
    for name in NAMES:
        drv = subprocess.run(
            ["nix-instantiate", "--store", str(store), str(source), "-A", name],
            env=_nix_env(), capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        outs = subprocess.run(
            ["nix-store", "--store", str(store), "--query", "--outputs", drv],
            env=_nix_env(), capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        found[name] = Drv(path=drv, outputs={"out": outs[0]})
    return found


@attrs.define
class Notifications:
    """Everything notified on hydra-notify's channels, in order."""

    url: str
    seen: list[tuple[str, str]] = attrs.field(factory=list)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        conn = await trio.to_thread.run_sync(
            functools.partial(psycopg.connect, self.url, autocommit=True)
        )
        try:
            for channel in ("build_started", "build_finished", "step_started", "step_finished"):
                await trio.to_thread.run_sync(conn.execute, f"LISTEN {channel}")
            task_status.started()
            while True:
                got = await trio.to_thread.run_sync(
                    lambda: [(n.channel, n.payload) for n in conn.notifies(timeout=0.2)]
                )
                self.seen.extend(got)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(conn.close)

    def of(self, build_id: int) -> list[tuple[str, str]]:
        return [(c, p) for c, p in self.seen if p.split("\t")[0] == str(build_id)]


@attrs.define
class HydraSetup:
    url: str
    data: Path
    store: Path
    jobset: int
    drvs: dict[str, Drv]
    notes: Notifications
    farm: Farm | None = None
    http: str = ""

    def queue(self, name: str, *, job: str | None = None) -> int:
        drv = self.drvs[name]
        return queue_build(self.url, self.jobset, job or name, drv.path, drv.outputs)

    async def finished(self, build_id: int) -> tuple[Any, ...]:
        """(buildstatus, iscachedbuild, starttime, stoptime) once the build is finished."""
        with trio.fail_after(LIMIT):
            while True:
                rows = await trio.to_thread.run_sync(
                    sql,
                    self.url,
                    "SELECT finished, buildstatus, iscachedbuild, starttime, stoptime"
                    " FROM builds WHERE id = %s",
                    build_id,
                )
                if rows and rows[0][0] == 1:
                    return tuple(rows[0][1:])
                await trio.sleep(0.05)

    async def steps(self, build_id: int) -> list[tuple[Any, ...]]:
        return await trio.to_thread.run_sync(
            sql,
            self.url,
            "SELECT stepnr, type, drvpath, busy, status, starttime, stoptime, machine, system,"
            " propagatedfrom FROM buildsteps WHERE build = %s ORDER BY stepnr",
            build_id,
        )

    async def busy_step(self, build_id: int) -> tuple[Any, ...]:
        """The step row of a build once it is busy building."""
        with trio.fail_after(LIMIT):
            while True:
                rows = [r for r in await self.steps(build_id) if r[3] == codes.Busy.BUILDING]
                if rows:
                    return rows[0]
                await trio.sleep(0.05)

    async def notified(self, build_id: int, channel: str) -> None:
        with trio.fail_after(LIMIT):
            while (channel, str(build_id)) not in [
                (c, p.split("\t")[0]) for c, p in self.notes.seen
            ]:
                await trio.sleep(0.05)


async def start_builders(nursery: trio.Nursery, server: Any, tmp_path: Path) -> None:
    for name in ("one", "two"):
        config = BuilderConfig(
            server=server,
            systems=(SYSTEM,),
            hostname=name,
            work_dir=tmp_path / f"builder-{name}",
            executors=("nix",),
            nix_store=tmp_path / f"store-{name}",
            ping_interval=1.0,
            reconnect_max=1.0,
            max_jobs=2,
        )
        await nursery.start(functools.partial(run_builder, config))


@pytest.fixture
async def hydra(tmp_path: Path, hydra_url: str) -> AsyncIterator[HydraSetup]:
    store = tmp_path / "runner-store"
    drvs = await trio.to_thread.run_sync(instantiate, tmp_path, store)
    jobset = make_jobset(hydra_url)
    notes = Notifications(hydra_url)
    setup = HydraSetup(
        url=hydra_url, data=tmp_path / "hydra-data", store=store, jobset=jobset, drvs=drvs,
        notes=notes,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(notes.run)
        yield setup
        nursery.cancel_scope.cancel()


@pytest.fixture
async def runner(hydra: HydraSetup, tmp_path: Path) -> AsyncIterator[HydraSetup]:
    """An in-process runner in Hydra mode with two Nix builders."""
    config = RunnerConfig(
        listen=attrs.evolve(RunnerConfig().listen, port=0),
        http=attrs.evolve(RunnerConfig().listen, port=0),
        state_dir=tmp_path / "state",
        default_system=SYSTEM,
        nix_store=hydra.store,
        hydra=HydraConfig(db=hydra.url, data=hydra.data),
    )
    farm, dispatcher = make_farm(config)
    hydra.farm = farm
    async with trio.open_nursery() as nursery:
        addresses: RunnerAddresses = await nursery.start(
            functools.partial(serve_runner, config, farm=farm, dispatcher=dispatcher)
        )
        hydra.http = addresses.http[0]
        await start_builders(nursery, addresses.builders[0], tmp_path)
        with trio.fail_after(LIMIT):
            while sum(m.state is MachineState.CONNECTED for m in farm.machines.values()) < 2:
                await trio.sleep(0.01)
        yield hydra
        nursery.cancel_scope.cancel()


@pytest.mark.realnet
@pytest.mark.linux  # chroot stores (--store DIR) build in Linux namespaces only
@needs_nix
async def test_hydra_builds_its_queue(runner: HydraSetup) -> None:
    """Builds inserted as Hydra's evaluator does and announced with builds_added are built:
    a chain succeeds (status 0, outputs valid, products, metrics, log where the web UI
    looks), a failure is 1 and its dependent 2, each with its step rows, and hydra-notify
    gets build_finished for every build."""
    h = runner
    c = h.queue("c")
    broken = h.queue("broken")
    after = h.queue("after-broken")
    assert (await h.finished(c))[:2] == (0, 0)
    assert (await h.finished(broken))[:2] == (1, 0)
    assert (await h.finished(after))[:2] == (2, 0)

    # the chain: one real step row per derivation, attributed to c, all succeeded
    steps = await h.steps(c)
    assert [(r[1], r[2], r[3], r[4]) for r in steps] == [
        (0, h.drvs[n].path, 0, 0) for n in ("a", "b", "c")
    ]
    for _, _, _, _, _, start, stop, machine, system, propagated in steps:
        assert 0 < start <= stop and machine in ("one", "two") and system == SYSTEM
        assert propagated is None
    out = h.drvs["c"].outputs["out"]
    assert await NixStore(h.store).is_valid(out)
    roots = gc_roots_dir(NixStore(h.store))
    for name in ("a", "b", "c"):  # GC roots where Hydra's runner keeps them
        path = h.drvs[name].outputs["out"]
        assert os.readlink(roots / path.rsplit("/", 1)[-1]) == path
    row = await trio.to_thread.run_sync(
        sql, h.url, "SELECT starttime, stoptime, size, closuresize FROM builds WHERE id = %s", c
    )
    assert row[0][0] == steps[-1][5] and row[0][1] == steps[-1][6]
    assert 0 < row[0][2] <= row[0][3]
    assert await trio.to_thread.run_sync(
        sql, h.url, "SELECT path FROM buildoutputs WHERE build = %s", c
    ) == [(out,)]
    products = await trio.to_thread.run_sync(
        sql,
        h.url,
        "SELECT type, subtype, path, name, filesize FROM buildproducts WHERE build = %s",
        c,
    )
    assert products == [("file", "report", f"{out}/report.txt", "report.txt", 9)]
    metrics = await trio.to_thread.run_sync(
        sql, h.url, "SELECT name, value, unit, project, jobset, job FROM buildmetrics"
    )
    assert metrics == [("lines", 3.0, "count", "p", "j", "c")]
    # the log of each step where the web UI reads it
    log_c = codes.log_path(h.data, h.drvs["c"].path)
    assert "building c" in log_c.read_text()
    assert "building a" in codes.log_path(h.data, h.drvs["a"].path).read_text()

    # the failure: broken's real row (status 1), after-broken's propagated row
    steps = await h.steps(broken)
    assert [(r[2], r[3], r[4], r[9]) for r in steps] == [(h.drvs["broken"].path, 0, 1, None)]
    assert "this one fails" in codes.log_path(h.data, h.drvs["broken"].path).read_text()
    steps = await h.steps(after)
    assert [(r[2], r[3], r[4], r[9]) for r in steps] == [(h.drvs["broken"].path, 0, 1, broken)]

    # notifications, per build, in Hydra's order
    await h.notified(broken, "build_finished")
    await h.notified(c, "build_finished")
    seen = h.notes.of(c)
    assert seen[0] == ("step_started", f"{c}\t1")
    assert ("build_started", str(c)) in seen
    assert ("step_finished", f"{c}\t3\t{log_c}") in seen
    assert seen[-1] == ("build_finished", str(c))
    assert ("build_finished", f"{broken}\t{broken}\t{after}") in h.notes.seen


@pytest.mark.realnet
@pytest.mark.linux  # chroot stores (--store DIR) build in Linux namespaces only
@needs_nix
async def test_cached_and_shared_steps(runner: HydraSetup) -> None:
    """A build whose outputs are valid finishes at once as cached, with no step; two builds
    needing the same derivation share one step, built once."""
    h = runner
    a = h.queue("a")
    assert (await h.finished(a))[:2] == (0, 0)
    again = h.queue("a", job="a-again")
    status, cached, start, stop = await h.finished(again)
    assert (status, cached) == (0, 1) and start == stop > 0
    assert await h.steps(again) == []
    await h.notified(again, "build_finished")
    assert [c for c, _ in h.notes.of(again)] == ["build_finished"]

    x1 = h.queue("x1")
    x2 = h.queue("x2")
    assert (await h.finished(x1))[0] == 0
    assert (await h.finished(x2))[0] == 0
    s = h.drvs["s"].path
    rows = await trio.to_thread.run_sync(
        sql, h.url, "SELECT build, status FROM buildsteps WHERE drvpath = %s", s
    )
    assert rows == [(x1, 0)]  # built once, attributed to the lower id
    assert h.farm is not None
    assert sum(b.spec.drv == s for b in h.farm.builds.values()) == 1


@pytest.mark.realnet
@pytest.mark.linux  # chroot stores (--store DIR) build in Linux namespaces only
@needs_nix
async def test_cancel_and_restart_take_effect(runner: HydraSetup, tmp_path: Path) -> None:
    """Cancelling a running build in the web UI aborts its step on the builder (step status
    4); restarting a failed build builds it again under a new step number."""
    h = runner
    sleeper = h.queue("sleeper")
    await h.busy_step(sleeper)
    with trio.fail_after(LIMIT):
        while not processes_with(marker(tmp_path)):
            await trio.sleep(0.05)
    async with httpx.AsyncClient(base_url=h.http) as http:
        machines = (await http.get("/status/machines")).json()
        builds = (await http.get("/status/builds")).json()
        steps = (await http.get("/status/steps")).json()
        active = (await http.get(f"/status/build/{sleeper}/active")).json()
    assert machines["machinesCount"] == 2 and set(machines["machines"]) == {"one", "two"}
    running = [m for m in machines["machines"].values() if m["jobs"]]
    assert [m["jobs"] for m in running] == [[h.drvs["sleeper"].path]]
    assert running[0]["connected"] and running[0]["stats"]["currentJobs"] == 1
    assert [(b["id"], b["drvPath"]) for b in builds["builds"]] == [
        (sleeper, h.drvs["sleeper"].path)
    ]
    assert [(s["drvPath"], s["lowestBuildId"]) for s in steps["steps"]] == [
        (h.drvs["sleeper"].path, sleeper)
    ]
    assert active == {"active": True}
    now = int(time.time())
    # what the web UI's cancel does (Hydra::Helper::Nix::cancelBuilds); the trigger notifies
    await trio.to_thread.run_sync(
        sql,
        h.url,
        "UPDATE builds SET finished = 1, buildstatus = 4, iscachedbuild = 0, starttime = %s,"
        " stoptime = %s WHERE id = %s AND finished = 0",
        now, now, sleeper,
    )  # fmt: skip
    with trio.fail_after(LIMIT):
        while (await h.steps(sleeper))[-1][3] != 0:
            await trio.sleep(0.05)
        while processes_with(f"sleeping {marker(tmp_path)}"):
            await trio.sleep(0.05)
    assert [(r[3], r[4]) for r in await h.steps(sleeper)] == [(0, 4)]
    async with httpx.AsyncClient(base_url=h.http) as http:
        assert (await http.get(f"/status/build/{sleeper}/active")).json() == {"active": False}

    broken = h.queue("broken")
    assert (await h.finished(broken))[0] == 1
    # the web UI's restart (restartBuilds): finished back to 0; the trigger notifies
    await trio.to_thread.run_sync(
        sql, h.url, "UPDATE builds SET finished = 0, iscachedbuild = 0 WHERE id = %s", broken
    )
    with trio.fail_after(LIMIT):
        while len(await h.steps(broken)) < 3:
            await trio.sleep(0.05)
    assert (await h.finished(broken))[0] == 1
    # a (built for it the first time), broken, and broken again under step 3
    assert [(r[0], r[2], r[4]) for r in await h.steps(broken)] == [
        (1, h.drvs["a"].path, 0),
        (2, h.drvs["broken"].path, 1),
        (3, h.drvs["broken"].path, 1),
    ]


def _runner_command(h: HydraSetup, tmp_path: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "hydra_trio", "queue-runner",
        "--listen", f"127.0.0.1:{port}", "--http", "127.0.0.1:0",
        "--state-dir", str(tmp_path / "state"), "--nix-store", str(h.store),
        "--hydra-db", h.url, "--hydra-data", str(h.data),
    ]  # fmt: skip


@pytest.mark.realnet
@pytest.mark.linux  # chroot stores (--store DIR) build in Linux namespaces only
@needs_nix
async def test_a_runner_killed_mid_build_leaves_no_busy_rows(
    hydra: HydraSetup, tmp_path: Path
) -> None:
    """kill -9 of the runner while a step is busy; the next runner aborts that row at start
    (busy 0, status 3), dispatches the step again under a new step number, and the build
    finishes."""
    from .helpers.procs import daemon_env, free_port

    h = hydra
    port = free_port()
    log = (tmp_path / "runner.log").open("ab")
    start_runner = functools.partial(
        trio.run_process,
        _runner_command(h, tmp_path, port),
        stdout=log,
        stderr=log,
        check=False,
        env=daemon_env(),
    )
    async with trio.open_nursery() as nursery:
        first = await nursery.start(start_runner)
        from hydra_trio import net

        await start_builders(nursery, net.HostPort("127.0.0.1", port), tmp_path)
        s = h.queue("s")
        row = await h.busy_step(s)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        assert [(r[0], r[3]) for r in await h.steps(s)] == [(row[0], codes.Busy.BUILDING)]
        second = await nursery.start(start_runner)
        assert (await h.finished(s))[0] == 0
        steps = await h.steps(s)
        assert (steps[0][3], steps[0][4]) == (0, 3)
        assert (steps[-1][3], steps[-1][4]) == (0, 0) and steps[-1][0] > steps[0][0]
        busy = await trio.to_thread.run_sync(sql, h.url, "SELECT 1 FROM buildsteps WHERE busy != 0")
        assert busy == []
        second.send_signal(signal.SIGINT)
        nursery.cancel_scope.cancel()
    log.close()


@pytest.mark.realnet
@pytest.mark.linux
@needs_nix
async def test_a_blackholed_builder_loses_its_step_to_another(
    hydra: HydraSetup, tmp_path: Path
) -> None:
    """A builder whose link goes silent mid-step: the runner drops it after its builder
    timeout, the step's row ends aborted (status 3) and the step is built on another builder
    under a new step number; the Hydra build succeeds."""
    from hydra_trio.hydra.queue import HydraQueue

    from .helpers.sim import Farmlet

    h = hydra
    config = RunnerConfig(
        builder_timeout=2.0,
        http=None,
        default_system=SYSTEM,
        nix_store=h.store,
        hydra=HydraConfig(db=h.url, data=h.data),
    )
    builder = functools.partial(
        BuilderConfig, systems=(SYSTEM,), ping_interval=0.5, ping_timeout=2.0, executors=("nix",)
    )
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            farmlet = Farmlet(nursery, config, tmp_path / "state")
            assert config.hydra is not None
            await nursery.start(HydraQueue(config.hydra, farmlet.farm, farmlet.storage).run)
            await farmlet.add_builder(
                "a", builder(work_dir=tmp_path / "a", nix_store=tmp_path / "store-a")
            )
            slow = h.queue("slow")
            row = await h.busy_step(slow)
            assert row[7] == "a"
            farmlet.network.current("a").blackhole()
            await farmlet.add_builder(
                "b", builder(work_dir=tmp_path / "b", nix_store=tmp_path / "store-b")
            )
            assert (await h.finished(slow))[0] == 0
            steps = await h.steps(slow)
            assert [(r[0], r[3], r[4], r[7]) for r in steps] == [(1, 0, 3, "a"), (2, 0, 0, "b")]
            assert farmlet.machine("a").lost_builds == 1
            nursery.cancel_scope.cancel()


@pytest.mark.realnet
@pytest.mark.linux
@needs_nix
async def test_a_stopping_runner_aborts_only_its_own_busy_rows(
    hydra: HydraSetup, tmp_path: Path
) -> None:
    """At its stop the runner aborts the rows it has busy (status 3, a stop time) and leaves
    a busy row it did not open alone (a hot standby's new leader may own it)."""
    h = hydra
    config = RunnerConfig(
        listen=attrs.evolve(RunnerConfig().listen, port=0),
        http=None,
        state_dir=tmp_path / "state",
        default_system=SYSTEM,
        nix_store=h.store,
        hydra=HydraConfig(db=h.url, data=h.data),
    )
    farm, dispatcher = make_farm(config)
    h.farm = farm
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            addresses: RunnerAddresses = await nursery.start(
                functools.partial(serve_runner, config, farm=farm, dispatcher=dispatcher)
            )
            await start_builders(nursery, addresses.builders[0], tmp_path)
            sleeper = h.queue("sleeper")
            await h.busy_step(sleeper)
            other = h.queue("x1", job="elsewhere")  # waits for s: no row of ours
            await trio.to_thread.run_sync(
                sql,
                h.url,
                "INSERT INTO buildsteps (build, stepnr, type, drvpath, busy, starttime, machine)"
                " VALUES (%s, 99, 0, %s, 30, 1, 'another-runner')",
                other,
                h.drvs["x1"].path,
            )
            nursery.cancel_scope.cancel()
    rows = await trio.to_thread.run_sync(
        sql, h.url, "SELECT build, busy, status, stoptime FROM buildsteps ORDER BY build, stepnr"
    )
    mine = [r for r in rows if r[0] == sleeper]
    assert [(r[1], r[2]) for r in mine] == [(0, 3)] and mine[0][3] > 0
    assert (other, 30, None, None) in rows


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hydra-db", "postgresql:///hydra"], "--hydra-db and --hydra-data go together"),
        (["--hydra-db", "mysql://x", "--hydra-data", "/tmp"], "must be a postgresql:// URL"),
    ],
)
def test_hydra_options_are_checked(args: list[str], message: str, tmp_path: Path) -> None:
    """A Hydra-mode option without its pair, or a database that is not PostgreSQL, is a
    usage error of one line."""
    done = subprocess.run(
        [sys.executable, "-m", "hydra_trio", "queue-runner", "--state-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_an_unreachable_hydra_database_is_one_line(tmp_path: Path) -> None:
    """Hydra mode with a database that cannot be reached: the runner exits 1 with one line."""
    done = subprocess.run(
        [
            sys.executable, "-m", "hydra_trio", "queue-runner", "--state-dir", str(tmp_path),
            "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
            "--hydra-db", f"postgresql://nobody@/hydra?host={tmp_path}&port=1",
            "--hydra-data", str(tmp_path / "hydra"),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "cannot connect to Hydra's database" in done.stderr
    assert "Traceback" not in done.stderr
