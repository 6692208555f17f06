"""The builder's start-up path on a machine without ``/proc`` (macOS, the BSDs, a container
with none mounted): claiming the work dir lists processes through psutil, and where even
that cannot list them the builder starts anyway and builds.  Real time, real processes."""

from __future__ import annotations

import logging
from pathlib import Path

import psutil
import pytest
import trio

from hydra_trio.builder.daemon import BuilderConfig, claim_work_dir
from hydra_trio.protocol.messages import BuildStatus
from hydra_trio.runner.daemon import RunnerConfig
from hydra_trio.runner.model import BuildSpec, BuildState
from hydra_trio.system import default_system

from .helpers.sim import Farmlet

SYSTEM = default_system()


@pytest.mark.skipif(not hasattr(psutil, "PROCFS_PATH"), reason="psutil reads no procfs here")
async def test_a_builder_without_proc_starts_and_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With the process listing pointed at a directory that does not exist, claiming the
    work dir warns once and kills nothing, leftovers are still removed, and a real build
    then runs to success and uploads its output."""
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(tmp_path / "no-proc"))
    work = tmp_path / "work"
    (work / "builds" / "b9-1").mkdir(parents=True)  # a killed predecessor's build directory
    with caplog.at_level(logging.WARNING):
        lock = await trio.to_thread.run_sync(claim_work_dir, work)
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("cannot list processes" in message for message in warnings), warnings
        assert not list((work / "builds").iterdir())
        runner = RunnerConfig(builder_timeout=30.0, http=None, default_system=SYSTEM)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                farmlet = Farmlet(nursery, runner, tmp_path / "runner")
                config = BuilderConfig(systems=(SYSTEM,), work_dir=work, ping_interval=1.0)
                await farmlet.add_builder("mac", config)
                spec = BuildSpec(command=("sh", "-c", "printf built > $OUT/result"), system=SYSTEM)
                build = farmlet.farm.submit(spec, trio.current_time())
                while not build.state.finished:
                    await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
        assert build.state is BuildState.SUCCEEDED, build.status
        assert build.status is BuildStatus.SUCCESS
        [output] = build.outputs
        assert (output.path, output.size) == ("result", len(b"built"))
    finally:
        lock.close()
