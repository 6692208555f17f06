"""The run queue: which runnable build goes to which free machine, and why one waits.

Builds are queued by *class*, what a machine needs to build them (system, executor, required
features): per class a heap in Hydra's order (priority, then builds that unblock the most
others, then age).  A dispatch gives each class open to some free machine a heap of those
machines, the most free capacity (scaled by speed factor) first, and takes the best build
across all classes until no class has both a build and a free machine, so an assignment costs
a few heap operations, not a pass over the farm (8,000 assignments over 2,000 machines took
18-22 s of event loop that way).  Only a retry, which avoids the machines it failed on, takes
the pass (``_pick_machine``).  A class no free machine can build costs a dispatch nothing,
however many builds it holds.

The scheduler only chooses; ``Farm`` makes the assignment (``assign``) and every other change
of a build.  It also keeps, per unfinished build, when it became runnable or was assigned:
where dispatch latency and build duration start.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping

import attrs

from hydra_trio.runner.model import Build, BuildState, Machine, MachineState

#: What a machine needs to build a build: (system, executor, required features).
_BuildClass = tuple[str, str, frozenset[str]]
#: A runnable build in its class's heap: (-priority, -dependents, seq, build id).
_Entry = tuple[int, int, int, str]
#: A machine in a dispatch's heap for one class: (-free slots x speed factor, -speed factor,
#: position in the farm, machine), i.e. Hydra's choice first, ties to the first listed.
_MachineEntry = tuple[float, float, int, Machine]

#: Retry delay for an infrastructure failure: RETRY_BASE * 2**(n-2) after the n-th failure, the
#: first retry immediate (the builder is gone, not the build's fault).  Capped at RETRY_CAP.
RETRY_BASE = 2.0
RETRY_CAP = 60.0


def retry_delay(infra_failures: int) -> float:
    """How long a build waits before its retry after its ``infra_failures``-th failure."""
    if infra_failures <= 1:
        return 0.0
    return min(RETRY_CAP, RETRY_BASE * 2.0 ** (infra_failures - 2))


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


def _pick_machine(build: Build, machines: list[Machine]) -> Machine | None:
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


@attrs.define(eq=False)
class Scheduler:
    #: the farm's builds (read only).
    builds: Mapping[str, Build]
    #: runnable builds per class; entries whose build is no longer runnable are skipped when
    #: they come to the top.
    _runnable: dict[_BuildClass, list[_Entry]] = attrs.field(factory=dict, init=False)
    #: per unfinished build, on the ``now`` clock: when it became runnable (while queued) or
    #: was assigned (while running).
    _since: dict[str, float] = attrs.field(factory=dict, init=False)

    def make_runnable(self, build: Build, now: float) -> None:
        """``build`` may run from now on (or from its ``not_before``)."""
        self._since[build.id] = now
        self.push(build)

    def push(self, build: Build) -> None:
        """(Re-)queue ``build`` in its class's heap with its current dependents count."""
        spec = build.spec
        heap = self._runnable.setdefault((spec.system, spec.executor, spec.required_features), [])
        heapq.heappush(heap, (-spec.priority, -len(build.dependents), build.seq, build.id))

    def started(self, build: Build, now: float) -> float:
        """``build`` is being assigned at ``now``: the seconds it waited while runnable
        (since it became runnable, or since its retry delay ended, whichever is later)."""
        ready = max(self._since.get(build.id, now), build.not_before)
        self._since[build.id] = now
        return max(0.0, now - ready)

    def forget(self, build: Build) -> float | None:
        """``build`` ended or its attempt did: when it was assigned (None if it was not)."""
        return self._since.pop(build.id, None)

    def dispatch(
        self, now: float, machines: Iterable[Machine], assign: Callable[[Build, Machine], None]
    ) -> float | None:
        """Call ``assign`` for every runnable build that has a free, capable machine, best
        first across all classes.  Returns the next time a delayed retry becomes due, or None."""
        for key in [key for key, heap in self._runnable.items() if not heap]:
            del self._runnable[key]
        if not self._runnable:
            # Nothing queued: no pass over the machines (a reconnect storm of 2,000 builders
            # wakes the dispatcher once per hello, and with 2,000 machines each pass cost ~1 ms).
            return None
        open_classes = self._open_classes([m for m in machines if m.free_slots > 0])
        next_due: float | None = None
        deferred: list[tuple[_BuildClass, _Entry]] = []
        while open_classes:
            best = self._best_class(open_classes)
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
                free = [e[3] for e in open_classes[best] if e[3].free_slots > 0]
                machine = _pick_machine(build, free)
            if machine is None:  # every machine of the class is full now
                heapq.heappush(self._runnable[best], entry)
                del open_classes[best]
                continue
            assign(build, machine)
        for key, entry in deferred:
            heapq.heappush(self._runnable[key], entry)
        return next_due

    def _open_classes(self, free: list[Machine]) -> dict[_BuildClass, list[_MachineEntry]]:
        """Per class with queued builds, the heap of free machines that can build it."""
        open_classes: dict[_BuildClass, list[_MachineEntry]] = {}
        for key in self._runnable:
            machines = [
                (-m.free_slots * m.speed_factor, -m.speed_factor, index, m)
                for index, m in enumerate(free)
                if m.can_build_class(*key)
            ]
            if machines:
                heapq.heapify(machines)
                open_classes[key] = machines
        return open_classes

    def _best_class(
        self, open_classes: dict[_BuildClass, list[_MachineEntry]]
    ) -> _BuildClass | None:
        """The class whose best runnable build comes first; classes out of builds close."""
        best: _BuildClass | None = None
        for key in list(open_classes):
            heap = self._runnable[key]
            while heap and not self._is_runnable(heap[0][3]):
                heapq.heappop(heap)  # stale entry
            if not heap:
                del open_classes[key]
            elif best is None or heap[0] < self._runnable[best][0]:
                best = key
        return best

    def _is_runnable(self, build_id: str) -> bool:
        build = self.builds.get(build_id)
        return build is not None and build.state is BuildState.QUEUED and not build.waiting_for

    def waiting_reason(self, build: Build, now: float, machines: Iterable[Machine]) -> str | None:
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
        capable = [m for m in machines if m.can_build(spec)]
        if not any(m.state is not MachineState.DISCONNECTED for m in capable):
            features = ", ".join(sorted(spec.required_features)) or "none"
            return (
                f"no connected machine can build it (system {spec.system}, "
                f"required features: {features}); it stays queued until one connects"
            )
        if all(m.state is MachineState.DRAINING for m in capable if m.session is not None):
            return "every machine that can build it is draining"
        return "waiting for a free job slot"
