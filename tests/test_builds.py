"""Build semantics through the in-process farm: graphs, retries, drain, cancel."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
import trio.testing

from hydra_trio.builder.daemon import BuilderState, run_builder
from hydra_trio.builder.state import EventKind
from hydra_trio.protocol.messages import (
    Assign,
    BuildStatus,
    FetchFiles,
    FetchRequest,
    FileInfo,
    InputSpec,
    Phase,
    Progress,
    Result,
)
from hydra_trio.runner.daemon import RunnerConfig
from hydra_trio.runner.model import BuildSpec, BuildState, MachineState

from .helpers.common import SYSTEM, builder_config, spec, wait_until
from .helpers.fake_runner import FakeRunner
from .helpers.sim import Farmlet

RUNNER = RunnerConfig(builder_timeout=30.0, http=None, default_system=SYSTEM, max_tries=3)


def scripted_executor(
    script: dict[str, BuildStatus], seen: list[tuple[str, int, str]], seconds: float = 1.0
) -> Callable[..., Awaitable[Result]]:
    """An executor that ends each build with the status ``script`` names for its command."""

    async def execute(assign: Assign, build_dir: Path, send, env, fetch) -> Result:  # type: ignore[no-untyped-def]
        seen.append((assign.build_id, assign.attempt, env.get("WHO", "")))
        await send(Progress(build_id=assign.build_id, attempt=assign.attempt, phase=Phase.BUILDING))
        await trio.sleep(seconds)
        status = script.get(assign.command[0], BuildStatus.SUCCESS)
        return Result(
            build_id=assign.build_id,
            attempt=assign.attempt,
            status=status,
            exit_code=0 if status is BuildStatus.SUCCESS else 1,
        )

    return execute


def with_after(build_spec: BuildSpec, *ids: str, name: str = "") -> BuildSpec:
    return BuildSpec(command=build_spec.command, system=build_spec.system, after=ids, name=name)


async def test_a_failure_in_the_middle_of_a_diamond_fails_everything_below_it(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """top -> (left, right) -> bottom: left fails, so bottom is dependency-failed, never run."""
    seen: list[tuple[str, int, str]] = []
    script = {"fail": BuildStatus.BUILD_FAILED}
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        await farm.add_builder(
            "a", builder_config(tmp_path, "a", max_jobs=2), execute=scripted_executor(script, seen)
        )
        now = trio.current_time()
        top = farm.farm.submit(spec("ok"), now)
        left = farm.farm.submit(with_after(spec("fail"), top.id), now)
        right = farm.farm.submit(with_after(spec("ok"), top.id), now)
        bottom = farm.farm.submit(with_after(spec("ok"), left.id, right.id), now)
        await wait_until(lambda: bottom.state.finished and right.state.finished)
        assert top.state is BuildState.SUCCEEDED
        assert left.status is BuildStatus.BUILD_FAILED
        assert right.state is BuildState.SUCCEEDED
        assert bottom.status is BuildStatus.DEPENDENCY_FAILED
        assert bottom.attempts == 0
        assert bottom.id not in {build_id for build_id, _, _ in seen}
        nursery.cancel_scope.cancel()


async def test_infrastructure_failures_are_retried_on_another_builder_up_to_max_tries(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A fetch failure is retried, preferring the other builder; after max-tries it fails
    with the last reason; a build failure is not retried."""
    seen: list[tuple[str, int, str]] = []
    script = {"flaky": BuildStatus.FETCH_FAILED, "broken": BuildStatus.BUILD_FAILED}
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        for name in ("a", "b"):
            await farm.add_builder(
                name, builder_config(tmp_path, name), execute=scripted_executor(script, seen)
            )
        flaky = farm.farm.submit(spec("flaky"), trio.current_time())
        broken = farm.farm.submit(spec("broken"), trio.current_time())
        await wait_until(lambda: flaky.state.finished and broken.state.finished)
        assert flaky.status is BuildStatus.FETCH_FAILED
        assert flaky.attempts == RUNNER.max_tries
        attempts = [attempt for build_id, attempt, _ in seen if build_id == flaky.id]
        assert attempts == [1, 2, 3]
        assert len(set(flaky.failed_on[:2])) == 2  # the retry went to the other builder
        assert broken.status is BuildStatus.BUILD_FAILED
        assert broken.attempts == 1
        assert farm.farm.metrics.requeued["fetch-failed"] == 2
        nursery.cancel_scope.cancel()


