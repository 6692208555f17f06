"""The builder's executor with real child processes (real time: no autojump clock here)."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from hydra_trio.builder import builddir, outputs, process
from hydra_trio.builder.executor import execute
from hydra_trio.protocol.messages import (
    Assign,
    BuildStatus,
    Phase,
    Progress,
)

from .helpers.executor import LIMIT, Recorder, assign, run

pytestmark = pytest.mark.realnet


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by init) counts as dead."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


async def gone(pid: int) -> bool:
    """Whether ``pid`` is dead within a few seconds (init reaps orphans asynchronously)."""
    with trio.move_on_after(5):
        while alive(pid):
            await trio.sleep(0.02)
    return not alive(pid)


def pids_in(path: Path) -> list[int]:
    """The pids a build wrote to ``path`` (none yet if it has not written them)."""
    try:
        return [int(word) for word in path.read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


async def read_pid(path: Path) -> int:
    with trio.fail_after(10):
        while not (pids := pids_in(path)):
            await trio.sleep(0.01)
    return pids[0]


async def test_success_lists_outputs_with_size_hash_and_links(tmp_path: Path) -> None:
    """A successful build's $OUT files are listed with size and sha256, uploaded, and a
    symlink is listed as a link (not followed); Progress(BUILDING) comes first."""
    script = (
        "echo building; printf hello > $OUT/a; mkdir $OUT/sub; head -c 300000 /dev/zero"
        " > $OUT/sub/big; ln -s /etc/passwd $OUT/link"
    )
    result, send, build_dir = await run(tmp_path, "sh", "-c", script)
    assert result.status is BuildStatus.SUCCESS
    assert result.exit_code == 0
    assert send.messages[0] == Progress(build_id="b1", attempt=1, phase=Phase.BUILDING)
    assert send.log() == b"building\n"
    by_path = {f.path: f for f in result.outputs}
    assert set(by_path) == {"a", "sub/big", "link"}
    assert by_path["a"].size == 5
    assert by_path["a"].sha256 == hashlib.sha256(b"hello").hexdigest()
    assert by_path["sub/big"].size == 300000
    assert by_path["sub/big"].sha256 == hashlib.sha256(bytes(300000)).hexdigest()
    assert by_path["link"].link == "/etc/passwd"
    assert by_path["link"].size == 0
    uploaded: dict[str, bytes] = {}
    for chunk in send.uploads():
        assert chunk.offset == len(uploaded.get(chunk.path, b""))
        uploaded[chunk.path] = uploaded.get(chunk.path, b"") + chunk.data
    assert uploaded == {"a": b"hello", "sub/big": bytes(300000)}  # links are not uploaded
    assert not build_dir.exists()


async def test_the_build_environment_has_in_out_home_and_tmpdir(tmp_path: Path) -> None:
    """$IN, $OUT, HOME and TMPDIR are existing directories inside the build directory, and
    the command runs in a fresh working directory there."""
    script = (
        'for d in "$IN" "$OUT" "$HOME" "$TMPDIR" "$PWD"; do test -d "$d" || exit 9; done;'
        ' echo "$IN|$OUT|$HOME|$TMPDIR|$PWD|$HYDRA_TRIO_BUILD_ID|$HYDRA_TRIO_ATTEMPT|'
        '$HYDRA_TRIO_BUILD_DIR";'
        " ls -A | wc -l"
    )
    result, send, build_dir = await run(tmp_path, "sh", "-c", script)
    assert result.status is BuildStatus.SUCCESS, send.log()
    fields, count = send.log().decode().strip().split("\n")
    base = str(build_dir)
    assert fields.split("|") == [
        f"{base}/in",
        f"{base}/out",
        f"{base}/work",
        f"{base}/tmp",
        f"{base}/work",
        "b1",
        "1",
        base,
    ]
    assert count.strip() == "0"


async def test_a_non_zero_exit_is_build_failed_with_its_code(tmp_path: Path) -> None:
    """Exit status 3 is build-failed with exit code 3 and no outputs."""
    result, _, build_dir = await run(tmp_path, "sh", "-c", "echo x > $OUT/f; exit 3")
    assert result.status is BuildStatus.BUILD_FAILED
    assert result.exit_code == 3
    assert result.outputs == ()
    assert not build_dir.exists()


async def test_a_command_that_does_not_exist_fails_with_127_and_says_why(tmp_path: Path) -> None:
    """A missing command is build-failed, exit 127, with the reason in the log."""
    result, send, build_dir = await run(tmp_path, "no-such-command-hydra-trio")
    assert result.status is BuildStatus.BUILD_FAILED
    assert result.exit_code == 127
    log = send.log().decode()
    assert "no-such-command-hydra-trio" in log
    assert "No such file" in log
    assert result.error == log.strip()
    assert not build_dir.exists()


def test_a_command_found_once_is_looked_for_again_once_it_is_gone(tmp_path: Path) -> None:
    """``process._on_path`` remembers where a program was found on a PATH, and checks it
    there each time: a program removed, made non-executable or replaced by a directory is
    missing at once (another directory of the PATH holding it still counts)."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    path = f"{first}:{second}"
    tool = first / "hydra-trio-probe"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert process._on_path("hydra-trio-probe", path)
    assert process._on_path("hydra-trio-probe", path)  # (from where it was found)
    tool.chmod(0o644)
    assert not process._on_path("hydra-trio-probe", path)
    tool.unlink()
    tool.mkdir()
    assert not process._on_path("hydra-trio-probe", path)
    other = second / "hydra-trio-probe"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    assert process._on_path("hydra-trio-probe", path)
    other.unlink()
    assert not process._on_path("hydra-trio-probe", path)
    assert not process._on_path("hydra-trio-probe", str(tmp_path / "nowhere"))


