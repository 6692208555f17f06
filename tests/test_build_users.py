"""Builds run as build users (``builder --build-users``, issue 19), with real processes: a
hostile build cannot read the token file, the builder's work dir and cache, nor another
running build's directory, and its outputs still upload; the builder refuses what would be
unsafe (a token file its group can read, fewer users than job slots, no root); a restarted
builder kills what its killed predecessor left running as build users, and removes the
cgroups it left."""

from __future__ import annotations

import functools
import grp
import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import trio
from click.testing import CliRunner

from hydra_trio.builder import buildusers, contain
from hydra_trio.builder.buildusers import BuildUserPool, BuildUsers, lock_pool
from hydra_trio.builder.executor import execute
from hydra_trio.builder.sandbox import Sandbox, SandboxError
from hydra_trio.builder.workdir import claim_work_dir
from hydra_trio.cli import main
from hydra_trio.protocol.messages import BuildStatus
from hydra_trio.runner.blobs import BlobStore
from hydra_trio.runner.daemon import RunnerAddresses, make_farm, serve_runner
from hydra_trio.runner.model import Build, BuildSpec, BuildState

from .helpers.executor import Recorder, assign
from .helpers.runner import loopback_config

pytestmark = [
    pytest.mark.realnet,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux build users"),
    pytest.mark.skipif(os.geteuid() != 0, reason="build users need the builder to be root"),
]

SYSTEM = "x86_64-linux"
TOKEN = b"s3cret-farm-token-19-users"
#: Real seconds each test may take at most (a loaded 2-core machine).
LIMIT = 90


@functools.cache
def cannot_sandbox() -> str:
    """Why this machine cannot run sandboxed builds ("" if it can; as test_sandbox's, which
    imports this module)."""
    try:
        Sandbox().check()
    except SandboxError as exc:
        return str(exc)
    return ""


def free_range(size: int = 4) -> str:
    """A range of ``size`` uids no account uses, random so that test runs at once (other
    worktrees) do not take the same users (the builder locks them)."""
    for _ in range(100):
        first = 40000 + random.randrange(2000) * 8
        taken = False
        for uid in range(first, first + size):
            try:
                pwd.getpwuid(uid)
                taken = True
            except KeyError:
                pass
        if not taken:
            return f"{first}-{first + size - 1}"
    raise AssertionError("no free uid range")


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory the build users can pass through (pytest's own tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="hydra-trio-build-users-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def builder_command(server: str, work: Path, spec: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "hydra_trio", "builder",
        "--server", server, "--systems", SYSTEM, "--work-dir", str(work),
        "--build-users", spec, *extra,
    ]  # fmt: skip


def output(state_dir: Path, build: Build, name: str) -> str:
    info = next(f for f in build.outputs if f.path == name)
    data = BlobStore(state_dir / "blobs").read_whole(info.sha256, 1 << 20)  # (packed or not)
    assert data is not None
    return data.decode()


HOLDER = """
echo a-secret > "$HOME/secret"
echo "$HOME" > {ex}/a-home
i=0; while [ ! -e {ex}/b-done ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
id -u > "$OUT/uid"
"""

HOSTILE = """
i=0; while [ ! -e {ex}/a-home ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
other=$(cat {ex}/a-home)
try() {{ name=$1; shift
  if "$@" > "$OUT/$name" 2>&1; then verdict=ALLOWED; else verdict=DENIED; fi
  echo $verdict >> "$OUT/$name"; }}
try token cat {token}
try workdir ls {work}
try cache ls {work}/cache
try machine-id cat {work}/machine-id
try builds ls {work}/builds
try other-secret cat "$other/secret"
try other-dir ls "$other"
try input sh -c 'cat "$IN"/*/f'
try input-new touch "$IN/new"
try input-change sh -c 'for f in "$IN"/*/f; do echo x >> "$f"; done'
try own-home sh -c 'echo mine > "$HOME/x" && cat "$HOME/x"'
id -u > "$OUT/uid"
touch {ex}/b-done
"""


