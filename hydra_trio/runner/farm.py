"""The queue runner's state and every transition of it: queue, machines, dispatch, fencing.

Theory of operation
-------------------
``Farm`` is synchronous and does no I/O: sessions call it when frames arrive, the HTTP API when
clients ask, the dispatcher task when it is woken.  Because trio runs one task at a time and no
method here awaits, each method is one atomic transition; the invariants hold between calls:

- A machine's ``running`` holds exactly the builds whose ``state`` is RUNNING and whose
  ``machine_id`` is that machine; a DISCONNECTED machine runs nothing.
- A build's ``attempts`` is its fencing token.  A Progress, LogChunk or Result is applied only
  if it comes from the session currently attached to the build's machine *and* names the
  build's current attempt while the build is RUNNING.  Anything else is counted in
  ``stale_rejected`` (and by kind in ``frames_rejected``), logged, and changes nothing: a
  builder can speak only for itself, and a result is committed at most once.
- Losing a session (EOF, error, watchdog, superseded) is one call, ``detach``: the machine is
  marked disconnected, its slots are freed, and each build it ran is requeued as an
  infrastructure failure (``builder-lost``) counted against ``max_tries``.

Whenever something happens that could make a dispatch possible, ``on_change`` is called; the
daemon's dispatcher task then calls ``dispatch(now)``.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs

from hydra_trio.protocol.messages import (
    Abort,
    Assign,
    BuildRef,
    BuildStatus,
    Drain,
    FileInfo,
    Hello,
    InputSpec,
    Limits,
    LogChunk,
    Ping,
    Progress,
    Result,
)
from hydra_trio.runner.metrics import FarmMetrics
from hydra_trio.runner.model import Build, BuildSpec, BuildState, Machine, MachineState, Session
from hydra_trio.runner.store import Snapshot, build_row, machine_row

log = logging.getLogger("hydra_trio.runner")

#: What a machine needs to build a build: (system, executor, required features).
_BuildClass = tuple[str, str, frozenset[str]]
#: A runnable build in its class's heap: (-priority, -dependents, seq, build id).
_Entry = tuple[int, int, int, str]
#: A machine in a dispatch's heap for one class: (-free slots x speed factor, -speed factor,
#: position in the farm, machine), i.e. Hydra's choice first, ties to the first listed.
_MachineEntry = tuple[float, float, int, Machine]


def _best_machine(heap: list[_MachineEntry]) -> Machine | None:
    """The machine with the most free capacity in ``heap``, None if none has a free slot.
    Entries are corrected as they come to the top: an assignment (through this class or
    another) changes a machine's free slots without telling the heaps it is in."""
    while heap:
        capacity, speed, index, machine = heap[0]
        current = -machine.free_slots * machine.speed_factor
        if machine.free_slots == 0:
            heapq.heappop(heap)
        elif current != capacity:
            heapq.heapreplace(heap, (current, speed, index, machine))
        else:
            return machine
    return None


#: Retry delay for an infrastructure failure: RETRY_BASE * 2**(n-2) after the n-th failure, the
#: first retry immediate (the builder is gone, not the build's fault).  Capped at RETRY_CAP.
RETRY_BASE = 2.0
RETRY_CAP = 60.0


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