async def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """Past the wall-clock timeout the build is timed-out and a background grandchild is
    killed along with the command."""
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    result, _, build_dir = await run(
        tmp_path, "sh", "-c", f"sleep 100 & echo $! > {pid_file}; sleep 100", timeout=1.0
    )
    assert result.status is BuildStatus.TIMED_OUT
    assert result.exit_code is None
    assert time.monotonic() - started >= 1.0
    assert await gone(await read_pid(pid_file))
    assert not build_dir.exists()


async def test_no_output_for_max_silent_is_silent_too_long(tmp_path: Path) -> None:
    """A build that stops printing for max_silent is killed as silent-too-long."""
    pid_file = tmp_path / "pid"
    result, send, build_dir = await run(
        tmp_path, "sh", "-c", f"echo start; sleep 100 & echo $! > {pid_file}; wait", max_silent=0.5
    )
    assert result.status is BuildStatus.SILENT_TOO_LONG
    assert send.log() == b"start\n"
    assert await gone(await read_pid(pid_file))
    assert not build_dir.exists()


async def test_output_keeps_a_build_under_max_silent_alive(tmp_path: Path) -> None:
    """Every chunk of output moves the silence deadline: a build printing more often than
    max_silent succeeds even though it runs longer than max_silent in total."""
    script = "for i in 1 2 3 4 5 6; do echo $i; sleep 0.2; done"
    result, send, _ = await run(tmp_path, "sh", "-c", script, max_silent=0.6)
    assert result.status is BuildStatus.SUCCESS
    assert send.log() == b"1\n2\n3\n4\n5\n6\n"


async def test_a_build_that_closes_its_output_and_hangs_is_silent_too_long(
    tmp_path: Path,
) -> None:
    """Closing stdout and stderr does not escape max_silent: the build is still silent."""
    result, send, _ = await run(
        tmp_path, "sh", "-c", "echo hi; exec >/dev/null 2>&1; sleep 2", max_silent=0.5
    )
    assert send.log() == b"hi\n"
    assert result.status is BuildStatus.SILENT_TOO_LONG


async def test_a_log_past_max_log_bytes_is_cut_at_the_limit(tmp_path: Path) -> None:
    """A log over max_log_bytes ends the build as log-limit-exceeded; exactly the first
    max_log_bytes bytes are sent."""
    result, send, build_dir = await run(
        tmp_path, "sh", "-c", "yes | head -c 200000; sleep 100", max_log_bytes=1000
    )
    assert result.status is BuildStatus.LOG_LIMIT_EXCEEDED
    assert send.log() == b"y\n" * 500
    assert not build_dir.exists()


async def test_outputs_past_max_output_bytes_are_refused(tmp_path: Path) -> None:
    """$OUT larger than max_output_bytes: output-limit-exceeded, nothing uploaded."""
    result, send, build_dir = await run(
        tmp_path,
        "sh",
        "-c",
        "head -c 600 /dev/zero > $OUT/a; head -c 600 /dev/zero > $OUT/b",
        max_output_bytes=1000,
    )
    assert result.status is BuildStatus.OUTPUT_LIMIT_EXCEEDED
    assert result.outputs == ()
    assert "1200" in result.error
    assert send.uploads() == []
    assert not build_dir.exists()