async def test_a_build_user_cannot_read_the_token_the_work_dir_nor_another_build(
    tmp_path: Path, reachable: Path
) -> None:
    """A hostile build, as a build user, is denied the token file, the work dir, the input
    cache and a running build's directory; it reads its inputs but cannot change them; its
    outputs upload and it succeeds, as does the build beside it, under another uid."""
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN + b"\n")
    token_file.chmod(0o600)
    exchange = reachable / "exchange"
    exchange.mkdir()
    exchange.chmod(0o1777)
    work = reachable / "work"
    spec = free_range(4)
    first = int(spec.split("-")[0])
    config = loopback_config(tmp_path, TOKEN)
    farm, dispatcher = make_farm(config)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            addresses: RunnerAddresses = await nursery.start(
                lambda task_status: serve_runner(
                    config, farm=farm, dispatcher=dispatcher, task_status=task_status
                )
            )
            command = builder_command(
                str(addresses.builders[0]), work, spec,
                "--max-jobs", "2", "--token-file", str(token_file),
            )  # fmt: skip
            builder = await trio.lowlevel.open_process(command, stdin=subprocess.DEVNULL)
            try:
                fmt = {"ex": exchange, "token": token_file, "work": work}
                dep = farm.submit(
                    BuildSpec(command=("sh", "-c", 'echo input > "$OUT/f"'), system=SYSTEM), 0.0
                )
                holder = farm.submit(
                    BuildSpec(command=("sh", "-c", HOLDER.format(**fmt)), system=SYSTEM), 0.0
                )
                hostile = farm.submit(
                    BuildSpec(
                        command=("sh", "-c", HOSTILE.format(**fmt)),
                        system=SYSTEM,
                        after=(dep.id,),
                    ),
                    0.0,
                )
                while not (holder.state.finished and hostile.state.finished):
                    assert builder.poll() is None, "the builder exited"
                    await trio.sleep(0.05)
            finally:
                builder.terminate()
                await builder.wait()
            nursery.cancel_scope.cancel()
    assert hostile.state is BuildState.SUCCEEDED, hostile.status
    assert holder.state is BuildState.SUCCEEDED, holder.status
    state_dir = config.state_dir
    for name in ("token", "workdir", "cache", "machine-id", "builds", "other-secret", "other-dir"):
        text = output(state_dir, hostile, name)
        assert text.splitlines()[-1] == "DENIED", (name, text)
        assert TOKEN.decode() not in text and "a-secret" not in text
    assert output(state_dir, hostile, "input").splitlines() == ["input", "ALLOWED"]
    assert output(state_dir, hostile, "input-new").splitlines()[-1] == "DENIED"
    assert output(state_dir, hostile, "input-change").splitlines()[-1] == "DENIED"
    assert output(state_dir, hostile, "own-home").splitlines() == ["mine", "ALLOWED"]
    uids = {int(output(state_dir, b, "uid")) for b in (holder, hostile)}
    assert len(uids) == 2 and all(first <= uid < first + 4 for uid in uids)
    assert (work.stat().st_mode & 0o777) == 0o711
    assert ((work / "cache").stat().st_mode & 0o777) == 0o700
    assert not buildusers.processes_of(frozenset(range(first, first + 4)))


