"""Shells standing by for the next builds (builder/standby.py): the script gives the command
exactly its arguments and environment; a shell is in its cgroup before a build takes it; one
that died is never given a build; closing ends them all; a build whose shell dies at the last
moment, or whose command is missing, still ends as it would have."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from hydra_trio.builder import contain, standby
from hydra_trio.builder.executor import execute
from hydra_trio.protocol.messages import BuildStatus

from .helpers.executor import LIMIT, Recorder, assign

pytestmark = pytest.mark.realnet

#: Prints its argv and environment as JSON.
_SHOW = "import json, os, sys; print(json.dumps([sys.argv, dict(os.environ)]))"
SHOW = [sys.executable, "-c", _SHOW]

TRICKY = {
    "PATH": os.environ["PATH"],
    "PYTHONCOERCECLOCALE": "0",  # or SHOW's python adds LC_CTYPE to what it prints
    "QUOTES": 'it\'s "quoted" and `ticked` $HOME ${PATH} \\ back',
    "NEWLINES": "one\ntwo\n\nthree\n",
    "EMPTY": "",
    "UNICODE": "größe ✓ 世界",
    "SPACES": "  a  b  ",
    "GLOB": "* ? [a-z]",
    "_under_score1": "x;y|z&&w>v<u",
}


def run_script(text: bytes, cwd: Path) -> tuple[list[str], dict[str, str]]:
    done = subprocess.run(
        ["/bin/sh", "-s"], input=text, env={}, cwd="/", capture_output=True, timeout=LIMIT
    )
    assert done.returncode == 0, done.stderr
    argv, env = json.loads(done.stdout)
    return argv, env


def test_a_script_cut_short_runs_nothing(tmp_path: Path) -> None:
    """It is one block: a shell given part of it (a short write) reads to the end of its input
    and runs none of it."""
    marker = tmp_path / "ran"
    text = standby.script(["touch", str(marker)], tmp_path, {"PATH": os.environ["PATH"]})
    assert text is not None
    done = subprocess.run(["/bin/sh", "-s"], input=text[:-3], env={}, timeout=LIMIT)
    assert done.returncode != 0
    assert not marker.exists()
    subprocess.run(["/bin/sh", "-s"], input=text, env={}, timeout=LIMIT, check=True)
    assert marker.exists()


def test_the_script_gives_the_command_exactly_its_arguments_and_environment(
    tmp_path: Path,
) -> None:
    cwd = tmp_path / "a dir with 'quotes' and $x"
    cwd.mkdir()
    args = ["", "two words", "it's", '"', "$HOME", "*", "-n", "line\nbreak", "ü"]
    text = standby.script([*SHOW, *args], cwd, TRICKY)
    assert text is not None
    argv, env = run_script(text, cwd)
    assert argv == ["-c", *args]
    # what the wrapper shell's exec gives too: the environment, and the PWD the shell sets
    assert env == {**TRICKY, "PWD": str(cwd.resolve())}


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["true"], {"NOT-A-NAME": "1"}),
        (["true"], {"1ABC": "1"}),
        (["true"], {"A B": "1"}),
        (["true"], {"IFS": ":"}),
        (["true"], {"PWD": "/elsewhere"}),
        (["true"], {"PPID": "1"}),
        (["true"], {"BASH_VERSINFO": "x"}),
        (["true"], {"BASHPID": "1"}),
        (["true"], {"FUNCNAME": "f"}),
        (["true"], {"A": "nul\0byte"}),
        (["true", "nul\0byte"], {}),
        (["-dash-first"], {}),
        ([], {}),
        (["true"], {"BIG": "x" * standby.SCRIPT_MOST}),
    ],
)
def test_what_a_shell_cannot_say_exactly_goes_the_usual_way(
    tmp_path: Path, argv: list[str], env: dict[str, str]
) -> None:
    assert standby.script(argv, tmp_path, env) is None


needs_cgroups = pytest.mark.skipif(
    contain.cgroup_parent() is None or not sys.platform.startswith("linux"),
    reason="no writable cgroup v2 hierarchy for this process",
)


@pytest.fixture
def shells(tmp_path: Path) -> Iterator[standby.Standby]:
    made = standby.for_builds(tmp_path / "builds", 2)
    assert made is not None
    try:
        yield made
    finally:
        made.close()
    assert not list(made.parent.glob(f"{contain.CGROUP_PREFIX}{made.owner}-*"))


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def idle(shell: standby.Shell) -> bool:
    """Moved into its cgroup, and its output its own again (while the shell moves itself,
    its stdout is the cgroup's cgroup.procs, its own saved as fd 10)."""
    fds = os.listdir(f"/proc/{shell.pid}/fd")
    return shell.cgroup.name in cgroup_of(shell.pid) and sorted(fds) == ["0", "1", "2"]


def wait_until(condition: object, what: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


@needs_cgroups
def test_a_shell_is_in_its_own_cgroup_before_a_build_takes_it(
    shells: standby.Standby, tmp_path: Path
) -> None:
    shells.fill()
    assert shells.size == 2 and shells.started == 2
    ready = list(shells._ready)
    assert len({shell.cgroup for shell in ready}) == 2
    for shell in ready:
        name = shell.cgroup.name
        assert name.startswith(f"{contain.CGROUP_PREFIX}{shells.owner}-")
        wait_until(lambda shell=shell: shell.cgroup.name in cgroup_of(shell.pid), "moved in")
        assert shell.untouched() == ""
    shells.fill()  # full: nothing more
    assert shells.started == 2


@needs_cgroups
def test_a_taken_shell_runs_its_command_in_its_cgroup_with_its_output_on_the_pipe(
    shells: standby.Standby, tmp_path: Path
) -> None:
    shells.fill()
    shell = shells.take(
        ["sh", "-c", "echo $$; cat /proc/self/cgroup; exit 3"],
        tmp_path,
        {"PATH": os.environ["PATH"]},
    )
    assert shell is not None and shells.taken == 1
    assert shell.run()
    output, pidfd = shell.hand_over()
    try:
        assert shell.popen.wait(timeout=LIMIT) == 3
        text = os.read(output, 65536).decode()
    finally:
        os.close(output)
        os.close(pidfd)
    pid, cgroup = text.split("\n", 1)
    assert int(pid) == shell.pid  # the shell's own process executed the command
    assert shell.cgroup.name in cgroup
    shell.cgroup.rmdir()  # a build's containment removes it; here, the test


@needs_cgroups
def test_a_shell_that_died_standing_by_is_never_given_a_build(
    shells: standby.Standby, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shells.fill()
    dead = shells._ready[0]  # the one taken first
    os.kill(dead.pid, signal.SIGKILL)
    wait_until(lambda: dead.untouched() == "had ended", "the shell died")
    with caplog.at_level(logging.WARNING, logger="hydra_trio.builder"):
        shell = shells.take(["true"], tmp_path, {})
    assert shell is not None and shell is not dead and shell.untouched() == ""
    assert f"(pid {dead.pid}) had ended" in caplog.text
    assert shells.take(["true"], tmp_path, {}) is None  # none left until refilled
    shells.fill()  # which removes the dead one's cgroup (never on the event loop)
    assert not dead.cgroup.exists()
    shells.drop(shell)  # (reaped, its cgroup removed, by the fixture's close)


@needs_cgroups
def test_no_build_can_write_into_a_shell_standing_by(
    shells: standby.Standby, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its stdin (the next build's script) cannot be opened through /proc, even by root; what
    is written into its output that way (the next build's log) makes it unusable."""
    shells.fill()
    first, second = shells._ready[0], shells._ready[1]
    wait_until(lambda: idle(first), "the shell waits")
    with pytest.raises(OSError) as raised:
        os.open(f"/proc/{first.pid}/fd/0", os.O_WRONLY)
    assert raised.value.errno == errno.ENXIO
    fd = os.open(f"/proc/{first.pid}/fd/1", os.O_WRONLY)
    os.write(fd, b"a forged log line\n")
    os.close(fd)
    with caplog.at_level(logging.WARNING, logger="hydra_trio.builder"):
        shell = shells.take(["true"], tmp_path, {})
    assert shell is second
    assert "had output before any build took it" in caplog.text
    wait_until(lambda: first.popen.poll() is not None, "the shell was ended")
    shells.fill()  # and its cgroup removed now that it has exited
    assert not first.cgroup.exists()
    shells.drop(shell)  # (reaped, its cgroup removed, by the fixture's close)


def test_shells_stand_by_only_where_builds_cannot_reach_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In a sandbox, or on a root builder (whose builds are root); not for an unprivileged
    builder's own-user builds, which could stop a shell or freeze its cgroup."""
    assert standby.out_of_reach(sandboxed=True)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert standby.out_of_reach(sandboxed=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert not standby.out_of_reach(sandboxed=False)
    assert standby.out_of_reach(sandboxed=True)
    monkeypatch.setattr(contain, "cgroup_parent", lambda: tmp_path)
    assert standby.for_builds(tmp_path / "builds", 2) is None
    assert standby.for_builds(tmp_path / "builds", 2, sandboxed=True) is not None


@needs_cgroups
def test_closing_ends_every_shell_standing_by(shells: standby.Standby) -> None:
    shells.fill()
    ready = list(shells._ready)
    shells.close()
    for shell in ready:
        assert shell.popen.poll() is not None
        assert not shell.cgroup.exists()
    shells.fill()  # closed: starts nothing
    assert shells.started == 2


@needs_cgroups
def test_a_standby_that_cannot_start_shells_waits_and_builds_go_the_usual_way(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shell that cannot be started (here: no cgroup can be made) is logged once, no other
    is tried for ``FILL_RETRY`` seconds, and then one is tried again."""
    shells = standby.Standby(2, tmp_path / "not-a-cgroup", "x")
    with caplog.at_level(logging.WARNING, logger="hydra_trio.builder"):
        shells.fill()
        shells.fill()
    assert shells.started == 0
    assert caplog.text.count("cannot start a shell standing by for builds") == 1
    assert shells.take(["true"], tmp_path, {}) is None
    monkeypatch.setattr(shells, "parent", contain.cgroup_parent())
    shells.fill()  # within FILL_RETRY: nothing tried
    assert shells.started == 0
    shells._retry_at = 0.0  # as if FILL_RETRY had passed
    shells.fill()
    assert shells.started == 2
    shells.close()


async def build(
    tmp_path: Path, shells: standby.Standby | None, *command: str
) -> tuple[BuildStatus, int | None, str]:
    send = Recorder()
    run = functools.partial(execute, standby=shells)
    with trio.fail_after(LIMIT):
        result = await run(assign(*command), tmp_path / "build", send, {"PATH": os.environ["PATH"]})
    return result.status, result.exit_code, send.log().decode()


@needs_cgroups
async def test_the_build_sees_the_environment_the_wrapper_shell_gives(
    shells: standby.Standby, tmp_path: Path
) -> None:
    shells.fill()
    through_standby = await build(tmp_path, shells, *SHOW)
    assert shells.taken == 1
    through_wrapper = await build(tmp_path, None, *SHOW)
    assert through_standby[:2] == through_wrapper[:2] == (BuildStatus.SUCCESS, 0)
    assert json.loads(through_standby[2]) == json.loads(through_wrapper[2])


@needs_cgroups
async def test_a_build_takes_a_replacement_standing_by_once_its_command_runs(
    shells: standby.Standby, tmp_path: Path
) -> None:
    shells.fill()
    for _ in range(3):
        status, code, _ = await build(tmp_path, shells, "true")
        assert (status, code) == (BuildStatus.SUCCESS, 0)
    assert shells.taken == 3 and shells.started == 5
    assert len(shells._ready) == 2
    assert all(shell.entered for shell in shells._ready)  # told to move as each build ended


@needs_cgroups
def test_a_shell_started_while_a_build_runs_moves_when_told_or_when_taken(
    shells: standby.Standby, tmp_path: Path
) -> None:
    """A replacement is started while its build runs and moves once that build's cgroup is
    gone (a cold move holds the kernel's cgroup lock, which the build's rmdir would wait
    for); one taken before it was told still runs its command in its cgroup."""
    shells.fill(enter=False)
    first, second = shells._ready[0], shells._ready[1]
    time.sleep(0.05)
    assert first.cgroup.name not in cgroup_of(first.pid)
    shell = shells.take(
        ["sh", "-c", "cat /proc/self/cgroup"], tmp_path, {"PATH": os.environ["PATH"]}
    )
    assert shell is first and shell.run()
    output, pidfd = shell.hand_over()
    try:
        assert shell.popen.wait(timeout=LIMIT) == 0
        assert first.cgroup.name in os.read(output, 65536).decode()
    finally:
        os.close(output)
        os.close(pidfd)
    first.cgroup.rmdir()
    shells.enter()
    wait_until(lambda: idle(second), "told, it moved")


@needs_cgroups
async def test_a_build_whose_shell_dies_before_its_script_starts_the_usual_way(
    shells: standby.Standby, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shells.fill()
    take = shells.take
    taken: list[standby.Shell] = []

    def take_and_kill(*args: object) -> standby.Shell | None:
        shell = take(*args)  # type: ignore[arg-type]
        assert shell is not None
        os.kill(shell.pid, signal.SIGKILL)
        wait_until(lambda: shell.untouched() == "had ended", "the shell died")
        taken.append(shell)
        return shell

    monkeypatch.setattr(shells, "take", take_and_kill)
    status, code, log = await build(tmp_path, shells, "sh", "-c", "cat /proc/self/cgroup")
    assert (status, code) == (BuildStatus.SUCCESS, 0)
    [dead] = taken
    assert dead.cgroup.name in log  # the usual way, into the same cgroup
    assert not dead.cgroup.exists()  # removed with its build


@needs_cgroups
async def test_a_missing_command_fails_127_and_its_shell_is_ended(
    shells: standby.Standby, tmp_path: Path
) -> None:
    shells.fill()
    first = shells._ready[0]
    status, code, log = await build(tmp_path, shells, "no-such-command-hydra-trio")
    assert (status, code) == (BuildStatus.BUILD_FAILED, 127)
    assert "No such file" in log
    assert shells.taken == 1
    assert first.popen.wait(timeout=LIMIT) in (0, -signal.SIGKILL)  # EOF or the kill first
    assert not first.cgroup.exists()