async def test_outputs_at_max_output_bytes_are_accepted(tmp_path: Path) -> None:
    """The output limit is inclusive: exactly max_output_bytes succeeds."""
    result, _, _ = await run(
        tmp_path, "sh", "-c", "head -c 1000 /dev/zero > $OUT/a", max_output_bytes=1000
    )
    assert result.status is BuildStatus.SUCCESS
    assert [f.size for f in result.outputs] == [1000]


async def test_cancelling_execute_kills_the_group_and_removes_the_build_dir(
    tmp_path: Path,
) -> None:
    """Cancelling execute (an Abort or a lost connection) kills the command and its
    background children and removes the build directory."""
    pids = tmp_path / "pids"
    build_dir = tmp_path / "build"
    send = Recorder()
    script = f"sleep 100 & echo $$ $! > {pids}; sleep 100"
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:

            async def build() -> None:
                await execute(
                    assign("sh", "-c", script), build_dir, send, {"PATH": os.environ["PATH"]}
                )
                raise AssertionError("execute returned instead of being cancelled")

            nursery.start_soon(build)
            while len(pids_in(pids)) < 2:
                await trio.sleep(0.01)
            assert build_dir.is_dir()
            nursery.cancel_scope.cancel()
    shell, child = pids_in(pids)
    assert await gone(shell)
    assert await gone(child)
    assert not build_dir.exists()


async def test_a_background_child_left_running_is_killed_and_does_not_hold_the_log(
    tmp_path: Path,
) -> None:
    """The command exits while a child it started in the background still holds the log
    pipe: the build ends at once with the command's status and the child is killed."""
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    result, send, build_dir = await run(
        tmp_path, "sh", "-c", f"sleep 100 & echo $! > {pid_file}; echo done"
    )
    assert result.status is BuildStatus.SUCCESS
    assert time.monotonic() - started < 10  # not the child's 100 s
    assert send.log() == b"done\n"
    assert await gone(await read_pid(pid_file))
    assert not build_dir.exists()


async def test_stdout_and_stderr_are_merged_into_log_chunks(tmp_path: Path) -> None:
    """LogChunks carry stdout and stderr, for this build and attempt, in order."""
    result, send, _ = await run(tmp_path, "sh", "-c", "echo out; echo err >&2; echo out2")
    assert result.status is BuildStatus.SUCCESS
    assert send.log() == b"out\nerr\nout2\n"
    assert all(m.build_id == "b1" and m.attempt == 1 for m in send.chunks())


async def test_output_printed_a_line_at_a_time_travels_in_few_log_chunks(tmp_path: Path) -> None:
    """What is read within LOG_LINGER of the first byte not yet sent goes out as one
    LogChunk: 100 lines printed about a millisecond apart make a few frames, not one a line
    (each frame costs the runner a thread hop and a file append), and the log is whole."""
    script = (
        "import sys, time\n"
        "for i in range(100):\n"
        "    sys.stdout.write(f'line {i}\\n'); sys.stdout.flush(); time.sleep(0.001)\n"
    )
    result, send, _ = await run(tmp_path, sys.executable, "-c", script)
    assert result.status is BuildStatus.SUCCESS
    assert send.log() == b"".join(b"line %d\n" % i for i in range(100))
    assert len(send.chunks()) < 50  # ~0.1 s of output: 2-3 frames; one a line without it


async def test_inputs_without_a_fetcher_fail_as_fetch_failed(tmp_path: Path) -> None:
    """An assignment with inputs on an executor that cannot fetch is fetch-failed (an
    infrastructure failure, retried elsewhere) without running the command."""
    from hydra_trio.protocol.messages import FileInfo, InputSpec

    marker = tmp_path / "ran"
    message = Assign(
        build_id="b1",
        attempt=1,
        command=("sh", "-c", f"touch {marker}"),
        inputs=(
            InputSpec(
                name="dep",
                build_id="b0",
                files=(FileInfo(path="f", size=1, sha256=hashlib.sha256(b"x").hexdigest()),),
            ),
        ),
    )
    build_dir = tmp_path / "build"
    send = Recorder()
    with trio.fail_after(LIMIT):
        result = await execute(message, build_dir, send, {"PATH": os.environ["PATH"]})
    assert result.status is BuildStatus.FETCH_FAILED
    assert send.messages == [Progress(build_id="b1", attempt=1, phase=Phase.FETCHING)]
    assert not marker.exists()
    assert not build_dir.exists()


