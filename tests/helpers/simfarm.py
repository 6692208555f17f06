"""A whole farm in one process under fault injection: the real runner and real builders over
``sim.Link``s, with a fault controller, and a journal of everything the invariants need.

Theory of operation
-------------------
``World`` runs one queue runner (``SimRunner``: a ``Farm``, its ``Dispatcher``, the real
``Persister`` over a SQLite store, ``serve_builder`` per connection) and builder processes
(``BuilderProcess``: the real ``run_builder`` with a scripted executor).  Every connection a
builder opens goes through ``World._connector``, which consults the builder's route (cut by
partitions and drops) and whether a runner is up, and wraps both ends of the new ``sim.Link``
so that the journal (``simjournal``) knows when each side last heard the other.

Faults (``World.apply``), each applied to what exists when it starts and healed when it ends:

- ``delay``: the builder's current connection holds its bytes in one or both directions; they
  are delivered, in order, when the delay ends (TCP retransmitting across a blip).  New
  connections are not affected.
- ``partition``: the route is cut: the current connection holds bytes as for ``delay``, and new
  connections hang (their SYNs are lost) until it heals.
- ``drop``: the current connection silently loses everything in one or both directions for good
  (a middlebox forgot it: no FIN, no RST), and new connections hang until the route heals.
- ``freeze``: SIGSTOP, then SIGCONT (see ``BuilderProcess`` for how faithful that is).
- ``crash``: kill -9 of the builder daemon: the kernel closes its sockets (a FIN, which travels
  like data), its builds die with it; a new process with the same machine id starts when the
  fault ends.
- ``crash-runner``: kill -9 of the runner: its tasks are cancelled without the final flush
  ``serve_runner`` does on a clean exit, so what the persister had committed is all that
  survives (a commit in flight is lost); its sockets FIN; connections are refused until a new
  runner starts from the same SQLite store the way ``serve_runner`` does (``store.load`` +
  ``farm.restore``).
- ``cancel`` (not a fault, an operator): a running build is cancelled through the farm, as the
  HTTP API does it.  It is what makes stale results and progress reach the runner at all: the
  attempt changes under a live session.

Overlapping faults compose: held directions and cut routes are counted, a crash of something
already dead does nothing (and restarts nothing).

Thread work (sqlite, statvfs) is made synchronous by ``simprocess.synchronous_threads``: it
takes no virtual time except a database commit, which takes ``COMMIT_LATENCY`` (so a runner can
die between sending an Assign and committing it, as a real one can), and a run is
deterministic under hypothesis (which seeds trio's scheduler).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from hydra_trio.builder.daemon import BuilderConfig, Executor
from hydra_trio.protocol.messages import Assign, BuildStatus, LogChunk, Phase, Progress, Result
from hydra_trio.runner.blobs import Storage
from hydra_trio.runner.daemon import Dispatcher, RunnerConfig, open_storage
from hydra_trio.runner.farm import FarmConfig
from hydra_trio.runner.journal import Journal as FarmJournal
from hydra_trio.runner.model import Build, BuildSpec, BuildState, Machine
from hydra_trio.runner.persister import Persister, take_rows
from hydra_trio.runner.session import serve_builder
from hydra_trio.runner.store import Store, open_store

from .sim import Link
from .simjournal import Execution, Journal, JournalingFarm
from .simprocess import (
    KILLED,
    BuilderEnd,
    BuilderProcess,
    Route,
    RunnerEnd,
    directions,
)

#: The sampling period of the timing invariants, and their tolerance.
TICK = 1.0
DIRECTIONS = ("both", "to_runner", "to_builder")
FAULT_KINDS = (
    "delay",
    "partition",
    "drop",
    "freeze",
    "crash",
    "poweroff",
    "crash-runner",
    "poweroff-runner",
)


# -- the runner ----------------------------------------------------------------------------


@attrs.define(eq=False)
class SimRunner:
    """One queue runner process: what ``serve_runner`` sets up, minus TCP and HTTP."""

    generation: int
    config: RunnerConfig
    journal: Journal
    farm: JournalingFarm = attrs.field(init=False)
    dispatcher: Dispatcher = attrs.field(factory=Dispatcher, init=False)
    storage: Storage = attrs.field(init=False)
    store: Store | None = attrs.field(default=None, init=False)
    persister: Persister | None = attrs.field(default=None, init=False)
    nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    handler: Callable[[trio.abc.Stream], Awaitable[None]] = attrs.field(init=False)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    done: trio.Event = attrs.field(factory=trio.Event, init=False)
    #: stopped cleanly: the last batch is written, as ``serve_runner`` does on its way out.
    graceful: bool = attrs.field(default=False, init=False)
    #: the connections made to it.
    links: list[Link] = attrs.field(factory=list, init=False)
    killed: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.farm = JournalingFarm(
            config=FarmConfig(max_tries=self.config.max_tries),
            on_change=self.dispatcher.wake,
            journal=FarmJournal(hold_assigns=True),
            sim_journal=self.journal,
            generation=self.generation,
        )
        self.storage = open_storage(self.config, self.farm)
        self.handler = functools.partial(
            serve_builder, self.farm, self.config.session_config(), self.storage
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        KILLED.set(lambda: self.killed)  # seen by this task and the tasks it starts
        try:
            with self.scope:
                store = await trio.to_thread.run_sync(
                    open_store, self.config.db, self.config.state_dir
                )
                self.store = store
                persister = self.persister = Persister(store, self.farm)
                try:
                    await trio.to_thread.run_sync(store.migrate)
                    snapshot = await trio.to_thread.run_sync(store.load)
                    self.journal.restored[self.generation] = {
                        self.journal.index[b.id]: (b.status, b.attempts)
                        for b in snapshot.builds
                        if b.state.finished
                    }
                    self.farm.restore(snapshot, trio.current_time())
                    async with trio.open_nursery() as nursery:
                        self.nursery = nursery
                        nursery.start_soon(persister.run)
                        nursery.start_soon(self.dispatcher.run, self.farm)
                        task_status.started()
                        await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True):
                        if self.graceful and persister.failure is None:
                            builds, edges, machines = take_rows(self.farm)
                            await trio.to_thread.run_sync(store.save, builds, edges, machines)
                        # kill -9: the kernel closes the file; what was committed survives.
                        await trio.to_thread.run_sync(store.close)
        finally:
            self.done.set()

    async def stop(self, *, graceful: bool) -> None:
        """Exit cleanly, or (``graceful=False``) die as with kill -9."""
        self.graceful = graceful
        self.killed = not graceful
        self.scope.cancel()
        await self.done.wait()


# -- the world -----------------------------------------------------------------------------


@attrs.frozen
class BuildPlan:
    """What the scripted executor does for one build: sleep ``duration`` (virtual) seconds,
    then end with ``outcome``: "ok" (success), "fail" (a build failure, final) or "flaky" (an
    infrastructure failure on attempt 1, success on any later attempt)."""

    duration: int
    outcome: str
    deps: tuple[int, ...] = ()

    def status(self, attempt: int) -> BuildStatus:
        if self.outcome == "fail":
            return BuildStatus.BUILD_FAILED
        if self.outcome == "flaky" and attempt == 1:
            return BuildStatus.FETCH_FAILED
        return BuildStatus.SUCCESS


@attrs.define(eq=False)
class World:
    """The runner, the builders, the network between them and the fault controller."""

    nursery: trio.Nursery
    root: Path
    runner_config: RunnerConfig
    builder_config: BuilderConfig
    plans: tuple[BuildPlan, ...]
    journal: Journal = attrs.field(factory=Journal)
    runner: SimRunner | None = attrs.field(default=None, init=False)
    generation: int = attrs.field(default=0, init=False)
    processes: dict[str, BuilderProcess] = attrs.field(factory=dict, init=False)
    incarnations: dict[str, int] = attrs.field(factory=dict, init=False)
    routes: dict[str, Route] = attrs.field(factory=dict, init=False)
    links: dict[str, list[Link]] = attrs.field(factory=dict, init=False)
    #: (link, direction) -> how many faults hold it.
    holds: dict[tuple[Link, str], int] = attrs.field(factory=dict, init=False)
    #: build index -> id.
    ids: list[str] = attrs.field(factory=list, init=False)
    #: builder name -> its configuration (kept for restarts).
    builder_config_for: dict[str, BuilderConfig] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.runner_config = attrs.evolve(self.runner_config, state_dir=self.root / "runner")

    # -- the runner ----------------------------------------------------------------------

    async def start_runner(self) -> SimRunner:
        self.generation += 1
        runner = SimRunner(self.generation, self.runner_config, self.journal)
        await self.nursery.start(runner.run)
        self.runner = runner
        self.journal.log(f"runner {runner.generation} started")
        return runner

    @property
    def farm(self) -> JournalingFarm:
        assert self.runner is not None
        return self.runner.farm

    @property
    def farm_storage(self) -> Storage:
        assert self.runner is not None
        return self.runner.storage

    async def submit(self) -> list[Build]:
        """Submit the graph the way ``POST /builds`` does: answered once it is durable."""
        assert self.runner is not None and self.runner.persister is not None
        names = {f"#{i}": i for i in range(len(self.plans))}
        specs = [
            BuildSpec(
                command=("sim", str(i)),
                name=f"#{i}",
                system=self.builder_config.systems[0],
                after=tuple(f"#{d}" for d in plan.deps),
            )
            for i, plan in enumerate(self.plans)
        ]
        builds = self.farm.submit_graph(specs, trio.current_time(), names.get)
        self.ids = [b.id for b in builds]
        self.journal.index.update({b.id: i for i, b in enumerate(builds)})
        await self.runner.persister.flush()
        return builds

    # -- builders ------------------------------------------------------------------------

    def start_builder(self, name: str, **config: Any) -> BuilderProcess:
        """Start (or, after a crash, restart) builder ``name``; ``config`` on its first start."""
        incarnation = self.incarnations.get(name, 0) + 1
        self.incarnations[name] = incarnation
        self.routes.setdefault(name, Route())
        if name not in self.builder_config_for:
            self.builder_config_for[name] = attrs.evolve(
                self.builder_config,
                hostname=name,
                work_dir=self.root / name,
                **config,
            )
        process = BuilderProcess(
            name,
            incarnation,
            self.builder_config_for[name],
            self.journal,
            self._connector,
            self._executor,
        )
        self.processes[name] = process
        self.nursery.start_soon(process.run)
        self.journal.log(f"{name}/{incarnation} started")
        return process

    def _connector(self, process: BuilderProcess) -> Callable[[], Awaitable[trio.abc.Stream]]:
        async def connect() -> trio.abc.Stream:
            await process.gate()  # a stopped process calls nothing
            route = self.routes[process.name]
            while route.cuts:  # SYNs are lost; run_builder's connect timeout ends the wait
                await route.changed.wait()
            await trio.lowlevel.checkpoint()
            runner = self.runner
            if runner is None or runner.nursery is None:
                raise ConnectionRefusedError("the runner is down")
            link = Link()
            self.links.setdefault(process.name, []).append(link)
            builder_end = BuilderEnd(link.builder_end, process, runner.generation)
            process.stream = builder_end
            runner.links.append(link)
            runner.nursery.start_soon(runner.handler, RunnerEnd(link.runner_end))
            return builder_end

        return connect

    def _executor(self, process: BuilderProcess) -> Executor:
        journal = self.journal

        async def execute(  # type: ignore[no-untyped-def]
            assign: Assign, build_dir: Path, send, env, fetch
        ) -> Result:
            index = int(assign.command[1])
            plan = self.plans[index]
            assert process.stream is not None
            run = Execution(
                builder=process.name,
                incarnation=process.incarnation,
                build=index,
                attempt=assign.attempt,
                stream=process.stream,
                process=process,
                started=trio.current_time(),
                generation=process.stream.generation,
            )
            journal.executions.append(run)
            journal.live.add(run)
            journal.log(f"started {run!r}")
            finished = False
            status = plan.status(assign.attempt)
            try:
                await send(
                    Progress(build_id=assign.build_id, attempt=assign.attempt, phase=Phase.BUILDING)
                )
                # A line naming this execution: an attempt's log must hold one execution's.
                await send(LogChunk(build_id=assign.build_id, attempt=assign.attempt, data=run.tag))
                await trio.sleep(plan.duration)
                finished = True
                run.ended, run.outcome = trio.current_time(), status.value
                journal.live.discard(run)
                journal.log(f"ended {run!r}")
                await send(
                    Progress(
                        build_id=assign.build_id, attempt=assign.attempt, phase=Phase.UPLOADING
                    )
                )
            finally:
                if not finished:
                    # A stopped daemon kills its builds only once it runs again.
                    await process.until_thawed()
                    run.ended, run.outcome = trio.current_time(), "killed"
                    journal.live.discard(run)
                    journal.log(f"killed {run!r}")
            return Result(
                build_id=assign.build_id,
                attempt=assign.attempt,
                status=status,
                exit_code=0 if status is BuildStatus.SUCCESS else 1,
            )

        return execute

    # -- faults --------------------------------------------------------------------------

    def current_link(self, name: str) -> Link | None:
        links = self.links.get(name)
        return links[-1] if links else None

    def hold(self, link: Link, direction: str) -> None:
        for d in directions(direction):
            count = self.holds.get((link, d), 0)
            if count == 0:
                link.pause(d)
            self.holds[(link, d)] = count + 1

    def release(self, link: Link, direction: str) -> None:
        for d in directions(direction):
            count = self.holds[(link, d)] - 1
            self.holds[(link, d)] = count
            if count:
                continue
            side = link.to_runner if d == "to_runner" else link.to_builder
            if side.blackholed:  # held bytes are lost in the black hole too
                side.held.clear()
                side.paused = False
            else:
                link.resume(d)

    async def crash_runner(self, *, poweroff: bool = False) -> bool:
        runner = self.runner
        if runner is None:
            return False
        self.runner = None  # connections are refused from now on
        if poweroff:
            for link in runner.links:
                link.blackhole("both")
        await runner.stop(graceful=False)
        self.journal.log(f"runner {runner.generation} killed")
        return True

    async def cancel(self, which: int) -> None:
        """An operator cancels the ``which``-th running build (the one whose machine has been
        silent longest first, modulo how many run; the ``which``-th build if none does) the
        way ``POST /builds/{id}/cancel`` does: ``farm.cancel``, answered once the change is
        durable."""
        runner = self.runner
        if runner is None or runner.persister is None:
            self.journal.log("cancel: refused, the runner is down")
            return
        builds = [runner.farm.builds[build_id] for build_id in self.ids]
        now = trio.current_time()

        def looks_stuck(build: Build) -> float:
            machine = runner.farm.machines.get(build.machine_id or "")
            silence = None if machine is None else machine_silence(machine, now)
            return -(silence or 0.0)

        # The builds that look stuck first (their machine silent longest): what an operator
        # cancels, and what makes a late (stale) result likely.
        running = sorted((b for b in builds if b.state is BuildState.RUNNING), key=looks_stuck)
        build = running[which % len(running)] if running else builds[which % len(builds)]
        index = self.journal.index[build.id]
        if build.state.finished:
            self.journal.log(f"cancel #{index}: already {build.state.value}")
            return
        runner.farm.cancel(build.id, trio.current_time())
        self.journal.cancels.setdefault(index, "unknown")
        persister = runner.persister
        async with trio.open_nursery() as race:

            async def answered() -> None:
                await persister.flush()
                self.journal.cancels[index] = "acknowledged"
                race.cancel_scope.cancel()

            async def runner_died() -> None:
                await runner.done.wait()
                race.cancel_scope.cancel()

            race.start_soon(answered)
            race.start_soon(runner_died)
        self.journal.log(f"cancel #{index}: {self.journal.cancels[index]}")

    async def apply(self, kind: str, target: str, direction: str, duration: float) -> None:
        """Apply one fault now, hold it for ``duration`` seconds, heal it."""
        journal = self.journal
        start = trio.current_time()
        way = f" {direction}" if kind in ("delay", "partition", "drop") else ""
        label = f"{kind} {target}{way}"
        if kind == "cancel":
            await self.cancel(int(target))
            return
        journal.log(f"fault: {label} for {duration:g} s")
        if kind in ("crash-runner", "poweroff-runner"):
            if await self.crash_runner(poweroff=kind == "poweroff-runner"):
                await trio.sleep_until(start + duration)
                await self.start_runner()
                journal.impaired.setdefault("*", []).append((start, trio.current_time()))
            return
        process = self.processes[target]
        link = self.current_link(target)
        if kind == "delay":
            if link is not None:
                self.hold(link, direction)
                await trio.sleep(duration)
                self.release(link, direction)
        elif kind in ("partition", "drop"):
            route = self.routes[target]
            route.cut()
            if link is not None:
                if kind == "partition":
                    self.hold(link, direction)
                else:
                    link.blackhole(direction)
            await trio.sleep(duration)
            route.heal()
            if link is not None and kind == "partition":
                self.release(link, direction)
            journal.impaired.setdefault(target, []).append((start, trio.current_time()))
        elif kind == "freeze":
            if process.alive:
                process.freeze()
                await trio.sleep(duration)
                await process.thaw()
                journal.impaired.setdefault(target, []).append((start, trio.current_time()))
        elif kind in ("crash", "poweroff"):
            if process.alive:
                if kind == "poweroff":
                    for old_link in self.links.get(target, []):
                        old_link.blackhole("both")
                await process.crash()
                journal.log(f"{target}/{process.incarnation} killed")
                await trio.sleep_until(start + duration)
                self.start_builder(target)
                journal.impaired.setdefault(target, []).append((start, trio.current_time()))
        else:
            raise ValueError(kind)
        journal.log(f"healed: {label}")

    async def stop(self) -> None:
        """End of the run: the runner exits cleanly (writing its last batch); builders die."""
        for process in self.processes.values():
            await process.crash()
        if self.runner is not None:
            await self.runner.stop(graceful=True)


def machine_silence(machine: Machine, now: float) -> float | None:
    """How long the runner has not heard from the machine's current session (None: none)."""
    if machine.session is None:
        return None
    stream = getattr(getattr(machine.session, "channel", None), "stream", None)
    if not isinstance(stream, RunnerEnd):
        return None
    return now - stream.last_received
