"""What happened in a simulated farm (``simfarm.World``), as the invariants need it.

``Journal`` collects executions (from the scripted executor), commits, attaches and stale
rejections (from ``JournalingFarm``, the real ``Farm`` with hooks), the snapshots each runner
restored, the times each builder needed a connection or could not get one, and a readable
timeline.  ``JournalingFarm`` also checks, as it goes, the invariants that can only be seen
inside a transition: a result or progress it rejects changes nothing, and what it commits is
the attempt running on that machine's live session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from hydra_trio.protocol.messages import BuildStatus, Progress, Result
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.model import Build, BuildState, Machine, Session

if TYPE_CHECKING:
    from .simprocess import BuilderEnd, BuilderProcess


@attrs.define(eq=False)
class Execution:
    """One run of a build's command on a builder (a child process in the real executor)."""

    builder: str
    incarnation: int
    build: int
    attempt: int
    #: the connection that assigned it (its ``last_received`` is when the builder last heard
    #: the runner on it).
    stream: BuilderEnd
    process: BuilderProcess
    started: float
    #: the runner generation whose Assign started it.
    generation: int = 0
    ended: float | None = None
    #: the status it returned, or "killed".
    outcome: str = ""

    @property
    def tag(self) -> bytes:
        return f"{self.builder}/{self.incarnation} started at {self.started:g}\n".encode()

    def __repr__(self) -> str:
        end = "running" if self.ended is None else f"{self.ended:g} {self.outcome}"
        return (
            f"#{self.build} attempt {self.attempt} on {self.builder}"
            f"/{self.incarnation} [{self.started:g} .. {end}]"
        )


@attrs.frozen
class Commit:
    """A result the runner applied (``Farm.on_result`` returned True)."""

    generation: int
    build: int
    attempt: int
    status: BuildStatus
    machine_id: str
    at: float


@attrs.define(eq=False)
class Journal:
    """Everything a run did that the invariants look at."""

    #: build id -> index in the submitted graph.
    index: dict[str, int] = attrs.field(factory=dict)
    executions: list[Execution] = attrs.field(factory=list)
    live: set[Execution] = attrs.field(factory=set)
    commits: list[Commit] = attrs.field(factory=list)
    #: builder name -> times the runner attached a session of it.
    attaches: dict[str, list[float]] = attrs.field(factory=dict)
    #: builder name -> times it needed a (new) connection: started, or a connection ended.
    needs_connection: dict[str, list[float]] = attrs.field(factory=dict)
    #: builder name ("*": all of them) -> (start, end) of times it could not connect at all.
    impaired: dict[str, list[tuple[float, float]]] = attrs.field(factory=dict)
    #: runner generation -> builds finished in the snapshot it restored: (status, attempts).
    restored: dict[int, dict[int, tuple[BuildStatus | None, int]]] = attrs.field(factory=dict)
    #: build index -> "acknowledged" (cancelled, durably: the client got its answer) or
    #: "unknown" (the runner died before answering: the cancel may be lost).
    cancels: dict[int, str] = attrs.field(factory=dict)
    #: frames rejected as stale (``Farm.current``), by kind ("result", "progress", ...).
    stale: dict[str, int] = attrs.field(factory=dict)
    violations: list[str] = attrs.field(factory=list)
    #: called on the first violation (the run can stop there).
    on_violation: Callable[[], None] = lambda: None
    timeline: list[tuple[float, str]] = attrs.field(factory=list)

    def log(self, text: str) -> None:
        self.timeline.append((trio.current_time(), text))

    def violation(self, text: str) -> None:
        self.violations.append(f"at {trio.current_time():g} s: {text}")
        self.log(f"VIOLATION {text}")
        self.on_violation()

    def name(self, build_id: str) -> str:
        return f"#{self.index[build_id]}" if build_id in self.index else build_id


# -- the farm, with hooks -------------------------------------------------------------------