async def test_an_output_whose_name_is_not_utf8_fails_the_build_clearly(tmp_path: Path) -> None:
    """A file name that is not UTF-8 cannot be listed or uploaded: build-failed, saying why."""
    result, _, _ = await run(tmp_path, "sh", "-c", "printf x > \"$OUT/$(printf 'a\\377')\"")
    assert result.status is BuildStatus.BUILD_FAILED
    assert "UTF-8" in result.error


async def test_a_leftover_build_dir_is_replaced_by_a_fresh_one(tmp_path: Path) -> None:
    build_dir = tmp_path / "build"
    (build_dir / "out").mkdir(parents=True)
    (build_dir / "out" / "stale").write_text("from an earlier attempt")
    result, send, _ = await run(tmp_path, "sh", "-c", 'ls -A "$OUT"; echo new > "$OUT/f"')
    assert result.status is BuildStatus.SUCCESS
    assert send.log() == b""  # the stale file was gone before the build ran
    assert [f.path for f in result.outputs] == ["f"]
    assert not build_dir.exists()


async def test_files_a_build_leaves_outside_out_are_removed_with_its_dir(tmp_path: Path) -> None:
    script = 'mkdir -p "$HOME/a/b" && echo x > "$HOME/a/b/c" && echo y > "$TMPDIR/t"'
    result, _, build_dir = await run(tmp_path, "sh", "-c", script)
    assert result.status is BuildStatus.SUCCESS and result.outputs == ()
    assert not build_dir.exists()


async def test_an_out_replaced_by_a_link_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret").write_text("not an output")
    script = f'rmdir "$OUT" && ln -s {elsewhere} "$OUT"'
    result, _, build_dir = await run(tmp_path, "sh", "-c", script)
    assert result.status is BuildStatus.BUILD_FAILED
    assert "no longer a directory" in (result.error or "")
    assert (elsewhere / "secret").exists() and not build_dir.exists()


def spares(builds: Path) -> list[Path]:
    return sorted(builds.glob(".spare-*"))


async def test_a_finished_build_dir_is_emptied_and_reused_by_the_next_build(
    tmp_path: Path,
) -> None:
    builds = tmp_path / "builds"
    first = 'echo secret > "$HOME/h"; mkdir "$TMPDIR/d"; echo o > "$OUT/o"; echo "$OUT"'
    with trio.fail_after(LIMIT):
        r1 = await execute(assign("sh", "-c", first), builds / "b1-1", Recorder(), {})
        assert r1.status is BuildStatus.SUCCESS and [f.path for f in r1.outputs] == ["o"]
        [spare] = spares(builds)
        assert sorted(p.name for p in spare.iterdir()) == ["in", "out", "tmp", "work"]
        assert not any(any(p.iterdir()) for p in spare.iterdir())  # all four emptied
        inode = spare.stat().st_ino
        send = Recorder()
        second = 'ls -A "$HOME" "$TMPDIR" "$OUT" "$IN"; stat -c %i "$OUT/.."'
        r2 = await execute(assign("sh", "-c", second), builds / "b2-1", send, {})
    assert r2.status is BuildStatus.SUCCESS and r2.outputs == ()
    listing, _, reused = send.log().decode().rpartition("\n")[0].rpartition("\n")
    assert "secret" not in listing and "h" not in listing.split()  # nothing of build 1
    assert int(reused) == inode  # the same directory, renamed into place
    assert [p.stat().st_ino for p in spares(builds)] == [inode]
    assert not (builds / "b1-1").exists() and not (builds / "b2-1").exists()


