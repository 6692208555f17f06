"""The runner's per-connection handler and the builder's handshake, each against a hand-written
peer over in-memory streams, in virtual time."""

from __future__ import annotations

import functools
import itertools
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import attrs
import psutil
import pytest
import trio
import trio.testing

from hydra_trio.builder.builddir import BUILD_DIR_VARIABLE
from hydra_trio.builder.daemon import (
    BuilderConfig,
    BuilderState,
    WorkDirError,
    claim_work_dir,
    load_machine_id,
    run_builder,
)
from hydra_trio.builder.state import SessionEnd
from hydra_trio.net import FramedChannel
from hydra_trio.protocol import codec
from hydra_trio.protocol.connection import Connection, ConnectionState
from hydra_trio.protocol.errors import IncompatibleVersionError
from hydra_trio.protocol.messages import (
    PROTOCOL_VERSION,
    Assign,
    BuildStatus,
    Challenge,
    FetchData,
    LogChunk,
    Message,
    Phase,
    Ping,
    Pong,
    Progress,
    Reject,
    Result,
    Role,
    Welcome,
)
from hydra_trio.runner.daemon import lock_state_dir
from hydra_trio.runner.model import BuildState, MachineState
from hydra_trio.runner.session import BuilderSession
from hydra_trio.runner.store import StoreError

from .helpers.common import RUNNER, SYSTEM, spec, state_of
from .helpers.fake_builder import hello
from .helpers.fake_runner import FakeRunner
from .helpers.sim import Farmlet


async def test_a_connection_that_sends_nothing_is_closed_after_exactly_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """No hello: the runner sends its challenge, then closes the connection at exactly
    handshake_timeout."""
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        t0 = trio.current_time()
        builder = runner.connect()
        sent = await builder.closed()
        assert trio.current_time() - t0 == pytest.approx(10.0, abs=1e-9)
        # all the runner said before the EOF: its challenge, and nothing after it
        decoder = codec.FrameDecoder()
        [challenge] = decoder.feed(sent)
        assert decoder.buffered == 0
        assert isinstance(challenge, Challenge)
        assert not challenge.token_required
        await trio.testing.wait_all_tasks_blocked()
        assert runner.ended[0] == pytest.approx(t0 + 10.0, abs=1e-9)
        assert runner.farm.machines == {}
        nursery.cancel_scope.cancel()


async def test_a_hello_that_is_half_sent_still_gets_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A peer trickling a partial frame does not extend the handshake deadline."""
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        t0 = trio.current_time()
        builder = runner.connect()
        await builder.challenge()
        frame = codec.encode(hello())
        for byte in frame[:-1]:  # a byte every ~0.1 s, done well before the deadline
            await builder.stream.send_all(bytes([byte]))
            await trio.sleep(8.0 / len(frame))
        assert await builder.closed() == b""
        assert trio.current_time() - t0 == pytest.approx(10.0, abs=1e-9)
        assert runner.farm.machines == {}
        nursery.cancel_scope.cancel()


async def test_a_first_frame_other_than_hello_closes_the_connection(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A Ping before the hello: closed at once, and nothing is attached to the farm."""
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        t0 = trio.current_time()
        builder = runner.connect()
        await builder.challenge()
        await builder.stream.send_all(codec.encode(Ping(seq=0)))
        assert await builder.closed() == b""
        assert trio.current_time() == t0
        assert runner.farm.machines == {}
        nursery.cancel_scope.cancel()


