"""Deterministic simulation: the real runner and builders under generated fault schedules.

Each example is a farm of 1 to 8 builders (``tests/helpers/simfarm.py``: real ``run_builder``, real
``serve_builder``/``Farm``/``Persister`` over SQLite, in-process links), a graph of up to 50
builds run by a scripted executor (virtual-time sleeps, scripted statuses, a log line naming
the run), and a schedule of faults (delays, drops, partitions, freezes, crashes and power
losses of builders and of the runner) and operators' cancels (the only way the attempt changes
under a live session, so the only way stale results and progress reach the runner).
Everything runs under
``MockClock(autojump_threshold=0)``, with thread work made synchronous, so an example is
deterministic and an hour of farm time takes a fraction of a second.

After the schedule, with every fault healed and time advanced, the invariants are checked:

- every build ends in a final state; every build that could succeed did; a scripted failure
  fails, a cancel the operator got an answer for sticks, and only the builds below those are
  dependency-failed (and never ran);
- each result was committed exactly once, by its final attempt: at most once per runner
  generation; a finishing result committed again in a later generation only if the first
  commit was lost with its runner (not in the snapshot the next runner restored); a build
  restored as finished never changes again; the last commit is the build's final attempt,
  status and machine; every commit is what an execution of that attempt on that machine
  returned; after a clean stop the database says what the farm says;
- at no sampled moment (every ``TICK``) did the runner count a slot as used on a machine it had
  not heard from for longer than builder-timeout + one tick;
- at no sampled moment did a build run on a builder that had not heard from the runner for
  longer than ping-timeout + one tick (a frozen builder is exempt until one tick after thaw:
  it cannot act while stopped);
- every time a builder needed a connection (it started, or a connection ended) it was attached
  again within one backoff cap (+ one tick) of the end of whatever kept it from connecting
  (its route cut, itself frozen or dead, the runner dead), and it is connected at the end;
- no stale result or progress changed anything, and what the runner commits is the attempt
  running on that machine's live session (checked inside ``Farm.on_result`` and
  ``on_progress``, ``simjournal.JournalingFarm``); a session never fails with an internal
  error;
- no attempt of a build ran twice (on two builders or on one), and an attempt's log holds one
  run's output (the runner sends an Assign only once its attempt number is committed: the test
  at the end pins the schedules that found the runner handing an attempt out twice).

Faults land on whole seconds (when builds end and start) or while the commits of that second
are in flight, and ``target()`` steers generation towards schedules that kill builds under way,
make stale frames reach the runner and lose results with a runner.

``HYDRA_TRIO_SIM_EXAMPLES`` sets the number of examples (the default keeps this file well under
a minute).  A failing schedule shrinks to a minimal fault list; the test prints it (the
``scenario=`` line) and the run's timeline.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, given, note, settings, target
from hypothesis import strategies as st

from hydra_trio.builder.daemon import BuilderConfig
from hydra_trio.protocol.messages import BuildStatus
from hydra_trio.runner.daemon import RunnerConfig
from hydra_trio.runner.model import BuildState, MachineState
from hydra_trio.runner.store import open_store

from .helpers.simfarm import DIRECTIONS, FAULT_KINDS, TICK, BuildPlan, World, machine_silence
from .helpers.simjournal import Commit, Execution
from .helpers.simprocess import COMMIT_LATENCY, synchronous_threads

#: 120 examples take about 25 s on a 2-core machine (4 to 5 examples a second).
EXAMPLES = int(os.environ.get("HYDRA_TRIO_SIM_EXAMPLES", "120"))

SYSTEM = "x86_64-linux"
RUNNER = RunnerConfig(
    builder_timeout=30.0,
    handshake_timeout=10.0,
    http=None,
    default_system=SYSTEM,
    # High enough that the faults of one schedule can never use up a build's tries: then
    # "every build that could succeed did" is exact.
    max_tries=50,
)
BUILDER = BuilderConfig(
    systems=(SYSTEM,), ping_interval=10.0, connect_timeout=10.0, reconnect_max=30.0
)
PING_TIMEOUT = BUILDER.effective_ping_timeout
BUILDER_TIMEOUT = RUNNER.builder_timeout
CAP = BUILDER.reconnect_max
#: Faults start within this many seconds of the graph's submission: on a whole second (when
#: builds end and start) or a little later, while the first or the second database commit of
#: that second is in flight (see ``simprocess.COMMIT_LATENCY``).
FAULT_WINDOW = 240
IN_FLIGHT = COMMIT_LATENCY / 2
OFFSETS = (0.0, IN_FLIGHT, COMMIT_LATENCY + IN_FLIGHT)
MAX_FAULT = 150
#: Where the runners' state dirs go: tmpfs if there is one (SQLite fsyncs every commit).
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@attrs.frozen
class Fault:
    """One event of a schedule: ``kind`` on builder ``target`` from ``at`` s for ``duration`` s
    (or, for ``cancel``, an operator cancelling the ``target``-th running build at ``at`` s)."""

    at: float
    kind: str
    target: int
    direction: str
    duration: int

    @property
    def who(self) -> str:
        if self.kind == "cancel":
            return str(self.target)
        return "runner" if self.kind.endswith("-runner") else f"b{self.target}"

    def __repr__(self) -> str:
        if self.kind == "cancel":
            return f"at {self.at:g} s: an operator cancels running build no. {self.target}"
        way = f" {self.direction}" if self.kind in ("delay", "partition", "drop") else ""
        return f"at {self.at:g} s: {self.kind} {self.who}{way} for {self.duration} s"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis prints failing examples with this


@attrs.frozen
class Scenario:
    #: max_jobs of each builder (b0, b1, ...).
    jobs: tuple[int, ...]
    builds: tuple[BuildPlan, ...]
    faults: tuple[Fault, ...]
    #: the seed ``make_graph`` made ``builds`` from, if it did.
    seed: int | None = None

    def __repr__(self) -> str:
        lines = [f"{len(self.jobs)} builders, job slots {list(self.jobs)}"]
        seed = "" if self.seed is None else f" (graph seed {self.seed})"
        lines.append(f"{len(self.builds)} builds{seed}:")
        for i, plan in enumerate(self.builds):
            after = f" after {', '.join(f'#{d}' for d in plan.deps)}" if plan.deps else ""
            lines.append(f"  #{i}: {plan.outcome} in {plan.duration} s{after}")
        lines.append(f"{len(self.faults)} faults:" if self.faults else "no faults")
        lines.extend(f"  {fault!r}" for fault in self.faults)
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis prints failing examples with this


def make_graph(size: int, seed: int) -> tuple[BuildPlan, ...]:
    """A random graph of ``size`` builds: up to 3 dependencies each, mostly short builds and
    some longer than every timeout, mostly successes.  Drawn from a seed rather than build by
    build, so that shrinking spends its time on the fault list."""
    rng = random.Random(seed)
    builds = []
    for i in range(size):
        deps = rng.sample(range(i), min(i, rng.choice((0, 0, 1, 1, 2, 3))))
        long = rng.random() < 0.25
        builds.append(
            BuildPlan(
                duration=rng.randint(31, 150) if long else rng.randint(1, 20),
                outcome=rng.choices(("ok", "flaky", "fail"), (8, 1, 1))[0],
                deps=tuple(sorted(deps)),
            )
        )
    return tuple(builds)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(1, 8))
    jobs = tuple(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)))
    size = draw(st.integers(1, 50))
    seed = draw(st.integers(0, 2**32 - 1))
    moments = st.tuples(st.integers(1, FAULT_WINDOW), st.sampled_from(OFFSETS)).map(sum)
    fault = st.builds(
        Fault,
        at=moments,
        kind=st.sampled_from(FAULT_KINDS),
        target=st.integers(0, n - 1),
        direction=st.sampled_from(DIRECTIONS),
        duration=st.integers(1, MAX_FAULT),
    )
    cancel = st.builds(
        Fault,
        at=moments,
        kind=st.just("cancel"),
        target=st.integers(0, 7),
        direction=st.just("both"),
        duration=st.just(0),
    )
    faults = draw(st.lists(fault | cancel, max_size=10))
    faults = sorted(faults, key=lambda f: (f.at, repr(f)))
    return Scenario(jobs, make_graph(size, seed), tuple(faults), seed)


# -- running one example -------------------------------------------------------------------


async def sample(world: World) -> None:
    """The timing invariants, checked every tick."""
    journal = world.journal
    reported: set[object] = set()
    while True:
        now = trio.current_time()
        runner = world.runner
        if runner is not None:
            for machine in runner.farm.machines.values():
                if machine.running and machine.state is MachineState.DISCONNECTED:
                    journal.violation(f"{machine.hostname} is disconnected but runs builds")
                if not machine.running:
                    continue
                silence = machine_silence(machine, now)
                if silence is None:
                    journal.violation(f"{machine.hostname} runs builds without a session")
                elif silence > BUILDER_TIMEOUT + TICK and machine.session not in reported:
                    reported.add(machine.session)
                    journal.violation(
                        f"runner {runner.generation} counts {len(machine.running)} slots used "
                        f"on {machine.hostname}, silent for {silence:g} s"
                    )
        for run in list(journal.live):
            process = run.process
            if process.frozen or now - process.thawed_at <= TICK:
                continue  # a stopped daemon cannot cancel anything
            silence = now - run.stream.last_received
            if silence > PING_TIMEOUT + TICK and run not in reported:
                reported.add(run)
                journal.violation(
                    f"{run!r} still runs; its builder has not heard the runner for {silence:g} s"
                )
        await trio.sleep(TICK)


async def run_fault(world: World, fault: Fault, start: float) -> None:
    await trio.sleep_until(start + fault.at)
    await world.apply(fault.kind, fault.who, fault.direction, fault.duration)


def settle_limit(scenario: Scenario) -> float:
    """A bound on the time from the last heal until everything is done: reconnecting, every
    infrastructure retry delay the faults may have caused, and all the work done serially."""
    work = sum(plan.duration for plan in scenario.builds)
    return (
        2 * (PING_TIMEOUT + CAP)
        + 60 * (len(scenario.faults) + 1)
        + work
        + 10 * len(scenario.builds)
    )


async def simulate(scenario: Scenario, root: Path) -> tuple[list[str], list[str], float]:
    """Run one example; returns the invariant violations, the timeline and how much trouble
    the faults made (see ``trouble``)."""
    # Every example's virtual time is bounded (a hang fails it instead of running forever).
    bound = FAULT_WINDOW + MAX_FAULT + settle_limit(scenario) + 600
    with trio.fail_after(bound):
        return await _simulate(scenario, root)


async def _simulate(scenario: Scenario, root: Path) -> tuple[list[str], list[str], float]:
    async with trio.open_nursery() as nursery:
        world = World(nursery, root, RUNNER, BUILDER, scenario.builds)
        journal = world.journal
        with trio.CancelScope() as run:
            # A violation seen while running ends the example there: failing examples stay
            # short, which keeps shrinking fast.
            journal.on_violation = run.cancel
            await world.start_runner()
            for index, jobs in enumerate(scenario.jobs):
                world.start_builder(f"b{index}", max_jobs=jobs)
            start = trio.current_time()
            await world.submit()
            nursery.start_soon(sample, world)
            async with trio.open_nursery() as faults:
                for fault in scenario.faults:
                    faults.start_soon(run_fault, world, fault, start)
            healed = trio.current_time()
            journal.log("every fault healed")
            quiet_after = healed + max(PING_TIMEOUT, BUILDER_TIMEOUT) + CAP + 2 * TICK
            limit = healed + settle_limit(scenario)
            while trio.current_time() < limit and not (
                trio.current_time() >= quiet_after and settled(world)
            ):
                await trio.sleep(TICK)
        if run.cancelled_caught:
            problems = list(journal.violations)
            journal.on_violation = lambda: None
            await world.stop()
        else:
            logs = {
                (build_id, attempt): await world.farm_storage.logs.read(build_id, attempt)
                for build_id in world.ids
                for attempt in range(1, world.farm.builds[build_id].attempts + 1)
            }
            problems = check_final(world, scenario, trio.current_time(), logs)
            await world.stop()
            problems += check_database(world)
        nursery.cancel_scope.cancel()
    timeline = [f"{t:9.3f} {text}" for t, text in journal.timeline]
    return problems, timeline, trouble(world)


def trouble(world: World) -> float:
    journal = world.journal
    killed = sum(run.outcome == "killed" for run in journal.executions)
    generations: dict[int, set[int]] = defaultdict(set)
    for commit in journal.commits:
        generations[commit.build].add(commit.generation)
    recommitted = sum(len(g) > 1 for g in generations.values())
    return killed + 5 * sum(journal.stale.values()) + 5 * recommitted


def settled(world: World) -> bool:
    farm = world.farm
    return all(build.state.finished for build in farm.builds.values()) and all(
        (machine := farm.machines.get(f"machine-{name}")) is not None
        and machine.state is MachineState.CONNECTED
        for name in world.processes
    )


# -- the invariants ------------------------------------------------------------------------


def check_final(
    world: World, scenario: Scenario, end: float, logs: dict[tuple[str, int], bytes]
) -> list[str]:
    journal = world.journal
    farm = world.farm
    problems = list(journal.violations)
    builds = [farm.builds[build_id] for build_id in world.ids]
    runs_of: dict[int, list[Execution]] = defaultdict(list)
    for run in journal.executions:
        runs_of[run.build].append(run)

    # Every build ends; those that could succeed did; failures are the scripted ones (or an
    # operator's cancel: acknowledged, it must have stuck; unanswered, it may have been lost).
    could: list[bool] = []
    for i, (plan, build) in enumerate(zip(scenario.builds, builds, strict=True)):
        cancel = journal.cancels.get(i)
        cancelled = cancel == "acknowledged" or (
            cancel == "unknown" and build.state is BuildState.CANCELLED
        )
        deps_could = all(could[d] for d in plan.deps)
        could.append(deps_could and plan.outcome != "fail" and not cancelled)
        what = f"#{i} ({build.state.value}, {build.status and build.status.value}, "
        what += f"{build.attempts} attempts)"
        if not build.state.finished:
            problems.append(f"{what} never finished")
        elif cancelled:
            if build.state is not BuildState.CANCELLED:
                problems.append(f"{what} was cancelled")
        elif could[i] and build.state is not BuildState.SUCCEEDED:
            problems.append(f"{what} could succeed and did not")
        elif deps_could and plan.outcome == "fail" and build.status is not BuildStatus.BUILD_FAILED:
            problems.append(f"{what} should have failed as scripted")
        elif not deps_could and (build.status is not BuildStatus.DEPENDENCY_FAILED or runs_of[i]):
            problems.append(f"{what} should be dependency-failed without running")

    # The running counts by state (/status, /metrics) match the builds.
    recount = Counter(b.state.value for b in farm.builds.values())
    if farm.queue_counts() != {s.value: recount[s.value] for s in BuildState}:
        problems.append(f"queue counts {farm.queue_counts()} but the builds are {dict(recount)}")

    # Each result committed once, by its final attempt.
    commits_of: dict[int, list[Commit]] = defaultdict(list)
    for commit in journal.commits:
        commits_of[commit.build].append(commit)
    for i, build in enumerate(builds):
        commits = commits_of[i]
        keys = [(c.generation, c.attempt) for c in commits]
        if len(set(keys)) != len(keys):
            problems.append(f"#{i}: an attempt's result was committed twice by one runner")
        finishing = [
            c for c in commits if not (c.status.is_infrastructure and c.attempt < RUNNER.max_tries)
        ]
        if build.status is BuildStatus.DEPENDENCY_FAILED:
            if commits:
                problems.append(f"#{i} is dependency-failed but results were committed")
            continue
        if not build.state.finished:
            continue
        if build.state is BuildState.CANCELLED:
            # No result finished it; any that did before was lost with its runner.
            last_generation = world.generation + 1
        elif not finishing:
            problems.append(f"#{i} finished without a committed result")
            continue
        else:
            last = finishing.pop()
            last_generation = last.generation
            if (last.attempt, last.status, last.machine_id) != (
                build.attempts,
                build.status,
                build.machine_id,
            ):
                problems.append(
                    f"#{i}: the last commit (attempt {last.attempt}, {last.status.value} from "
                    f"{last.machine_id}) is not the build's final state (attempt "
                    f"{build.attempts}, {build.status and build.status.value} on "
                    f"{build.machine_id})"
                )
        for earlier in finishing:
            if earlier.generation >= last_generation or earlier.generation == world.generation:
                problems.append(f"#{i}: finished twice by runner {earlier.generation}")
            elif i in journal.restored.get(earlier.generation + 1, {}):
                # It was durable when its runner died (the next one restored it finished),
                # so nothing may have committed it again.
                problems.append(
                    f"#{i}: its result, durable since runner {earlier.generation}, was "
                    "committed again"
                )
        for generation, finished in journal.restored.items():
            if i not in finished:
                continue
            if finished[i] != (build.status, build.attempts):
                problems.append(f"#{i} changed after runner {generation} restored it finished")
            if any(c.generation >= generation for c in commits):
                problems.append(f"#{i} was committed again after runner {generation} restored it")

    # Every commit is what an execution of that attempt on that machine returned.
    for commit in journal.commits:
        if not any(
            run.attempt == commit.attempt
            and f"machine-{run.builder}" == commit.machine_id
            and run.outcome == commit.status.value
            for run in runs_of[commit.build]
        ):
            problems.append(
                f"#{commit.build} attempt {commit.attempt}: runner {commit.generation} committed "
                f"{commit.status.value} from {commit.machine_id}, which no execution returned"
            )

    # No attempt of a build ran twice (on two builders, or at all), and an attempt's log is
    # one execution's.
    by_attempt: dict[tuple[int, int], list[Execution]] = defaultdict(list)
    for run in journal.executions:
        by_attempt[(run.build, run.attempt)].append(run)
    for (i, attempt), runs in by_attempt.items():
        if len(runs) > 1:
            where = " on two builders" if len({run.builder for run in runs}) > 1 else ""
            log = logs.get((world.ids[i], attempt), b"")
            problems.append(
                f"#{i} attempt {attempt} ran {len(runs)} times{where}: {runs}; its log holds "
                f"{len(set(log.splitlines()))} runs' lines"
            )
    for (i, attempt), runs in by_attempt.items():
        if len(runs) > 1:
            continue  # reported (or tolerated) above
        log = logs.get((world.ids[i], attempt), b"")
        others = [line for line in log.splitlines(keepends=True) if line != runs[0].tag]
        if others:
            problems.append(f"#{i} attempt {attempt}: its log has lines of another run: {others}")

    # Builders reconnect within one backoff cap of being able to.
    for name in world.processes:
        blocked = merge(journal.impaired.get(name, []) + journal.impaired.get("*", []))
        attaches = journal.attaches.get(name, [])
        for needed in journal.needs_connection.get(name, []):
            deadline = reconnect_deadline(needed, blocked)
            if deadline > end:
                continue  # the final check below covers it
            if not any(needed <= t <= deadline for t in attaches):
                problems.append(
                    f"{name} needed a connection at {needed:g} s and was not attached by "
                    f"{deadline:g} s"
                )
        machine = farm.machines.get(f"machine-{name}")
        if machine is None or machine.state is not MachineState.CONNECTED:
            problems.append(f"{name} is not connected at the end")
    return problems


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def reconnect_deadline(needed: float, blocked: list[tuple[float, float]]) -> float:
    """When a builder that needed a connection at ``needed`` must be attached: one backoff cap
    after nothing blocks it any more (a block starting before that pushes it out again)."""
    ready = needed
    for start, end in blocked:
        if start <= ready <= end:
            ready = end
    deadline = ready + CAP + TICK
    for start, end in blocked:
        if ready < start <= deadline:
            ready = max(ready, end)
            deadline = ready + CAP + TICK
    return deadline


def check_database(world: World) -> list[str]:
    """After a clean stop, the store holds exactly the final state of every build."""
    store = open_store(None, world.runner_config.state_dir)
    try:
        stored = {build.id: build for build in store.load().builds}
    finally:
        store.close()
    problems = []
    for i, build_id in enumerate(world.ids):
        build = world.farm.builds[build_id]
        row = stored.get(build_id)
        if row is None:
            problems.append(f"#{i} is not in the database")
        elif (row.state, row.status, row.attempts) != (build.state, build.status, build.attempts):
            problems.append(
                f"#{i}: the database says {row.state.value}/{row.status} after {row.attempts} "
                f"attempts, the farm {build.state.value}/{build.status} after {build.attempts}"
            )
    return problems


# -- the test ------------------------------------------------------------------------------


def run_example(scenario: Scenario) -> tuple[list[str], list[str], float]:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp, synchronous_threads():
        return trio.run(
            simulate, scenario, Path(tmp), clock=trio.testing.MockClock(autojump_threshold=0)
        )


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios())
def test_the_farm_keeps_its_invariants_under_any_fault_schedule(scenario: Scenario) -> None:
    """Any schedule of delays, drops, partitions, freezes, crashes, power losses and cancels:
    every invariant holds."""
    problems, timeline, trouble = run_example(scenario)
    # Steer generation towards schedules that make trouble: builds killed under way, stale
    # frames, results lost with a runner.
    target(trouble, label="trouble")
    if problems:
        note("timeline:\n" + "\n".join(timeline))
    assert not problems, "\n".join(problems)


#: The minimal schedule of a bug this test found (fixed: ``Journal.hold_assigns``): b0 finishes #0
#: at 1 s, the runner commits it and sent b0 the Assign of #1 attempt 1 at once; it is killed
#: 5 ms later, while that batch is still being committed.  The next runner restored #1 with no
#: attempts and handed out #1 attempt 1 a second time: the fencing token was reused, and the
#: second run's log was appended to the first's (``<build>.1.log``).
ATTEMPT_REUSE = Scenario(
    jobs=(1,),
    builds=(BuildPlan(duration=1, outcome="ok"), BuildPlan(duration=1, outcome="ok", deps=(0,))),
    faults=(Fault(at=1 + IN_FLIGHT, kind="crash-runner", target=0, direction="both", duration=1),),
)
#: The same with a power loss (no FIN), during the second commit of that second (#0's success
#: is durable, #1's Assign is not): b0 ran #1 attempt 1 until its ping timeout (31 s), and b1,
#: whose own timeout came first, reconnected at 30.7 s and was given #1 attempt 1 too: the same
#: attempt ran on two builders at once.  Now b0 never receives that Assign.
ATTEMPT_REUSE_AT_ONCE = Scenario(
    jobs=(1, 1),
    builds=(
        BuildPlan(duration=1, outcome="ok"),
        BuildPlan(duration=100, outcome="ok", deps=(0,)),
        BuildPlan(duration=100, outcome="ok"),
    ),
    faults=(
        Fault(
            at=1 + COMMIT_LATENCY + IN_FLIGHT,
            kind="poweroff-runner",
            target=0,
            direction="both",
            duration=1,
        ),
    ),
)


@settings(max_examples=1, deadline=None, database=None)
@given(scenarios=st.just((ATTEMPT_REUSE, ATTEMPT_REUSE_AT_ONCE)))  # seeds trio's scheduler
def test_an_attempt_number_is_not_handed_out_again_after_a_runner_crash(
    scenarios: tuple[Scenario, ...],
) -> None:
    """A runner that dies between sending an Assign and committing it: no attempt runs twice."""
    problems = []
    for scenario in scenarios:
        found, timeline, _ = run_example(scenario)
        if found:
            note(f"{scenario!r}\ntimeline:\n" + "\n".join(timeline))
        problems += found
    assert not problems, "\n".join(problems)
