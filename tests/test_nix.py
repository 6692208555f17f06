"""Nix derivations built by the farm, with a real Nix: a runner and builders each with their
own chroot store (``--store DIR``), real processes and real time (no autojump: Nix runs as
child processes).  Skipped where ``nix-store`` is not installed."""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from hydra_trio import cli
from hydra_trio.builder.daemon import BuilderConfig, BuilderState, run_builder
from hydra_trio.builder.nixexec import fetch_closure
from hydra_trio.nixstore import NixError, NixStore, export_label, label_path
from hydra_trio.protocol.messages import Assign, BuildStatus, FileInfo, Phase
from hydra_trio.runner import nix
from hydra_trio.runner.blobs import BlobStore
from hydra_trio.runner.daemon import RunnerAddresses, RunnerConfig, make_farm, serve_runner
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.model import BuildState, MachineState
from hydra_trio.runner.specs import DrvRequest
from hydra_trio.system import default_system

from .helpers.sim import Farmlet


@functools.cache
def _why_nix_cannot_build() -> str | None:
    """None where Nix builds a trivial derivation in a chroot store here, else why not: the
    skip check tests that Nix can build, not only that it is on PATH."""
    if shutil.which("nix-store") is None or shutil.which("nix-instantiate") is None:
        return "Nix is not installed (apt-get install nix-bin): skipped the Nix build tests"
    with tempfile.TemporaryDirectory(prefix="hydra-trio-nix-check-") as root:
        try:
            trio.run(NixStore(Path(root) / "store").check_can_build)
        except NixError as exc:
            return f"Nix cannot build here, skipped the Nix build tests: {exc}"
    return None


pytestmark = [
    pytest.mark.realnet,
    pytest.mark.linux,  # chroot stores (--store DIR) build in Linux namespaces only
    pytest.mark.skipif(_why_nix_cannot_build() is not None, reason=str(_why_nix_cannot_build())),
]

SYSTEM = default_system()
#: Every test is bounded: a hung Nix or daemon fails the test, not the suite.
LIMIT = 60.0

#: Derivations with /bin/sh as builder (no nixpkgs).  ``b`` requires the feature ``two``, so
#: it runs on the builder offering it, and the chain crosses stores both ways.
GRAPH = r"""
let
  mk = name: deps: script: extra: builtins.derivation ({
    inherit name deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/bin:/usr/bin";
  } // extra);
  a = mk "a" [] "echo A > $out" {};
  b = mk "b" [a] "echo building b; echo B > $out; cat ${a} >> $out" {
    requiredSystemFeatures = [ "two" ];
  };
  c = mk "c" [b] "mkdir $out; cat ${b} > $out/result; echo C >> $out/result" {};
  broken = mk "broken" [a] "echo this one fails; exit 3" {};
  after-broken = mk "after-broken" [broken] "echo > $out" {};
  sleeper = mk "sleeper" [] "echo sleeping @MARKER@; sleep 60; echo > $out" {};
in { inherit a b c broken after-broken sleeper; }
"""


def _nix_env() -> dict[str, str]:
    return {**os.environ, "NIX_REMOTE": "local"}


@pytest.fixture
def runner_store(tmp_path: Path) -> Path:
    return tmp_path / "runner-store"


