"""``builder --sandbox`` (builder/sandbox.py), with real processes: a sandboxed build sees
neither the builder's work dir nor its token file, cannot connect to a server on the
machine's loopback, cannot write its ``$IN``, and still runs ordinary commands (sh, python3)
that read ``$IN`` and fill ``$OUT``; what it starts dies with it; a builder that cannot
sandbox refuses to start with one line.  Skipped where bubblewrap is missing or cannot make
namespaces here."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import psutil
import pytest
import trio

from hydra_trio.builder import contain
from hydra_trio.builder.config import BuilderConfig
from hydra_trio.builder.executor import execute
from hydra_trio.builder.sandbox import Sandbox, SandboxError, SandboxPath
from hydra_trio.protocol.messages import NETWORK_FEATURE, BuildStatus
from hydra_trio.runner.daemon import RunnerAddresses, make_farm, serve_runner
from hydra_trio.runner.model import Build, BuildSpec, BuildState
from hydra_trio.runner.specs import SpecError, parse_spec

from .helpers.executor import LIMIT, Recorder, assign
from .helpers.procs import daemon_env
from .helpers.runner import loopback_config
from .test_build_users import free_range

pytestmark = pytest.mark.realnet

SYSTEM = "x86_64-linux"
TOKEN = b"s3cret-sandbox-token-19"


@functools.cache
def cannot_sandbox() -> str:
    """Why this machine cannot run sandboxed builds ("" if it can)."""
    try:
        Sandbox().check()
    except SandboxError as exc:
        return str(exc)
    return ""


needs_sandbox = pytest.mark.skipif(
    bool(cannot_sandbox()), reason=f"cannot sandbox here: {cannot_sandbox()}"
)

#: What a build tries to reach, one line each: "<what>: yes ..." or "<what>: no (...)".
PROBE = """
import os, socket
def attempt(what, reach):
    try:
        got = reach()
    except OSError as exc:
        print(f"{what}: no ({exc.strerror or exc})")
    else:
        print(f"{what}: yes {got}")
attempt("machine-id", lambda: open(os.environ["WORK"] + "/machine-id").read().strip())
attempt("cache", lambda: os.listdir(os.environ["WORK"] + "/cache"))
attempt("token", lambda: open(os.environ["TOKEN"]).read().strip())
attempt("write-in", lambda: open(os.environ["IN"] + "/written", "w").close())
attempt("chmod-in", lambda: os.chmod(os.environ["IN"] + "/a/greeting", 0o644))
def connect():
    with socket.create_connection(("127.0.0.1", int(os.environ["PORT"])), timeout=10):
        return "connected"