@attrs.define(eq=False)
class JournalingFarm(Farm):
    """The real ``Farm``, telling the journal about attaches and results, and checking that a
    result or progress it rejects as stale changes nothing."""

    sim_journal: Journal = attrs.field(kw_only=True, factory=Journal)
    generation: int = attrs.field(kw_only=True, default=1)

    def attach(self, session: Session, hello: Any, now: float, address: str = "") -> Machine:
        machine = super().attach(session, hello, now, address)
        self.sim_journal.attaches.setdefault(machine.hostname, []).append(now)
        self.sim_journal.log(f"runner {self.generation} attached {machine.hostname}")
        return machine

    def detach(self, session: Session, reason: str, now: float, *, lost: bool = True) -> None:
        machine = self.registry.machine_of(session)
        if machine is not None:
            self.sim_journal.log(f"runner {self.generation} detached {machine.hostname}: {reason}")
        if reason.startswith("internal error"):  # serve_builder's catch-all: a bug
            self.sim_journal.violation(f"runner {self.generation} session failed: {reason}")
        super().detach(session, reason, now, lost=lost)

    def _fingerprint(self, build_id: str, machine: Machine) -> tuple[Any, ...]:
        build = self.builds.get(build_id)
        about = (
            None
            if build is None
            else (build.state, build.status, build.attempts, build.machine_id, build.phase)
        )
        return (
            about,
            tuple(machine.running),
            machine.succeeded_builds,
            machine.failed_builds,
            sum(self.metrics.finished.values()),
            sum(self.metrics.requeued.values()),
        )

    def current(
        self, session: Session, machine: Machine, build_id: str, attempt: int, **kw: Any
    ) -> Build | None:
        build = super().current(session, machine, build_id, attempt, **kw)
        if build is None:
            kind = str(kw.get("kind", "frame"))
            self.sim_journal.stale[kind] = self.sim_journal.stale.get(kind, 0) + 1
            self.sim_journal.log(
                f"runner {self.generation} rejected a stale {kind} of "
                f"{self.sim_journal.name(build_id)} attempt {attempt} from {machine.hostname}"
            )
        return build

    def on_result(self, session: Session, machine: Machine, msg: Result, now: float) -> bool:
        before = self._fingerprint(msg.build_id, machine)
        build = self.builds.get(msg.build_id)
        # The fencing rule, checked independently of ``current``: a result may change something
        # only if its attempt is the one running on this machine's live session right now.
        fenced_in = (
            build is not None
            and build.state is BuildState.RUNNING
            and build.attempts == msg.attempt
            and build.machine_id == machine.machine_id
            and machine.session is session
        )
        committed = super().on_result(session, machine, msg, now)
        journal = self.sim_journal
        what = f"{journal.name(msg.build_id)} attempt {msg.attempt} {msg.status.value}"
        if committed and not fenced_in:
            journal.violation(f"runner {self.generation} committed the stale result {what}")
        if committed:
            journal.commits.append(
                Commit(
                    generation=self.generation,
                    build=journal.index[msg.build_id],
                    attempt=msg.attempt,
                    status=msg.status,
                    machine_id=machine.machine_id,
                    at=now,
                )
            )
            journal.log(f"runner {self.generation} committed {what} from {machine.hostname}")
        else:
            journal.log(f"runner {self.generation} rejected {what} from {machine.hostname}")
            if self._fingerprint(msg.build_id, machine) != before:
                journal.violation(f"the stale result {what} changed the farm")
        return committed

    def on_progress(self, session: Session, machine: Machine, msg: Progress) -> None:
        build = self.builds.get(msg.build_id)
        current = (
            build is not None
            and machine.session is session
            and machine.running.get(msg.build_id) is build
            and build.attempts == msg.attempt
        )
        before = self._fingerprint(msg.build_id, machine)
        super().on_progress(session, machine, msg)
        if not current and self._fingerprint(msg.build_id, machine) != before:
            self.sim_journal.violation(
                f"a stale progress of {self.sim_journal.name(msg.build_id)} attempt "
                f"{msg.attempt} changed the farm"
            )
