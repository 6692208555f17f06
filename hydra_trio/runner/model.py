"""What the queue runner knows: builds and machines, and the states they move through.

These are plain bookkeeping objects; ``farm.Farm`` owns them, and it and the parts it delegates
to (``registry.Registry`` for machines, ``scheduler.Scheduler`` for the run queue) are the only
code that changes them, so every transition (and its invariants) is in one place.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import attrs

from hydra_trio.protocol.messages import BuildStatus, FileInfo, Message, Phase

T = TypeVar("T")


class BuildState(enum.Enum):
    """Where a build is in its life."""

    #: waiting for its dependencies, a retry delay, or a free machine.
    QUEUED = "queued"
    #: assigned to a machine under its current attempt.
    RUNNING = "running"
    #: ended with status ``success``.
    SUCCEEDED = "succeeded"
    #: ended with any failure status.
    FAILED = "failed"
    #: cancelled by an operator.
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({BuildState.SUCCEEDED, BuildState.FAILED, BuildState.CANCELLED})


class MachineState(enum.Enum):
    """A builder machine as the runner sees it."""

    #: a live session; eligible for new builds.
    CONNECTED = "connected"
    #: a live session, but no new builds; it finishes what it runs.
    DRAINING = "draining"
    #: no live session: its slots are free and its builds were requeued.
    DISCONNECTED = "disconnected"


class Session(Protocol):
    """What the farm needs of a builder connection (implemented in ``runner.session``)."""

    @property
    def session_id(self) -> str: ...

    def post(self, message: Message) -> None:
        """Queue a message for the builder without waiting."""

    def close(self, reason: str) -> None:
        """End the connection (idempotent); the session then detaches itself."""


@attrs.frozen(kw_only=True)
class BuildSpec:
    """What a client asks to build (validated before it reaches the farm)."""

    command: tuple[str, ...]
    name: str = ""
    system: str
    required_features: frozenset[str] = frozenset()
    after: tuple[str, ...] = ()
    priority: int = 0
    timeout: float | None = None
    max_silent: float | None = None
    env: tuple[tuple[str, str], ...] = ()
    #: non-empty: a Nix derivation (its store path) to realise, on a builder with the ``nix``
    #: executor; ``command`` is then only for humans.
    drv: str = ""
    #: the derivation's outputs: (output name, store path).
    drv_outputs: tuple[tuple[str, str], ...] = ()
    #: export files (one per store path, in the runner's blob store) of the part of the input
    #: closure no other build of the farm produces: the derivation files, and the outputs
    #: that were already valid in the runner's store with their closures.
    nix_inputs: tuple[FileInfo, ...] = ()

    @property
    def executor(self) -> str:
        """Which builder executor can run it."""
        return "nix" if self.drv else "command"


def _count_state(build: Build, attribute: Any, new: BuildState) -> BuildState:
    """``on_setattr`` of ``Build.state``: moves the build between its farm's state counts."""
    counts = build._counts
    if counts is not None and new is not build.state:
        counts[build.state] -= 1
        counts[new] += 1
    return new