attempt("connect", connect)
print("uid:", os.getuid())
greeting = open(os.environ["IN"] + "/a/greeting").read()
open(os.environ["OUT"] + "/copy", "w").write(greeting)
print("greeting:", greeting.strip())
"""


def log_of(state_dir: Path, build: Build) -> str:
    [path] = state_dir.rglob(f"{build.id}.*.log")
    return path.read_text()


async def wait_done(build: Build, builder: trio.Process) -> None:
    while build.state in (BuildState.QUEUED, BuildState.RUNNING):
        assert builder.poll() is None, "the builder exited"
        await trio.sleep(0.05)


async def run_probe(
    tmp_path: Path, builder_options: list[str], *, network: bool = False, work: Path | None = None
) -> tuple[Build, str]:
    """A runner in this process, a real ``hydra-trio builder`` with ``builder_options``, a
    build ``a`` writing ``$OUT/greeting`` with sh, and a python3 build after it running
    ``PROBE`` against a loopback server of the test (asking for the network with
    ``network``, as ``POST /builds`` does).  Returns the probe build and its log."""
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN + b"\n")
    token_file.chmod(0o600)
    work = work or tmp_path / "work"
    config = loopback_config(tmp_path, TOKEN)
    farm, dispatcher = make_farm(config)
    with socket.create_server(("127.0.0.1", 0)) as server, trio.fail_after(90):
        port = server.getsockname()[1]
        async with trio.open_nursery() as nursery:
            addresses: RunnerAddresses = await nursery.start(
                functools.partial(serve_runner, config, farm=farm, dispatcher=dispatcher)
            )
            builder = await trio.lowlevel.open_process(
                [
                    sys.executable, "-m", "hydra_trio", "builder",
                    "--server", str(addresses.builders[0]),
                    "--systems", SYSTEM,
                    "--work-dir", str(work),
                    "--token-file", str(token_file),
                    *builder_options,
                ],
                env=daemon_env(),
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                first = farm.submit(
                    BuildSpec(
                        name="a",
                        command=("sh", "-c", 'echo hello from a > "$OUT/greeting"'),
                        system=SYSTEM,
                    ),
                    0.0,
                )
                env = {"WORK": str(work), "TOKEN": str(token_file), "PORT": str(port)}
                body = {
                    "command": ["python3", "-c", PROBE],
                    "system": SYSTEM,
                    "after": [first.id],
                    "env": env,
                    "network": network,
                }
                probe = farm.submit(parse_spec(body, SYSTEM), 0.0)
                await wait_done(probe, builder)
            finally:
                builder.terminate()
                await builder.wait()
            nursery.cancel_scope.cancel()
    assert first.status is BuildStatus.SUCCESS, log_of(config.state_dir, first)
    return probe, log_of(config.state_dir, probe)


@needs_sandbox
async def test_a_sandboxed_build_reaches_neither_the_work_dir_the_token_nor_the_network(
    tmp_path: Path,
) -> None:
    """With --sandbox the probe build reads its $IN and fills its $OUT, and nothing else."""
    probe, log = await run_probe(tmp_path, ["--sandbox"])
    assert probe.status is BuildStatus.SUCCESS, log
    assert "greeting: hello from a" in log
    assert [file.path for file in probe.outputs] == ["copy"]
    for what in ("machine-id", "cache", "token", "write-in", "chmod-in", "connect"):
        assert f"\n{what}: no (" in f"\n{log}", log
    assert TOKEN.decode() not in log


@needs_sandbox
async def test_a_build_that_asks_for_the_network_gets_it_where_the_sandbox_allows(
    tmp_path: Path,
) -> None:
    """``network: true`` on a ``--sandbox-allow-network`` builder: the probe connects to the
    test's loopback server, and still sees neither the work dir nor the token."""
    probe, log = await run_probe(tmp_path, ["--sandbox", "--sandbox-allow-network"], network=True)
    assert probe.status is BuildStatus.SUCCESS, log
    assert "\nconnect: yes connected" in f"\n{log}", log
    for what in ("machine-id", "cache", "token", "write-in", "chmod-in"):
        assert f"\n{what}: no (" in f"\n{log}", log


@needs_sandbox
async def test_a_build_that_does_not_ask_has_no_network_even_where_it_is_allowed(
    tmp_path: Path,
) -> None:
    probe, log = await run_probe(tmp_path, ["--sandbox", "--sandbox-allow-network"])
    assert probe.status is BuildStatus.SUCCESS, log
    assert "\nconnect: no (" in f"\n{log}", log


@pytest.fixture
def passable() -> Iterator[Path]:
    """A directory build users can pass through (pytest's own tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="hydra-trio-sandbox-users-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0, reason="build users need the builder to be root")
async def test_sandbox_and_build_users_compose(tmp_path: Path, passable: Path) -> None:
    """``--sandbox --build-users``: bwrap runs as the build's own uid (unprivileged user
    namespaces), and the build still reads its $IN, fills its $OUT and reaches nothing else."""
    spec = free_range(2)
    first = int(spec.split("-")[0])
    options = ["--sandbox", "--build-users", spec]
    probe, log = await run_probe(tmp_path, options, work=passable / "work")
    assert probe.status is BuildStatus.SUCCESS, log
    assert "greeting: hello from a" in log
    for what in ("machine-id", "cache", "token", "write-in", "chmod-in", "connect"):
        assert f"\n{what}: no (" in f"\n{log}", log
    [uid] = [line.split()[1] for line in log.splitlines() if line.startswith("uid: ")]
    assert first <= int(uid) < first + 2


async def test_without_the_sandbox_the_same_build_reaches_them(tmp_path: Path) -> None:
    """The control: unsandboxed, the probe does read the work dir and token and connect (so
    the sandboxed test's "no" lines are the sandbox's doing)."""
    probe, log = await run_probe(tmp_path, [])
    assert probe.status is BuildStatus.SUCCESS, log
    for what in ("machine-id", "cache", "token", "write-in", "chmod-in", "connect"):
        assert f"\n{what}: yes" in f"\n{log}", log


# -- containment: what a sandboxed build starts dies with it ---------------------------------


@pytest.fixture(params=["cgroup", "tree"])
def containment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """With a cgroup per build (where this process may make one) and with the fallback."""
    if request.param == "cgroup":
        if contain.cgroup_parent() is None:
            pytest.skip("no writable cgroup v2 hierarchy for this process")
    else:
        monkeypatch.setattr(contain, "cgroup_parent", lambda: None)
    yield request.param


def marked(marker: str) -> list[psutil.Process]:
    """The processes whose command line holds ``marker``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if marker in " ".join(process.info["cmdline"] or ()):
            found.append(process)
    return found


