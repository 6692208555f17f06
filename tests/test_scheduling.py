"""The farm's scheduler (``Farm.dispatch``), as Hydra schedules: no network, no clock.

Order: priority, then the builds that unblock the most others, then age; per-system
matching with required / supported / mandatory features and ``maxJobs``; among capable
machines the most free capacity scaled by speed factor, avoiding one the build failed on.
"""

from __future__ import annotations

from collections.abc import Iterator

from hydra_trio.protocol.messages import Assign, BuildStatus, Hello, Message, Result
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.model import Build, BuildSpec, BuildState, Machine

SYSTEM = "x86_64-linux"


class FakeSession:
    def __init__(self, name: str) -> None:
        self.session_id = name
        self.posted: list[Message] = []

    def post(self, message: Message) -> None:
        self.posted.append(message)

    def close(self, reason: str) -> None:
        pass


def machine(
    farm: Farm,
    name: str,
    *,
    max_jobs: int = 1,
    speed: float = 1.0,
    systems: tuple[str, ...] = (SYSTEM,),
    features: tuple[str, ...] = (),
    mandatory: tuple[str, ...] = (),
) -> FakeSession:
    session = FakeSession(name)
    hello = Hello(
        protocol_version="1.0",
        machine_id=name,
        hostname=name,
        systems=systems,
        max_jobs=max_jobs,
        speed_factor=speed,
        supported_features=features,
        mandatory_features=mandatory,
    )
    farm.attach(session, hello, 0.0)
    return session


def submit(
    farm: Farm, name: str, *, priority: int = 0, features: tuple[str, ...] = (), **kw: object
) -> Build:
    spec = BuildSpec(
        command=("true",),
        name=name,
        system=str(kw.get("system", SYSTEM)),
        priority=priority,
        required_features=frozenset(features),
    )
    return farm.submit(spec, 0.0)


def assigned(session: FakeSession, farm: Farm) -> list[str]:
    return [farm.builds[m.build_id].spec.name for m in session.posted if isinstance(m, Assign)]


def test_priority_first_then_age() -> None:
    farm = Farm()
    old, new, urgent = submit(farm, "old"), submit(farm, "new"), submit(farm, "urgent", priority=5)
    session = machine(farm, "m", max_jobs=2)
    farm.dispatch(0.0)
    assert assigned(session, farm) == ["urgent", "old"]
    assert new.state is BuildState.QUEUED and {old.state, urgent.state} == {BuildState.RUNNING}


def test_builds_that_unblock_more_go_before_older_ones() -> None:
    farm = Farm()
    submit(farm, "lonely")
    hub = submit(farm, "hub")
    farm.submit_graph(
        [BuildSpec(command=("true",), system=SYSTEM, after=(hub.id,)) for _ in range(3)],
        0.0,
        lambda name: None,
    )
    session = machine(farm, "m")
    farm.dispatch(0.0)
    assert assigned(session, farm) == ["hub"]


def test_priority_holds_across_builds_needing_different_features() -> None:
    """A machine that can build both kinds takes the more urgent one, whichever kind it is."""
    for plain_priority, expected in ((0, "kvm"), (9, "plain")):
        farm = Farm()
        submit(farm, "plain", priority=plain_priority)
        submit(farm, "kvm", priority=5, features=("kvm",))
        session = machine(farm, "m", features=("kvm",))
        farm.dispatch(0.0)
        assert assigned(session, farm) == [expected]


def test_features_required_supported_and_mandatory() -> None:
    farm = Farm()
    submit(farm, "plain")
    submit(farm, "kvm", features=("kvm",))
    submit(farm, "big", features=("big",))
    basic = machine(farm, "basic", max_jobs=3)
    only_big = machine(farm, "only-big", max_jobs=3, features=("big",), mandatory=("big",))
    farm.dispatch(0.0)
    assert assigned(only_big, farm) == ["big"]  # mandatory: nothing without "big"
    assert assigned(basic, farm) == ["plain"]  # "kvm" is not supported anywhere
    assert [b.spec.name for b in farm.builds.values() if b.state is BuildState.QUEUED] == ["kvm"]


def test_other_systems_wait_for_their_machines() -> None:
    farm = Farm()
    submit(farm, "arm", system="aarch64-linux")
    submit(farm, "x86")
    x86 = machine(farm, "x86")
    farm.dispatch(0.0)
    assert assigned(x86, farm) == ["x86"]
    arm = machine(farm, "arm", systems=("aarch64-linux",))
    farm.dispatch(0.0)
    assert assigned(arm, farm) == ["arm"]


def test_max_jobs_and_the_most_free_capacity_scaled_by_speed() -> None:
    farm = Farm()
    for index in range(7):
        submit(farm, f"b{index}")
    wide = machine(farm, "wide", max_jobs=4, speed=1.0)  # 4 free x 1
    fast = machine(farm, "fast", max_jobs=2, speed=3.0)  # 2 free x 3
    farm.dispatch(0.0)
    # fast (6) > wide (4); then fast 1x3=3 < wide 4; wide 3x1=3 ties fast's 3: the faster
    # machine wins the tie; then wide 3 > fast 0 ...: 6 builds fit in 6 slots, one waits.
    assert assigned(fast, farm) == ["b0", "b2"]
    assert assigned(wide, farm) == ["b1", "b3", "b4", "b5"]
    assert sum(b.state is BuildState.QUEUED for b in farm.builds.values()) == 1