@attrs.define(eq=False)
class Farm:
    config: FarmConfig = attrs.field(factory=FarmConfig)
    on_change: Callable[[], None] = lambda: None
    #: called with a build id when it is assigned or finishes (wakes log followers).
    on_build_change: Callable[[str], None] = lambda build_id: None
    #: called when there is something for the persister to write.
    on_dirty: Callable[[], None] = lambda: None
    #: called with a build after each transition of an attempt: assigned (RUNNING, no
    #: phase), a phase reported (RUNNING), requeued after an infrastructure failure (QUEUED),
    #: finished.  Synchronous, inside the transition: an observer copies what it needs and
    #: must not call back into the farm (Hydra mode writes Hydra's tables from these).
    observers: list[Callable[[Build], None]] = attrs.field(factory=list)

    builds: dict[str, Build] = attrs.field(factory=dict, init=False)
    machines: dict[str, Machine] = attrs.field(factory=dict, init=False)
    #: runnable builds per class (what a machine must have to build them: system, executor,
    #: required features): heap of (-priority, -dependents, seq, build id), so Hydra's order:
    #: priority, then builds that unblock the most others, then age.  Entries whose build is
    #: no longer queued are skipped when popped.  A class no free machine can build costs
    #: `dispatch` nothing however many builds it holds.
    _runnable: dict[_BuildClass, list[_Entry]] = attrs.field(factory=dict, init=False)
    _seq: int = attrs.field(default=0, init=False)
    #: builds per state, kept by ``Build.state`` itself (``Build.count_in``): /status and
    #: /metrics read it without a pass over the queue.
    _state_counts: dict[BuildState, int] = attrs.field(
        factory=lambda: dict.fromkeys(BuildState, 0), init=False
    )
    #: counters for /metrics and /status.
    stale_rejected: int = attrs.field(default=0, init=False)
    #: the same frames by kind (``progress``, ``log``, ``result``, ``upload``, ``fetch``):
    #: each about a build its sender does not run under that attempt.
    frames_rejected: Counter[str] = attrs.field(factory=Counter, init=False)
    builders_lost_idle: int = attrs.field(default=0, init=False)
    builders_lost_busy: int = attrs.field(default=0, init=False)
    requeued: Counter[str] = attrs.field(factory=Counter, init=False)
    finished: Counter[str] = attrs.field(factory=Counter, init=False)
    #: hellos refused, by ``Reject`` code (``auth-failed``, ``incompatible-version``).
    handshakes_rejected: Counter[str] = attrs.field(factory=Counter, init=False)
    #: histograms and counters of events for /metrics, in this farm's own registry.
    metrics: FarmMetrics = attrs.field(factory=FarmMetrics, init=False)
    #: per unfinished build, on the ``now`` clock: when it became runnable (while queued) or
    #: was assigned (while running); where dispatch latency and build duration start.
    _since: dict[str, float] = attrs.field(factory=dict, init=False)
    #: per machine id, what its last rejected frame was about (see ``current``).
    _last_rejected: dict[str, tuple[str, str, int]] = attrs.field(factory=dict, init=False)
    #: changed since the persister last took them (see ``store.Persister``).
    _dirty_builds: set[str] = attrs.field(factory=set, init=False)
    _dirty_machines: set[str] = attrs.field(factory=set, init=False)
    _new_edges: list[tuple[str, str]] = attrs.field(factory=list, init=False)
    #: with a persister (``persist_with``): Assigns made since it last took the dirty rows,
    #: sent once the batch that records their attempt numbers is committed.
    _hold_assigns: bool = attrs.field(default=False, init=False)
    _held: list[tuple[Session, Assign]] = attrs.field(factory=list, init=False)

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
        resolved: list[list[str]] = []
        for index, spec in enumerate(specs):
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
            resolved.append(deps)
        created = []
        submitted_at = time.time()
        # Runnable builds enter the queue once the whole graph is in, with their dependents
        # counted: the heap orders builds that unblock more of them first.  A queued build
        # outside this graph that gains dependents goes in again with its new count (the old
        # entry is skipped as stale once the build has run).
        runnable: list[Build] = []
        gained: dict[str, Build] = {}
        new = set(ids)
        for build_id, spec, deps in zip(ids, specs, resolved, strict=True):
            self._seq += 1
            build = Build(
                id=build_id,
                spec=spec if spec.after == tuple(deps) else attrs.evolve(spec, after=tuple(deps)),
                seq=self._seq,
                submitted_at=submitted_at,
            )
            self.builds[build_id] = build
            build.count_in(self._state_counts)
            created.append(build)
            self._touch(build)
            self._new_edges.extend((build_id, dep_id) for dep_id in deps)
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
            if log.isEnabledFor(logging.DEBUG):
                log.debug("build %s queued: %s", build_id, " ".join(spec.command)[:200])
            if failed_dep is not None:
                self._dependency_failed(build, failed_dep, now)
            elif not build.waiting_for:
                runnable.append(build)
        for build in runnable:
            self._make_runnable(build, now)
        for build in gained.values():
            self._push(build)
        if len(created) == 1:
            log.info("build %s queued: %s", created[0].id, " ".join(specs[0].command)[:200])
        else:
            log.info("graph of %d builds queued", len(created))
        self.on_change()
        return created

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

    def attach(self, session: Session, hello: Hello, now: float) -> Machine:
        """A builder completed its hello.  A previous session of the same machine is
        superseded: detached (its builds requeued) and closed before this one gets work."""
        machine = self.machines.get(hello.machine_id)
        if machine is not None and machine.session is not None:
            old = machine.session
            self.detach(old, "superseded by a new connection from the same machine", now)
            old.close("superseded by a new connection from the same machine")
        if machine is None:
            machine = Machine(
                machine_id=hello.machine_id,
                hostname=hello.hostname,
                systems=hello.systems,
                supported_features=frozenset(hello.supported_features),
                mandatory_features=frozenset(hello.mandatory_features),
                max_jobs=hello.max_jobs,
                speed_factor=hello.speed_factor,
                executors=frozenset(hello.executors),
            )
            self.machines[hello.machine_id] = machine
        else:
            machine.hostname = hello.hostname
            machine.systems = hello.systems
            machine.supported_features = frozenset(hello.supported_features)
            machine.mandatory_features = frozenset(hello.mandatory_features)
            machine.max_jobs = hello.max_jobs
            machine.speed_factor = hello.speed_factor
            machine.executors = frozenset(hello.executors)
        machine.session = session
        machine.state = MachineState.DRAINING if machine.drain_requested else MachineState.CONNECTED
        machine.draining_itself = False
        machine.connected_at = machine.last_ping_at = now
        machine.disconnected_at = None
        machine.disconnect_reason = ""
        machine.sessions += 1
        self._touch_machine(machine)
        log.info(
            "builder %s (%s) connected: systems %s, %d job slots",
            machine.hostname,
            machine.machine_id,
            ",".join(machine.systems),
            machine.max_jobs,
        )
        self.on_change()
        return machine

    def detach(self, session: Session, reason: str, now: float, *, lost: bool = True) -> None:
        """A session ended (``lost=False``: the builder said goodbye after draining).
        No-op if it was already superseded."""
        machine = self._machine_of(session)
        if machine is None:
            return
        silent = now - machine.last_ping_at
        machine.session = None
        machine.state = MachineState.DISCONNECTED
        machine.disconnected_at = now
        machine.disconnect_reason = reason
        requeue = list(machine.running.values())
        self._touch_machine(machine)
        if lost and machine.running:
            self.builders_lost_busy += 1
        elif lost:
            self.builders_lost_idle += 1
        log.warning(
            "builder %s (%s) disconnected: %s (last ping %.1f s ago); requeueing %d builds",
            machine.hostname,
            machine.machine_id,
            reason,
            silent,
            len(requeue),
        )
        machine.running.clear()
        for build in requeue:
            machine.lost_builds += 1
            self._infrastructure_failure(
                build, BuildStatus.BUILDER_LOST, now, f"builder {machine.hostname} lost: {reason}"
            )
        self.on_change()

    def drain(self, machine_key: str) -> Machine:
        """Stop giving a machine new builds; what it runs finishes.  Key: id or hostname."""
        machine = self.find_machine(machine_key)
        machine.drain_requested = True
        self._touch_machine(machine)
        if machine.state is MachineState.CONNECTED:
            machine.state = MachineState.DRAINING
        if machine.session is not None:
            machine.session.post(Drain(reason="drain requested by an operator"))
        return machine

    def find_machine(self, key: str) -> Machine:
        if key in self.machines:
            return self.machines[key]
        matches = [m for m in self.machines.values() if m.hostname == key]
        if len(matches) != 1:
            raise KeyError(key)
        return matches[0]

    def _machine_of(self, session: Session) -> Machine | None:
        for machine in self.machines.values():
            if machine.session is session:
                return machine
        return None

    # -- frames from builders ---------------------------------------------------------------

    def on_ping(self, session: Session, machine: Machine, ping: Ping, now: float) -> None:
        """Record liveness and reconcile: a build the builder runs that is not its current
        assignment is aborted (it may be a stale attempt from before a partition)."""
        if machine.session is not session:
            return
        machine.last_ping_at = now
        machine.load = ping.load
        machine.disk_free = ping.disk_free
        for ref in ping.running:
            build = machine.running.get(ref.build_id)
            if build is None or build.attempts != ref.attempt:
                session.post(
                    Abort(
                        build_id=ref.build_id,
                        attempt=ref.attempt,
                        reason="not assigned to this machine under this attempt",
                    )
                )

    def on_builder_drain(self, session: Session, machine: Machine) -> None:
        """The builder announced it is shutting down after its running builds."""
        if machine.session is session and machine.state is MachineState.CONNECTED:
            machine.state = MachineState.DRAINING
            machine.draining_itself = True

    def current(
        self,
        session: Session,
        machine: Machine,
        build_id: str,
        attempt: int,
        *,
        kind: str = "frame",
    ) -> Build | None:
        """The build a frame of ``kind`` is about, if the frame is current: from the session
        attached to ``machine``, for a build running there under ``attempt``.  Anything else
        is counted and logged, and None is returned: the frame must not be applied."""
        build = machine.running.get(build_id) if machine.session is session else None
        if build is not None and build.attempts == attempt:
            return build
        self.stale_rejected += 1
        self.frames_rejected[kind] += 1
        # One warning per run of rejected frames about the same thing: a builder still
        # streaming the log of an aborted attempt gives one line, not one per chunk.
        key = (kind, build_id, attempt)
        if self._last_rejected.get(machine.machine_id) != key:
            self._last_rejected[machine.machine_id] = key
            log.warning(
                "rejected a frame (%s) for build %.100r attempt %d from %s (%s): %s",
                kind,
                build_id,
                attempt,
                machine.hostname,
                machine.machine_id,
                self._why_not_current(session, machine, build_id, attempt),
            )
        return None

    def _why_not_current(
        self, session: Session, machine: Machine, build_id: str, attempt: int
    ) -> str:
        if machine.session is not session:
            return "its connection was superseded or closed"
        build = self.builds.get(build_id)
        if build is None:
            return "there is no such build"
        if build.machine_id != machine.machine_id:
            where = f"it was assigned to {build.hostname}" if build.hostname else "never assigned"
            return f"not a build of this machine ({where})"
        if build.attempts != attempt:
            return f"a stale attempt (the current attempt is {build.attempts})"
        return f"the build no longer runs here (it is {build.state.value})"

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
        self._touch_machine(machine)
        if (assigned_at := self._since.pop(build.id, None)) is not None:
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
        all classes.  Returns the next time a delayed retry becomes due (so the caller can
        sleep until then), or None.

        Each class open to some free machine gets a heap of those machines, the most free
        capacity (scaled by speed factor) first, so an assignment costs a few heap operations,
        not a pass over the farm (8,000 assignments over 2,000 machines took 18-22 s of event
        loop that way).  Only a retry, which avoids the machines it failed on, takes the pass
        (``_pick_machine``)."""
        free = [m for m in self.machines.values() if m.free_slots > 0]
        open_classes: dict[_BuildClass, list[_MachineEntry]] = {}
        for key, heap in list(self._runnable.items()):
            if not heap:
                del self._runnable[key]
                continue
            machines = [
                (-m.free_slots * m.speed_factor, -m.speed_factor, index, m)
                for index, m in enumerate(free)
                if m.can_build_class(*key)
            ]
            if machines:
                heapq.heapify(machines)
                open_classes[key] = machines
        next_due: float | None = None
        deferred: list[tuple[_BuildClass, _Entry]] = []
        while open_classes:
            best: _BuildClass | None = None
            for key in list(open_classes):
                heap = self._runnable[key]
                while heap and not self._is_runnable(heap[0][3]):
                    heapq.heappop(heap)  # stale entry
                if not heap:
                    del open_classes[key]
                elif best is None or heap[0] < self._runnable[best][0]:
                    best = key
            if best is None:
                break
            entry = heapq.heappop(self._runnable[best])
            build = self.builds[entry[3]]
            if build.not_before > now:
                next_due = build.not_before if next_due is None else min(next_due, build.not_before)
                deferred.append((best, entry))
                continue
            machine = _best_machine(open_classes[best])
            if machine is not None and build.failed_on:
                machine = self._pick_machine(
                    build, [e[3] for e in open_classes[best] if e[3].free_slots > 0]
                )
            if machine is None:  # every machine of the class is full now
                heapq.heappush(self._runnable[best], entry)
                del open_classes[best]
                continue
            self._assign(build, machine, now)
        for key, entry in deferred:
            heapq.heappush(self._runnable[key], entry)
        return next_due

    def _is_runnable(self, build_id: str) -> bool:
        build = self.builds.get(build_id)
        return build is not None and build.state is BuildState.QUEUED and not build.waiting_for

    def waiting_reason(self, build: Build, now: float) -> str | None:
        """Why a queued build is not running (derived on demand: keeping it up to date in
        ``dispatch`` would cost a pass over the whole queue)."""
        if build.state is not BuildState.QUEUED:
            return None
        if build.waiting_for:
            return f"waiting for {len(build.waiting_for)} dependencies"
        if build.not_before > now:
            reason = build.status.value if build.status else "a failure"
            return f"retry in {build.not_before - now:.0f} s after {reason}"
        spec = build.spec
        capable = [m for m in self.machines.values() if m.can_build(spec)]
        if not any(m.state is not MachineState.DISCONNECTED for m in capable):
            features = ", ".join(sorted(spec.required_features)) or "none"
            return (
                f"no connected machine can build it (system {spec.system}, "
                f"required features: {features}); it stays queued until one connects"
            )
        if all(m.state is MachineState.DRAINING for m in capable if m.session is not None):
            return "every machine that can build it is draining"
        return "waiting for a free job slot"

    def _pick_machine(self, build: Build, machines: list[Machine]) -> Machine | None:
        """Among capable machines with free slots: avoid machines that failed this build,
        then the most free capacity scaled by speed factor."""
        capable = [m for m in machines if m.can_build(build.spec)]
        if not capable:
            return None
        return max(
            capable,
            key=lambda m: (
                m.machine_id not in build.failed_on,
                m.free_slots * m.speed_factor,
                m.speed_factor,
            ),
        )

    def _assign(self, build: Build, machine: Machine, now: float) -> None:
        assert machine.session is not None
        # Runnable since then, or since its retry delay ended, whichever is later.
        ready = max(self._since.get(build.id, now), build.not_before)
        self.metrics.dispatch_latency.observe(max(0.0, now - ready))
        self._since[build.id] = now
        build.attempts += 1
        build.state = BuildState.RUNNING
        self._touch(build)
        build.machine_id = machine.machine_id
        build.hostname = machine.hostname
        build.phase = None
        build.started_at = time.time()
        build.log_size = 0
        machine.running[build.id] = build
        spec = build.spec
        timeout = spec.timeout if spec.timeout is not None else self.config.default_timeout
        max_silent = (
            spec.max_silent if spec.max_silent is not None else self.config.default_max_silent
        )
        deps = [self.builds[dep_id] for dep_id in spec.after]
        assign = Assign(
            build_id=build.id,
            attempt=build.attempts,
            name=spec.name,
            command=spec.command,
            env=dict(spec.env),
            inputs=()
            if spec.drv
            else tuple(
                InputSpec(name=dep.name or dep.id, build_id=dep.id, files=dep.outputs)
                for dep in deps
            ),
            drv=spec.drv,
            store_paths=nix_store_paths(spec, deps) if spec.drv else (),
            limits=Limits(
                timeout=timeout,
                max_silent=max_silent,
                max_log_bytes=self.config.max_log_bytes,
                max_output_bytes=self.config.max_output_bytes,
            ),
        )
        if self._hold_assigns:
            self._held.append((machine.session, assign))
        else:
            machine.session.post(assign)
        log.info("build %s attempt %d assigned to %s", build.id, build.attempts, machine.hostname)
        self.on_build_change(build.id)
        self._observe(build)

    def is_input(self, build: Build, sha256: str) -> bool:
        """Whether a file with this hash is one a builder running ``build`` may fetch: an
        output of a build it depends on, or (a Nix build) an export the runner made for it."""
        if any(f.sha256 == sha256 and not f.link for f in build.spec.nix_inputs):
            return True
        return any(
            f.sha256 == sha256 and not f.link
            for dep_id in build.spec.after
            for f in self.builds[dep_id].outputs
        )

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
        self._touch(build)
        if not build.waiting_for:
            self._push(build)  # the old entry is skipped once the build has run
            self.on_change()

    def _make_runnable(self, build: Build, now: float) -> None:
        self._since[build.id] = now
        self._push(build)

    def _push(self, build: Build) -> None:
        spec = build.spec
        heap = self._runnable.setdefault((spec.system, spec.executor, spec.required_features), [])
        heapq.heappush(heap, (-spec.priority, -len(build.dependents), build.seq, build.id))

    def _infrastructure_failure(
        self, build: Build, status: BuildStatus, now: float, error: str
    ) -> None:
        build.infra_failures += 1
        self._touch(build)
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
        delay = (
            0.0
            if build.infra_failures <= 1
            else min(RETRY_CAP, RETRY_BASE * 2 ** (build.infra_failures - 2))
        )
        build.state = BuildState.QUEUED
        build.status = status
        build.error = error
        build.phase = None
        build.not_before = now + delay
        self.requeued[status.value] += 1
        log.info("build %s requeued (%s), retry in %.0f s", build.id, status.value, delay)
        self._observe(build)
        self._make_runnable(build, now)

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
        build.finished_at = time.time()
        self._touch(build)
        self._since.pop(build.id, None)
        self.finished[status.value] += 1
        self.on_build_change(build.id)
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
                self._make_runnable(dependent, now)

    def _dependency_failed(self, build: Build, dependency: Build, now: float) -> None:
        """``build`` can never run: ``dependency`` ended without success (and so, through
        ``_finish``, can nothing that depends on ``build``)."""
        reason = dependency.status.value if dependency.status else dependency.state.value
        self._finish(
            build, BuildStatus.DEPENDENCY_FAILED, now, error=f"dependency {dependency.id} {reason}"
        )

    # -- persistence ------------------------------------------------------------------------

    def _touch(self, build: Build) -> None:
        self._dirty_builds.add(build.id)
        self.on_dirty()

    def _touch_machine(self, machine: Machine) -> None:
        self._dirty_machines.add(machine.machine_id)
        self.on_dirty()

    def persist_with(self, wake: Callable[[], None]) -> None:
        """Write changes through a persister: ``wake`` is called when there is something to
        write, and from now on an Assign is held until the batch recording its attempt number
        is committed (``take_held_assigns``, ``release_assigns``).  Otherwise a runner killed
        between the two would leave the database one attempt behind, and its successor would
        hand the same attempt number out again: two runs, possibly at once on two builders,
        could then each commit or interleave their logs under it."""
        self.on_dirty = wake
        self._hold_assigns = True

    def take_held_assigns(self) -> list[tuple[Session, Assign]]:
        """The Assigns made since the last call: their builds' rows are in the batch the last
        ``take_dirty`` returned (call both without a checkpoint in between)."""
        held, self._held = self._held, []
        return held

    def release_assigns(self, held: list[tuple[Session, Assign]]) -> None:
        """Send Assigns whose attempt numbers are now committed, unless the assignment ended
        in the meantime (the build was cancelled, or its builder's session died and the build
        went back to the queue): then the builder must never see it."""
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

    def take_dirty(
        self,
    ) -> tuple[list[tuple[Any, ...]], list[tuple[str, str]], list[tuple[Any, ...]]]:
        """Rows of everything changed since the last call (build rows in submission order, so
        a build is written no earlier than the builds it depends on), then forget them."""
        builds = sorted((self.builds[i] for i in self._dirty_builds), key=lambda b: b.seq)
        now = time.time()
        machines = [machine_row(self.machines[i], now) for i in self._dirty_machines]
        edges = self._new_edges
        self._dirty_builds = set()
        self._dirty_machines = set()
        self._new_edges = []
        return [build_row(b) for b in builds], edges, machines

    def restore(self, snapshot: Snapshot, now: float) -> None:
        """Load the queue a previous runner left.  Builds that were running go back to the
        queue (their builders' connections died with that runner, and a builder cancels its
        builds when its connection dies); the next dispatch gives them a new attempt number,
        so a result of the old attempt can never be committed.  Known machines are listed as
        disconnected until they reconnect; none of this counts as lost."""
        for machine in snapshot.machines:
            machine.disconnect_reason = "the runner restarted; waiting for it to reconnect"
            machine.last_ping_at = machine.disconnected_at = now
            self.machines[machine.machine_id] = machine
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
                self._touch(build)
                requeued += 1
            if build.state is not BuildState.QUEUED:
                continue
            deps = [self.builds[d] for d in build.spec.after if d in self.builds]
            failed = [d for d in deps if d.state.finished and d.state is not BuildState.SUCCEEDED]
            if failed:
                self._dependency_failed(build, failed[0], now)
                continue
            build.waiting_for = {d.id for d in deps if not d.state.finished}
            if not build.waiting_for:
                self._make_runnable(build, now)
        log.info(
            "restored %d builds (%d requeued from running) and %d machines",
            len(snapshot.builds),
            requeued,
            len(snapshot.machines),
        )
        self.on_change()

    # -- views ------------------------------------------------------------------------------

    def queue_counts(self) -> dict[str, int]:
        return {state.value: count for state, count in self._state_counts.items()}

    def running_refs(self, machine: Machine) -> list[BuildRef]:
        return [BuildRef(build_id=b.id, attempt=b.attempts) for b in machine.running.values()]
