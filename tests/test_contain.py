"""Every descendant dies with its build (builder/contain.py), with real processes, in every
way a build can be contained: its own cgroup v2 (where this machine lets the test make one),
entered through the wrapper shell or through a shell standing by in it (builder/standby.py),
and the fallback (the builder as subreaper and a process-tree kill)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from hydra_trio.builder import contain, standby
from hydra_trio.builder.executor import execute
from hydra_trio.protocol.messages import BuildStatus

from .helpers import executor as helpers
from .helpers.executor import LIMIT, Recorder, assign, run
from .test_executor import alive, gone, pids_in

pytestmark = pytest.mark.realnet


@pytest.fixture(params=["cgroup", "standby", "tree"])
def containment(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """Each test runs with a cgroup per build (skipped where the machine does not let this
    process make cgroups), entered through the wrapper shell and through a shell standing by,
    and with the fallback."""
    if request.param == "tree":
        monkeypatch.setattr(contain, "cgroup_parent", lambda: None)
        yield request.param
        return
    if contain.cgroup_parent() is None:
        pytest.skip("no writable cgroup v2 hierarchy for this process")
    if request.param == "cgroup":
        yield request.param
        return
    shells = standby.for_builds(tmp_path / "build", 2)
    assert shells is not None
    shells.fill()
    monkeypatch.setattr(helpers, "execute", functools.partial(execute, standby=shells))
    try:
        yield request.param
    finally:
        shells.close()
    assert shells.taken >= 1  # the build did not go the usual way
    assert not list(shells.parent.glob(f"{contain.CGROUP_PREFIX}{shells.owner}-*"))


#: A daemon that leaves the build's session and process group (its output elsewhere), and a
#: grandchild orphaned by a double fork; both write their pids to ``pids``.
def escapees(pids: Path) -> str:
    return (
        f"setsid -f sh -c 'echo $$ >> {pids}; exec sleep 100' </dev/null >/dev/null 2>&1; "
        f"(sh -c 'echo $$ >> {pids}; exec sleep 100' </dev/null >/dev/null 2>&1 &) ; "
        f'while [ "$(cat {pids} 2>/dev/null | wc -l)" -lt 2 ]; do sleep 0.01; done'
    )


async def all_gone(pids: list[int]) -> bool:
    return all([await gone(pid) for pid in pids])


async def test_a_setsid_daemon_and_a_double_forked_grandchild_die_when_the_build_ends(
    tmp_path: Path, containment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[contain.Containment] = []
    create = contain.Containment.create

    def recording(marker: str, name: str) -> contain.Containment:
        made.append(create(marker, name))
        return made[-1]

    taken = standby.Shell.containment

    def recording_taken(shell: standby.Shell, marker: str) -> contain.Containment:
        made.append(taken(shell, marker))
        return made[-1]

    monkeypatch.setattr(contain.Containment, "create", recording)
    monkeypatch.setattr(standby.Shell, "containment", recording_taken)
    pids = tmp_path / "pids"
    result, _, _ = await run(tmp_path, "sh", "-c", escapees(pids))
    assert result.status is BuildStatus.SUCCESS
    escaped = pids_in(pids)
    assert len(escaped) == 2
    assert await all_gone(escaped)
    [used] = made
    assert (used.cgroup is not None) == (containment != "tree")
    assert used.cgroup is None or not used.cgroup.exists()  # removed with its build


async def test_they_die_when_the_build_times_out(tmp_path: Path, containment: str) -> None:
    pids = tmp_path / "pids"
    result, _, _ = await run(tmp_path, "sh", "-c", escapees(pids) + "; sleep 100", timeout=2.0)
    assert result.status is BuildStatus.TIMED_OUT
    escaped = pids_in(pids)
    assert len(escaped) == 2
    assert await all_gone(escaped)


async def test_they_die_when_the_build_is_cancelled(tmp_path: Path, containment: str) -> None:
    pids = tmp_path / "pids"
    script = escapees(pids) + f"; echo ready >> {pids}.ready; sleep 100"
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:

            async def build() -> None:
                await helpers.execute(
                    assign("sh", "-c", script),
                    tmp_path / "build",
                    Recorder(),
                    {"PATH": os.environ["PATH"]},
                )

            nursery.start_soon(build)
            while not await trio.Path(f"{pids}.ready").exists():
                await trio.sleep(0.01)
            escaped = pids_in(pids)
            assert all(alive(pid) for pid in escaped)
            nursery.cancel_scope.cancel()
    assert len(escaped) == 2
    assert await all_gone(escaped)


async def test_a_descendant_holding_stdout_open_does_not_hang_the_build(
    tmp_path: Path, containment: str
) -> None:
    """The command exits at once; a setsid daemon it started keeps the log pipe open.  The
    build ends (not after the daemon's 100 s, not at a timeout) and the daemon is gone."""
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    result, send, _ = await run(
        tmp_path, "sh", "-c", f"setsid -f sh -c 'echo $$ > {pid_file}; exec sleep 100'; echo done"
    )
    assert result.status is BuildStatus.SUCCESS
    assert time.monotonic() - started < 10
    assert b"done\n" in send.log()
    while not pids_in(pid_file):  # written before the daemon's exec, so already there
        await trio.sleep(0.01)
    assert await gone(pids_in(pid_file)[0])


async def test_a_descendant_that_ends_by_itself_soon_after_is_not_killed(
    tmp_path: Path, containment: str
) -> None:
    """What the command left gets a short grace: a background writer that finishes within
    it completes its output."""
    out = tmp_path / "late"
    result, _, _ = await run(tmp_path, "sh", "-c", f"(sleep 0.2; echo late > {out}) & exit 0")
    assert result.status is BuildStatus.SUCCESS
    assert out.read_text() == "late\n"


async def test_the_command_itself_runs_in_its_builds_cgroup(
    tmp_path: Path, containment: str
) -> None:
    """The command is in the build's own cgroup from its first instruction (it is moved
    before it executes), with the same process as the one the builder started."""
    result, send, _ = await run(tmp_path, "sh", "-c", "echo $$; cat /proc/$$/cgroup")
    assert result.status is BuildStatus.SUCCESS
    pid, cgroup = send.log().decode().split("\n", 1)
    assert int(pid) > 0
    assert (contain.CGROUP_PREFIX in cgroup) == (containment != "tree")


@pytest.mark.parametrize(
    ("program", "why"),
    [("no-such-command-hydra-trio", "No such file"), ("not-executable", "Permission denied")],
)
async def test_a_command_that_cannot_be_executed_is_127_with_why_in_either_containment(
    tmp_path: Path, containment: str, program: str, why: str
) -> None:
    """A missing or non-executable command fails with 127 and the reason, as before the
    command was started through the cgroup's shell wrapper."""
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    if program == "not-executable":
        program = str(tmp_path / program)  # a path, as the build would name it
    result, send, _ = await run(tmp_path, program)
    assert result.status is BuildStatus.BUILD_FAILED
    assert result.exit_code == 127
    assert why in send.log().decode()


@pytest.mark.skipif(contain.cgroup_parent() is None, reason="no writable cgroup v2 here")
def test_the_quick_close_gives_up_while_anything_is_in_the_cgroup(tmp_path: Path) -> None:
    """``close_quick`` (on the event loop) removes a build's cgroup only when nothing is in
    it: with a process in it, or a cgroup made under it, it leaves both to ``close``."""
    empty = contain.Containment.create(str(tmp_path / "builds" / "b1-1"), "b1-1")
    assert empty.cgroup is not None and empty.cgroup.is_dir()
    assert empty.close_quick()
    assert not empty.cgroup.exists()

    busy = contain.Containment.create(str(tmp_path / "builds" / "b2-1"), "b2-1")
    assert busy.cgroup is not None
    process = subprocess.Popen(busy.wrap(["sleep", "100"]), start_new_session=True)
    try:
        # not busy.started(process.pid): close_quick kills the main process's group first, and
        # whether the kill or the rmdir is first is the scheduler's choice; a process it does
        # not know of (a build's setsid daemon) stays in the cgroup for certain
        while not busy.populated():
            time.sleep(0.01)
        assert not busy.close_quick()
        assert busy.cgroup.is_dir() and process.poll() is None  # nothing done
        busy.close()
        assert process.wait(timeout=LIMIT) == -signal.SIGKILL
        assert not busy.cgroup.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    nested = contain.Containment.create(str(tmp_path / "builds" / "b3-1"), "b3-1")
    assert nested.cgroup is not None
    (nested.cgroup / "made-by-the-build").mkdir()
    assert not nested.close_quick()
    assert nested.cgroup.is_dir()
    nested.close()
    assert not nested.cgroup.exists()