def test_a_retry_avoids_the_machine_it_failed_on() -> None:
    farm = Farm()
    build = submit(farm, "flaky")
    first = machine(farm, "first", max_jobs=2, speed=2.0)
    second = machine(farm, "second", max_jobs=1)
    farm.dispatch(0.0)
    assert assigned(first, farm) == ["flaky"]
    failed = Result(build_id=build.id, attempt=1, status=BuildStatus.UPLOAD_FAILED, error="x")
    farm.on_result(first, farm.machines["first"], failed, 0.0)  # an infrastructure failure
    assert build.state is BuildState.QUEUED and build.failed_on == ["first"]
    farm.dispatch(build.not_before)
    assert assigned(second, farm) == ["flaky"]  # though "first" has more free capacity


def test_a_delayed_retry_waits_and_is_kept() -> None:
    farm = Farm()
    build = submit(farm, "later")
    build.not_before = 30.0
    session = machine(farm, "m")
    assert farm.dispatch(0.0) == 30.0
    assert assigned(session, farm) == []
    assert farm.dispatch(30.0) is None
    assert assigned(session, farm) == ["later"]


def test_builds_no_free_machine_can_build_cost_dispatch_nothing() -> None:
    """Thousands of queued builds needing a feature no machine has are not even looked at:
    their class's heap is left as it is, and the other builds go out."""
    farm = Farm()
    for index in range(2000):
        submit(farm, f"gpu{index}", priority=9, features=("gpu",))
    submit(farm, "plain")
    session = machine(farm, "m", max_jobs=2)
    [gpu_heap] = [h for key, h in farm.scheduler._runnable.items() if "gpu" in key[2]]
    before = list(gpu_heap)
    farm.dispatch(0.0)
    assert assigned(session, farm) == ["plain"]
    assert gpu_heap == before


def test_with_nothing_queued_a_dispatch_does_not_look_at_the_machines() -> None:
    """A dispatch with an empty queue (each hello of a reconnect storm wakes one) reads no
    machine; once a build is queued, the next one assigns it."""
    farm = Farm()
    session = machine(farm, "m")
    looked: list[str] = []

    def machines() -> Iterator[Machine]:
        for m in farm.machines.values():
            looked.append(m.machine_id)
            yield m

    def assign(build: Build, m: Machine) -> None:
        farm._assign(build, m, 0.0)

    assert farm.scheduler.dispatch(0.0, machines(), assign) is None
    assert looked == []
    submit(farm, "b")
    farm.scheduler.dispatch(0.0, machines(), assign)
    assert looked == ["m"]
    assert assigned(session, farm) == ["b"]


def test_within_one_graph_the_build_others_wait_for_goes_first() -> None:
    """Dependents are counted once the whole graph is in, not as each build is added."""
    farm = Farm()
    specs = [BuildSpec(command=("true",), system=SYSTEM, name=n) for n in ("a", "b")]
    specs += [BuildSpec(command=("true",), system=SYSTEM, name=f"c{i}", after=("b",)) for i in "12"]
    farm.submit_graph(specs, 0.0, {"a": 0, "b": 1}.get)
    session = machine(farm, "m")
    farm.dispatch(0.0)
    assert assigned(session, farm) == ["b"]


def test_the_counts_by_state_follow_every_change() -> None:
    farm = Farm()
    first = submit(farm, "first")
    (second, third) = farm.submit_graph(
        [
            BuildSpec(command=("true",), system=SYSTEM, name="second", after=(first.id,)),
            BuildSpec(command=("true",), system=SYSTEM, name="third"),
        ],
        0.0,
        lambda name: None,
    )
    assert farm.queue_counts()["queued"] == 3
    session = machine(farm, "m", max_jobs=2)
    farm.dispatch(0.0)
    assert (farm.queue_counts()["queued"], farm.queue_counts()["running"]) == (1, 2)
    failed = Result(build_id=first.id, attempt=1, status=BuildStatus.BUILD_FAILED, exit_code=1)
    farm.on_result(session, farm.machines["m"], failed, 1.0)  # second: dependency-failed
    farm.cancel(third.id, 2.0)
    counts = farm.queue_counts()
    assert counts == {"queued": 0, "running": 0, "succeeded": 0, "failed": 2, "cancelled": 1}
    assert {b.state.value for b in (first, second)} == {"failed"}


def test_a_retry_never_goes_to_a_full_machine_it_did_not_fail_on() -> None:
    """When the only machine with a free slot is the one the build failed on, it goes there:
    a full machine it did not fail on is no choice at all."""
    farm = Farm()
    build = submit(farm, "flaky")
    first = machine(farm, "first")
    farm.dispatch(0.0)
    failed = Result(build_id=build.id, attempt=1, status=BuildStatus.UPLOAD_FAILED, error="x")
    farm.on_result(first, farm.machines["first"], failed, 0.0)
    busy = machine(farm, "busy", max_jobs=1, speed=2.0)
    submit(farm, "filler", priority=9)  # goes first, to the faster machine: now full
    farm.dispatch(build.not_before)
    assert assigned(busy, farm) == ["filler"]
    assert assigned(first, farm) == ["flaky", "flaky"]


def test_many_machines_and_builds_are_matched_by_capacity() -> None:
    farm = Farm()
    sessions = [machine(farm, f"m{i}", max_jobs=2, speed=1.0 + (i % 3)) for i in range(30)]
    for index in range(50):
        submit(farm, f"b{index}")
    farm.dispatch(0.0)
    loads = [len(assigned(s, farm)) for s in sessions]
    assert sum(loads) == 50
    # the fastest machines (speed 3) are filled first, then speed 2, the rest by capacity
    assert all(loads[i] == 2 for i in range(30) if i % 3 == 2)
    assert all(loads[i] == 2 for i in range(30) if i % 3 == 1)