def escapees(marker: str) -> str:
    """A daemon out of the build's session and a double-forked grandchild, both ``sleep``s
    with ``marker`` as an argument; the script goes on once both run."""
    sleeper = f"exec sleep 1000 {marker}"
    return (
        f"setsid -f sh -c 'echo >> $TMPDIR/started; {sleeper}' </dev/null >/dev/null 2>&1; "
        f"(sh -c 'echo >> $TMPDIR/started; {sleeper}' </dev/null >/dev/null 2>&1 &) ; "
        'while [ "$(cat $TMPDIR/started 2>/dev/null | wc -l)" -lt 2 ]; do sleep 0.01; done'
    )


async def none_left(marker: str) -> bool:
    with trio.move_on_after(10):
        while marked(marker):
            await trio.sleep(0.05)
    return not marked(marker)


@needs_sandbox
async def test_what_a_sandboxed_build_left_running_dies_when_it_ends(
    tmp_path: Path, containment: str
) -> None:
    marker = f"0.{os.getpid()}1"
    command = assign("sh", "-c", escapees(marker))
    with trio.fail_after(LIMIT):
        result = await execute(command, tmp_path / "build", Recorder(), _env(), sandbox=Sandbox())
    assert result.status is BuildStatus.SUCCESS
    assert await none_left(marker)


@needs_sandbox
async def test_a_cancelled_sandboxed_build_takes_everything_it_started(
    tmp_path: Path, containment: str
) -> None:
    marker = f"0.{os.getpid()}2"
    command = assign("sh", "-c", escapees(marker) + "; sleep 1000")
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    execute, command, tmp_path / "build", Recorder(), _env(), sandbox=Sandbox()
                )
            )
            while len(marked(marker)) < 2:  # both sleeps run, in the sandbox
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert await none_left(marker)


@needs_sandbox
async def test_a_sandboxed_build_that_times_out_takes_everything_it_started(
    tmp_path: Path, containment: str
) -> None:
    marker = f"0.{os.getpid()}3"
    command = assign("sh", "-c", escapees(marker) + "; sleep 1000", timeout=3.0)
    send = Recorder()
    with trio.fail_after(LIMIT):
        result = await execute(command, tmp_path / "build", send, _env(), sandbox=Sandbox())
    assert result.status is BuildStatus.TIMED_OUT, send.log()
    assert await none_left(marker)


@needs_sandbox
async def test_a_build_asking_for_the_network_fails_at_once_where_the_sandbox_denies_it(
    tmp_path: Path,
) -> None:
    """Only if the runner sent it anyway (the builder does not offer the feature): the
    command never runs, and the error says why."""
    ran = tmp_path / "ran"
    command = attrs.evolve(assign("sh", "-c", f"touch {ran}"), network=True)
    with trio.fail_after(LIMIT):
        result = await execute(command, tmp_path / "build", Recorder(), _env(), sandbox=Sandbox())
    assert result.status is BuildStatus.BUILD_FAILED
    assert "asks for the network" in result.error
    assert not ran.exists()


@needs_sandbox
async def test_a_sandboxed_build_has_no_capabilities(tmp_path: Path) -> None:
    """Even on a builder running as root (as the test may): no mount, no mknod."""
    command = assign("sh", "-c", "grep CapEff /proc/self/status; id -u")
    send = Recorder()
    with trio.fail_after(LIMIT):
        result = await execute(command, tmp_path / "build", send, _env(), sandbox=Sandbox())
    assert result.status is BuildStatus.SUCCESS, send.log()
    assert f"CapEff:\t{0:016x}\n{os.getuid()}\n" == send.log().decode()


def test_a_builder_offers_the_network_feature_exactly_where_builds_get_the_network() -> None:
    assert NETWORK_FEATURE in BuilderConfig().advertised_features
    sandboxed = BuilderConfig(supported_features=("kvm",), sandbox=Sandbox())
    assert sandboxed.advertised_features == ("kvm",)
    allowing = BuilderConfig(sandbox=Sandbox(allow_network=True))
    assert allowing.advertised_features == (NETWORK_FEATURE,)