@attrs.define(eq=False)
class Build:
    """One build and everything known about it."""

    id: str
    spec: BuildSpec
    #: submission order: FIFO within a priority.
    seq: int
    submitted_at: float
    state: BuildState = attrs.field(default=BuildState.QUEUED, on_setattr=_count_state)
    #: why it ended (or why its last attempt ended while it waits for a retry).
    status: BuildStatus | None = None
    #: dispatches so far; the current (or last) attempt's number, and so its fencing token.
    attempts: int = 0
    #: attempts that ended in an infrastructure failure.
    infra_failures: int = 0
    machine_id: str | None = None
    hostname: str | None = None
    phase: Phase | None = None
    exit_code: int | None = None
    error: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    outputs: tuple[FileInfo, ...] = ()
    timings: dict[str, float] = attrs.field(factory=dict)
    #: a retry is not dispatched before this (monotonic) time.
    not_before: float = 0.0
    #: machines whose attempts failed for infrastructure reasons: tried last on a retry.
    failed_on: list[str] = attrs.field(factory=list)
    #: unfinished builds named in ``after``.
    waiting_for: set[str] = attrs.field(factory=set)
    #: builds that name this one in ``after``.
    dependents: list[str] = attrs.field(factory=list)
    #: bytes of the current attempt's log accepted so far.
    log_size: int = 0
    #: the builds-per-state counts this build is counted in (its farm's), see `count_in`.
    _counts: dict[BuildState, int] | None = attrs.field(default=None, init=False, repr=False)

    def count_in(self, counts: dict[BuildState, int]) -> None:
        """Count this build in ``counts`` from now on: every change of ``state`` moves it."""
        assert self._counts is None, "a build is counted in one farm"
        self._counts = counts
        counts[self.state] += 1

    @property
    def name(self) -> str:
        return self.spec.name

    def to_json(self, waiting_reason: str | None = None, *, outputs: bool = True) -> dict[str, Any]:
        """The build as the HTTP API shows it; ``outputs`` False leaves its ``outputs`` empty
        (for the caller to fill in with ``outputs_json`` off the event loop: 100,000 of them
        take ~100 ms to convert and ~230 ms to encode)."""
        return {
            "id": self.id,
            "name": self.spec.name or None,
            "command": list(self.spec.command),
            "system": self.spec.system,
            "requiredFeatures": sorted(self.spec.required_features),
            "after": list(self.spec.after),
            "priority": self.spec.priority,
            "timeout": self.spec.timeout,
            "maxSilent": self.spec.max_silent,
            "state": self.state.value,
            "status": self.status.value if self.status else None,
            "phase": self.phase.value if self.phase and self.state is BuildState.RUNNING else None,
            "attempts": self.attempts,
            "machine": self.hostname,
            "machineId": self.machine_id,
            "exitCode": self.exit_code,
            "error": self.error or None,
            "waitingFor": sorted(self.waiting_for),
            "waitingReason": waiting_reason,
            "outputs": outputs_json(self.outputs) if outputs else [],
            "drv": self.spec.drv or None,
            "storePaths": {name: path for name, path in self.spec.drv_outputs},
            "timings": self.timings,
            "submittedAt": self.submitted_at,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
        }


def outputs_json(outputs: tuple[FileInfo, ...]) -> list[dict[str, Any]]:
    """A build's outputs as ``Build.to_json`` shows them."""
    return [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in outputs]


#: ``Machine.to_json``'s fields after ``sinceLastPing``, in order (``Machine._dynamic``).
_DYNAMIC_FIELDS = (
    "connected",
    "state",
    "drainRequested",
    "succeededBuilds",
    "failedBuilds",
    "lostBuilds",
    "disconnectReason",
    "load",
    "diskFree",
    "lowDisk",
)


