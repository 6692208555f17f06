"""The builder machines the runner knows, their sessions, and fencing.

A machine is known by its machine id and outlives its connections: ``connect`` attaches a
session that completed its hello (creating the machine the first time), ``disconnect`` detaches
it and hands back the builds it ran, for ``Farm`` to requeue.

Fencing (``current``): a frame about a build (Progress, LogChunk, Result, an upload or a
fetch) is applied only if it comes from the session currently attached to the build's machine
*and* names the build's current attempt.  Anything else is counted (``FarmMetrics``), logged
once per run of such frames, and must change nothing: a builder can speak only for itself, and
a result is committed at most once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import attrs

from hydra_trio.protocol.messages import Abort, Drain, Hello, Ping
from hydra_trio.runner.metrics import FarmMetrics
from hydra_trio.runner.model import Build, Machine, MachineState, Session

log = logging.getLogger("hydra_trio.runner")


class AmbiguousMachineError(KeyError):
    """A hostname that names several machines; ``machine_ids`` are theirs."""

    def __init__(self, hostname: str, machine_ids: list[str]) -> None:
        super().__init__(hostname)
        self.hostname = hostname
        self.machine_ids = machine_ids

    def __str__(self) -> str:
        return (
            f"{len(self.machine_ids)} machines are called {self.hostname!r}: "
            f"{', '.join(self.machine_ids)}; name one by its machine id"
        )


@attrs.define(eq=False)
class Registry:
    #: the farm's builds (read only: for the reason a frame is rejected).
    builds: Mapping[str, Build]
    metrics: FarmMetrics
    machines: dict[str, Machine] = attrs.field(factory=dict, init=False)
    #: per machine id, what its last rejected frame was about (see ``current``).
    _last_rejected: dict[str, tuple[str, str, int]] = attrs.field(factory=dict, init=False)

    def find(self, key: str) -> Machine:
        """A machine by id, or by hostname: the one machine of that name, or the one connected
        machine of that name.  ``KeyError`` when none has it; ``AmbiguousMachineError`` naming
        their ids when several do (two live builders on one host, each with its work dir)."""
        if key in self.machines:
            return self.machines[key]
        matches = [m for m in self.machines.values() if m.hostname == key]
        if len(matches) > 1:
            live = [m for m in matches if m.session is not None]
            if len(live) == 1:
                return live[0]
            raise AmbiguousMachineError(key, sorted(m.machine_id for m in live or matches))
        if not matches:
            raise KeyError(key)
        return matches[0]

    def machine_of(self, session: Session) -> Machine | None:
        """The machine ``session`` is attached to, None if it is not (or no longer)."""
        for machine in self.machines.values():
            if machine.session is session:
                return machine
        return None

    def connect(self, session: Session, hello: Hello, now: float, address: str = "") -> Machine:
        """Attach ``session`` (from ``address``) to its machine, made or updated from
        ``hello``.  The caller has detached the machine's previous session, if any."""
        machine = self.machines.get(hello.machine_id)
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
                protocol_version=hello.protocol_version,
            )
            self.machines[hello.machine_id] = machine
        else:
            _update(machine, hello)
        machine.session = session
        machine.instance, machine.address = hello.instance, address
        machine.state = MachineState.DRAINING if machine.drain_requested else MachineState.CONNECTED
        machine.draining_itself = False
        machine.told_to_drain = False
        machine.connected_at = machine.last_ping_at = now
        machine.disconnected_at = None
        machine.disconnect_reason = ""
        machine.sessions += 1
        log.info(
            "builder %s (%s) connected: systems %s, %d job slots",
            machine.hostname,
            machine.machine_id,
            ",".join(machine.systems),
            machine.max_jobs,
        )
        return machine

    def disconnect(self, machine: Machine, reason: str, now: float, *, lost: bool) -> list[Build]:
        """Mark ``machine`` disconnected and free its slots; returns the builds it ran."""
        silent = now - machine.last_ping_at
        machine.session = None
        machine.state = MachineState.DISCONNECTED
        machine.disconnected_at = now
        machine.disconnect_reason = reason
        requeue = list(machine.running.values())
        if lost and machine.running:
            self.metrics.builders_lost_busy += 1
        elif lost:
            self.metrics.builders_lost_idle += 1
        log.warning(
            "builder %s (%s) disconnected: %s (last ping %.1f s ago); requeueing %d builds",
            machine.hostname,
            machine.machine_id,
            reason,
            silent,
            len(requeue),
        )
        machine.running.clear()
        machine.lost_builds += len(requeue)
        return requeue

    def drain(self, key: str) -> Machine:
        """Stop giving a machine new builds; what it runs finishes.  Key: id or hostname.

        The runner remembers the drain (``drain_requested``, stored) until ``undrain``.  The
        builder connected now is told (it leaves once its builds are done, as on SIGTERM);
        a builder that connects later is not: it stays connected and idle, so one restarted
        by its service manager does not exit again because of an old drain."""
        machine = self.find(key)
        machine.drain_requested = True
        if machine.state is MachineState.CONNECTED:
            machine.state = MachineState.DRAINING
        if machine.session is not None and not machine.told_to_drain:
            machine.told_to_drain = True
            machine.session.post(Drain(reason="drain requested by an operator"))
        return machine

    def undrain(self, key: str) -> Machine:
        """Give a drained machine builds again.  A builder that was already told to drain
        still leaves after its builds (the protocol has no message to call a drain back);
        when it connects again it gets builds."""
        machine = self.find(key)
        machine.drain_requested = False
        if machine.told_to_drain:
            machine.draining_itself = True  # on its way out, as after a SIGTERM
        if machine.state is MachineState.DRAINING and not machine.draining_itself:
            machine.state = MachineState.CONNECTED
        return machine

    def restore(self, machines: list[Machine], now: float) -> None:
        """Machines a previous runner knew, disconnected until they reconnect."""
        for machine in machines:
            machine.disconnect_reason = "the runner restarted; waiting for it to reconnect"
            machine.last_ping_at = machine.disconnected_at = now
            self.machines[machine.machine_id] = machine

    def on_ping(self, session: Session, machine: Machine, ping: Ping, now: float) -> bool:
        """Record liveness and reconcile: a build the builder runs that is not its current
        assignment is aborted (it may be a stale attempt from before a partition).  True when
        the machine's room for new builds changed (its disk became low, or has room again)."""
        if machine.session is not session:
            return False
        machine.last_ping_at = now
        machine.load = ping.load
        machine.disk_free = ping.disk_free
        changed = ping.low_disk != machine.low_disk
        if changed:
            machine.low_disk = ping.low_disk
            if ping.low_disk:
                log.warning(
                    "builder %s: low disk, no new builds until it has room", machine.hostname
                )
            else:
                log.info("builder %s: disk space back, taking builds again", machine.hostname)
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
        return changed

    def on_builder_drain(self, session: Session, machine: Machine) -> None:
        """The builder announced it is shutting down after its running builds."""
        if machine.session is session and machine.state is MachineState.CONNECTED:
            machine.state = MachineState.DRAINING
            machine.draining_itself = True

    def current(
        self, session: Session, machine: Machine, build_id: str, attempt: int, kind: str
    ) -> Build | None:
        """The build a frame of ``kind`` is about, if the frame is current: from the session
        attached to ``machine``, for a build running there under ``attempt``.  Anything else
        is counted and logged, and None is returned: the frame must not be applied."""
        build = machine.running.get(build_id) if machine.session is session else None
        if build is not None and build.attempts == attempt:
            return build
        self.metrics.stale_rejected += 1
        self.metrics.frames_rejected[kind] += 1
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


def _update(machine: Machine, hello: Hello) -> None:
    """What a machine said about itself in a new hello."""
    machine.hostname = hello.hostname
    machine.systems = hello.systems
    machine.supported_features = frozenset(hello.supported_features)
    machine.mandatory_features = frozenset(hello.mandatory_features)
    machine.max_jobs = hello.max_jobs
    machine.speed_factor = hello.speed_factor
    machine.executors = frozenset(hello.executors)
    machine.protocol_version = hello.protocol_version
