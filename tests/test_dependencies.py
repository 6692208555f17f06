"""The runner survives its dependencies: PostgreSQL restarted under load, a state dir that fills
up and frees again, a second runner on the same SQLite file (real sockets and time)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from hydra_trio.runner.logs import TRUNCATED_MARKER
from hydra_trio.runner.model import BuildState
from hydra_trio.runner.store import StoreError, open_store

from .helpers.pg import Cluster, find_bindir
from .helpers.runner import Runner, start_runner

pytestmark = pytest.mark.realnet

LIMIT = 60.0


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Any]:
    """``await start(**RunnerConfig options)`` -> a Runner served until the test ends."""
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=20) as client:

        async def start_one(**options: Any) -> Runner:
            return await start_runner(nursery, tmp_path, client, **options)

        yield start_one
        nursery.cancel_scope.cancel()


# -- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A PostgreSQL of this test's own (it is stopped and started: not the shared one)."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed")
    cluster = Cluster.start(bindir)
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_postgresql_restarted_under_load_loses_nothing_and_the_runner_carries_on(
    start: Any, own_cluster: Cluster
) -> None:
    """PostgreSQL stopped while builds run: reads answer, writes get 503 with the reason, the
    builder keeps its session; once it is back every build commits and nothing is lost."""
    url = own_cluster.new_database()
    with trio.fail_after(LIMIT):
        runner = await start(db=url)
        await runner.start_builder("b1", max_jobs=4)
        before = [await runner.submit("sh", "-c", "sleep 0.3") for _ in range(8)]
        await runner.until(lambda: runner.farm.queue_counts()["running"] > 0)
        await trio.to_thread.run_sync(own_cluster.stop_server)
        try:
            response = await runner.post("true")
            assert response.status_code == 503, response.text
            assert "PostgreSQL" in response.json()["error"]
            # The persister has seen the database go: the next write is refused up front.
            refused = await runner.post("true")
            assert refused.status_code == 503
            assert "nothing was changed" in refused.json()["error"]
            status = (await runner.client.get("/status")).json()
            assert [w["kind"] for w in status["warnings"]] == ["database"]
            assert (await runner.client.get(f"/builds/{before[0]}")).status_code == 200
            # Builds go on finishing meanwhile; their results wait in memory.
            await runner.until(lambda: runner.farm.queue_counts()["succeeded"] >= 4)
        finally:
            await trio.to_thread.run_sync(own_cluster.start_server)
        while (response := await runner.post("true")).status_code != 201:
            assert response.status_code == 503
            await trio.sleep(0.1)
        after = response.json()["id"]
        await runner.until(
            lambda: all(b.state is BuildState.SUCCEEDED for b in runner.farm.builds.values()),
        )
        machine = next(iter(runner.farm.machines.values()))
        assert machine.sessions == 1 and machine.lost_builds == 0
        await runner.until(lambda: not runner.farm.journal.changed_builds)
        status = (await runner.client.get("/status")).json()
        assert status["warnings"] == []
        metrics = (await runner.client.get("/metrics")).text
        assert 'hydra_trio_dependency_faults_total{kind="database"}' in metrics
    store = await trio.to_thread.run_sync(open_store, url, Path("."))
    try:
        await trio.sleep(0.5)  # the last batch
        saved = {b.id: b for b in (await trio.to_thread.run_sync(store.load)).builds}
    finally:
        store.close()
    for build_id in [*before, after]:
        assert saved[build_id].state is BuildState.SUCCEEDED
        assert saved[build_id].attempts == 1


# -- SQLite ------------------------------------------------------------------------------------


async def test_a_second_runner_on_the_same_sqlite_file_is_refused(
    start: Any, tmp_path: Path
) -> None:
    """Another state dir, the same --db sqlite:///: one clear StoreError, the first serves on."""
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    with trio.fail_after(LIMIT):
        runner = await start(db=url, state_dir=tmp_path / "a")
        with pytest.raises(ExceptionGroup) as caught:
            async with trio.open_nursery() as nursery, httpx.AsyncClient() as other:
                await start_runner(nursery, tmp_path, other, db=url, state_dir=tmp_path / "b")
        (error,) = caught.value.exceptions
        assert isinstance(error, StoreError)
        assert "in use by another queue runner" in str(error)
        await runner.submit("true")


