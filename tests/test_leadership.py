"""Several runners on one PostgreSQL database: the lease, its fencing epoch, standbys, takeover
(real sockets, real PostgreSQL; the slow failovers of real processes are in tests/chaos)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from hydra_trio.builder.daemon import BuilderConfig, run_builder
from hydra_trio.builder.servers import ServerList
from hydra_trio.net import FramedChannel, HostPort
from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.messages import PROTOCOL_VERSION, Challenge, Hello, Reject, Role
from hydra_trio.runner.daemon import RunnerAddresses, RunnerConfig, serve_runner
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.leadership import LeaseStore
from hydra_trio.runner.model import BuildSpec, BuildState
from hydra_trio.runner.persister import take_rows
from hydra_trio.runner.store import Deposed, open_store

from .helpers.pg import Cluster

pytestmark = pytest.mark.realnet

SYSTEM = "x86_64-linux"
LIMIT = 30.0


@pytest.fixture
def pg_url(pg_cluster: Cluster | None) -> str:
    if pg_cluster is None:
        pytest.skip("PostgreSQL is not installed")
    return pg_cluster.new_database()


def expire(url: str) -> None:
    """Make the lease lapse now, as if its holder had stopped renewing long ago."""
    store = open_store(url, Path("."))
    try:
        store._transaction(
            lambda cur: cur.execute(
                "UPDATE runner_lease SET expires_at = now() - interval '1 second'"
            )
        )
    finally:
        store.close()


@pytest.fixture
def leases(pg_url: str) -> Iterator[tuple[LeaseStore, LeaseStore]]:
    a, b = LeaseStore(pg_url), LeaseStore(pg_url)
    a.migrate()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_the_lease_is_held_by_one_runner_and_its_epoch_only_grows(
    leases: tuple[LeaseStore, LeaseStore], pg_url: str
) -> None:
    """One acquire wins; another fails while the lease is live, wins once it lapsed, with a
    higher epoch; the old holder's renewal then fails."""
    a, b = leases
    first = a.acquire("a", "a:1", "http://a", 30)
    assert first is not None
    assert b.acquire("b", "b:1", "http://b", 30) is None
    assert a.renew(first, 30)
    seen = b.read()
    assert (seen.epoch, seen.holder, seen.builders, seen.live) == (first, "a", "a:1", True)
    expire(pg_url)
    second = b.acquire("b", "b:1", "http://b", 30)
    assert second is not None and second > first
    assert not a.renew(first, 30)
    b.release(second)
    third = a.acquire("a", "a:1", "http://a", 30)
    assert third is not None and third > second


def test_a_deposed_leaders_write_is_refused_by_the_epoch(
    leases: tuple[LeaseStore, LeaseStore], pg_url: str
) -> None:
    """A store fenced at an epoch another runner has since taken over commits nothing."""
    a, b = leases
    epoch = a.acquire("a", "", "", 30)
    assert epoch is not None
    store = open_store(pg_url, Path("."))
    try:
        store.migrate()
        store.fence(epoch, 30)
        farm = Farm()
        farm.submit(BuildSpec(command=("true",), system=SYSTEM), 0.0)
        store.save(*take_rows(farm))  # while it leads: written
        expire(pg_url)
        assert b.acquire("b", "", "", 30) == epoch + 1
        late = farm.submit(BuildSpec(command=("true",), system=SYSTEM), 0.0)
        with pytest.raises(Deposed, match=f"epoch {epoch}"):
            store.save(*take_rows(farm))
        assert late.id not in {build.id for build in store.load().builds}
        assert len(store.load().builds) == 1
    finally:
        store.close()


# -- runners -----------------------------------------------------------------------------------


@attrs.define
class Started:
    addresses: RunnerAddresses
    client: httpx.AsyncClient
    scope: trio.CancelScope

    async def status(self) -> dict[str, Any]:
        response = await self.client.get("/status")
        assert response.status_code == 200
        data: dict[str, Any] = response.json()
        return data

    async def role(self, role: str) -> dict[str, Any]:
        """Poll /status until this runner has ``role``."""
        while (status := await self.status())["role"] != role:
            await trio.sleep(0.05)
        return status


@pytest.fixture
async def start(tmp_path: Path, pg_url: str) -> AsyncIterator[Any]:
    async with trio.open_nursery() as nursery:
        clients: list[httpx.AsyncClient] = []

        async def start_runner(name: str, **options: Any) -> Started:
            config = RunnerConfig(
                listen=HostPort("127.0.0.1", 0),
                http=HostPort("127.0.0.1", 0),
                state_dir=tmp_path / name,
                data_dir=tmp_path / "data",
                db=pg_url,
                default_system=SYSTEM,
                **options,
            )

            scope = trio.CancelScope()

            async def run(task_status: trio.TaskStatus[RunnerAddresses]) -> None:
                with scope:
                    await serve_runner(config, task_status=task_status)

            addresses: RunnerAddresses = await nursery.start(run)
            client = httpx.AsyncClient(base_url=addresses.http[0], timeout=10)
            clients.append(client)
            return Started(addresses, client, scope)

        yield start_runner
        for client in clients:
            await client.aclose()
        nursery.cancel_scope.cancel()


