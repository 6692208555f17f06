"""What changed in the farm since the persister last took it, and the Assigns waiting on it.

The farm marks every build and machine it changes (``touch``, ``touch_machine``) and every
dependency edge it creates (``add_edges``); the persister takes them all at once (``take``),
turns them into rows (``rows.build_row``/``rows.machine_row``) and commits them as one
transaction.  Marking sets ``changed``, the trio event the persister waits on: the farm stays
synchronous and never calls the persister.

With ``hold_assigns`` (a farm whose changes a persister writes), an Assign is not sent when it
is made but held (``hold``) until the batch that records its attempt number is committed:
otherwise a runner killed between the two would leave the database one attempt behind, and
its successor would hand the same attempt number out again.  Two runs, possibly at once on two
builders, could then each commit or interleave their logs under it.
"""

from __future__ import annotations

import attrs
import trio

from hydra_trio.protocol.messages import Assign
from hydra_trio.runner.model import Build, Machine, Session


@attrs.frozen
class Changes:
    """Everything changed since the previous ``Journal.take``."""

    #: in submission order, so a build is written no earlier than the builds it depends on.
    builds: list[Build]
    #: (build id, id of a build it depends on), new since the last take.
    edges: list[tuple[str, str]]
    machines: list[Machine]


@attrs.define(eq=False)
class Journal:
    #: hold each Assign until the batch recording its attempt is committed (see the module).
    hold_assigns: bool = False
    _builds: dict[str, Build] = attrs.field(factory=dict, init=False)
    _machines: dict[str, Machine] = attrs.field(factory=dict, init=False)
    _edges: list[tuple[str, str]] = attrs.field(factory=list, init=False)
    _held: list[tuple[Session, Assign]] = attrs.field(factory=list, init=False)
    #: set when there is something to write, or a write was asked for (``wake``).
    changed: trio.Event = attrs.field(factory=trio.Event, init=False)

    @property
    def changed_builds(self) -> int:
        """How many builds changed since the last ``take``."""
        return len(self._builds)

    def touch(self, build: Build) -> None:
        self._builds[build.id] = build
        self.changed.set()

    def touch_machine(self, machine: Machine) -> None:
        self._machines[machine.machine_id] = machine
        self.changed.set()

    def add_edges(self, edges: list[tuple[str, str]]) -> None:
        self._edges.extend(edges)

    def wake(self) -> None:
        """Have the persister write a batch (``Persister.flush``), changed or not."""
        self.changed.set()

    def hold(self, session: Session, assign: Assign) -> bool:
        """Keep ``assign`` until its attempt is committed; False: send it now (no persister)."""
        if self.hold_assigns:
            self._held.append((session, assign))
        return self.hold_assigns

    def take(self) -> tuple[Changes, list[tuple[Session, Assign]]]:
        """What changed since the last call, and the Assigns made meanwhile (whose builds'
        rows are in these changes), then forget both and re-arm ``changed``."""
        builds = sorted(self._builds.values(), key=lambda b: b.seq)
        changes = Changes(builds=builds, edges=self._edges, machines=list(self._machines.values()))
        held = self._held
        self._builds, self._machines, self._edges, self._held = {}, {}, [], []
        self.changed = trio.Event()
        return changes, held