# -- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs (skipped where mounting is not permitted)."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path, leave: int) -> Path:
    """Fill the file system of ``where`` but ``leave`` bytes; returns the filler file."""
    filler = where / "filler"
    stat = os.statvfs(where)
    size = stat.f_bavail * stat.f_frsize - leave
    with filler.open("wb") as f:
        while size > 0:
            size -= f.write(b"\0" * min(size, 1 << 20))
    return filler


async def test_a_full_disk_truncates_one_log_and_fails_one_upload_then_work_resumes(
    start: Any, small_disk: Path, tmp_path: Path
) -> None:
    """State dir on a small disk: a 12 MB log is truncated with a marker and its build still
    succeeds; an output that does not fit fails its upload (retried); the builder's session
    and the runner go on, /status warns, and once space is freed the retry succeeds."""
    with trio.fail_after(LIMIT):
        runner = await start(state_dir=small_disk, db=f"sqlite:///{tmp_path / 'q.sqlite'}")
        await runner.start_builder("b1")
        noisy = await runner.submit("sh", "-c", "head -c 12000000 /dev/zero | tr '\\0' x; echo")
        await runner.until(lambda: runner.farm.builds[noisy].state.finished)
        assert runner.farm.builds[noisy].state is BuildState.SUCCEEDED
        log = (await runner.client.get(f"/builds/{noisy}/log")).content
        assert log.endswith(TRUNCATED_MARKER) and 0 < len(log) < 5_000_000
        status = (await runner.client.get("/status")).json()
        assert "logs" in [w["kind"] for w in status["warnings"]]
        # The operator frees the space; then fills it up again but 64 KiB.
        for path in (small_disk / "logs").iterdir():
            path.unlink()
        filler = fill(small_disk, 64 * 1024)
        big = await runner.submit("sh", "-c", "head -c 1000000 /dev/urandom > $OUT/big")
        await runner.until(lambda: runner.farm.builds[big].infra_failures >= 1)
        assert runner.farm.builds[big].status is not None
        assert runner.farm.builds[big].status.value == "upload-failed"
        status = (await runner.client.get("/status")).json()
        assert "outputs" in [w["kind"] for w in status["warnings"]]
        filler.unlink()
        await runner.until(lambda: runner.farm.builds[big].state.finished)
        assert runner.farm.builds[big].state is BuildState.SUCCEEDED
        quiet = await runner.submit("sh", "-c", "echo hello")
        await runner.until(lambda: runner.farm.builds[quiet].state.finished)
        assert (await runner.client.get(f"/builds/{quiet}/log")).content == b"hello\n"
        machine = next(iter(runner.farm.machines.values()))
        assert machine.sessions == 1 and machine.lost_builds == 0
        status = (await runner.client.get("/status")).json()
        assert status["warnings"] == []
        metrics = (await runner.client.get("/metrics")).text
        assert 'hydra_trio_dependency_faults_total{kind="logs"} 1.0' in metrics


async def test_a_full_database_disk_answers_507_and_takes_writes_once_freed(
    start: Any, small_disk: Path
) -> None:
    """SQLite on a full disk: a submission gets 507 with the reason, the runner goes on
    answering reads, and once space is freed submissions are taken and kept."""
    with trio.fail_after(LIMIT):
        runner = await start(state_dir=small_disk)
        await runner.submit("true")  # no builder: stays queued
        filler = fill(small_disk, 0)
        for _ in range(3):
            response = await runner.post("echo", "x" * 3000)
            assert response.status_code == 507, response.text
        status = (await runner.client.get("/status")).json()
        assert [w["kind"] for w in status["warnings"]] == ["database"]
        assert status["warnings"][0]["diskFull"] is True
        filler.unlink()
        while (response := await runner.post("true")).status_code != 201:
            assert response.status_code == 507
            await trio.sleep(0.1)
        assert (await runner.client.get("/status")).json()["warnings"] == []
