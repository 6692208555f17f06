"""One machine, one session (issue 19): two builder processes with one machine id (a copied
work dir) do not knock each other off; the second is refused with ``duplicate-machine`` and
named in the log, and no build is lost or retried (real sockets, real builds)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import trio

from hydra_trio.builder.daemon import BuilderConfig, BuilderState, run_builder
from hydra_trio.builder.state import SessionEnd
from hydra_trio.protocol.messages import RejectCode
from hydra_trio.runner.daemon import RunnerAddresses, make_farm, serve_runner
from hydra_trio.runner.model import BuildSpec, BuildState

from .helpers.runner import loopback_config

pytestmark = pytest.mark.realnet

SYSTEM = "x86_64-linux"
LIMIT = 30.0
DUPLICATE = RejectCode.DUPLICATE_MACHINE.value


async def test_a_second_builder_with_the_same_machine_id_is_refused_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = loopback_config(tmp_path)
    farm, dispatcher = make_farm(config)
    for name in ("one", "two"):  # the second work dir is a copy of the first
        (tmp_path / name).mkdir()
        (tmp_path / name / "machine-id").write_text("cloned-id\n")
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            addresses: RunnerAddresses = await nursery.start(
                functools.partial(serve_runner, config, farm=farm, dispatcher=dispatcher)
            )

            def builder(name: str) -> BuilderConfig:
                return BuilderConfig(
                    server=addresses.builders[0],
                    systems=(SYSTEM,),
                    work_dir=tmp_path / name,
                    hostname=name,
                    ping_interval=1,
                    max_jobs=2,
                )

            first: BuilderState = await nursery.start(
                functools.partial(run_builder, builder("one"))
            )
            while "cloned-id" not in farm.machines:
                await trio.sleep(0.01)
            second: BuilderState = await nursery.start(
                functools.partial(run_builder, builder("two"))
            )
            builds = [
                farm.submit(BuildSpec(command=("sleep", "0.3"), system=SYSTEM), 0.0)
                for _ in range(4)
            ]
            while farm.queue_counts()["succeeded"] < 4 or not second.events:
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()

    assert first.instance != second.instance
    machine = farm.machines["cloned-id"]
    assert machine.hostname == "one" and machine.sessions == 1  # never superseded
    assert machine.lost_builds == 0
    for build in builds:
        assert build.state is BuildState.SUCCEEDED and build.attempts == 1
    refused = [event.ended for event in second.events if event.end is SessionEnd.REJECTED]
    assert refused and all(DUPLICATE in ended.reason for ended in refused if ended)
    assert first.sessions == 1 and second.sessions == 0
    assert farm.metrics.handshakes_rejected[DUPLICATE] == len(refused)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    runner_errors = [e for e in errors if e.startswith("refused builder two from 127.0.0.1:")]
    assert runner_errors, errors
    assert "cloned-id" in runner_errors[0]
    assert f"already connected from {machine.address} " in runner_errors[0]
    assert machine.address.startswith("127.0.0.1:")
    # and the refused builder says so as an error too
    assert any(e.startswith(f"rejected by the queue runner ({DUPLICATE})") for e in errors)
