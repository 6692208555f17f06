"""Liveness of the runner <-> builder connection, in virtual time over the simulated network."""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from hydra_trio.builder.state import EventKind
from hydra_trio.protocol.messages import (
    Assign,
    BuildStatus,
    LogChunk,
    Phase,
    Progress,
    Result,
)
from hydra_trio.runner.daemon import RunnerConfig
from hydra_trio.runner.model import BuildState, MachineState

from .helpers.common import RUNNER, SYSTEM, builder_config, spec, wait_until
from .helpers.sim import Farmlet


def hanging_executor(
    log: list[tuple[str, int]], phase: Phase = Phase.BUILDING, seconds: float = 10 * 3600
) -> Callable[..., Awaitable[Result]]:
    """An executor that reports ``phase`` and then hangs (a stuck fetch or a long build)."""

    async def execute(assign: Assign, build_dir: Path, send, env, fetch) -> Result:  # type: ignore[no-untyped-def]
        log.append((assign.build_id, assign.attempt))
        await send(Progress(build_id=assign.build_id, attempt=assign.attempt, phase=phase))
        await trio.sleep(seconds)
        return Result(
            build_id=assign.build_id,
            attempt=assign.attempt,
            status=BuildStatus.SUCCESS,
            exit_code=0,
        )

    return execute


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_blackholed_link_is_detected_on_both_sides_and_the_build_moves(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A link that silently drops everything: the builder reconnects after exactly ping-timeout,
    the runner drops the machine after exactly builder-timeout, the build runs on B, and A's
    child process is gone."""
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        pid_file = tmp_path / "pid"
        state_a = await farm.add_builder("a", builder_config(tmp_path, "a"))
        build = farm.farm.submit(
            spec("sh", "-c", f"echo $$ > {pid_file}; exec sleep 3600"), trio.current_time()
        )
        await wait_until(lambda: pid_file.exists() and pid_file.read_text().strip())
        pid = int(pid_file.read_text())
        assert process_alive(pid)
        await farm.add_builder("b", builder_config(tmp_path, "b"))
        machine_a = farm.machine("a")

        await trio.sleep(25 - trio.current_time() % 10)  # between two pings
        last_ping = machine_a.last_ping_at
        farm.network.current("a").blackhole()
        t0 = trio.current_time()

        await wait_until(lambda: machine_a.state is MachineState.DISCONNECTED)
        assert machine_a.disconnected_at == pytest.approx(last_ping + RUNNER.builder_timeout)
        assert "silent for 30 s" in machine_a.disconnect_reason
        watchdog = [e.time for e in state_a.events if e.kind is EventKind.WATCHDOG]
        assert len(watchdog) == 1
        assert t0 < watchdog[0] <= last_ping + 30.0 + 1e-6  # the pong came right after the ping

        assert build.state is BuildState.RUNNING
        assert build.attempts == 2
        assert build.hostname == "b"
        assert build.started_at is not None
        # The kill is immediate, but the old child is reaped in real time, not virtual time:
        # give the reaper real time without letting the clock run on.
        real_deadline = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < real_deadline:
            await trio.lowlevel.checkpoint()
        assert not process_alive(pid)
        nursery.cancel_scope.cancel()


async def test_a_fetch_hanging_for_ten_hours_never_disconnects_a_healthy_builder(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The seed's case: a build stuck fetching inputs for 10 hours; pings keep flowing."""
    started: list[tuple[str, int]] = []
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        await farm.add_builder(
            "a",
            builder_config(tmp_path, "a"),
            execute=hanging_executor(started, Phase.FETCHING, 11 * 3600),
        )
        build = farm.farm.submit(spec(), trio.current_time())
        machine = farm.machine("a")
        await wait_until(lambda: build.phase is Phase.FETCHING)
        end = trio.current_time() + 10 * 3600
        worst = 0.0
        while trio.current_time() < end:
            await trio.sleep(7)
            assert machine.state is MachineState.CONNECTED
            worst = max(worst, trio.current_time() - machine.last_ping_at)
        assert worst <= 10.0
        assert machine.sessions == 1
        assert started == [(build.id, 1)]
        assert build.state is BuildState.RUNNING
        nursery.cancel_scope.cancel()


async def test_a_blip_shorter_than_the_timeouts_changes_nothing(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A 15 s pause in both directions, shorter than timeout - interval: nothing changes."""
    started: list[tuple[str, int]] = []
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        await farm.add_builder(
            "a", builder_config(tmp_path, "a"), execute=hanging_executor(started)
        )
        build = farm.farm.submit(spec(), trio.current_time())
        await wait_until(lambda: build.state is BuildState.RUNNING)
        await trio.sleep(15 - trio.current_time() % 10)
        link = farm.network.current("a")
        link.pause()
        await trio.sleep(15)
        link.resume()
        await trio.sleep(100)
        machine = farm.machine("a")
        assert machine.state is MachineState.CONNECTED
        assert machine.sessions == 1
        assert len(farm.network.links["a"]) == 1
        assert started == [(build.id, 1)]
        assert build.attempts == 1
        nursery.cancel_scope.cancel()


async def test_a_builder_pings_often_enough_for_the_runners_timeout_whatever_its_flags(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Runner --builder-timeout 3, builder left at --ping-interval 10: the builder pings every
    second, keeps its one session and its build for 100 s, and warns once about its flag."""
    started: list[tuple[str, int]] = []
    fast = attrs.evolve(RUNNER, builder_timeout=3.0)
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, fast, tmp_path / "runner")
        state = await farm.add_builder(
            "a", builder_config(tmp_path, "a"), execute=hanging_executor(started)
        )
        build = farm.farm.submit(spec(), trio.current_time())
        await wait_until(lambda: build.state is BuildState.RUNNING)
        machine = farm.machine("a")
        pings: list[float] = []
        for _ in range(100):
            await trio.sleep(1)
            pings.append(machine.last_ping_at)
        # every second a new ping, none of them later than 1 s after the one before
        assert len(set(pings)) >= 99
        assert max(b - a for a, b in itertools.pairwise(sorted(set(pings)))) <= 1.0 + 1e-9
        assert machine.state is MachineState.CONNECTED
        assert machine.sessions == 1
        assert state.sessions == 1
        assert started == [(build.id, 1)]
        assert build.attempts == 1
        warnings = [r.getMessage() for r in caplog.records if "--ping-interval" in r.getMessage()]
        assert warnings == [
            "--ping-interval 10 s is longer than a third of the runner's --builder-timeout 3 s: "
            "pinging every 1 s instead (give --ping-interval 1 to silence this)"
        ]
        nursery.cancel_scope.cancel()


async def test_a_late_result_for_a_superseded_attempt_is_rejected(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """After a partition, the old builder's Result for attempt 1 changes nothing; the new
    attempt's result is committed, once."""
    started: list[tuple[str, int]] = []
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        await farm.add_builder(
            "a", builder_config(tmp_path, "a"), execute=hanging_executor(started, seconds=100)
        )
        build = farm.farm.submit(spec(), trio.current_time())
        await wait_until(lambda: build.state is BuildState.RUNNING)
        await trio.sleep(5)
        # A partition cuts a off; once the runner gives up on it, b takes the build over.
        farm.network.current("a").blackhole()
        await wait_until(lambda: farm.machine("a").state is MachineState.DISCONNECTED)
        await farm.add_builder(
            "b", builder_config(tmp_path, "b"), execute=hanging_executor(started, seconds=50)
        )
        await wait_until(lambda: build.attempts == 2)
        assert build.hostname == "b"

        # a reconnects and, from the old attempt, claims success.
        machine_a = farm.machine("a")
        await wait_until(lambda: machine_a.state is MachineState.CONNECTED)
        session = machine_a.session
        stale = Result(build_id=build.id, attempt=1, status=BuildStatus.SUCCESS, exit_code=0)
        rejected_before = farm.farm.metrics.stale_rejected
        assert not farm.farm.on_result(session, machine_a, stale, trio.current_time())
        stale_log = LogChunk(build_id=build.id, attempt=1, data=b"stale")
        assert farm.farm.on_log(session, machine_a, stale_log) is None
        assert farm.farm.metrics.stale_rejected == rejected_before + 2
        assert build.state is BuildState.RUNNING
        assert b"stale" not in await farm.storage.logs.read(build.id, 1)
        assert b"stale" not in await farm.storage.logs.read(build.id, 2)

        await wait_until(lambda: build.state.finished)
        assert build.state is BuildState.SUCCEEDED
        assert build.attempts == 2
        assert build.hostname == "b"
        assert farm.farm.metrics.finished[BuildStatus.SUCCESS.value] == 1
        # A duplicate of the committed result is rejected too: committed once.
        machine_b = farm.machine("b")
        again = Result(build_id=build.id, attempt=2, status=BuildStatus.BUILD_FAILED)
        assert not farm.farm.on_result(machine_b.session, machine_b, again, trio.current_time())
        assert build.state is BuildState.SUCCEEDED
        nursery.cancel_scope.cancel()


async def test_a_reconnect_while_the_old_socket_is_half_open_supersedes_it(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The builder gives up on a dead link before the runner does; its new connection
    replaces the old session at once, and the old session's build is requeued first."""
    runner = RunnerConfig(builder_timeout=300.0, http=None, default_system=SYSTEM)
    started: list[tuple[str, int]] = []
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, runner, tmp_path / "runner")
        state = await farm.add_builder(
            "a", builder_config(tmp_path, "a", ping_timeout=30.0), execute=hanging_executor(started)
        )
        build = farm.farm.submit(spec(), trio.current_time())
        await wait_until(lambda: build.state is BuildState.RUNNING)
        machine = farm.machine("a")
        old_session = machine.session
        farm.network.current("a").blackhole()
        t0 = trio.current_time()
        await wait_until(lambda: machine.sessions == 2)
        assert trio.current_time() - t0 < 60  # well before the runner's 300 s
        assert machine.session is not old_session
        assert old_session.close_reason is not None
        assert "superseded" in old_session.close_reason
        assert machine.state is MachineState.CONNECTED
        await wait_until(lambda: build.attempts == 2)
        assert started == [(build.id, 1), (build.id, 2)]
        assert machine.lost_builds == 1
        assert state.sessions == 2
        # exactly one live session for the machine
        assert sum(1 for m in farm.farm.machines.values() if m.session is not None) == 1
        nursery.cancel_scope.cancel()


async def test_cancel_of_a_running_build_aborts_it_and_its_late_result_is_stale(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Cancelling a running build frees the slot at once; the builder aborts the attempt."""
    started: list[tuple[str, int]] = []
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        state = await farm.add_builder(
            "a", builder_config(tmp_path, "a"), execute=hanging_executor(started)
        )
        build = farm.farm.submit(spec(), trio.current_time())
        await wait_until(lambda: build.state is BuildState.RUNNING)
        machine = farm.machine("a")
        farm.farm.cancel(build.id, trio.current_time())
        assert build.state is BuildState.CANCELLED
        assert machine.running == {}
        late = Result(build_id=build.id, attempt=1, status=BuildStatus.SUCCESS)
        assert not farm.farm.on_result(machine.session, machine, late, trio.current_time())
        assert build.state is BuildState.CANCELLED
        await trio.sleep(1)
        assert not any(e.kind is EventKind.DISCONNECTED for e in state.events)
        nursery.cancel_scope.cancel()


async def test_a_hundred_builders_reconnect_spread_out_never_faster_than_the_floor(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """When the runner goes away, reconnect attempts spread over the jitter window."""
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        for index in range(100):
            await farm.add_builder(
                f"b{index}", builder_config(tmp_path, f"b{index}"), rng=random.Random(index)
            )
        await wait_until(
            lambda: all(m.state is MachineState.CONNECTED for m in farm.farm.machines.values())
        )
        # The runner restarts: every connection is closed at once and refused for 5 s.
        farm.network.down = True
        t0 = trio.current_time()
        for links in farm.network.links.values():
            await links[-1].runner_end.aclose()
        await trio.sleep(5)
        farm.network.down = False
        await wait_until(
            lambda: all(m.state is MachineState.CONNECTED for m in farm.farm.machines.values())
        )

        first = sorted(times[1] - t0 for times in farm.network.connect_times.values())
        assert len(first) == 100
        assert min(first) >= 0.1  # the floor
        assert max(first) <= 1.0 + 1e-9  # the first window is about a second
        buckets = [0] * 10
        for t in first:
            buckets[min(9, int(t * 10))] += 1
        assert max(buckets) <= 25, buckets  # no spike
        # Later attempts back off further, but never beyond the cap.
        for times in farm.network.connect_times.values():
            gaps = [b - a for a, b in itertools.pairwise(times[1:])]
            assert all(0.1 - 1e-9 <= g <= 60 for g in gaps)
        nursery.cancel_scope.cancel()


async def test_builder_messages_are_applied_only_for_the_current_attempt(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Progress and log frames of the current attempt are applied."""
    # Timeouts of days, not the contract's 30 s: the runner appends the log chunk in a worker
    # thread before it reads the next frame, and while that thread takes real time the
    # autojump clock runs on (wait_until polls, a few hundred virtual seconds per real second
    # of it); with 30 s, a loaded machine let the builder's ping timeout pass meanwhile, and
    # the build failed as builder-lost three times.  Liveness is not what this test is about.
    days = attrs.evolve(RUNNER, builder_timeout=30 * 86400.0)
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, days, tmp_path / "runner")

        async def execute(assign: Assign, build_dir: Path, send, env, fetch) -> Result:  # type: ignore[no-untyped-def]
            await send(
                Progress(build_id=assign.build_id, attempt=assign.attempt, phase=Phase.BUILDING)
            )
            await send(LogChunk(build_id=assign.build_id, attempt=assign.attempt, data=b"hi\n"))
            return Result(
                build_id=assign.build_id,
                attempt=assign.attempt,
                status=BuildStatus.SUCCESS,
                exit_code=0,
            )

        config = builder_config(tmp_path, "a", ping_interval=86400.0)
        await farm.add_builder("a", config, execute=execute)
        build = farm.farm.submit(spec(), trio.current_time())
        await wait_until(lambda: build.state.finished)
        assert build.state is BuildState.SUCCEEDED
        assert build.attempts == 1
        assert await farm.storage.logs.read(build.id, build.attempts) == b"hi\n"
        assert farm.farm.metrics.stale_rejected == 0
        nursery.cancel_scope.cancel()