async def test_a_build_dir_of_many_files_is_removed_after_the_result_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished build directory with at least RECYCLE_ENTRIES entries is gone from its
    place when the result is returned (renamed aside, not kept as a spare) and removed by
    the janitor thread; one with fewer is still emptied and kept as a spare."""
    monkeypatch.setattr(builddir, "RECYCLE_ENTRIES", 50)
    builds = tmp_path / "builds"
    many = (
        'mkdir "$OUT/d" "$HOME/h"; for i in $(seq 60); do : > "$OUT/d/$i"; : > "$HOME/h/$i"; done'
    )
    with trio.fail_after(LIMIT):
        result = await execute(assign("sh", "-c", many), builds / "b1-1", Recorder(), {})
        assert result.status is BuildStatus.SUCCESS and len(result.outputs) == 60
        assert not (builds / "b1-1").exists() and spares(builds) == []
        while list(builds.iterdir()):  # the janitor removes the trash (real time)
            await trio.sleep(0.01)
        few = 'echo o > "$OUT/o"'
        result = await execute(assign("sh", "-c", few), builds / "b2-1", Recorder(), {})
    assert result.status is BuildStatus.SUCCESS
    assert len(spares(builds)) == 1 and not (builds / "b2-1").exists()


async def test_a_no_op_build_takes_a_thread_only_for_what_its_directory_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a spare at hand and nothing left in its directory, a build's directory is prepared
    and recycled, and its empty $OUT found empty, on the event loop (no thread, none of the
    blocking functions called); a build that leaves files gets them (in threads) as before."""
    builds = tmp_path / "builds"
    called: list[str] = []

    def recording(name: str, function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            called.append(name)
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(builddir, "prepare", recording("prepare", builddir.prepare))
    monkeypatch.setattr(builddir, "remove", recording("remove", builddir.remove))
    monkeypatch.setattr(outputs, "_scan", recording("scan", outputs._scan))
    with trio.fail_after(LIMIT):
        await execute(assign("true"), builds / "b0-1", Recorder(), {})
        assert called == ["prepare"]  # no spare yet: made in a thread
        [spare] = spares(builds)
        called.clear()
        r1 = await execute(assign("true"), builds / "b1-1", Recorder(), {})
        assert r1.status is BuildStatus.SUCCESS and r1.outputs == ()
        assert called == []
        assert len(spares(builds)) == 1 and not spare.exists()  # taken, then given back
        script = 'echo o > "$OUT/o"; echo h > "$HOME/h"'
        r2 = await execute(assign("sh", "-c", script), builds / "b2-1", Recorder(), {})
    assert called == ["scan", "remove"]  # outputs to hash, a file to delete: threads
    assert [f.path for f in r2.outputs] == ["o"]
    [kept] = spares(builds)
    assert not any(any(p.iterdir()) for p in kept.iterdir())  # emptied all the same
    assert not (builds / "b1-1").exists() and not (builds / "b2-1").exists()


@pytest.mark.parametrize(
    "script",
    [
        'chmod 500 "$OUT"',  # a subdirectory's mode changed
        'echo x > "$OUT/../extra"',  # something beside the four subdirectories
        # a subdirectory replaced by a link: what it points to is not emptied
        'rmdir "$TMPDIR" && ln -s "$OUT/../../../victim" "$TMPDIR"',
    ],
)
async def test_a_build_dir_the_build_changed_is_removed_not_reused(
    tmp_path: Path, script: str
) -> None:
    builds = tmp_path / "builds"
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep").write_text("not the build's")
    with trio.fail_after(LIMIT):
        await execute(assign("true"), builds / "b0-1", Recorder(), {})  # makes one spare
        [spare] = spares(builds)
        await execute(assign("sh", "-c", script), builds / "b1-1", Recorder(), {})
    assert spares(builds) == []  # b1 took the spare and did not give it back
    assert not (builds / "b1-1").exists() and not spare.exists()
    assert (tmp_path / "victim" / "keep").read_text() == "not the build's"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
async def test_finished_builds_leave_no_file_descriptor_open(tmp_path: Path) -> None:
    """A build's log pipe and whatever waited for its process are closed when it ends,
    however it ended (success, failure, a timeout that killed it)."""
    await run(tmp_path, "true")  # the first build opens what stays open (caches)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        await run(tmp_path, "sh", "-c", "echo out; echo err >&2")
        await run(tmp_path, "false")
        await run(tmp_path, "sleep", "100", timeout=0.2)
    assert len(os.listdir("/proc/self/fd")) <= before


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
async def test_builds_cancelled_from_outside_leave_no_file_descriptor_open(
    tmp_path: Path,
) -> None:
    """A build whose task is cancelled (an Abort, the connection lost) while its command runs
    closes its log pipe and whatever waited for its process too."""
    await run(tmp_path, "true")  # the first build opens what stays open (caches)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with trio.move_on_after(0.3) as scope:  # real time: the command is running by then
            await run(tmp_path, "sleep", "100")
        assert scope.cancelled_caught
    assert len(os.listdir("/proc/self/fd")) <= before
