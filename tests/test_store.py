"""The durable queue, against both backends: schema, rows, compare-and-set, restore."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from hydra_trio.protocol.messages import BuildStatus, FileInfo, Hello
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.journal import Journal
from hydra_trio.runner.model import BuildSpec, BuildState, MachineState
from hydra_trio.runner.persister import Persister, take_rows
from hydra_trio.runner.rows import build_row
from hydra_trio.runner.store import (
    SCHEMA_VERSION,
    Store,
    StoreError,
    open_store,
)

SYSTEM = "x86_64-linux"
SHA = "ab" * 32


def spec(name: str = "", *after: str) -> BuildSpec:
    return BuildSpec(command=("true",), system=SYSTEM, name=name, after=after)


def flush(farm: Farm, store: Store) -> None:
    builds, edges, machines = take_rows(farm)
    store.save(builds, edges, machines)


class FakeSession:
    session_id = "s"

    def __init__(self) -> None:
        self.posted: list[object] = []

    def post(self, message: object) -> None:
        self.posted.append(message)

    def close(self, reason: str) -> None:
        pass


def hello(name: str = "a") -> Hello:
    return Hello(
        protocol_version="1.0", machine_id=f"m-{name}", hostname=name, systems=(SYSTEM,), max_jobs=2
    )


def test_a_database_from_newer_code_is_refused(
    store: Store, store_url: str, tmp_path: Path
) -> None:
    """A schema_version above SCHEMA_VERSION makes migrate fail with a clear error."""
    store._transaction(
        lambda cur: cur.execute(
            store._sql("UPDATE schema_version SET version = ?"), (SCHEMA_VERSION + 1,)
        )
    )
    again = open_store(store_url, tmp_path)
    try:
        with pytest.raises(StoreError, match="schema version"):
            again.migrate()
    finally:
        again.close()


def test_migrate_twice_keeps_the_data(store: Store, store_url: str, tmp_path: Path) -> None:
    """Opening an existing database again loses nothing."""
    farm = Farm()
    farm.submit(spec("a"), 0.0)
    flush(farm, store)
    again = open_store(store_url, tmp_path)
    try:
        again.migrate()
        assert [b.spec.name for b in again.load().builds] == ["a"]
    finally:
        again.close()


def test_builds_edges_and_machines_round_trip(store: Store) -> None:
    """Everything the farm writes comes back from load as it was."""
    farm = Farm()
    session = FakeSession()
    farm.attach(session, hello(), 0.0)
    top = farm.submit(spec("top"), 0.0)
    [left, right] = farm.submit_graph(
        [spec("l", top.id), spec("r", top.id)], 0.0, lambda name: None
    )
    farm.dispatch(0.0)
    flush(farm, store)
    snapshot = store.load()
    loaded = {b.id: b for b in snapshot.builds}
    assert set(loaded) == {top.id, left.id, right.id}
    assert loaded[top.id].state is BuildState.RUNNING
    assert loaded[top.id].attempts == 1
    assert loaded[top.id].hostname == "a"
    assert loaded[left.id].spec == left.spec
    assert sorted(snapshot.edges) == sorted([(left.id, top.id), (right.id, top.id)])
    [machine] = snapshot.machines
    assert (machine.machine_id, machine.hostname, machine.max_jobs) == ("m-a", "a", 2)
    assert machine.state is MachineState.DISCONNECTED


def test_a_result_is_committed_once_and_a_stale_attempt_changes_nothing(store: Store) -> None:
    """The row update is a compare-and-set on (build, attempt)."""
    farm = Farm()
    build = farm.submit(spec("x"), 0.0)
    build.state, build.attempts = BuildState.RUNNING, 2
    store.save([build_row(build)], [], [])
    # attempt 1 (stale) claims success: nothing changes
    build.state, build.attempts, build.status = BuildState.SUCCEEDED, 1, BuildStatus.SUCCESS
    store.save([build_row(build)], [], [])
    [row] = store.load().builds
    assert (row.state, row.attempts) == (BuildState.RUNNING, 2)
    # attempt 2 commits
    build.attempts = 2
    build.outputs = (FileInfo(path="out", size=3, sha256=SHA),)
    store.save([build_row(build)], [], [])
    # a second result for attempt 2 (or a later write) cannot change a finished build
    build.state, build.status = BuildState.FAILED, BuildStatus.BUILD_FAILED
    store.save([build_row(build)], [], [])
    [row] = store.load().builds
    assert (row.state, row.status, row.attempts) == (BuildState.SUCCEEDED, BuildStatus.SUCCESS, 2)
    assert row.outputs == (FileInfo(path="out", size=3, sha256=SHA),)


def test_restore_requeues_running_builds_under_a_new_attempt(store: Store) -> None:
    """After a restart running builds are queued again, dependencies are rewired, machines
    are known but disconnected, and the next dispatch uses a new attempt number."""
    farm = Farm()
    session = FakeSession()
    farm.attach(session, hello(), 0.0)
    top = farm.submit(spec("top"), 0.0)
    below = farm.submit(spec("below", top.id), 0.0)
    farm.dispatch(0.0)
    assert top.state is BuildState.RUNNING and top.attempts == 1
    flush(farm, store)

    restarted = Farm()
    restarted.restore(store.load(), 100.0)
    top2, below2 = restarted.builds[top.id], restarted.builds[below.id]
    assert top2.state is BuildState.QUEUED
    assert below2.waiting_for == {top.id}
    assert restarted.machines["m-a"].state is MachineState.DISCONNECTED
    assert restarted.machines["m-a"].lost_builds == 0
    restarted.attach(FakeSession(), hello(), 101.0)
    restarted.dispatch(101.0)
    assert top2.state is BuildState.RUNNING
    assert top2.attempts == 2
    # the restore itself was journalled: running -> queued is durable too
    flush(restarted, store)
    assert {b.id: b.attempts for b in store.load().builds}[top.id] == 2


def test_runner_restarts_do_not_use_up_a_builds_tries(store: Store) -> None:
    """A build cut short by three runner restarts in a row (attempts 1-3, none its fault)
    still gets its max_tries (3) infrastructure failures before it fails builder-lost."""
    farm = Farm()
    farm.attach(FakeSession(), hello(), 0.0)
    build = farm.submit(spec("x"), 0.0)
    farm.dispatch(0.0)
    for restart in range(1, 4):
        flush(farm, store)
        farm = Farm()
        farm.restore(store.load(), 0.0)
        farm.attach(FakeSession(), hello(), 0.0)
        farm.dispatch(0.0)
        build = farm.builds[build.id]
        assert (build.state, build.attempts) == (BuildState.RUNNING, restart + 1)
    for lost in range(1, 4):
        session = farm.machines["m-a"].session
        assert session is not None
        farm.detach(session, "silent", 1000.0 * lost)
        if lost < 3:
            assert build.state is BuildState.QUEUED, lost
            farm.attach(FakeSession(), hello(), 1000.0 * lost)
            farm.dispatch(1000.0 * lost + 500)
            assert build.state is BuildState.RUNNING
    assert (build.state, build.status) == (BuildState.FAILED, BuildStatus.BUILDER_LOST)
    assert (build.attempts, build.infra_failures) == (6, 3)


def test_restore_fails_dependents_of_a_failed_build(store: Store) -> None:
    """A queued build whose dependency had failed is dependency-failed on restore."""
    farm = Farm()
    top = farm.submit(spec("top"), 0.0)
    below = farm.submit(spec("below", top.id), 0.0)
    flush(farm, store)
    top.state, top.status = BuildState.FAILED, BuildStatus.BUILD_FAILED
    store.save([build_row(top)], [], [])  # the crash came before the dependents were written
    restarted = Farm()
    restarted.restore(store.load(), 0.0)
    assert restarted.builds[below.id].status is BuildStatus.DEPENDENCY_FAILED


async def test_the_persister_commits_groups_and_flush_waits_for_durability(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """Many changes while a batch is written land in few transactions; after flush() the
    database has all of them."""
    farm = Farm(journal=Journal(hold_assigns=True))
    persister = Persister(store, farm)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(persister.run)
        for index in range(200):
            farm.submit(spec(f"b{index}"), 0.0)
        await persister.flush()
        assert len(await trio.to_thread.run_sync(lambda: store.load().builds)) == 200
        assert persister.batches <= 3
        nursery.cancel_scope.cancel()


async def test_a_build_submitted_to_a_free_machine_is_assigned_after_one_commit(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    """The new build's row and its Assign's attempt go into the same transaction: the
    persister lets the dispatcher, woken with it, run before it takes the rows."""
    from hydra_trio.runner.daemon import Dispatcher

    dispatcher = Dispatcher()
    farm = Farm(on_change=dispatcher.wake, journal=Journal(hold_assigns=True))
    persister = Persister(store, farm)
    session = FakeSession()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(persister.run)
        nursery.start_soon(dispatcher.run, farm)
        farm.attach(session, hello(), 0.0)
        await persister.flush()
        before, ids = persister.batches, []
        for index in range(2):  # the machine has two slots
            ids.append(farm.submit(spec(f"b{index}"), 0.0).id)  # as POST /builds does, then
            await persister.flush()
            await trio.testing.wait_all_tasks_blocked()
            assert persister.batches == before + index + 1
            assert [getattr(m, "build_id", None) for m in session.posted] == ids
        nursery.cancel_scope.cancel()


def test_a_graph_is_all_or_nothing(store: Store) -> None:
    """A batch that fails part-way leaves nothing of it behind."""
    farm = Farm()
    builds = farm.submit_graph([spec("a"), spec("b", "a")], 0.0, {"a": 0}.get)
    rows, edges, machines = take_rows(farm)
    broken = [*rows, (*rows[0][:2], None, *rows[0][3:])]  # NULL spec violates the schema
    broken[-1] = ("zz", *broken[-1][1:])
    with pytest.raises(Exception):  # noqa: B017 - each driver raises its own IntegrityError
        store.save(broken, edges, machines)
    assert store.load().builds == []
    store.save(rows, edges, machines)
    assert {b.id for b in store.load().builds} == {b.id for b in builds}