def compact_json(value: Any) -> str:
    """``value`` as compact JSON, as ``/status`` is encoded (``http.RunnerApi.status``)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


#: Items per ``json.dumps`` call in ``json_list``.
JSON_PIECE = 1000


def json_list(items: tuple[T, ...], convert: Callable[[tuple[T, ...]], list[Any]]) -> str:
    """``compact_json(convert(items))``, made ``JSON_PIECE`` items per ``json.dumps`` call:
    a call holds the GIL for its whole length, and one over 100,000 outputs in a worker thread
    kept the event loop waiting ~200 ms."""
    pieces = (
        compact_json(convert(items[start : start + JSON_PIECE]))[1:-1]
        for start in range(0, len(items), JSON_PIECE)
    )
    return "[" + ",".join(pieces) + "]"


@attrs.define(eq=False)
class Machine:
    """A builder machine, known by its machine id; outlives its connections."""

    machine_id: str
    hostname: str
    systems: tuple[str, ...]
    supported_features: frozenset[str]
    mandatory_features: frozenset[str]
    max_jobs: int
    speed_factor: float
    #: what it can run: ``command`` and/or ``nix`` (``Hello.executors``).
    executors: frozenset[str] = frozenset({"command"})
    #: what its last hello said (a 1.3 builder takes input listings in pieces).
    protocol_version: str = "1.0"
    #: the connected builder process (``Hello.instance``, "" from a builder before 1.4) and
    #: where it connected from (``HOST:PORT``).
    instance: str = ""
    address: str = ""
    state: MachineState = MachineState.DISCONNECTED
    session: Session | None = None
    #: builds it runs now, by id.
    running: dict[str, Build] = attrs.field(factory=dict)
    connected_at: float = 0.0
    #: monotonic time of the last Ping (or of the connection, before the first ping).
    last_ping_at: float = 0.0
    disconnected_at: float | None = None
    disconnect_reason: str = ""
    #: the runner was told to drain it (survives reconnects).
    drain_requested: bool = False
    #: the builder said it is shutting down (only for this session).
    draining_itself: bool = False
    #: this session's builder was sent the operator's Drain (it leaves after its builds).
    told_to_drain: bool = False
    succeeded_builds: int = 0
    failed_builds: int = 0
    lost_builds: int = 0
    sessions: int = 0
    load: float = 0.0
    disk_free: int = 0
    #: (1.3) its last ping said its disk is low: it gets no new build meanwhile.
    low_disk: bool = False
    #: `to_json`'s fields that change only when the builder says Hello again, with the values
    #: they were made from (a 2,000-machine ``/status`` builds them once, not every time).
    _static_json: tuple[tuple[Any, ...], dict[str, Any], str] | None = attrs.field(
        default=None, init=False, repr=False
    )
    #: `to_json_text`'s encoded `_dynamic` fields, with the values they were made from.
    _dynamic_text: tuple[tuple[Any, ...], str] | None = attrs.field(
        default=None, init=False, repr=False
    )

    @property
    def free_slots(self) -> int:
        if self.state is not MachineState.CONNECTED or self.low_disk:
            return 0
        return max(0, self.max_jobs - len(self.running))

    def can_build(self, spec: BuildSpec) -> bool:
        """Hydra's rule: the system matches, required <= supported, mandatory <= required."""
        return self.can_build_class(spec.system, spec.executor, spec.required_features)

    def can_build_class(self, system: str, executor: str, required: frozenset[str]) -> bool:
        return (
            executor in self.executors
            and system in self.systems
            and required <= self.supported_features
            and self.mandatory_features <= required
        )

    def _static(self) -> tuple[dict[str, Any], str]:
        """The fields of ``to_json`` that change only with a hello, as a dict and encoded
        (without the braces), made again only when one of them changed."""
        key = (
            self.machine_id,
            self.hostname,
            self.systems,
            self.supported_features,
            self.mandatory_features,
            self.max_jobs,
            self.speed_factor,
            self.executors,
        )
        if self._static_json is None or self._static_json[0] != key:
            fields = {
                "machineId": self.machine_id,
                "hostname": self.hostname,
                "systems": list(self.systems),
                "supportedFeatures": sorted(self.supported_features),
                "mandatoryFeatures": sorted(self.mandatory_features),
                "maxJobs": self.max_jobs,
                "speedFactor": self.speed_factor,
                "executors": sorted(self.executors),
            }
            self._static_json = (key, fields, compact_json(fields)[1:-1])
        return self._static_json[1], self._static_json[2]

    def _dynamic(self) -> tuple[Any, ...]:
        """The values of ``_DYNAMIC_FIELDS``, in order."""
        return (
            self.state is not MachineState.DISCONNECTED,
            self.state.value,
            self.drain_requested,
            self.succeeded_builds,
            self.failed_builds,
            self.lost_builds,
            self.disconnect_reason or None,
            self.load,
            self.disk_free,
            self.low_disk,
        )

    def to_json(self, now: float) -> dict[str, Any]:
        connected = self.state is not MachineState.DISCONNECTED
        return {
            **self._static()[0],
            "currentJobs": len(self.running) if connected else 0,
            "sinceLastPing": round(max(0.0, now - self.last_ping_at), 3),
            **dict(zip(_DYNAMIC_FIELDS, self._dynamic(), strict=True)),
        }

    def to_json_text(self, now: float) -> str:
        """``to_json(now)`` encoded as ``json.dumps(..., ensure_ascii=False,
        separators=(",", ":"))`` would, from pieces kept between calls: a machine's fields are
        encoded again only when they changed.  ``/status`` with 2,000 machines took 15-35 ms
        of the GIL encoding the list; this way about a tenth of that."""
        values = self._dynamic()
        if self._dynamic_text is None or self._dynamic_text[0] != values:
            fields = dict(zip(_DYNAMIC_FIELDS, values, strict=True))
            self._dynamic_text = (values, compact_json(fields)[1:-1])
        jobs = len(self.running) if values[0] else 0
        since = round(max(0.0, now - self.last_ping_at), 3)
        return (
            f'{{{self._static()[1]},"currentJobs":{jobs},'
            f'"sinceLastPing":{since!r},{self._dynamic_text[1]}}}'
        )