async def test_an_incompatible_protocol_version_is_rejected_naming_both_versions(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A hello speaking 2.0 gets Reject(incompatible-version) naming 2.0 and ours, then EOF."""
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        builder = runner.connect()
        await builder.challenge()
        await builder.send(hello(version="2.0"))
        reject = await builder.receive()
        assert isinstance(reject, Reject)
        assert reject.code == "incompatible-version"
        assert "2.0" in reject.reason
        assert PROTOCOL_VERSION in reject.reason
        assert await builder.closed() == b""
        assert runner.farm.machines == {}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x00\x00\x00\x03\xc1\xc1\xc1", id="invalid-msgpack"),
        pytest.param(b"\xff\xff\xff\xff", id="oversized-frame"),
        pytest.param(
            codec.encode(Assign(build_id="x", attempt=1, command=("true",))), id="runner-only"
        ),
    ],
)
async def test_a_malformed_frame_closes_that_connection_only(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, garbage: bytes
) -> None:
    """Builder a sends a bad frame: a is dropped; b, connected at the same time, keeps its
    session, gets its Pongs, and runs a build to completion."""
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        a = runner.connect()
        b = runner.connect()
        await a.handshake("a")
        await b.handshake("b")
        machine_a, machine_b = runner.farm.machines["a"], runner.farm.machines["b"]
        session_b = machine_b.session
        await b.ping()

        await a.stream.send_all(garbage)
        assert await a.closed() == b""
        assert machine_a.state is MachineState.DISCONNECTED
        assert "protocol error" in machine_a.disconnect_reason

        assert (await b.ping()).seq == 1
        build = runner.farm.submit(spec(), trio.current_time())
        assign = await b.receive()
        assert isinstance(assign, Assign)
        assert assign.build_id == build.id
        await b.send(Result(build_id=build.id, attempt=assign.attempt, status=BuildStatus.SUCCESS))
        assert (await b.ping()).seq == 2
        assert build.state is BuildState.SUCCEEDED
        assert build.hostname == "b"
        assert machine_b.state is MachineState.CONNECTED
        assert machine_b.session is session_b
        assert machine_b.sessions == 1
        assert 1 not in runner.ended
        nursery.cancel_scope.cancel()


async def test_a_ping_gets_its_pong_and_resets_since_last_ping(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Ping(seq) is answered with Pong(seq), and /status's sinceLastPing restarts from 0."""
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        builder = runner.connect()
        await builder.handshake("m1")
        machine = runner.farm.machines["m1"]
        await trio.sleep(7)
        assert machine.to_json(trio.current_time())["sinceLastPing"] == pytest.approx(7.0)
        for seq in range(3):
            pong = await builder.ping()
            assert pong.seq == seq
        assert machine.to_json(trio.current_time())["sinceLastPing"] == 0.0
        await trio.sleep(4)
        assert machine.to_json(trio.current_time())["sinceLastPing"] == pytest.approx(4.0)
        nursery.cancel_scope.cancel()


async def test_a_silent_builder_is_disconnected_at_exactly_its_last_frame_plus_the_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """After its last frame a builder goes quiet: disconnected at last frame + 30 s exactly,
    and its running build is requeued as builder-lost."""
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        builder = runner.connect()
        await builder.handshake("m1")
        build = runner.farm.submit(spec(), trio.current_time())
        assert isinstance(await builder.receive(), Assign)
        await trio.sleep(12)
        await builder.ping()
        await trio.sleep(5)
        await builder.send(Progress(build_id=build.id, attempt=1, phase=Phase.BUILDING))
        last_frame = trio.current_time()
        machine = runner.farm.machines["m1"]

        await trio.sleep(29.9)
        assert state_of(machine) is MachineState.CONNECTED
        await builder.closed()
        assert trio.current_time() == pytest.approx(last_frame + 30.0, abs=1e-9)
        assert state_of(machine) is MachineState.DISCONNECTED
        assert machine.disconnected_at == pytest.approx(last_frame + 30.0, abs=1e-9)
        assert "silent for 30 s" in machine.disconnect_reason
        assert build.state is BuildState.QUEUED
        assert build.status is BuildStatus.BUILDER_LOST
        assert machine.lost_builds == 1
        nursery.cancel_scope.cancel()


async def test_a_frame_arriving_slowly_keeps_the_builder_alive_until_its_bytes_stop(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A frame that takes longer than the timeout to arrive (a very slow link) keeps the
    builder alive while its bytes come in; once they stop, the watchdog fires at the last
    progress + 30 s exactly, not at the last whole frame's."""
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        builder = runner.connect()
        await builder.handshake("m1")
        build = runner.farm.submit(spec(), trio.current_time())
        assert isinstance(await builder.receive(), Assign)
        frame = builder.conn.send(LogChunk(build_id=build.id, attempt=1, data=b"x" * 16384))
        machine = runner.farm.machines["m1"]
        piece = 2048  # each piece is more than PROGRESS_BYTES
        for start in range(0, 4 * piece, piece):  # 4 pieces 20 s apart: 80 s for the frame
            await builder.stream.send_all(frame[start : start + piece])
            last_progress = trio.current_time()
            await trio.sleep(20)
            assert state_of(machine) is MachineState.CONNECTED
        await builder.closed()
        assert trio.current_time() == pytest.approx(last_progress + 30.0, abs=1e-9)
        assert machine.disconnected_at == pytest.approx(last_progress + 30.0, abs=1e-9)
        assert "silent for 30 s" in machine.disconnect_reason
        nursery.cancel_scope.cancel()


async def test_a_result_for_an_attempt_that_is_not_current_is_counted_and_ignored(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A Result naming another attempt changes nothing and is counted in stale_rejected; the
    current attempt's Result is then committed."""
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        builder = runner.connect()
        await builder.handshake("m1")
        build = runner.farm.submit(spec(), trio.current_time())
        assign = await builder.receive()
        assert isinstance(assign, Assign)
        assert assign.attempt == 1
        for attempt in (0, 2):
            await builder.send(
                Result(build_id=build.id, attempt=attempt, status=BuildStatus.SUCCESS)
            )
        await builder.send(Result(build_id="no-such-build", attempt=1, status=BuildStatus.SUCCESS))
        await builder.ping()  # frames are handled in order: the results were seen
        assert runner.farm.metrics.stale_rejected == 3
        assert state_of(build) is BuildState.RUNNING
        assert build.attempts == 1
        assert runner.farm.machines["m1"].running == {build.id: build}

        await builder.send(Result(build_id=build.id, attempt=1, status=BuildStatus.BUILD_FAILED))
        await builder.ping()
        assert state_of(build) is BuildState.FAILED
        assert build.status is BuildStatus.BUILD_FAILED
        assert runner.farm.metrics.stale_rejected == 3
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------
# The builder's side of the handshake.


def builder_config(tmp_path: Path) -> BuilderConfig:
    return BuilderConfig(
        systems=(SYSTEM,),
        work_dir=tmp_path / "builder",
        hostname="b1",
        reconnect_floor=0.5,
        reconnect_base=1.0,
        reconnect_max=60.0,
    )


async def test_a_runner_rejecting_our_version_ends_run_builder_with_an_error(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Reject(incompatible-version) is the one rejection run_builder does not retry."""
    config = builder_config(tmp_path)
    async with trio.open_nursery() as nursery:
        runner = FakeRunner(nursery, reject="incompatible-version")
        state = BuilderState(config=config, machine_id="m1")
        with pytest.raises(IncompatibleVersionError, match="go away"):
            await run_builder(config, connect=runner.connect, state=state)
        assert len(runner.connect_times) == 1
        assert runner.hellos[0].protocol_version == PROTOCOL_VERSION
        assert runner.hellos[0].machine_id == "m1"
        nursery.cancel_scope.cancel()


async def test_an_auth_failure_backs_off_and_retries(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Reject(auth-failed) does not end the builder: it reconnects after the jittered
    backoff, never sooner than the floor, with growing windows."""
    config = builder_config(tmp_path)
    async with trio.open_nursery() as nursery:
        runner = FakeRunner(nursery, reject="auth-failed")
        state = BuilderState(config=config, machine_id="m1", rng=random.Random(7))
        await nursery.start(
            functools.partial(run_builder, config, connect=runner.connect, state=state)
        )
        while len(runner.connect_times) < 4:
            await runner.connected.wait()
        times = runner.connect_times
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for n, gap in enumerate(gaps):
            assert config.reconnect_floor <= gap <= config.reconnect_base * 2**n + 1e-9
        rejected = [
            e.reason
            for e in state.events
            if e.end is SessionEnd.REJECTED and "auth-failed" in e.reason
        ]
        assert len(rejected) >= 3
        assert "go away" in rejected[0]
        nursery.cancel_scope.cancel()


def test_the_machine_id_is_kept_in_the_work_dir(tmp_path: Path) -> None:
    """load_machine_id creates an id once and returns the same one ever after (a restart);
    another work dir is another machine."""
    first = load_machine_id(tmp_path / "w")
    assert first
    assert load_machine_id(tmp_path / "w") == first
    assert (tmp_path / "w" / "machine-id").read_text().strip() == first
    assert load_machine_id(tmp_path / "other") != first


def test_a_work_dir_is_claimed_by_one_builder_which_clears_what_a_killed_one_left(
    tmp_path: Path,
) -> None:
    """claim_work_dir: a second builder on the same work dir is refused with one clear line;
    the first removes build directories and partial fetches left behind (a builder killed with
    -9 cannot), and keeps the machine id and the cache."""
    work = tmp_path / "w"
    machine_id = load_machine_id(work)
    leftover = work / "builds" / "b1-1"
    (leftover / "out").mkdir(parents=True)
    (leftover / "out" / "x").write_text("half")
    (leftover / "in").mkdir()
    (leftover / "in").chmod(0o500)
    (work / "cache" / "tmp").mkdir(parents=True)
    (work / "cache" / "tmp" / "0-abc").write_bytes(b"partial")
    blob = work / "cache" / "ab" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"kept")
    lock = claim_work_dir(work)
    try:
        assert not list((work / "builds").iterdir())
        assert not list((work / "cache" / "tmp").iterdir())
        assert blob.read_bytes() == b"kept"
        assert load_machine_id(work) == machine_id
        with pytest.raises(WorkDirError, match=r"another builder is using .*--work-dir"):
            claim_work_dir(work)
    finally:
        lock.close()
    claim_work_dir(work).close()  # free again once the first has stopped


def test_a_new_builder_kills_what_builds_of_a_killed_one_left_running(tmp_path: Path) -> None:
    """A builder killed with -9 cannot kill its builds' processes; the next one on the same
    work dir finds them by HYDRA_TRIO_BUILD_DIR and kills them (and only them)."""
    work = tmp_path / "w"
    ours = work.absolute() / "builds" / "b1-1"
    elsewhere = tmp_path / "other" / "builds" / "b1-1"

    def start(build_dir: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, BUILD_DIR_VARIABLE: str(build_dir)}
        # a shell with a child: the shell is the group leader, the sleep a member
        return subprocess.Popen(["sh", "-c", "sleep 60 & wait"], env=env, start_new_session=True)

    left, other = start(ours), start(elsewhere)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(_children_of(left.pid)) < 1:
            time.sleep(0.01)
        [child] = _children_of(left.pid)
        claim_work_dir(work).close()
        assert left.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.01)
        assert not _alive(child)
        assert other.poll() is None  # another work dir's build: not ours to kill
    finally:
        for proc in (left, other):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _children_of(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


async def test_the_runner_keeps_a_builder_that_hears_nothing_informed_that_it_lives(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A builder whose pings answer on time gets nothing more.  One that is still heard from
    but whose pings stop getting through (during an upload they wait behind its own data)
    still hears from the runner: a Pong repeating the last ping's number after 1.5 ping
    intervals of silence, every 1.5 intervals, so its ping timeout does not depend on its own
    outgoing queue.  One not heard from within half a ping interval gets none: a builder cut
    off in one direction must notice."""
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        builder = runner.connect()
        await builder.challenge()
        await builder.send(attrs.evolve(hello("m1"), ping_interval=2.0))
        assert isinstance(await builder.receive(), Welcome)
        for _ in range(5):  # pinging on time: each ping gets its pong, nothing else comes
            pong = await builder.ping()
            await trio.sleep(2.0)
            assert not builder.received
        assert pong.seq == 4
        last_pong = trio.current_time() - 2.0

        async def uploading() -> None:  # frames, but no pings
            for _ in range(18):
                await builder.send(LogChunk(build_id="elsewhere", attempt=1, data=b"x"))
                await trio.sleep(0.5)

        nursery.start_soon(uploading)
        heard: list[tuple[float, Message]] = []
        while len(heard) < 3:
            message = await builder.receive()
            heard.append((trio.current_time() - last_pong, message))
        assert heard == [(pytest.approx(3.0 * n), Pong(seq=4)) for n in (1, 2, 3)]
        assert builder.conn.rtt is not None  # (from the real pongs; the keepalives left it)
        # The builder falls silent after its last frame (at 10.5 s): at 12 s it was last heard
        # more than half a ping interval ago, so no more keepalives (the runner gives up on it
        # at 40.5 s).
        with trio.move_on_after(25):
            while True:
                message = await builder.receive()
                heard.append((trio.current_time() - last_pong, message))
        assert heard[3:] == []
        nursery.cancel_scope.cancel()


async def test_an_answer_never_waits_behind_a_write_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While the writer is stuck handing a large frame to a peer that does not read (a
    transfer over a slow link), the receive loop's Pong is queued, not awaited: the loop
    goes on reading, so the runner never takes the builder for silent because of its own
    writes."""
    runner_end, _builder_end = trio.testing.lockstep_stream_pair()
    channel = FramedChannel(
        runner_end, Connection(Role.RUNNER, now=trio.current_time(), peer_timeout=1e9)
    )
    channel.connection.state = ConnectionState.ESTABLISHED
    session = BuilderSession(channel)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.writer)
        session.post(FetchData(request_id=1, data=b"x" * 65536))
        await trio.sleep(1)
        assert channel.writing  # the builder reads nothing: the write cannot finish
        with trio.fail_after(0.001):
            await session.reply(Pong(seq=7))
        assert session.outbox.queued == 1
        nursery.cancel_scope.cancel()


def test_a_state_dir_is_held_by_one_runner(tmp_path: Path) -> None:
    """A second runner on the same state dir is refused with one line; free once the first
    has stopped."""
    lock = lock_state_dir(tmp_path / "state")
    try:
        with pytest.raises(StoreError, match=r"another queue runner is using .*--state-dir"):
            lock_state_dir(tmp_path / "state")
    finally:
        lock.close()
    lock_state_dir(tmp_path / "state").close()
