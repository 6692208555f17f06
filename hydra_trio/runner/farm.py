"""The queue runner's state and every transition of it: submissions, results, the queue.

Theory of operation
-------------------
``Farm`` is synchronous and does no I/O: sessions call it when frames arrive, the HTTP API when
clients ask, the dispatcher task when it is woken.  Because trio runs one task at a time and no
method here awaits, each method is one atomic transition; the invariants hold between calls:

- A machine's ``running`` holds exactly the builds whose ``state`` is RUNNING and whose
  ``machine_id`` is that machine; a DISCONNECTED machine runs nothing.
- A build's ``attempts`` is its fencing token.  A Progress, LogChunk or Result is applied only
  if it comes from the session currently attached to the build's machine *and* names the
  build's current attempt while the build is RUNNING (``Registry.current``).  Anything else is
  counted in ``metrics.stale_rejected`` (and by kind in ``metrics.frames_rejected``), logged,
  and changes nothing: a builder can speak only for itself, and a result is committed at most
  once.
- Losing a session (EOF, error, watchdog, superseded) is one call, ``detach``: the machine is
  marked disconnected, its slots are freed, and each build it ran is requeued as an
  infrastructure failure (``builder-lost``) counted against ``max_tries``.

The farm owns the builds and the transitions; it delegates to the parts everything else:
``registry.Registry`` (machines, sessions, fencing), ``scheduler.Scheduler`` (the run queue,
which build goes where, waiting reasons, the retry delay), ``journal.Journal`` (what changed
since the persister's last commit, and the Assigns held until it is committed),
``metrics.FarmMetrics`` (counters and histograms) and ``logs.Followers`` (waiters on a build).
All of them are given at construction (or made by default) and never replaced.

Time comes in as ``now`` (the daemon's monotonic ``trio.current_time()``); the wall-clock
timestamps a build shows are ``epoch + now``, with ``epoch`` given at construction.

Whenever something happens that could make a dispatch possible, ``on_change`` is called; the
daemon's dispatcher task then calls ``dispatch(now)``.

This module is longer than the others (past 600 lines) on purpose: it is every transition of
a build, and the invariants above can only be checked by reading them side by side.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence

import attrs

from hydra_trio.protocol.messages import (
    LISTING_MINOR,
    NETWORK_FEATURE,
    Abort,
    Assign,
    BuildRef,
    BuildStatus,
    FileInfo,
    Hello,
    InputSpec,
    Limits,
    LogChunk,
    Ping,
    Progress,
    Result,
    speaks,
)
from hydra_trio.runner.journal import Journal
from hydra_trio.runner.logs import Followers
from hydra_trio.runner.metrics import FarmMetrics
from hydra_trio.runner.model import (
    Build,
    BuildSpec,
    BuildState,
    Machine,
    MachineState,
    Session,
)
from hydra_trio.runner.registry import Registry
from hydra_trio.runner.scheduler import Scheduler, retry_delay
from hydra_trio.runner.store import Snapshot

log = logging.getLogger("hydra_trio.runner")

#: Builds whose input hashes ``Farm.is_input`` keeps (the ones fetching at once, and more).
_INPUT_HASH_CACHE = 256


def nix_store_paths(spec: BuildSpec, deps: list[Build]) -> tuple[FileInfo, ...]:
    """The export files of a Nix build's input closure, each after the paths it references:
    the runner's exports first (they reference nothing built here), then each dependency's
    output closure (each already in that order), every store path once."""
    seen: set[str] = set()
    listed: list[FileInfo] = []
    for info in (*spec.nix_inputs, *(f for dep in deps for f in dep.outputs)):
        if info.path not in seen and not info.link:
            seen.add(info.path)
            listed.append(info)
    return tuple(listed)


class UnknownBuildError(KeyError):
    """No build with that id."""


class InvalidGraphError(ValueError):
    """A submission names unknown builds or would create a cycle."""


@attrs.define(eq=False)
class FarmConfig:
    """The parts of the runner's configuration the farm's logic depends on."""

    max_tries: int = 3
    max_log_bytes: int = 64 * 1024 * 1024
    #: per build: the builder fails a build whose $OUT is larger, and the runner disconnects a
    #: builder that uploads more for one attempt (docs/security.md).
    max_output_bytes: int = 16 * 1024 * 1024 * 1024
    default_timeout: float | None = None
    default_max_silent: float | None = None


#: An ``Assign`` lists its inputs' files itself while they take at most this many bytes (about:
#: ``_listing_bytes``); beyond, to a 1.3 builder, it lists none and the builder asks for each
#: input's listing in pieces (``ListRequest``), so no Assign grows with its inputs.
INLINE_LISTING = 256 * 1024
#: What one ``FileInfo`` costs on the wire besides its path and link (keys, hash, size, flags).
_FILE_INFO_BYTES = 120


def _listing_bytes(files: Sequence[FileInfo]) -> int:
    """About how many bytes ``files`` take on the wire (at least that many)."""
    return sum(len(f.path) + len(f.link) + _FILE_INFO_BYTES for f in files)


def _inline_listing(deps: list[Build]) -> bool:
    """Whether ``deps``' files fit in an Assign (INLINE_LISTING), looking at no more of them
    than that takes: a dispatch costs no pass over 100,000 files."""
    budget = INLINE_LISTING
    for dep in deps:
        if len(dep.outputs) * _FILE_INFO_BYTES > budget:
            return False
        budget -= _listing_bytes(dep.outputs)
        if budget < 0:
            return False
    return True


def _assignment(
    build: Build, deps: list[Build], config: FarmConfig, *, pieces: bool = False
) -> Assign:
    """The Assign of ``build``'s current attempt; ``deps``: the builds it names in ``after``.
    ``pieces``: the builder takes listings in pieces (1.3), so large ones are left out."""
    spec = build.spec
    listed = pieces and not _inline_listing(deps)
    timeout = spec.timeout if spec.timeout is not None else config.default_timeout
    max_silent = spec.max_silent if spec.max_silent is not None else config.default_max_silent
    return Assign(
        build_id=build.id,
        attempt=build.attempts,
        name=spec.name,
        command=spec.command,
        env=dict(spec.env),
        inputs=()
        if spec.drv
        else tuple(
            InputSpec(
                name=dep.name or dep.id,
                build_id=dep.id,
                files=() if listed else dep.outputs,
                listed=listed,
            )
            for dep in deps
        ),
        drv=spec.drv,
        store_paths=nix_store_paths(spec, deps) if spec.drv else (),
        network=NETWORK_FEATURE in spec.required_features,
        limits=Limits(
            timeout=timeout,
            max_silent=max_silent,
            max_log_bytes=config.max_log_bytes,
            max_output_bytes=config.max_output_bytes,
        ),
    )


@attrs.define(eq=False)
class Farm:
    config: FarmConfig = attrs.field(factory=FarmConfig)
    #: called when a dispatch may have become possible (the dispatcher's ``wake``).
    on_change: Callable[[], None] = lambda: None
    #: waiters on a build, woken when it is assigned or finishes (log followers).
    followers: Followers = attrs.field(factory=Followers)
    #: what changed since the persister's last commit (``Journal(hold_assigns=True)`` for a
    #: farm a persister writes: see ``journal``).
    journal: Journal = attrs.field(factory=Journal)
    #: counters and histograms for /metrics and /status.
    metrics: FarmMetrics = attrs.field(factory=FarmMetrics)
    #: called with a build after each transition of an attempt: assigned (RUNNING, no
    #: phase), a phase reported (RUNNING), requeued after an infrastructure failure (QUEUED),
    #: finished.  Synchronous, inside the transition: an observer copies what it needs and
    #: must not call back into the farm (Hydra mode writes Hydra's tables from these).
    observers: list[Callable[[Build], None]] = attrs.field(factory=list)
    #: wall-clock seconds at ``now`` == 0: a timestamp shown to people is ``epoch + now``.
    #: ``make_farm`` gives ``time.time() - trio.current_time()``; the default suits callers
    #: whose ``now`` starts at 0 (tests).
    epoch: float = attrs.field(factory=time.time)

    builds: dict[str, Build] = attrs.field(factory=dict, init=False)
    registry: Registry = attrs.field(init=False)
    scheduler: Scheduler = attrs.field(init=False)
    _seq: int = attrs.field(default=0, init=False)
    #: per build (the last ``_INPUT_HASH_CACHE`` asked about): its inputs' hashes.
    _input_hashes: dict[str, frozenset[str]] = attrs.field(factory=dict, init=False)
    #: builds per state, kept by ``Build.state`` itself (``Build.count_in``): /status and
    #: /metrics read it without a pass over the queue.
    _state_counts: dict[BuildState, int] = attrs.field(
        factory=lambda: dict.fromkeys(BuildState, 0), init=False
    )

    def __attrs_post_init__(self) -> None:
        self.registry = Registry(self.builds, self.metrics)
        self.scheduler = Scheduler(self.builds)

    @property
    def machines(self) -> Mapping[str, Machine]:
        return self.registry.machines

    # -- submissions ------------------------------------------------------------------------

    def submit(self, spec: BuildSpec, now: float) -> Build:
        """Queue one build.  Raises ``InvalidGraphError`` if ``after`` names unknown builds."""
        return self.submit_graph([spec], now, lambda name: None)[0]

    def submit_graph(
        self, specs: list[BuildSpec], now: float, local: Callable[[str], int | None]
    ) -> list[Build]:
        """Queue several builds atomically: all of them or (on error) none.

        ``after`` entries may name existing build ids or, via ``local(name) -> index``, builds of
        this same submission (which must come earlier in ``specs``, so no cycle can form).
        """
        # One random read for the whole graph (uuid4 per build is a syscall each).
        entropy = os.urandom(8 * len(specs)).hex()
        ids = [entropy[i : i + 16] for i in range(0, len(entropy), 16)]
        resolved = [self._resolve(spec, index, ids, local) for index, spec in enumerate(specs)]
        local_specs = dict(zip(ids, specs, strict=True))  # once: per build, O(n^2) a graph
        for spec, deps in zip(specs, resolved, strict=True):
            self._check_inputs(spec, deps, local_specs)
        # Runnable builds enter the queue once the whole graph is in, with their dependents
        # counted: the heap orders builds that unblock more of them first.  A queued build
        # outside this graph that gains dependents goes in again with its new count (the old
        # entry is skipped as stale once the build has run).
        runnable: list[Build] = []
        gained: dict[str, Build] = {}
        new = set(ids)
        created = []
        for build_id, spec, deps in zip(ids, specs, resolved, strict=True):
            build = self._create(build_id, spec, deps, now)
            created.append(build)
            failed_dep = None
            for dep_id in deps:
                dep = self.builds[dep_id]
                dep.dependents.append(build_id)
                if dep.state is BuildState.QUEUED and not dep.waiting_for and dep_id not in new:
                    gained[dep_id] = dep
                if dep.state is BuildState.SUCCEEDED:
                    continue
                if dep.state.finished:
                    failed_dep = dep
                else:
                    build.waiting_for.add(dep_id)
            if failed_dep is not None:
                self._dependency_failed(build, failed_dep, now)
            elif not build.waiting_for:
                runnable.append(build)
        for build in runnable:
            self.scheduler.make_runnable(build, now)
        for build in gained.values():
            self.scheduler.push(build)
        if len(created) == 1:
            log.info("build %s queued: %s", created[0].id, " ".join(specs[0].command)[:200])
        else:
            log.info("graph of %d builds queued", len(created))
        self.on_change()
        return created

    def _resolve(
        self, spec: BuildSpec, index: int, ids: list[str], local: Callable[[str], int | None]
    ) -> list[str]:
        """The build ids ``spec.after`` names (see ``submit_graph``)."""
        deps: list[str] = []
        for ref in spec.after:
            other = local(ref)
            if other is not None:
                if other >= index:
                    raise InvalidGraphError(f"{ref!r} must be defined before it is used")
                deps.append(ids[other])
            elif ref in self.builds:
                deps.append(ref)
            else:
                raise InvalidGraphError(f"unknown build {ref!r} in 'after'")
        return deps

    def _check_inputs(self, spec: BuildSpec, deps: list[str], local: dict[str, BuildSpec]) -> None:
        """Refuse a build whose inputs could never be placed: two of them under the same
        ``$IN/<name>`` (a build named twice in ``after``, or two dependencies of one name).
        ``local``: the specs of this submission by their new ids."""
        if spec.drv:
            return  # a Nix build's inputs are store paths, not $IN entries
        placed: dict[str, str] = {}
        for dep_id in deps:
            # a build of this graph by its name (its id is not known yet), another by its id
            ref = local[dep_id].name if dep_id in local else dep_id
            name = (local[dep_id] if dep_id in local else self.builds[dep_id].spec).name or dep_id
            if name in placed:
                who = f"build {spec.name!r}: " if spec.name else ""
                if placed[name] == ref:
                    what = f"{ref!r} is named twice"
                else:
                    what = f"{placed[name]!r} and {ref!r} would both be"
                raise InvalidGraphError(
                    f"{who}after: {what} placed at $IN/{name}; each input needs a name of its own"
                )
            placed[name] = ref

    def _create(self, build_id: str, spec: BuildSpec, deps: list[str], now: float) -> Build:
        self._seq += 1
        build = Build(
            id=build_id,
            spec=spec if spec.after == tuple(deps) else attrs.evolve(spec, after=tuple(deps)),
            seq=self._seq,
            submitted_at=self.epoch + now,
        )
        self.builds[build_id] = build
        build.count_in(self._state_counts)
        self.journal.touch(build)
        self.journal.add_edges([(build_id, dep_id) for dep_id in deps])
        if log.isEnabledFor(logging.DEBUG):
            log.debug("build %s queued: %s", build_id, " ".join(spec.command)[:200])
        return build

    def get(self, build_id: str) -> Build:
        try:
            return self.builds[build_id]
        except KeyError:
            raise UnknownBuildError(build_id) from None

    def cancel(self, build_id: str, now: float) -> Build:
        """Cancel a queued or running build; a running one is aborted on its builder."""
        build = self.get(build_id)
        if build.state.finished:
            return build
        if build.state is BuildState.RUNNING:
            machine = self.machines[build.machine_id]  # type: ignore[index]
            del machine.running[build.id]
            if machine.session is not None:
                machine.session.post(
                    Abort(build_id=build.id, attempt=build.attempts, reason="cancelled")
                )
        self._finish(build, BuildStatus.CANCELLED, now, state=BuildState.CANCELLED)
        self.on_change()
        return build

    # -- machines ---------------------------------------------------------------------------

    def duplicate_of(self, hello: Hello, now: float, quiet: float) -> Machine | None:
        """The machine whose live session is another builder process with ``hello``'s machine
        id (``Hello.instance`` differs; both 1.4), or None.  Such a hello is refused: letting
        it supersede would make two builders knock each other off for ever.  A session that
        has not pinged for ``quiet`` seconds is not live (its builder crashed, the connection
        is half-open): a restarted builder supersedes it as before."""
        known = self.machines.get(hello.machine_id)
        if known is None or known.session is None or not (known.instance and hello.instance):
            return None
        if now - known.last_ping_at > quiet:
            return None
        return known if known.instance != hello.instance else None

    def attach(self, session: Session, hello: Hello, now: float, address: str = "") -> Machine:
        """A builder completed its hello (from ``address``).  A previous session of the same
        machine (the same builder process reconnecting, the old connection half-open) is
        superseded: detached (its builds requeued) and closed before this one gets work."""
        known = self.machines.get(hello.machine_id)
        if known is not None and known.session is not None:
            old = known.session
            self.detach(old, "superseded by a new connection from the same machine", now)
            old.close("superseded by a new connection from the same machine")
        machine = self.registry.connect(session, hello, now, address)
        self.journal.touch_machine(machine)
        self.on_change()
        return machine

    def detach(self, session: Session, reason: str, now: float, *, lost: bool = True) -> None:
        """A session ended (``lost=False``: the builder said goodbye after draining).
        No-op if it was already superseded."""
        machine = self.registry.machine_of(session)
        if machine is None:
            return
        requeue = self.registry.disconnect(machine, reason, now, lost=lost)
        self.journal.touch_machine(machine)
        for build in requeue:
            self._infrastructure_failure(
                build, BuildStatus.BUILDER_LOST, now, f"builder {machine.hostname} lost: {reason}"
            )
        self.on_change()

    def stop_session(self, session: Session, reason: str, now: float) -> None:
        """The runner stops on purpose: end ``session`` as ``detach`` does, except that its
        running builds go back to the queue as after a restart (``restore``): no try used,
        no loss counted for the machine.  No-op if it was already superseded."""
        machine = self.registry.machine_of(session)
        if machine is None:
            return
        machine.session = None
        machine.state = MachineState.DISCONNECTED
        machine.disconnected_at = now
        machine.disconnect_reason = reason
        running = list(machine.running.values())
        machine.running.clear()
        self.journal.touch_machine(machine)
        for build in running:
            build.state = BuildState.QUEUED
            build.status = BuildStatus.BUILDER_LOST
            build.error = "the runner stopped while it ran"
            build.phase = None
            self.journal.touch(build)
            self._observe(build)
            self.scheduler.make_runnable(build, now)
        self.on_change()

    def drain(self, machine_key: str) -> Machine:
        """Stop giving a machine new builds; what it runs finishes.  Key: id or hostname."""
        machine = self.registry.drain(machine_key)
        self.journal.touch_machine(machine)
        return machine

    def undrain(self, machine_key: str) -> Machine:
        """Give a drained machine builds again (``Registry.undrain``).  Key: id or hostname."""
        machine = self.registry.undrain(machine_key)
        self.journal.touch_machine(machine)
        self.on_change()
        return machine

    def find_machine(self, key: str) -> Machine:
        return self.registry.find(key)

    # -- frames from builders ---------------------------------------------------------------

    def on_ping(self, session: Session, machine: Machine, ping: Ping, now: float) -> None:
        if self.registry.on_ping(session, machine, ping, now):
            self.on_change()  # a builder with room again may take a build

    def on_builder_drain(self, session: Session, machine: Machine) -> None:
        self.registry.on_builder_drain(session, machine)

    def current(
        self,
        session: Session,
        machine: Machine,
        build_id: str,
        attempt: int,
        *,
        kind: str = "frame",
    ) -> Build | None:
        """The build a frame of ``kind`` is about if the frame is current, else None (counted
        and logged): see ``Registry.current``."""
        return self.registry.current(session, machine, build_id, attempt, kind)

    def on_progress(self, session: Session, machine: Machine, msg: Progress) -> None:
        build = self.current(session, machine, msg.build_id, msg.attempt, kind="progress")
        if build is not None and build.phase is not msg.phase:
            build.phase = msg.phase
            self._observe(build)

    def on_log(self, session: Session, machine: Machine, msg: LogChunk) -> bytes | None:
        """The part of a log chunk to keep (cut at the log limit), or None if it is stale."""
        build = self.current(session, machine, msg.build_id, msg.attempt, kind="log")
        if build is None:
            return None
        room = self.config.max_log_bytes - build.log_size
        data = msg.data[: max(0, room)]
        build.log_size += len(data)
        return data

    def on_result(self, session: Session, machine: Machine, msg: Result, now: float) -> bool:
        """Commit a result if (and only if) it is for the current attempt.  Returns whether
        it was committed."""
        build = self.current(session, machine, msg.build_id, msg.attempt, kind="result")
        if build is None:
            return False
        del machine.running[build.id]
        self.journal.touch_machine(machine)
        if (assigned_at := self.scheduler.forget(build)) is not None:
            self.metrics.build_duration.observe(max(0.0, now - assigned_at))
        build.exit_code = msg.exit_code
        build.timings = dict(msg.timings)
        if msg.status is BuildStatus.SUCCESS:
            machine.succeeded_builds += 1
            build.outputs = msg.outputs
            self._finish(build, msg.status, now, state=BuildState.SUCCEEDED)
        elif msg.status.is_infrastructure:
            self._infrastructure_failure(build, msg.status, now, msg.error)
        else:
            machine.failed_builds += 1
            self._finish(build, msg.status, now, error=msg.error)
        self.on_change()
        return True

    # -- dispatch ---------------------------------------------------------------------------

    def dispatch(self, now: float) -> float | None:
        """Assign every runnable build that has a free, capable machine, best first across
        all classes (``Scheduler.dispatch``).  Returns the next time a delayed retry becomes
        due (so the caller can sleep until then), or None."""
        return self.scheduler.dispatch(
            now, self.machines.values(), lambda build, machine: self._assign(build, machine, now)
        )

    def waiting_reason(self, build: Build, now: float) -> str | None:
        """Why a queued build is not running (``Scheduler.waiting_reason``)."""
        return self.scheduler.waiting_reason(build, now, self.machines.values())

    def _assign(self, build: Build, machine: Machine, now: float) -> None:
        session = machine.session
        assert session is not None
        self.metrics.dispatch_latency.observe(self.scheduler.started(build, now))
        build.attempts += 1
        build.state = BuildState.RUNNING
        self.journal.touch(build)
        build.machine_id = machine.machine_id
        build.hostname = machine.hostname
        build.phase = None
        build.started_at = self.epoch + now
        build.log_size = 0
        machine.running[build.id] = build
        deps = [self.builds[dep_id] for dep_id in build.spec.after]
        assign = _assignment(
            build, deps, self.config, pieces=speaks(machine.protocol_version, LISTING_MINOR)
        )
        if not self.journal.hold(session, assign):
            session.post(assign)
        log.info("build %s attempt %d assigned to %s", build.id, build.attempts, machine.hostname)
        self.followers.notify(build.id)
        self._observe(build)

    def release_assigns(self, held: list[tuple[Session, Assign]]) -> None:
        """Send Assigns whose attempt numbers are now committed (``Journal.take`` gave them),
        unless the assignment ended in the meantime (the build was cancelled, or its builder's
        session died and the build went back to the queue): then the builder must never see
        it."""
        for session, assign in held:
            build = self.builds.get(assign.build_id)
            if build is None or build.state is not BuildState.RUNNING:
                continue
            machine = self.machines.get(build.machine_id or "")
            if (
                build.attempts == assign.attempt
                and machine is not None
                and machine.session is session
                and machine.running.get(build.id) is build
            ):
                session.post(assign)

    def is_input(self, build: Build, sha256: str) -> bool:
        """Whether a file with this hash is one a builder running ``build`` may fetch: an
        output of a build it depends on, or (a Nix build) an export the runner made for it.
        The hashes of a build's inputs are gathered once (the outputs of a succeeded build
        never change), so a fetch of 100,000 files is not 100,000 passes over them."""
        known = self._input_hashes.get(build.id)
        if known is None:
            known = frozenset(
                f.sha256
                for f in itertools.chain(
                    build.spec.nix_inputs,
                    *(self.builds[dep_id].outputs for dep_id in build.spec.after),
                )
                if not f.link
            )
            if len(self._input_hashes) >= _INPUT_HASH_CACHE:
                del self._input_hashes[next(iter(self._input_hashes))]
            self._input_hashes[build.id] = known
        return sha256 in known

    def listing(self, build: Build, of: str) -> tuple[FileInfo, ...] | None:
        """The output listing of ``of`` if it is one of ``build``'s inputs, else None."""
        if of not in build.spec.after:
            return None
        return self.builds[of].outputs

    # -- transitions ------------------------------------------------------------------------

    def _observe(self, build: Build) -> None:
        for observer in self.observers:
            observer(build)

    def raise_priority(self, build_id: str, priority: int) -> None:
        """Give a queued build a higher priority (Hydra's bump); lower ones are ignored, and
        so are builds that already run or ended."""
        build = self.builds.get(build_id)
        if build is None or build.state is not BuildState.QUEUED or priority <= build.spec.priority:
            return
        build.spec = attrs.evolve(build.spec, priority=priority)
        self.journal.touch(build)
        if not build.waiting_for:
            self.scheduler.push(build)  # the old entry is skipped once the build has run
            self.on_change()

    def _infrastructure_failure(
        self, build: Build, status: BuildStatus, now: float, error: str
    ) -> None:
        build.infra_failures += 1
        self.journal.touch(build)
        if build.machine_id is not None:
            build.failed_on.append(build.machine_id)
        # Counted in infrastructure failures, not attempts: an attempt cut short because the
        # runner itself restarted is nobody's failure, and must not use up the build's tries.
        if build.infra_failures >= self.config.max_tries:
            log.warning(
                "build %s failed after %d attempts (%d infrastructure failures): %s",
                build.id,
                build.attempts,
                build.infra_failures,
                error,
            )
            self._finish(build, status, now, error=error)
            return
        delay = retry_delay(build.infra_failures)
        build.state = BuildState.QUEUED
        build.status = status
        build.error = error
        build.phase = None
        build.not_before = now + delay
        self.metrics.requeued[status.value] += 1
        log.info("build %s requeued (%s), retry in %.0f s", build.id, status.value, delay)
        self._observe(build)
        self.scheduler.make_runnable(build, now)

    def _finish(
        self,
        build: Build,
        status: BuildStatus,
        now: float,
        *,
        state: BuildState = BuildState.FAILED,
        error: str = "",
    ) -> None:
        build.state = state
        build.status = status
        build.error = error
        build.phase = None
        build.finished_at = self.epoch + now
        self.journal.touch(build)
        self.scheduler.forget(build)
        self.metrics.finished[status.value] += 1
        self.followers.notify(build.id)
        log.info("build %s finished: %s%s", build.id, status.value, f" ({error})" if error else "")
        self._observe(build)
        for dep_id in build.dependents:
            dependent = self.builds[dep_id]
            if dependent.state.finished:
                continue
            dependent.waiting_for.discard(build.id)
            if state is not BuildState.SUCCEEDED:
                self._dependency_failed(dependent, build, now)
            elif not dependent.waiting_for:
                self.scheduler.make_runnable(dependent, now)

    def _dependency_failed(self, build: Build, dependency: Build, now: float) -> None:
        """``build`` can never run: ``dependency`` ended without success (and so, through
        ``_finish``, can nothing that depends on ``build``)."""
        reason = dependency.status.value if dependency.status else dependency.state.value
        self._finish(
            build, BuildStatus.DEPENDENCY_FAILED, now, error=f"dependency {dependency.id} {reason}"
        )

    # -- restart ----------------------------------------------------------------------------

    def restore(self, snapshot: Snapshot, now: float) -> None:
        """Load the queue a previous runner left.  Builds that were running go back to the
        queue (their builders' connections died with that runner, and a builder cancels its
        builds when its connection dies); the next dispatch gives them a new attempt number,
        so a result of the old attempt can never be committed.  Known machines are listed as
        disconnected until they reconnect; none of this counts as lost."""
        self.registry.restore(snapshot.machines, now)
        for build in snapshot.builds:
            self.builds[build.id] = build
            build.count_in(self._state_counts)
            self._seq = max(self._seq, build.seq)
        for build_id, dep_id in snapshot.edges:
            if build_id in self.builds and dep_id in self.builds:
                self.builds[dep_id].dependents.append(build_id)
        requeued = 0
        for build in snapshot.builds:
            if build.state is BuildState.RUNNING:
                build.state = BuildState.QUEUED
                build.status = BuildStatus.BUILDER_LOST
                build.error = "the runner restarted while it ran"
                build.phase = None
                self.journal.touch(build)
                requeued += 1
            if build.state is BuildState.QUEUED:
                self._requeue_restored(build, now)
        log.info(
            "restored %d builds (%d requeued from running) and %d machines",
            len(snapshot.builds),
            requeued,
            len(snapshot.machines),
        )
        self.on_change()

    def _requeue_restored(self, build: Build, now: float) -> None:
        deps = [self.builds[d] for d in build.spec.after if d in self.builds]
        failed = [d for d in deps if d.state.finished and d.state is not BuildState.SUCCEEDED]
        if failed:
            self._dependency_failed(build, failed[0], now)
            return
        build.waiting_for = {d.id for d in deps if not d.state.finished}
        if not build.waiting_for:
            self.scheduler.make_runnable(build, now)

    # -- views ------------------------------------------------------------------------------

    def queue_counts(self) -> dict[str, int]:
        return {state.value: count for state, count in self._state_counts.items()}

    def running_refs(self, machine: Machine) -> list[BuildRef]:
        return [BuildRef(build_id=b.id, attempt=b.attempts) for b in machine.running.values()]
