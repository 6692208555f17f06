"""``Runner``: a real queue runner on loopback (builder port and HTTP API on port 0), an HTTP
client for it, and real builders started beside it.  Real sockets and time: no autojump.

``start_runner`` starts one in a test's nursery; the ``runner`` fixture (conftest.py) is one
started with the defaults."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from hydra_trio.builder.daemon import BuilderConfig, run_builder
from hydra_trio.net import HostPort
from hydra_trio.runner.daemon import RunnerAddresses, RunnerConfig, make_farm, serve_runner
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.model import MachineState

from .common import SYSTEM

#: Every test is bounded: a hung server must fail the test, not the suite.
LIMIT = 20.0


@attrs.define
class Runner:
    client: httpx.AsyncClient
    farm: Farm
    addresses: RunnerAddresses
    nursery: trio.Nursery
    tmp_path: Path

    async def start_builder(self, name: str, max_jobs: int = 1, work: str = "") -> None:
        """A real builder over TCP (work dir: ``work``, or ``name``); returns once the runner
        lists one more connected machine of that hostname."""
        config = BuilderConfig(
            server=self.addresses.builders[0],
            systems=(SYSTEM,),
            work_dir=self.tmp_path / (work or name),
            hostname=name,
            ping_interval=1,
            max_jobs=max_jobs,
        )

        def connected() -> int:
            return sum(
                m.hostname == name and m.state is MachineState.CONNECTED
                for m in self.farm.machines.values()
            )

        before = connected()
        await self.nursery.start(functools.partial(run_builder, config))
        while connected() <= before:
            await trio.sleep(0.01)

    async def post(self, *command: str) -> httpx.Response:
        return await self.client.post("/builds", json={"command": list(command)})

    async def submit(self, *command: str, **body: Any) -> str:
        """POST /builds of ``command`` (default ``true``) with ``body``'s fields; its id."""
        build = {"command": list(command) or ["true"], **body}
        response = await self.client.post("/builds", json=build)
        assert response.status_code == 201, response.text
        build_id = response.json()["id"]
        assert isinstance(build_id, str)
        return build_id

    async def until(self, check: Callable[[], object]) -> None:
        """Poll ``check()`` every 50 ms until it is true (the test's fail_after bounds it)."""
        while not check():
            await trio.sleep(0.05)


def loopback_config(tmp_path: Path, token: bytes | None = None) -> RunnerConfig:
    """A runner on a free loopback port, without HTTP, its state under ``tmp_path``."""
    return RunnerConfig(
        listen=HostPort("127.0.0.1", 0),
        http=None,
        state_dir=tmp_path / "state",
        default_system=SYSTEM,
        token=token,
    )


async def start_runner(
    nursery: trio.Nursery, tmp_path: Path, client: httpx.AsyncClient, **options: Any
) -> Runner:
    """Serve a runner in ``nursery`` with ``options`` (RunnerConfig fields; its state dir is
    ``tmp_path / "state"`` unless given) and point ``client`` at its HTTP API."""
    config = RunnerConfig(
        listen=HostPort("127.0.0.1", 0),
        http=HostPort("127.0.0.1", 0),
        default_system=SYSTEM,
        **{"state_dir": tmp_path / "state", **options},
    )
    farm, dispatcher = make_farm(config)
    addresses: RunnerAddresses = await nursery.start(
        functools.partial(serve_runner, config, farm=farm, dispatcher=dispatcher)
    )
    client.base_url = httpx.URL(addresses.http[0])
    return Runner(client, farm, addresses, nursery, tmp_path)
