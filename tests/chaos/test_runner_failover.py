"""Two queue runners on one PostgreSQL database, as processes: the leader killed with builds in
flight, and the leader frozen past its lease then woken (its late writes fenced by the epoch).

Runners ``--builder-timeout 3`` (so ``--lease-timeout`` 3), builders ``--ping-interval 1
--ping-timeout 3 --server A,B``, over loopback (no network faults: the faults are signals to the
runners' own process handles).  Each scenario checks, in the database once both runners are
gone, that every build succeeded exactly once and none used a try.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from ..helpers.pg import Cluster
from ..helpers.procs import Daemon, RealFarm, free_port, real_farm
from .conftest import ENABLED, SKIP_REASON

if not ENABLED:
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytestmark = [pytest.mark.chaos, pytest.mark.realnet]

BUILDER_TIMEOUT = 3.0
BUILDERS = 4
LIMIT = 90.0


@attrs.define(eq=False)
class Runner:
    daemon: Daemon
    builders: str
    url: str


@attrs.define(eq=False)
class Pair:
    """Two runners of one database and the builders that know both."""

    farm: RealFarm
    db: str
    runners: dict[str, Runner] = attrs.field(factory=dict)

    async def start_runner(self, name: str) -> Runner:
        builder_port, http_port = free_port(), free_port()
        daemon = await self.farm.start(
            name,
            "queue-runner",
            "--listen", f"127.0.0.1:{builder_port}",
            "--http", f"127.0.0.1:{http_port}",
            "--builder-timeout", f"{BUILDER_TIMEOUT:g}",
            "--state-dir", str(self.farm.tmp_path / name),
            "--data-dir", str(self.farm.tmp_path / "data"),
            "--db", self.db,
        )  # fmt: skip
        runner = Runner(daemon, f"127.0.0.1:{builder_port}", f"http://127.0.0.1:{http_port}")
        self.runners[name] = runner
        return runner

    async def status(self, runner: Runner) -> dict[str, Any] | None:
        with contextlib.suppress(httpx.TransportError):
            response = await self.farm.client.get(f"{runner.url}/status")
            if response.status_code == 200:
                result: dict[str, Any] = response.json()
                return result
        return None

    async def role(self, runner: Runner, role: str) -> dict[str, Any]:
        while (status := await self.status(runner)) is None or status["role"] != role:
            await trio.sleep(0.02)
        return status

    async def start_builders(self, leader: Runner) -> None:
        servers = ",".join(r.builders for r in self.runners.values())
        for index in range(BUILDERS):
            await self.farm.start_builder(f"b{index}", server=servers, wait=False)
        while (status := await self.status(leader)) is None or sum(
            m["connected"] for m in status["machines"]
        ) < BUILDERS:
            await trio.sleep(0.05)

    async def submit(self, leader: Runner, command: list[str], count: int) -> list[str]:
        ids = []
        for _ in range(count):
            response = await self.farm.client.post(
                f"{leader.url}/builds", json={"command": command}
            )
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        return ids

    async def builds(self, runner: Runner, ids: list[str]) -> list[dict[str, Any]]:
        return [
            (await self.farm.client.get(f"{runner.url}/builds/{build_id}")).json()
            for build_id in ids
        ]


@contextlib.asynccontextmanager
async def pair(tmp_path: Path, pg_cluster: Cluster | None) -> AsyncIterator[Pair]:
    if pg_cluster is None:
        pytest.skip("PostgreSQL is not installed")
    async with real_farm(tmp_path) as farm:
        yield Pair(farm, pg_cluster.new_database())


def check_database(db: str, ids: list[str]) -> None:
    """Every build succeeded once; none used a try (no infrastructure failure)."""
    from hydra_trio.runner.store import open_store

    store = open_store(db, Path("."))
    try:
        builds = {b.id: b for b in store.load().builds}
    finally:
        store.close()
    for build_id in ids:
        build = builds[build_id]
        assert build.state.value == "succeeded", (build_id, build.state, build.error)
        assert build.infra_failures == 0, (build_id, build.infra_failures, build.error)


async def test_the_leader_killed_with_builds_in_flight(
    tmp_path: Path, pg_cluster: Cluster | None
) -> None:
    """kill -9 of the leader with a build on every builder: the standby takes the lease once
    it lapses, the builders move to it, every build runs again (no try used) and succeeds."""
    async with pair(tmp_path, pg_cluster) as p:
        with trio.fail_after(LIMIT):
            a = await p.start_runner("runnerA")
            await p.role(a, "leader")
            b = await p.start_runner("runnerB")
            await p.role(b, "standby")
            await p.start_builders(a)
            ids = await p.submit(a, ["sh", "-c", "sleep 4"], BUILDERS)
            while any(x["state"] != "running" for x in await p.builds(a, ids)):
                await trio.sleep(0.05)
            killed = time.monotonic()
            a.daemon.signal(signal.SIGKILL)
            await p.role(b, "leader")
            while any(x["state"] != "running" or x["attempts"] < 2 for x in await p.builds(b, ids)):
                await trio.sleep(0.05)
            print(f"every build running again {time.monotonic() - killed:.2f} s after the kill")
            while any(x["state"] != "succeeded" for x in await p.builds(b, ids)):
                await trio.sleep(0.05)
            b.daemon.signal(signal.SIGINT)
            await b.daemon.process.wait()
        check_database(p.db, ids)


async def test_a_frozen_leader_woken_after_the_takeover_commits_nothing(
    tmp_path: Path, pg_cluster: Cluster | None
) -> None:
    """SIGSTOP of the leader past its lease: the standby takes over and finishes the builds;
    SIGCONT: the old leader's late writes are refused by the epoch, it stands by naming the
    new leader, and the database holds only the new leader's results."""
    async with pair(tmp_path, pg_cluster) as p:
        with trio.fail_after(LIMIT):
            a = await p.start_runner("runnerA")
            await p.role(a, "leader")
            b = await p.start_runner("runnerB")
            await p.role(b, "standby")
            await p.start_builders(a)
            ids = await p.submit(a, ["sh", "-c", "sleep 2"], BUILDERS)
            while any(x["state"] != "running" for x in await p.builds(a, ids)):
                await trio.sleep(0.05)
            a.daemon.signal(signal.SIGSTOP)
            await p.role(b, "leader")
            while any(x["state"] != "succeeded" for x in await p.builds(b, ids)):
                await trio.sleep(0.05)
            a.daemon.signal(signal.SIGCONT)
            status = await p.role(a, "standby")
            while status.get("leader") != b.url:
                await trio.sleep(0.05)
                status = await p.status(a) or {}
            # What the old leader did on waking (its builders were gone: requeue them) was
            # refused by the epoch, or never attempted: the new leader's results stand.
            assert all(x["state"] == "succeeded" for x in await p.builds(b, ids))
            for runner in (a, b):
                runner.daemon.signal(signal.SIGINT)
                await runner.daemon.process.wait()
        check_database(p.db, ids)
        log = a.daemon.log()
        assert "lost the leadership" in log or "nothing was written" in log, log