async def test_a_drained_builder_finishes_its_build_keeps_pinging_and_leaves_cleanly(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Drain during a long build: no new work, never disconnected while building, the build
    succeeds, then the builder says goodbye and run_builder returns (exit 0)."""
    seen: list[tuple[str, int, str]] = []
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        state = await farm.add_builder(
            "a",
            builder_config(tmp_path, "a", max_jobs=2),
            execute=scripted_executor({}, seen, seconds=600),
        )
        long = farm.farm.submit(spec("long"), trio.current_time())
        await wait_until(lambda: long.state is BuildState.RUNNING)
        machine = farm.machine("a")
        farm.farm.drain("a")
        assert machine.state is MachineState.DRAINING
        later = farm.farm.submit(spec("later"), trio.current_time())
        states = set()
        while not long.state.finished:
            states.add(machine.state)
            assert trio.current_time() - machine.last_ping_at <= 10.0
            await trio.sleep(1)
        assert states == {MachineState.DRAINING}
        assert long.state is BuildState.SUCCEEDED
        await wait_until(lambda: machine.state is MachineState.DISCONNECTED)
        assert "goodbye" in machine.disconnect_reason
        assert farm.farm.metrics.builders_lost_idle == farm.farm.metrics.builders_lost_busy == 0
        assert later.state is BuildState.QUEUED  # never given to the draining builder
        assert [build_id for build_id, _, _ in seen] == [long.id]
        assert state.draining
        await trio.sleep(100)
        assert len(farm.network.links["a"]) == 1  # it did not reconnect: it exited
        nursery.cancel_scope.cancel()


async def test_a_drain_is_remembered_by_the_runner_and_undone_by_undrain(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """After a drain the builder leaves; started again, it is not told to drain again (it
    stays connected, gets no builds, never exits); undrain gives it the waiting build."""
    seen: list[tuple[str, int, str]] = []
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        config = builder_config(tmp_path, "a")
        first = await farm.add_builder("a", config, execute=scripted_executor({}, seen))
        machine = farm.machine("a")
        farm.farm.drain("a")
        await wait_until(lambda: machine.state is MachineState.DISCONNECTED)
        assert first.draining
        assert machine.drain_requested

        # The same machine (same id), started again: the runner keeps it idle, it stays.
        again = await farm.add_builder("a", config, execute=scripted_executor({}, seen))
        waiting = farm.farm.submit(spec("waiting"), trio.current_time())
        await trio.sleep(300)
        assert machine.state is MachineState.DRAINING
        assert machine.session is not None
        assert not again.draining
        assert again.sessions == 1
        assert waiting.state is BuildState.QUEUED
        assert "draining" in (farm.farm.waiting_reason(waiting, trio.current_time()) or "")
        assert machine.to_json(trio.current_time())["drainRequested"] is True

        farm.farm.undrain("a")
        assert machine.state is MachineState.CONNECTED
        assert not machine.drain_requested
        await wait_until(lambda: waiting.state is BuildState.SUCCEEDED)
        assert [build_id for build_id, _, _ in seen] == [waiting.id]
        assert machine.to_json(trio.current_time())["drainRequested"] is False
        nursery.cancel_scope.cancel()


async def test_a_build_no_machine_can_run_stays_queued_and_says_why(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """An unsupported system or feature never fails the build early; /builds/{id} says why."""
    seen: list[tuple[str, int, str]] = []
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        await farm.add_builder(
            "a",
            builder_config(
                tmp_path, "a", mandatory_features=("big",), supported_features=("big", "kvm")
            ),
            execute=scripted_executor({}, seen),
        )
        now = trio.current_time()
        other = farm.farm.submit(BuildSpec(command=("x",), system="aarch64-linux"), now)
        plain = farm.farm.submit(spec("x"), now)  # lacks the machine's mandatory feature
        fits = farm.farm.submit(
            BuildSpec(command=("x",), system=SYSTEM, required_features=frozenset({"big"})), now
        )
        await wait_until(lambda: fits.state.finished)
        await trio.sleep(24 * 3600)
        assert other.state is BuildState.QUEUED
        assert plain.state is BuildState.QUEUED
        reason = farm.farm.waiting_reason(other, trio.current_time())
        assert reason is not None and "aarch64-linux" in reason
        assert "no connected machine" in (
            farm.farm.waiting_reason(plain, trio.current_time()) or ""
        )
        assert fits.state is BuildState.SUCCEEDED
        assert farm.farm.waiting_reason(fits, trio.current_time()) is None
        nursery.cancel_scope.cancel()


async def test_an_input_fetch_that_stalls_fails_the_attempt_instead_of_hanging(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The runner answers pings but never sends the input: after fetch-timeout without data
    the attempt ends fetch-failed (retried by the runner), and the connection stays up."""
    config = builder_config(tmp_path, "a", fetch_timeout=120.0)
    info = FileInfo(path="big", size=10, sha256="ab" * 32)
    assign = Assign(
        build_id="b1",
        attempt=1,
        command=("true",),
        inputs=(InputSpec(name="dep", build_id="b0", files=(info,)),),
    )

    async with trio.open_nursery() as nursery:
        runner = FakeRunner(nursery, assign=assign, connections=1)
        seen = runner.seen
        state = BuilderState(config=config, machine_id="m")
        run = functools.partial(run_builder, config, connect=runner.connect, state=state)
        await nursery.start(run)
        await wait_until(lambda: any(isinstance(m, Result) for _, m in seen))
        # (1.7: this runner takes many small files per request)
        [(asked, request)] = [(t, m) for t, m in seen if isinstance(m, FetchFiles)][:1]
        assert request.files == (info.sha256,)
        [(ended, result)] = [(t, m) for t, m in seen if isinstance(m, Result)]
        assert result.status is BuildStatus.FETCH_FAILED
        assert "nothing received for 120 s" in result.error
        # Not before the timeout, and after one timeout only: the file was asked for once.
        # (No upper bound on the virtual time: the autojump clock jumps from ping to ping while
        # a cleanup thread runs, as far as a loaded machine keeps that thread busy.)
        assert ended - asked >= 120.0
        assert [m for _, m in seen if isinstance(m, FetchFiles | FetchRequest)] == [request]
        assert state.sessions == 1
        assert not any(e.kind is EventKind.DISCONNECTED for e in state.events)
        nursery.cancel_scope.cancel()


async def test_cancelling_a_queued_build_never_runs_it_and_fails_its_dependents(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A build cancelled while queued is never assigned; builds after it are
    dependency-failed."""
    seen: list[tuple[str, int, str]] = []
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        now = trio.current_time()
        queued = farm.farm.submit(spec("x"), now)
        after = farm.farm.submit(with_after(spec("y"), queued.id), now)
        farm.farm.cancel(queued.id, now)
        await farm.add_builder(
            "a", builder_config(tmp_path, "a"), execute=scripted_executor({}, seen)
        )
        await trio.sleep(60)
        assert queued.state is BuildState.CANCELLED and queued.attempts == 0
        assert after.status is BuildStatus.DEPENDENCY_FAILED
        assert seen == []
        nursery.cancel_scope.cancel()
