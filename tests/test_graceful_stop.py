"""A graceful stop of the runner costs nothing: running builds finish within the grace or go
back to the queue without using a try, and no builder counts as lost (real sockets and time)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import trio

from hydra_trio.builder.daemon import BuilderConfig, BuilderState, run_builder
from hydra_trio.builder.state import SessionEnd
from hydra_trio.net import HostPort
from hydra_trio.runner.daemon import RunnerAddresses, RunnerConfig, make_farm, serve_runner
from hydra_trio.runner.model import BuildSpec, BuildState
from hydra_trio.runner.store import open_store

pytestmark = pytest.mark.realnet

SYSTEM = "x86_64-linux"
LIMIT = 30.0


async def _stop_with_builds(tmp_path: Path, *, graceful: bool) -> tuple[Any, Any, Any, Any]:
    """A runner with a short and a long build running, stopped gracefully (``graceful_stop``,
    as SIGTERM) or at once (cancelled, as SIGINT); returns the farm, the builder's session
    ends, the saved snapshot, and the two builds."""
    config = RunnerConfig(
        listen=HostPort("127.0.0.1", 0),
        http=None,
        state_dir=tmp_path / "state",
        default_system=SYSTEM,
        stop_grace=2.0,
    )
    farm, dispatcher = make_farm(config)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            runner_scope = trio.CancelScope()
            stop = trio.Event()
            stopped = trio.Event()

            async def run_runner(task_status: trio.TaskStatus[RunnerAddresses]) -> None:
                with runner_scope:
                    await serve_runner(
                        config,
                        farm=farm,
                        dispatcher=dispatcher,
                        graceful_stop=stop,
                        task_status=task_status,
                    )
                stopped.set()

            addresses = await nursery.start(run_runner)
            builder_config = BuilderConfig(
                server=addresses.builders[0],
                systems=(SYSTEM,),
                work_dir=tmp_path / "builder",
                hostname="b1",
                ping_interval=1,
                max_jobs=2,
            )
            state: BuilderState = await nursery.start(
                functools.partial(run_builder, builder_config)
            )
            short = farm.submit(BuildSpec(command=("sleep", "0.5"), system=SYSTEM), 0.0)
            long = farm.submit(BuildSpec(command=("sleep", "60"), system=SYSTEM), 0.0)
            while farm.queue_counts()["running"] < 2:
                await trio.sleep(0.02)
            if graceful:
                stop.set()
            else:
                runner_scope.cancel()
            await stopped.wait()
            # The runner is done when it has said goodbye and closed; the builder records
            # the session's end when it reads that, a moment later (under load, later still).
            while not any(event.end is not None for event in state.events):
                await trio.sleep(0.01)
            ends = [event.end for event in state.events]
            nursery.cancel_scope.cancel()
    store = open_store(None, config.state_dir)
    try:
        snapshot = store.load()
    finally:
        store.close()
    return farm, ends, snapshot, (short, long)


async def test_a_graceful_stop_lets_builds_finish_and_requeues_the_rest_without_a_try(
    tmp_path: Path,
) -> None:
    """SIGTERM-like stop with a short and a long build running: the short one succeeds in
    the grace, the long one is queued again with no try used; the builder was told the
    runner is going (not a fault) and nothing counts as lost."""
    farm, ends, snapshot, (short, long) = await _stop_with_builds(tmp_path, graceful=True)
    assert SessionEnd.RUNNER_STOPPING in ends, ends
    saved = {b.id: b for b in snapshot.builds}
    assert saved[short.id].state is BuildState.SUCCEEDED
    assert saved[long.id].state is BuildState.QUEUED
    assert saved[long.id].infra_failures == 0
    assert saved[long.id].attempts == 1
    (machine,) = snapshot.machines
    assert machine.lost_builds == 0 and machine.succeeded_builds == 1
    assert farm.metrics.builders_lost_busy == 0 and farm.metrics.builders_lost_idle == 0


async def test_an_immediate_stop_requeues_every_running_build_without_a_try(
    tmp_path: Path,
) -> None:
    """SIGINT-like stop (cancelled): no grace, but still no try used and nothing lost."""
    farm, ends, snapshot, builds = await _stop_with_builds(tmp_path, graceful=False)
    assert SessionEnd.RUNNER_STOPPING in ends, ends
    saved = {b.id: b for b in snapshot.builds}
    for build in builds:
        assert saved[build.id].state is BuildState.QUEUED
        assert saved[build.id].infra_failures == 0
    (machine,) = snapshot.machines
    assert machine.lost_builds == 0
    assert farm.metrics.builders_lost_busy == 0 and farm.metrics.builders_lost_idle == 0