def test_network_true_is_the_network_feature_and_must_be_a_boolean() -> None:
    spec = parse_spec({"command": ["true"], "network": True}, SYSTEM)
    assert spec.required_features == {NETWORK_FEATURE}
    assert parse_spec({"command": ["true"]}, SYSTEM).required_features == frozenset()
    with pytest.raises(SpecError, match="network: must be true or false"):
        parse_spec({"command": ["true"], "network": "yes"}, SYSTEM)


def _env() -> dict[str, str]:
    return {"PATH": os.environ["PATH"]}


# -- the start-up check ----------------------------------------------------------------------


def start_builder(
    tmp_path: Path, *options: str, path: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = daemon_env()
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [
            sys.executable, "-m", "hydra_trio", "builder",
            "--server", "127.0.0.1:9",
            "--work-dir", str(tmp_path / "work"),
            *options,
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="elsewhere: needs Linux")
def test_a_builder_without_bubblewrap_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    """No ``bwrap`` on PATH: exit 1, one line saying to install bubblewrap."""
    empty = tmp_path / "bin"
    empty.mkdir()
    ran = start_builder(tmp_path, "--sandbox", path=str(empty))
    assert ran.returncode == 1, ran.stderr
    [line] = ran.stderr.strip().splitlines()
    assert "bubblewrap" in line and "--sandbox" in line
    assert not (tmp_path / "work").exists()  # refused before it claimed the work dir


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="elsewhere: needs Linux")
def test_a_missing_sandbox_path_is_refused_at_start(tmp_path: Path) -> None:
    ran = start_builder(tmp_path, "--sandbox", "--sandbox-path", str(tmp_path / "nowhere"))
    assert ran.returncode == 1, ran.stderr
    [line] = ran.stderr.strip().splitlines()
    assert "--sandbox-path" in line and "nowhere" in line


def test_a_sandbox_path_holding_the_work_dir_is_refused_at_start(tmp_path: Path) -> None:
    """Builds would read the work dir (its cache, its machine id) through it."""
    ran = start_builder(tmp_path, "--sandbox", "--sandbox-path", str(tmp_path))
    assert ran.returncode == 1, ran.stderr
    [line] = ran.stderr.strip().splitlines()
    assert "work dir" in line and f"--sandbox-path {tmp_path}" in line


def test_a_sandbox_path_holding_the_token_file_is_refused_at_start(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "token").write_bytes(TOKEN)
    (secrets / "token").chmod(0o600)
    ran = start_builder(
        tmp_path, "--sandbox", "--sandbox-path", f"{secrets}=/s", "--token-file", f"{secrets}/token"
    )
    assert ran.returncode == 1, ran.stderr
    [line] = ran.stderr.strip().splitlines()
    assert "token file" in line and str(secrets) in line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="elsewhere: needs Linux")
def test_sandbox_options_from_a_config_file(tmp_path: Path) -> None:
    """``sandbox-path`` is a list in a --config file; the options reach the builder's
    start-up check (here: the missing path named by the file)."""
    config = tmp_path / "builder.toml"
    config.write_text(f'sandbox = true\nsandbox-path = ["/usr", "{tmp_path}/nowhere=/x"]\n')
    ran = start_builder(tmp_path, "--config", str(config))
    assert ran.returncode == 1, ran.stderr
    assert f"--sandbox-path {tmp_path}/nowhere: no such file" in ran.stderr


def test_sandbox_options_need_sandbox(tmp_path: Path) -> None:
    ran = start_builder(tmp_path, "--sandbox-path", "/opt")
    assert ran.returncode == 2
    assert "need --sandbox" in ran.stderr


def test_a_sandboxed_builder_cannot_offer_the_network_without_allowing_it(
    tmp_path: Path,
) -> None:
    ran = start_builder(tmp_path, "--sandbox", "--features", "network")
    assert ran.returncode == 2
    assert "--sandbox-allow-network" in ran.stderr


def test_on_macos_the_sandbox_is_refused_saying_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(SandboxError, match="--sandbox needs Linux namespaces; this is darwin"):
        Sandbox().check()


def test_sandbox_paths_parse() -> None:
    """``PATH`` or ``PATH=INSIDE``, absolute."""
    assert SandboxPath.parse("/opt/tools") == SandboxPath(Path("/opt/tools"), Path("/opt/tools"))
    assert SandboxPath.parse("/srv/x/=/x") == SandboxPath(Path("/srv/x"), Path("/x"))
    with pytest.raises(ValueError, match="absolute"):
        SandboxPath.parse("tools")