def run_builder_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hydra_trio", "builder", "--systems", SYSTEM, *args],
        capture_output=True,
        text=True,
        timeout=LIMIT,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_a_token_file_its_group_can_read_is_refused(tmp_path: Path, reachable: Path) -> None:
    """With build users, a token file readable by its group: one line, exit status 1."""
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN + b"\n")
    token_file.chmod(0o640)
    done = run_builder_cli(
        "--server", "127.0.0.1:9", "--work-dir", str(reachable / "work"),
        "--build-users", free_range(), "--token-file", str(token_file),
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "readable by its group or others" in lines[0], done.stderr
    assert not (reachable / "work").exists()


def test_fewer_build_users_than_job_slots_is_refused(reachable: Path) -> None:
    """--max-jobs above the pool's size: one line, exit status 1, before anything starts."""
    done = run_builder_cli(
        "--server", "127.0.0.1:9", "--work-dir", str(reachable / "work"),
        "--build-users", free_range(2), "--max-jobs", "3",
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--max-jobs 3 is more than the 2 build users" in lines[0]


def test_a_malformed_spec_is_refused() -> None:
    """A spec that is neither a group nor a range: one usage line."""
    done = run_builder_cli("--server", "127.0.0.1:9", "--build-users", "no-such-group-19")
    assert done.returncode == 2
    assert "no such group" in done.stderr
    with pytest.raises(buildusers.BuildUsersError, match="0 < FIRST <= LAST"):
        BuildUsers.parse("30010-30000")


def test_a_builder_that_is_not_root_is_refused(
    reachable: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A builder neither root nor with the capabilities given build users: one line, exit
    status 1 (the effective uid and capabilities as a non-root process has them: this
    machine's interpreter is not executable by another user)."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(buildusers, "_effective_capabilities", lambda: {"CAP_KILL"})
    args = [
        "builder", "--systems", SYSTEM, "--server", "127.0.0.1:9",
        "--work-dir", str(reachable / "work"), "--build-users", free_range(),
    ]  # fmt: skip
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 1, done.output
    lines = done.output.strip().splitlines()
    assert len(lines) == 1, done.output
    assert "needs the builder to run as root" in lines[0]
    assert "lacks CAP_CHOWN, CAP_SETGID, CAP_SETUID" in lines[0]


def wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def test_a_process_a_killed_builder_left_running_as_a_build_user_is_killed_at_start(
    reachable: Path,
) -> None:
    """A process of a build user (which scrubbed its environment: no build marker) left by a
    killed builder is killed when a builder with those users claims the work dir."""
    users = BuildUsers.parse(free_range())
    user = users.users[1]
    leftover = subprocess.Popen(
        ["sleep", "1000"],
        user=user.uid,
        group=user.gid,
        extra_groups=[],
        env={},
        start_new_session=True,
        cwd="/",
    )
    try:
        work = reachable / "work"
        with lock_pool(users, reachable / "locks"):
            claim_work_dir(work, users).close()
        assert leftover.wait(timeout=LIMIT) == -9
    finally:
        leftover.kill()
        leftover.wait()


def test_a_second_builder_cannot_take_build_users_in_use(reachable: Path) -> None:
    """Two builders on one pool would kill each other's builds: the second is refused."""
    users = BuildUsers.parse(free_range())
    refused = pytest.raises(buildusers.BuildUsersError, match="in use by another builder")
    with lock_pool(users, reachable / "locks"), refused, lock_pool(users, reachable / "locks"):
        pass


@pytest.mark.skipif(contain.cgroup_parent() is None, reason="no writable cgroup v2 here")
def test_cgroups_a_killed_builder_left_are_killed_and_removed_at_start(
    reachable: Path,
) -> None:
    """The cgroup of a build whose builder was killed (-9) is killed and removed when a
    builder claims the same work dir; another work dir's build cgroup is left alone."""
    work = reachable / "work"
    builds = work.absolute() / "builds"
    ours = contain.Containment.create(str(builds / "b1-1"), "b1-1")
    other = contain.Containment.create(str(reachable / "elsewhere" / "builds" / "b1-1"), "b1-1")
    assert ours.cgroup is not None and other.cgroup is not None
    started = []
    try:
        for containment in (ours, other):
            started.append(
                subprocess.Popen(
                    ["sleep", "1000"], preexec_fn=containment.enter, start_new_session=True
                )
            )
        claim_work_dir(work).close()
        assert started[0].wait(timeout=LIMIT) == -9
        assert not ours.cgroup.exists()
        assert started[1].poll() is None and other.cgroup.exists()
    finally:
        for process in started:
            process.kill()
            process.wait()
        other.close()


def test_a_group_names_its_members_as_build_users() -> None:
    """A group spec: every member (and account whose primary group it is), the group's gid."""
    group = next(
        (g for g in grp.getgrall() if g.gr_mem and "root" not in g.gr_mem and g.gr_gid != 0),
        None,
    )
    if group is None:
        pytest.skip("no group with members on this machine")
    users = BuildUsers.parse(group.gr_name)
    assert {u.gid for u in users.users} == {group.gr_gid}
    assert {pwd.getpwnam(name).pw_uid for name in group.gr_mem} <= users.uids


async def test_what_a_build_user_left_running_outside_every_group_dies_with_its_build(
    reachable: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a cgroup, a build user's daemon that left the build's session and scrubbed its
    environment (which the fallback's tree walk cannot find) is killed by its uid when the
    build ends; the build still succeeds."""
    monkeypatch.setattr(contain, "cgroup_parent", lambda: None)
    pool = BuildUserPool(BuildUsers.parse(free_range(2)))
    pids = reachable / "pids"
    script = (
        f"setsid -f env -i sh -c 'echo $$ > {pids}.tmp; mv {pids}.tmp {pids}; exec sleep 1000'"
        f" </dev/null >/dev/null 2>&1; while [ ! -e {pids} ]; do sleep 0.01; done"
    )
    await trio.Path(reachable).chmod(0o777)  # the daemon writes its pid here
    with trio.fail_after(LIMIT):
        result = await execute(
            assign("sh", "-c", script),
            reachable / "builds" / "b1-1",
            Recorder(),
            {"PATH": os.environ["PATH"]},
            users=pool,
        )
    assert result.status is BuildStatus.SUCCESS, result.error
    pid = int(pids.read_text())
    assert await trio.to_thread.run_sync(wait_gone, pid)
    assert not buildusers.processes_of(pool.users.uids)


@pytest.mark.skipif(bool(cannot_sandbox()), reason=f"cannot sandbox here: {cannot_sandbox()}")
async def test_a_sandboxed_build_runs_as_its_build_user(reachable: Path) -> None:
    """--build-users with --sandbox: bubblewrap runs as the build user, so the build's files
    in $OUT are that uid's and its processes too."""
    pool = BuildUserPool(BuildUsers.parse(free_range(2)))
    build_dir = reachable / "builds" / "b1-1"
    send = Recorder()
    with trio.fail_after(LIMIT):
        result = await execute(
            assign("sh", "-c", 'id -u > "$OUT/uid"; id -G > "$OUT/groups"'),
            build_dir,
            send,
            {"PATH": os.environ["PATH"]},
            sandbox=Sandbox(),
            users=pool,
        )
    assert result.status is BuildStatus.SUCCESS, (result.error, send.log())
    uploaded = {u.path: u.data for u in send.uploads()}
    assert int(uploaded["uid"]) in pool.users.uids
    assert [int(g) for g in uploaded["groups"].split()] == [pool.users.users[0].gid]


def test_a_sandbox_bubblewrap_cannot_make_as_a_build_user_is_refused(reachable: Path) -> None:
    """--sandbox with --build-users: where bubblewrap fails as the build user (here: a
    "bubblewrap" that always fails), the start-up check says so in one line."""
    user = BuildUsers.parse(free_range(1)).users[0]
    with pytest.raises(buildusers.BuildUsersError, match="cannot make a sandbox as build user"):
        buildusers.check_sandbox(Sandbox(bwrap="false"), user)
    if not cannot_sandbox():
        buildusers.check_sandbox(Sandbox(), user)  # the real one can, here