@pytest.fixture
def drvs(tmp_path: Path, runner_store: Path) -> dict[str, str]:
    """The graph's derivations, instantiated into the runner's store: name -> .drv path."""
    source = tmp_path / "graph.nix"
    source.write_text(GRAPH.replace("@MARKER@", marker(tmp_path)))
    found = {}
    for name in ("a", "b", "c", "broken", "after-broken", "sleeper"):
        done = subprocess.run(
            ["nix-instantiate", "--store", str(runner_store), str(source), "-A", name],
            env=_nix_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        found[name] = done.stdout.strip()
    return found


def marker(tmp_path: Path) -> str:
    """A word only this test's sleeper derivation has on its command line."""
    return f"marker-{os.getpid()}-{tmp_path.name}"


def processes_with(word: str) -> list[int]:
    """Pids of the processes whose command line holds ``word``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if word.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def store_path_file(store: Path, path: str) -> Path:
    return store / path.lstrip("/")


async def valid(store: Path, path: str) -> bool:
    return await NixStore(store).is_valid(path)


@attrs.define
class Farm2:
    """A real runner (TCP and HTTP) and two Nix builders, each with its own store."""

    farm: Farm
    http: httpx.AsyncClient
    builders: dict[str, BuilderState]

    async def submit(self, drv: str, **options: Any) -> httpx.Response:
        return await self.http.post("/builds", json={"drv": drv, **options})

    async def finished(self, build_id: str) -> dict[str, Any]:
        with trio.fail_after(LIMIT):
            while not self.farm.builds[build_id].state.finished:
                await trio.sleep(0.05)
        answer = (await self.http.get(f"/builds/{build_id}")).json()
        assert isinstance(answer, dict)
        return answer


@pytest.fixture
async def farm2(tmp_path: Path, runner_store: Path) -> AsyncIterator[Farm2]:
    config = RunnerConfig(
        listen=attrs.evolve(RunnerConfig().listen, port=0),
        http=attrs.evolve(RunnerConfig().listen, port=0),
        state_dir=tmp_path / "state",
        default_system=SYSTEM,
        nix_store=runner_store,
    )
    farm, dispatcher = make_farm(config)
    async with trio.open_nursery() as nursery:
        addresses: RunnerAddresses = await nursery.start(
            functools.partial(serve_runner, config, farm=farm, dispatcher=dispatcher)
        )
        builders = {}
        for name, features in (("one", ()), ("two", ("two",))):
            builder = BuilderConfig(
                server=addresses.builders[0],
                systems=(SYSTEM,),
                supported_features=features,
                mandatory_features=features,
                hostname=name,
                work_dir=tmp_path / f"builder-{name}",
                executors=("nix",),
                nix_store=tmp_path / f"store-{name}",
                ping_interval=1.0,
            )
            builders[name] = await nursery.start(functools.partial(run_builder, builder))
        with trio.fail_after(LIMIT):
            while sum(m.state is MachineState.CONNECTED for m in farm.machines.values()) < 2:
                await trio.sleep(0.01)
        async with httpx.AsyncClient(base_url=addresses.http[0]) as http:
            yield Farm2(farm=farm, http=http, builders=builders)
        nursery.cancel_scope.cancel()


async def test_a_chain_builds_bottom_up_across_two_stores(
    farm2: Farm2, drvs: dict[str, str], runner_store: Path, tmp_path: Path
) -> None:
    """A three-derivation chain submitted as its top .drv builds bottom-up on two builders
    with their own stores, and the top output ends up valid in the runner's store."""
    response = await farm2.submit(drvs["c"])
    assert response.status_code == 201, response.text
    answer = response.json()
    assert len(answer["ids"]) == 3
    top = await farm2.finished(answer["id"])
    assert top["state"] == "succeeded", top
    builds = {name: farm2.farm.builds[i] for name, i in answer["ids"].items()}
    by_drv = {b.spec.drv: b for b in builds.values()}
    a, b, c = (by_drv[drvs[n]] for n in ("a", "b", "c"))
    assert all(x.status is BuildStatus.SUCCESS and x.attempts == 1 for x in (a, b, c))
    # bottom-up: each step depends on the one below, and ran on the builder matching it
    assert c.spec.after == (b.id,) and b.spec.after == (a.id,) and a.spec.after == ()
    assert (a.hostname, b.hostname, c.hostname) == ("one", "two", "one")
    assert b.spec.required_features == frozenset({"two"})
    out = top["storePaths"]["out"]
    assert top["drv"] == drvs["c"]
    assert await valid(runner_store, out)
    assert store_path_file(runner_store, out).joinpath("result").read_text() == "B\nA\nC\n"
    # the builders' stores are separate: "one" built a and c, "two" only b (with a imported)
    assert await valid(tmp_path / "store-one", out)
    assert not await valid(tmp_path / "store-two", out)
    log = await farm2.http.get(f"/builds/{b.id}/log")
    assert "building b" in log.text


def _cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this worker thread; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        cli.main(list(args), standalone_mode=False)
        status = 0
    except SystemExit as exc:
        status = int(exc.code or 0)
    finally:
        sys.stdout, sys.stderr = saved
    return status, out.getvalue(), err.getvalue()


async def test_submit_drv_on_the_command_line(farm2: Farm2, drvs: dict[str, str]) -> None:
    """``submit --drv --wait`` prints the top build's id and exits 0 once it succeeded;
    ``show`` lists its store path; a second submit says there is nothing to build."""
    url = str(farm2.http.base_url)
    with trio.fail_after(LIMIT):
        status, out, _ = await trio.to_thread.run_sync(
            _cli, "submit", "--url", url, "--drv", drvs["a"], "--wait"
        )
        assert status == 0
        build_id = out.strip()
        assert farm2.farm.builds[build_id].spec.drv == drvs["a"]
        status, out, _ = await trio.to_thread.run_sync(_cli, "show", "--url", url, build_id)
        store_path = farm2.farm.builds[build_id].spec.drv_outputs[0][1]
        assert f"store path: {store_path} (out)" in out.splitlines()
        status, out, err = await trio.to_thread.run_sync(
            _cli, "submit", "--url", url, "--drv", drvs["a"]
        )
        assert (status, out) == (0, "")
        assert err.startswith("nothing to build: ")


async def test_valid_outputs_are_not_rebuilt(farm2: Farm2, drvs: dict[str, str]) -> None:
    """Derivations whose outputs are valid in the runner's store get no build: after a and b
    are built, submitting c queues c alone, and submitting c again queues nothing."""
    first = (await farm2.submit(drvs["b"])).json()
    assert len(first["ids"]) == 2
    assert (await farm2.finished(first["id"]))["state"] == "succeeded"
    second = (await farm2.submit(drvs["c"])).json()
    assert list(second["ids"]) == [drvs["c"].rsplit("/", 1)[1].removesuffix(".drv")]
    assert (await farm2.finished(second["id"]))["state"] == "succeeded"
    builds = len(farm2.farm.builds)
    again = await farm2.submit(drvs["c"])
    assert again.status_code == 200
    assert again.json()["id"] is None and again.json()["ids"] == {}
    assert len(farm2.farm.builds) == builds


async def test_a_queued_step_is_shared_not_queued_twice(farm2: Farm2, drvs: dict[str, str]) -> None:
    """A submission whose graph overlaps unfinished steps of an earlier one depends on them
    instead of queueing the same derivations again."""
    for machine_id in list(farm2.farm.machines):  # nothing runs: the steps stay queued
        farm2.farm.drain(machine_id)
    first = (await farm2.submit(drvs["b"])).json()
    second = (await farm2.submit(drvs["c"])).json()
    assert len(second["ids"]) == 1
    assert farm2.farm.builds[second["id"]].spec.after == (first["id"],)
    again = (await farm2.submit(drvs["b"])).json()
    assert (again["id"], again["ids"]) == (first["id"], {})
    assert len(farm2.farm.builds) == 3


async def test_a_failing_derivation_fails_its_dependents(
    farm2: Farm2, drvs: dict[str, str]
) -> None:
    """A derivation whose builder fails is build-failed; what depends on it is
    dependency-failed without running."""
    answer = (await farm2.submit(drvs["after-broken"])).json()
    top = await farm2.finished(answer["id"])
    assert (top["state"], top["status"]) == ("failed", "dependency-failed")
    broken = next(b for b in farm2.farm.builds.values() if b.spec.drv == drvs["broken"])
    assert broken.status is BuildStatus.BUILD_FAILED
    assert broken.attempts == 1
    assert farm2.farm.builds[answer["id"]].attempts == 0
    log = await farm2.http.get(f"/builds/{broken.id}/log")
    assert "this one fails" in log.text


async def test_a_derivation_past_its_timeout_is_timed_out(
    farm2: Farm2, drvs: dict[str, str]
) -> None:
    """A step's timeout goes to Nix, and a build that passes it ends as timed-out."""
    answer = (await farm2.submit(drvs["sleeper"], timeout=1)).json()
    top = await farm2.finished(answer["id"])
    assert (top["state"], top["status"]) == ("failed", "timed-out"), top
    assert "timed out" in top["error"]


async def test_a_silent_derivation_is_silent_too_long(farm2: Farm2, drvs: dict[str, str]) -> None:
    """A step's max-silent goes to Nix, and a build silent that long is silent-too-long."""
    answer = (await farm2.submit(drvs["sleeper"], maxSilent=1)).json()
    top = await farm2.finished(answer["id"])
    assert (top["state"], top["status"]) == ("failed", "silent-too-long"), top


async def test_cancelling_a_nix_build_stops_its_build_processes(
    farm2: Farm2, drvs: dict[str, str], tmp_path: Path
) -> None:
    """Cancelling a running Nix build interrupts nix-store, which kills the build's
    processes (they run as a build user, outside the builder's process group)."""
    word = marker(tmp_path)
    answer = (await farm2.submit(drvs["sleeper"])).json()
    with trio.fail_after(LIMIT):
        while word not in (await farm2.http.get(f"/builds/{answer['id']}/log")).text:
            await trio.sleep(0.05)
        assert await trio.to_thread.run_sync(processes_with, word)
        response = await farm2.http.post(f"/builds/{answer['id']}/cancel")
        assert response.json()["state"] == "cancelled"
        while await trio.to_thread.run_sync(processes_with, word):
            await trio.sleep(0.05)


async def test_a_builder_fetches_only_the_paths_its_store_lacks(
    tmp_path: Path, drvs: dict[str, str], runner_store: Path
) -> None:
    """Of a step's input closure, the builder fetches the export files of the store paths
    its store does not have, imports them, and then has the whole closure."""
    blobs = BlobStore(tmp_path / "blobs")
    runner = NixStore(runner_store)
    plan = await nix.plan(runner, blobs, DrvRequest(drv=drvs["c"]))
    top = plan.specs[-1]
    labels = [info.path for info in top.nix_inputs]
    assert labels == [export_label(drvs[n]) for n in ("a", "b", "c")]  # references first
    builder = NixStore(tmp_path / "builder-store")
    await builder.import_files([blobs.path_of(top.nix_inputs[0].sha256)])  # a.drv only
    fetched: list[str] = []

    async def fetch(assign: Assign, info: FileInfo) -> Path:
        fetched.append(info.path)
        return blobs.path_of(info.sha256)

    assign = Assign(
        build_id="c", attempt=1, command=top.command, drv=top.drv, store_paths=top.nix_inputs
    )
    await fetch_closure(builder, assign, fetch)
    assert fetched == labels[1:]
    assert not await builder.invalid(label_path(label) for label in labels)


async def test_bad_drv_submissions_are_refused(
    farm2: Farm2, drvs: dict[str, str], runner_store: Path, tmp_path: Path
) -> None:
    """A drv that is not a derivation's store path (a path outside the store, a plain file
    in it) or not in the runner's store is refused with one line, and nothing is queued."""
    text = tmp_path / "notes.txt"
    text.write_text("not a derivation")
    added = (
        (
            await trio.run_process(
                ["nix-store", "--store", str(runner_store), "--add", str(text)],
                env=_nix_env(),
                capture_stdout=True,
            )
        )
        .stdout.decode()
        .strip()
    )
    cases = {
        "/tmp/x.drv": "is not a derivation's store path",
        "/nix/store/00000000000000000000000000000000-missing.drv": "not in the runner's Nix store",
        added: "is not a derivation's store path",  # in the store, but a plain file
    }
    for drv, expected in cases.items():
        response = await farm2.submit(drv)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert expected in error and "\n" not in error, error
    assert farm2.farm.builds == {}


def _blocked_store(store: NixStore, importing: trio.Event) -> Callable[..., Any]:
    """A store whose ``import_files`` never returns: a Nix step stuck in its import."""

    @attrs.frozen
    class Stuck(NixStore):
        async def import_files(self, files: Any) -> None:
            importing.set()
            await trio.sleep_forever()

    return functools.partial(Stuck, store.root)


async def test_a_blackholed_builder_in_a_nix_import_loses_its_step(
    tmp_path: Path, drvs: dict[str, str], runner_store: Path
) -> None:
    """The liveness tests' blackhole case with a Nix step in its import phase: the runner
    drops the silent builder and the step is built on another builder."""
    config = RunnerConfig(
        builder_timeout=2.0, http=None, default_system=SYSTEM, nix_store=runner_store
    )
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            farmlet = Farmlet(nursery, config, tmp_path / "state")
            importing = trio.Event()
            builder = functools.partial(
                BuilderConfig,
                systems=(SYSTEM,),
                ping_interval=0.5,
                ping_timeout=2.0,
                executors=("nix",),
            )
            stuck = _blocked_store(NixStore(tmp_path / "store-a"), importing)()
            await farmlet.add_builder("a", builder(work_dir=tmp_path / "a"), nix_store=stuck)
            plan = await nix.plan(
                farmlet.storage.nix, farmlet.storage.blobs, DrvRequest(drv=drvs["a"])
            )
            index = {name: i for i, name in enumerate(plan.names)}
            [build] = farmlet.farm.submit_graph(plan.specs, trio.current_time(), index.get)
            await importing.wait()
            assert build.phase is Phase.FETCHING and build.hostname == "a"
            farmlet.network.current("a").blackhole()
            await farmlet.add_builder(
                "b", builder(work_dir=tmp_path / "b", nix_store=tmp_path / "store-b")
            )
            while not build.state.finished:
                await trio.sleep(0.05)
            assert build.state is BuildState.SUCCEEDED
            assert (build.hostname, build.attempts) == ("b", 2)
            assert farmlet.machine("a").lost_builds == 1
            assert await valid(runner_store, plan.outputs[0][1])
            nursery.cancel_scope.cancel()


def _flaky_store(root: Path, failures: list[int]) -> NixStore:
    """A real store whose next ``failures[0]`` imports fail (an import error)."""

    @attrs.frozen
    class Flaky(NixStore):
        async def import_files(self, files: Any) -> None:
            if failures[0] > 0:
                failures[0] -= 1
                raise NixError("nix-store --import: injected failure")
            await NixStore.import_files(self, files)

    return Flaky(root)


@pytest.mark.parametrize("side", ["builder", "runner"])
async def test_an_import_error_is_retried(
    tmp_path: Path, drvs: dict[str, str], runner_store: Path, side: str
) -> None:
    """An import that fails, of the inputs on the builder or of the outputs on the runner,
    is an infrastructure failure: the step is retried and then succeeds."""
    config = RunnerConfig(http=None, default_system=SYSTEM, nix_store=runner_store)
    failures = [1]
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            farmlet = Farmlet(nursery, config, tmp_path / "state")
            builder = BuilderConfig(systems=(SYSTEM,), work_dir=tmp_path / "b", executors=("nix",))
            if side == "builder":
                store = _flaky_store(tmp_path / "store-b", failures)
            else:
                store = NixStore(tmp_path / "store-b")
                farmlet.storage.nix = _flaky_store(runner_store, failures)
            await farmlet.add_builder("b", builder, nix_store=store)
            plan = await nix.plan(
                NixStore(runner_store), farmlet.storage.blobs, DrvRequest(drv=drvs["a"])
            )
            [build] = farmlet.farm.submit_graph(plan.specs, trio.current_time(), lambda n: None)
            while not build.state.finished:
                await trio.sleep(0.05)
            assert build.state is BuildState.SUCCEEDED
            assert (build.attempts, build.infra_failures, failures) == (2, 1, [0])
            expected = "fetch-failed" if side == "builder" else "upload-failed"
            assert farmlet.farm.metrics.requeued[expected] == 1
            assert await valid(runner_store, plan.outputs[0][1])
            nursery.cancel_scope.cancel()


@pytest.mark.skipif(os.geteuid() != 0, reason="Nix uses build-users-group only as root")
def test_a_nix_builder_where_nix_cannot_build_exits_with_one_line_saying_what_to_set_up(
    tmp_path: Path,
) -> None:
    """Nix as root builds as the users of ``build-users-group``; where that group does not
    exist the builder refuses to start, in one line naming the group and the set-up, instead
    of failing every build it is given as internal-error."""
    env = {
        **os.environ,
        "NIX_CONFIG": "build-users-group = hydra-trio-no-such-group",
        "PYTHONUNBUFFERED": "1",
    }
    args = ["--server", "127.0.0.1:9", "--executor", "nix", "--work-dir", str(tmp_path / "w")]
    args += ["--nix-store", str(tmp_path / "store")]
    done = subprocess.run(
        [sys.executable, "-m", "hydra_trio", "builder", *args],
        env=env,
        capture_output=True,
        timeout=LIMIT,
        check=False,
    )
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1, lines
    assert "hydra-trio-no-such-group" in lines[0]
    assert "nix-setup-systemd" in lines[0] and "build-users-group =" in lines[0]
