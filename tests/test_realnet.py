"""Failover with real processes over real loopback TCP: a frozen builder, a killed builder.

A queue runner (``--builder-timeout 3``) and two builders (``--ping-interval 1 --ping-timeout 3``,
one job slot each) run as child processes (``tests/helpers/procs.py``); the tests drive them through
the HTTP API and with signals. No autojump clock here: each test body is bounded by ``TEST_TIMEOUT``
and every wait inside it by its own timeout."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from .helpers.procs import RealFarm, process_alive, real_farm

pytestmark = pytest.mark.realnet

#: The runner's --builder-timeout.
BUILDER_TIMEOUT = 3.0
#: A generous bound on each whole test (they take about 15 s).
TEST_TIMEOUT = 90.0


def recording(tmp_path: Path, seconds: int) -> list[str]:
    """A build command that records its pid per attempt, then sleeps ``seconds`` (long enough
    to be caught running, short enough to end by itself if it is ever orphaned)."""
    return ["sh", "-c", f'echo $$ > {tmp_path}/pid-"$HYDRA_TRIO_ATTEMPT"; exec sleep {seconds}']


async def wait_pid(tmp_path: Path, attempt: int) -> int:
    path = tmp_path / f"pid-{attempt}"
    with trio.fail_after(10):
        while not (path.exists() and path.read_text().strip()):
            await trio.sleep(0.02)
    return int(path.read_text())


async def running_build(farm: RealFarm, tmp_path: Path, seconds: int) -> tuple[str, str, int]:
    """Submit a recording build; returns its id, the hostname running it, and its pid."""
    build_id = await farm.submit(*recording(tmp_path, seconds))
    with trio.fail_after(10):
        build = await farm.wait_build(build_id, "running", lambda b: b["state"] == "running")
    assert build["attempts"] == 1
    return build_id, build["machine"], await wait_pid(tmp_path, 1)


def finished(build: dict[str, Any]) -> bool:
    return build["finishedAt"] is not None


async def test_a_frozen_builder_loses_its_build_within_the_timeout_and_rejoins_when_thawed(
    tmp_path: Path,
) -> None:
    """SIGSTOP: the build runs on the other builder within builder-timeout + 1 s, the frozen
    machine is disconnected as silent; after SIGCONT it reconnects under the same id and builds."""
    with trio.fail_after(TEST_TIMEOUT):
        async with real_farm(tmp_path) as farm:
            await farm.start_runner(builder_timeout=BUILDER_TIMEOUT)
            builders = {name: await farm.start_builder(name) for name in ("bA", "bB")}
            build_id, holder, pid = await running_build(farm, tmp_path, 8)
            other = "bB" if holder == "bA" else "bA"
            frozen = await farm.machine(holder)
            assert frozen is not None

            stopped_at = time.monotonic()
            builders[holder].signal(signal.SIGSTOP)
            with trio.fail_after(BUILDER_TIMEOUT + 5):
                build = await farm.wait_build(
                    build_id,
                    f"running again, on {other}",
                    lambda b: b["attempts"] == 2 and b["state"] == "running",
                )
            failover = time.monotonic() - stopped_at
            assert build["machine"] == other
            assert failover <= BUILDER_TIMEOUT + 1, f"the build moved after {failover:.2f} s"
            machine = await farm.machine(holder)
            assert machine is not None
            assert machine["state"] == "disconnected"
            assert not machine["connected"]
            assert machine["currentJobs"] == 0
            assert machine["lostBuilds"] == 1
            assert f"silent for {BUILDER_TIMEOUT:g} s" in machine["disconnectReason"]
            assert process_alive(pid)  # frozen with its builder, the old attempt still sleeps

            builders[holder].signal(signal.SIGCONT)
            with trio.fail_after(10):
                thawed = await farm.wait_for(
                    f"{holder} connected again",
                    lambda m: m is not None and m["state"] == "connected",
                    lambda: farm.machine(holder),
                )
            assert thawed is not None
            assert thawed["machineId"] == frozen["machineId"]
            assert thawed["disconnectReason"] is None
            log = builders[holder].log()
            assert "no frame from the runner" in log or "connection closed by peer" in log, log
            with trio.fail_after(5):  # the dead session's build was killed with it
                while process_alive(pid):
                    await trio.sleep(0.02)

            moved = await farm.build(build_id)
            assert (moved["state"], moved["machine"]) == ("running", other), "not busy"
            fresh = await farm.submit("sh", "-c", "echo thawed > $OUT/greeting")
            with trio.fail_after(10):
                done = await farm.wait_build(fresh, "finished", finished)
            assert (done["status"], done["machine"], done["attempts"]) == ("success", holder, 1)
            assert [o["path"] for o in done["outputs"]] == ["greeting"]

            with trio.fail_after(15):
                moved = await farm.wait_build(build_id, "finished", finished)
            assert (moved["status"], moved["machine"], moved["attempts"]) == ("success", other, 2)


async def test_a_killed_builder_loses_its_build_on_the_connection_closing(tmp_path: Path) -> None:
    """SIGKILL: the runner learns it from the socket (EOF or reset), not from the silence
    watchdog; the build is requeued and succeeds on the other builder."""
    with trio.fail_after(TEST_TIMEOUT):
        async with real_farm(tmp_path) as farm:
            await farm.start_runner(builder_timeout=BUILDER_TIMEOUT)
            builders = {name: await farm.start_builder(name) for name in ("bA", "bB")}
            build_id, holder, pid = await running_build(farm, tmp_path, 4)
            other = "bB" if holder == "bA" else "bA"

            builders[holder].signal(signal.SIGKILL)
            with trio.fail_after(15):
                machine = await farm.wait_for(
                    f"{holder} disconnected",
                    lambda m: m is not None and m["state"] == "disconnected",
                    lambda: farm.machine(holder),
                )
            assert machine is not None
            reason = machine["disconnectReason"]
            assert "silent" not in reason
            assert "closed by peer" in reason or "reset" in reason, reason
            assert machine["lostBuilds"] == 1

            with trio.fail_after(20):
                build = await farm.wait_build(build_id, "finished", finished)
            assert (build["status"], build["machine"], build["attempts"]) == ("success", other, 2)
            # The killed builder could not kill its build: the orphan ends by itself.
            with trio.fail_after(10):
                while process_alive(pid):
                    await trio.sleep(0.05)