async def _hello(address: HostPort) -> Reject | Any:
    """A builder's handshake on ``address``; returns the runner's answer to the hello."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    conn = Connection(Role.BUILDER, now=trio.current_time(), peer_timeout=1e9)
    channel = FramedChannel(stream, conn)
    try:
        challenge = await channel.receive()
        assert isinstance(challenge, Challenge)
        await channel.send(
            Hello(
                protocol_version=PROTOCOL_VERSION,
                machine_id="m-probe",
                hostname="probe",
                systems=(SYSTEM,),
            )
        )
        return await channel.receive()
    finally:
        await stream.aclose()


async def test_a_second_runner_stands_by_and_names_the_leader(start: Any) -> None:
    """B, started after A on the same database: role standby naming A; its writes get 503
    with A's URL, its builder port answers a hello with Reject code standby naming A."""
    with trio.fail_after(LIMIT):
        a = await start("a")
        assert (await a.role("leader"))["warnings"] == []
        b = await start("b")
        status = await b.status()
        while status.get("leader") is None:
            status = await b.status()
            await trio.sleep(0.05)
        assert status == {
            "role": "standby",
            "leader": a.addresses.http[0],
            "leaderBuilders": str(a.addresses.builders[0]),
        }
        response = await b.client.post("/builds", json={"command": ["true"]})
        assert response.status_code == 503
        assert response.json()["leader"] == a.addresses.http[0]
        assert (await b.client.get("/builds")).status_code == 503
        answer = await _hello(b.addresses.builders[0])
        assert isinstance(answer, Reject)
        assert answer.code == "standby"
        assert answer.leader == str(a.addresses.builders[0])
        assert (await a.client.post("/builds", json={"command": ["true"]})).status_code == 201


async def test_the_standby_takes_over_the_queue_when_the_leader_stops(
    start: Any, tmp_path: Path
) -> None:
    """A builder given both runners, the standby first, settles on the leader A; A stops (it
    lets its lease go): B leads at once, with A's queue, the builder moves over and runs it."""
    with trio.fail_after(LIMIT):
        a = await start("a")
        await a.role("leader")
        b = await start("b")
        await b.role("standby")
        async with trio.open_nursery() as nursery:
            config = BuilderConfig(
                servers=(b.addresses.builders[0], a.addresses.builders[0]),
                systems=(SYSTEM,),
                work_dir=tmp_path / "builder",
                hostname="b1",
                ping_interval=1,
            )
            nursery.start_soon(functools.partial(run_builder, config))
            while not [m for m in (await a.status())["machines"] if m["connected"]]:
                await trio.sleep(0.05)
            ids = []
            for _ in range(3):
                response = await a.client.post(
                    "/builds", json={"command": ["sh", "-c", "sleep 0.2"]}
                )
                ids.append(response.json()["id"])
            while (await a.status())["queue"]["running"] == 0:
                await trio.sleep(0.05)
            a.scope.cancel()
            await b.role("leader")
            for build_id in ids:
                while (await b.client.get(f"/builds/{build_id}")).json()["state"] != "succeeded":
                    await trio.sleep(0.05)
            (machine,) = (await b.status())["machines"]
            assert machine["connected"] and machine["hostname"] == "b1"
            nursery.cancel_scope.cancel()


def test_a_builder_tries_its_runners_in_turn_and_goes_to_the_named_leader() -> None:
    """One round of failures backs off once; a standby naming a listed runner sends the
    builder there next; one address backs off on every failure, as before."""
    a, b, c = HostPort("a", 1), HostPort("b", 1), HostPort("c", 1)
    servers = ServerList((a, b, c))
    assert servers.current == a
    assert not servers.failed()  # a refused: b next, at once
    assert servers.current == b
    assert not servers.failed(leader="c:1")  # b is a standby naming c
    assert servers.current == c
    assert servers.failed()  # a whole round failed: back off
    assert servers.current == a
    servers.connected()
    assert not servers.failed(leader="elsewhere:9")  # not listed: the next one
    assert servers.current == b
    single = ServerList((a,))
    assert single.failed() and single.failed() and single.current == a


async def test_a_leader_whose_lease_was_taken_stands_down_and_commits_nothing(
    start: Any, pg_url: str
) -> None:
    """The lease taken from under A (as when A froze past it): A's next write is refused by
    the epoch, A answers as a standby, and the submission is not in the database."""
    with trio.fail_after(LIMIT):
        a = await start("a")
        await a.role("leader")
        thief = LeaseStore(pg_url)
        try:
            expire(pg_url)
            assert await trio.to_thread.run_sync(thief.acquire, "thief", "t:1", "http://t", 60)
            response = await a.client.post("/builds", json={"command": ["stale"]})
            # Either the fenced write failed (503), or A had already noticed (503 standby).
            assert response.status_code == 503, response.text
            while (await a.role("standby")).get("leader") != "http://t":
                await trio.sleep(0.05)
        finally:
            thief.close()
        store = await trio.to_thread.run_sync(open_store, pg_url, Path("."))
        try:
            builds = (await trio.to_thread.run_sync(store.load)).builds
        finally:
            store.close()
        assert [b for b in builds if b.spec.command == ("stale",)] == []
        assert all(b.state is BuildState.QUEUED for b in builds)


async def test_a_client_given_both_runners_reaches_the_leader(start: Any) -> None:
    """--url STANDBY,LEADER (and a dead URL first): status and submit go to the leader."""
    from hydra_trio.cli.client import RunnerClient

    with trio.fail_after(LIMIT):
        a = await start("a")
        await a.role("leader")
        b = await start("b")
        while (await b.status()).get("leader") is None:
            await trio.sleep(0.05)
        dead = "http://127.0.0.1:1"
        client = RunnerClient(f"{dead},{b.addresses.http[0]},{a.addresses.http[0]}")
        status = await trio.to_thread.run_sync(client.status)
        assert status["role"] == "leader"
        build_id = await trio.to_thread.run_sync(client.submit, {"command": ["true"]})
        assert (await a.client.get(f"/builds/{build_id}")).status_code == 200
        # The standby alone, naming the leader: followed.
        only_b = RunnerClient(b.addresses.http[0])
        assert (await trio.to_thread.run_sync(only_b.status))["role"] == "leader"
