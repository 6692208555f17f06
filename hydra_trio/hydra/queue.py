"""Hydra's queue, built by the farm, written back the way Hydra's own runner writes it.

Theory of operation
-------------------
*Reading.*  ``HydraQueue`` LISTENs on the channels Hydra's evaluator and web UI notify and,
on each notification (and once at start), reads every unfinished row of ``builds``.  A new
build's ``.drv`` closure is planned as any ``drv`` submission (``runner.nix.plan``): each
derivation with an output missing from the runner's store is a farm build (a *step*), and a
step already queued for another build is shared, not queued twice.  A build with nothing to
build is finished at once as a cached build; one whose ``.drv`` is not in the store is
aborted.  A build that left the unfinished set (cancelled, deleted) is forgotten, and the
steps this runner queued that no remaining build needs are cancelled in the farm (a running
one is aborted on its builder).  A bump raises the priority of the build's queued steps.

*Writing.*  The farm calls ``observe`` inside each transition of a Nix build's attempt
(assigned, phase, requeued, finished).  It only records a snapshot in ``_events``: the farm's
transitions are synchronous and the database is not, so one writer task applies the events
in order, each as the transactions Hydra's runner makes (``db.HydraDB``).  The list is
unbounded because the farm cannot wait; it holds one small record per transition, and
transitions are paced by builders.  Which Hydra builds a step is for is read from the farm's
graph when the event is applied: the builds whose top-level step is that farm build or
depends on it.

*Restarts.*  Hydra's rows are the durable state: at start the runner aborts the busy steps a
previous runner left (as Hydra's does) and re-reads the queue; the farm restores its own
queue, and planning reuses its unfinished steps by derivation.

Past 400 lines because reading, writing and restarts share ``HydraQueue``'s one map of Hydra
builds to farm steps; splitting them would pass that map between three modules.  The SQL is in
``db``, the ``nix-support`` files in ``nixsupport``.
"""

from __future__ import annotations

import collections
import getpass
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import attrs
import trio

from hydra_trio.hydra.codes import HydraStatus, busy_of, log_path, step_status
from hydra_trio.hydra.config import HydraConfig
from hydra_trio.hydra.db import HydraDB, HydraDBError, Listener, QueuedBuild, StepRow, Success
from hydra_trio.hydra.nixsupport import read_outputs
from hydra_trio.nixstore import NixError, NixStore
from hydra_trio.protocol.messages import BuildStatus, Phase
from hydra_trio.runner import nix
from hydra_trio.runner.blobs import Storage
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.model import Build, BuildState
from hydra_trio.runner.specs import DrvRequest, SpecError
from hydra_trio.system import lock_dir

log = logging.getLogger("hydra_trio.hydra")

T = TypeVar("T")

#: Seconds between retries of a database write or read that failed (capped backoff).
RETRY_MIN, RETRY_MAX = 1.0, 30.0
#: Tries of an event whose write the database refuses (not: cannot be reached).
REFUSALS = 3


@attrs.frozen(kw_only=True)
class Event:
    """A snapshot of one Nix build's transition, taken inside the farm's transition."""

    farm_id: str
    #: ``assigned``, ``phase``, ``requeued`` or ``finished``.
    kind: str
    attempt: int
    state: BuildState
    status: BuildStatus | None
    error: str
    hostname: str
    phase: Phase | None
    time: int
    drv: str
    system: str
    outputs: tuple[tuple[str, str], ...]


@attrs.define
class OpenStep:
    """The ``buildsteps`` row of a farm build's running attempt."""

    build: int
    stepnr: int
    attempt: int
    start: int
    machine: str
    log: Path


def _snapshot(build: Build) -> Event:
    if build.state is BuildState.RUNNING:
        kind = "assigned" if build.phase is None else "phase"
    elif build.state is BuildState.QUEUED:
        kind = "requeued"
    else:
        kind = "finished"
    return Event(
        farm_id=build.id,
        kind=kind,
        attempt=build.attempts,
        state=build.state,
        status=build.status,
        error=build.error,
        hostname=build.hostname or "",
        phase=build.phase,
        time=int(time.time()),
        drv=build.spec.drv,
        system=build.spec.system,
        outputs=build.spec.drv_outputs,
    )


def _link_log(target: Path, link: Path) -> None:
    """While a step runs, Hydra's log path is a link to the farm's log of the attempt, so
    the web UI shows it live."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def _copy_log(source: Path, target: Path) -> None:
    """When the attempt ends, the link becomes a copy (the farm's log may go away; and
    hydra-notify compresses the file in place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as out:
            if source.exists():
                with source.open("rb") as f:
                    shutil.copyfileobj(f, out)
        tmp.chmod(0o644)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def gc_roots_dir(store: NixStore) -> Path:
    """Where Hydra's runner keeps its GC roots: ``<nix state dir>/gcroots/per-user/<user>/
    hydra-roots`` (the state dir of a chroot store is under its root)."""
    state = Path("/nix/var/nix") if store.root is None else store.root / "nix/var/nix"
    return state / "gcroots" / "per-user" / getpass.getuser() / "hydra-roots"


def _add_roots(roots: Path, paths: list[str]) -> None:
    """One symbolic link per store path, named after it (as Hydra's runner makes them)."""
    roots.mkdir(parents=True, exist_ok=True)
    for path in paths:
        link = roots / path.rsplit("/", 1)[-1]
        if not link.is_symlink():
            link.symlink_to(path)


def farm_priority(build: QueuedBuild) -> int:
    """Hydra's order as one farm priority: global priority (a bump is ``time()``) first,
    then the build's own priority (clamped to 0..999)."""
    return build.global_priority * 1000 + max(0, min(999, build.priority))


class HydraQueue:
    """Serves Hydra's queue from ``farm``, keeping Hydra's tables in step (see the module's
    docstring).  Owns its two database connections and the lock in Hydra's data dir."""

    def __init__(self, config: HydraConfig, farm: Farm, storage: Storage) -> None:
        self.config = config
        self.farm = farm
        self.storage = storage
        self.db = HydraDB(config.db)
        self.listener = Listener(config.db)
        self._db_lock = trio.Lock()
        #: unfinished Hydra builds this runner serves, by id.
        self.builds: dict[int, QueuedBuild] = {}
        #: the farm build of each Hydra build's top-level derivation, and the reverse.
        self.top: dict[int, str] = {}
        self._by_top: dict[str, set[int]] = collections.defaultdict(set)
        #: farm builds queued for Hydra builds (only these are cancelled when unneeded).
        self._ours: set[str] = set()
        self._open: dict[str, OpenStep] = {}
        self._events: collections.deque[Event] = collections.deque()
        self._events_changed = trio.Event()
        #: Hydra builds finished since the current re-read began (its rows may be stale).
        self._finished_recently: set[int] = set()
        self._reread_wanted = trio.Event()
        self.rereads = 0
        #: unfinished Nix builds the farm restored from a previous runner: they become ours
        #: (cancellable) when a Hydra build turns out to need them.
        self._restored = {b.id for b in farm.builds.values() if b.spec.drv and not b.state.finished}
        #: during a re-read: the unfinished farm build of each derivation (made once per
        #: re-read, not once per build: a first read of a big queue would be quadratic).
        self._unfinished_by_drv: dict[str, str] = {}
        self._roots = gc_roots_dir(storage.nix)
        farm.observers.append(self.observe)

    # -- farm side ----------------------------------------------------------------------------

    def observe(self, build: Build) -> None:
        """The farm's observer: record a Nix build's transition for the writer."""
        if build.spec.drv:
            self._events.append(_snapshot(build))
            self._events_changed.set()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._db_lock:
            return await trio.to_thread.run_sync(fn, *args)

    # -- the daemon ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take Hydra's runner lock, abort the steps a previous runner left busy, then serve
        the queue until cancelled; on the way out, the steps it has busy are aborted (Hydra's
        runner aborts every busy row on SIGTERM; with hot standbys that could be the new
        leader's).  Raises ``HydraDBError`` if the database is unreachable at
        start, or another runner holds the lock."""
        lock = await trio.to_thread.run_sync(self._lock)
        try:
            cleared = await self._call(self.db.clear_busy, int(time.time()))
            if cleared:
                log.info("aborted %d steps a previous queue runner left busy", cleared)
            await trio.to_thread.run_sync(self.listener.open)
            task_status.started()
            async with trio.open_nursery() as nursery:
                await self._reread_until_done()
                nursery.start_soon(self._write)
                nursery.start_soon(self._listen)
                nursery.start_soon(self._rereads)
        finally:
            # Only this runner's own busy rows: with hot standbys a deposed leader stops
            # while the new leader's steps are busy, and must not abort those.
            with trio.move_on_after(10, shield=True):
                mine = [(step.build, step.stepnr) for step in self._open.values()]
                try:
                    if mine:
                        await self._call(self.db.abort_steps, mine, int(time.time()))
                except HydraDBError as exc:
                    log.warning("could not abort the busy steps at shutdown: %s", exc)
                await trio.to_thread.run_sync(self.listener.close)
                await trio.to_thread.run_sync(self.db.close)
                lock.close()

    def _lock(self) -> IO[bytes]:
        lock = lock_dir(self.config.data / "queue-runner")
        if lock is None:
            raise HydraDBError(
                f"another queue runner holds {self.config.data / 'queue-runner' / 'lock'}: "
                "stop hydra-queue-runner (or the other hydra-trio) first"
            )
        return lock

    async def _listen(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                channels = await trio.to_thread.run_sync(self.listener.wait, 1.0)
            except HydraDBError as exc:
                log.warning("%s; retrying in %.0f s", exc, delay)
                await trio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                self._reread_wanted.set()  # notifications may have been missed meanwhile
                continue
            delay = RETRY_MIN
            if channels:
                log.debug("notified on %s", ", ".join(sorted(set(channels))))
                self._reread_wanted.set()

    async def _rereads(self) -> None:
        while True:
            await self._reread_wanted.wait()
            self._reread_wanted = trio.Event()
            await self._reread_until_done()

    async def _reread_until_done(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                await self.reread()
                return
            except HydraDBError as exc:
                log.warning("reading Hydra's queue: %s; retrying in %.0f s", exc, delay)
                await trio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)

    # -- reading the queue --------------------------------------------------------------------

    async def reread(self) -> None:
        """Read the unfinished builds: add new ones, forget those that left (and cancel the
        steps no build needs any more), raise the priorities of bumped ones."""
        self._finished_recently = set()
        rows = await self._call(self.db.unfinished)
        self.rereads += 1
        unfinished = {row.id for row in rows}
        gone = [build_id for build_id in self.builds if build_id not in unfinished]
        for build_id in gone:
            log.info("Hydra build %d left the queue (cancelled, deleted or restarted)", build_id)
            self._forget(build_id)
        if gone:
            self._cancel_unneeded()
        added = 0
        self._unfinished_by_drv = {
            b.spec.drv: b.id
            for b in self.farm.builds.values()
            if b.spec.drv and not b.state.finished
        }
        for row in rows:
            known = self.builds.get(row.id)
            if known is not None:
                if farm_priority(row) > farm_priority(known):
                    self.builds[row.id] = row
                    self._raise(self.top[row.id], farm_priority(row))
            elif row.id not in self._finished_recently:
                await self._add(row)
                added += 1
        if added:
            log.info("%d new Hydra builds read (%d unfinished)", added, len(self.builds))

    async def _add(self, row: QueuedBuild) -> None:
        existing = self._unfinished_by_drv.get(row.drv)
        if existing is not None:
            # Its top-level drv is a step already queued (for another build, or natively):
            # nothing to plan, and no Nix process to run (an evaluation's jobs are mostly
            # steps of one another).
            self._raise(existing, farm_priority(row))
            self._register(row, existing)
            return
        now = int(time.time())
        store = self.storage.nix
        try:
            valid = await store.is_valid(row.drv)
        except NixError as exc:
            log.warning("Hydra build %d: the runner's Nix store: %s", row.id, exc)
            return
        if not valid:
            log.warning("Hydra build %d: %s is not in the store: aborted", row.id, row.drv)
            await self._call(self.db.abort_build, row.id, now)
            return
        request = DrvRequest(
            drv=row.drv,
            priority=farm_priority(row),
            timeout=float(row.timeout or self.config.default_timeout),
            max_silent=float(row.maxsilent or self.config.default_max_silent),
        )
        try:
            plan = await nix.plan(
                store,
                self.storage.blobs,
                request,
                self._unfinished_by_drv.get,
                self.storage.nix_exports,
            )
        except (SpecError, NixError) as exc:
            log.warning("Hydra build %d: %s: aborted", row.id, exc)
            await self._call(self.db.abort_build, row.id, now)
            return
        if row.id in self.builds:  # a concurrent re-read got there first
            return
        if not plan.specs and plan.existing is None:
            await self._cached(row, plan.outputs)
            return
        if plan.specs:
            index = {name: i for i, name in enumerate(plan.names)}
            created = self.farm.submit_graph(plan.specs, trio.current_time(), index.get)
            self._ours.update(b.id for b in created)
            self._unfinished_by_drv.update((b.spec.drv, b.id) for b in created)
            top = created[-1].id  # the plan lists every step after its inputs
        else:
            assert plan.existing is not None
            top = plan.existing
            self._raise(top, request.priority)
        self._register(row, top)

    def _register(self, row: QueuedBuild, top: str) -> None:
        self.builds[row.id] = row
        self.top[row.id] = top
        self._by_top[top].add(row.id)
        if self._restored:
            self._adopt(top)
        top_build = self.farm.builds[top]
        if top_build.state.finished:  # it ended while this build was being planned
            self.observe(top_build)

    async def _cached(self, row: QueuedBuild, outputs: tuple[tuple[str, str], ...]) -> None:
        now = int(time.time())
        try:
            result = await self._success(outputs, now, now)
        except NixError as exc:
            log.warning("Hydra build %d: reading its outputs: %s", row.id, exc)
            return
        await self._call(self.db.succeed_builds, [(row, True)], result, True)
        log.info("Hydra build %d: cached (its outputs are valid)", row.id)

    async def _success(
        self, outputs: tuple[tuple[str, str], ...], start: int, stop: int
    ) -> Success:
        store = self.storage.nix
        paths = [path for _, path in outputs]
        sizes = await store.nar_sizes(paths)
        closure = 0
        for path in paths:  # the Rust runner's sum of per-output closures
            closure += sum(await store.nar_sizes(await store.requisites([path])))
        facts = await trio.to_thread.run_sync(read_outputs, list(outputs), store.real_path)
        return Success(
            start=start,
            stop=stop,
            size=sum(sizes),
            closure_size=closure,
            outputs=outputs,
            facts=facts,
        )

    def _forget(self, build_id: int) -> None:
        self.builds.pop(build_id, None)
        self._finished_recently.add(build_id)
        top = self.top.pop(build_id, None)
        if top is not None:
            self._by_top[top].discard(build_id)
            if not self._by_top[top]:
                del self._by_top[top]

    def _cancel_unneeded(self) -> None:
        """Cancel the farm builds this runner queued that no unfinished Hydra build needs
        (a running one is aborted on its builder)."""
        now = trio.current_time()
        for farm_id in list(self._ours):
            build = self.farm.builds.get(farm_id)
            if build is None or build.state.finished:
                self._ours.discard(farm_id)
            elif not self.needing(farm_id):
                log.info("step %s: no Hydra build needs it any more: cancelled", farm_id)
                self._ours.discard(farm_id)
                self.farm.cancel(farm_id, now)

    def _adopt(self, top: str) -> None:
        """Restored farm builds a Hydra build needs are this runner's to cancel."""
        todo = [top]
        while todo:
            farm_id = todo.pop()
            if farm_id in self._restored:
                self._restored.discard(farm_id)
                self._ours.add(farm_id)
            build = self.farm.builds.get(farm_id)
            if build is not None:
                todo.extend(d for d in build.spec.after if d in self._restored)

    def _raise(self, top: str, priority: int) -> None:
        """Raise the priority of a step and every unfinished step it needs."""
        seen = {top}
        todo = [top]
        while todo:
            build = self.farm.builds.get(todo.pop())
            if build is None or build.state.finished:
                continue
            self.farm.raise_priority(build.id, priority)
            for dep in build.spec.after:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)

    def needing(self, farm_id: str) -> set[int]:
        """The unfinished Hydra builds that need the farm build ``farm_id``: those whose top
        step is it or depends on it."""
        found: set[int] = set()
        seen = {farm_id}
        todo = [farm_id]
        while todo:
            current = todo.pop()
            found.update(self._by_top.get(current, ()))
            build = self.farm.builds.get(current)
            if build is None:
                continue
            for dependent in build.dependents:
                if dependent not in seen:
                    seen.add(dependent)
                    todo.append(dependent)
        return found

    def _attributed(self, farm_id: str, needing: set[int]) -> int:
        """Hydra's choice: a build whose top-level drv is the step, else any (the lowest id)."""
        direct = self._by_top.get(farm_id, set()) & needing
        return min(direct or needing)

    # -- writing ------------------------------------------------------------------------------

    async def _write(self) -> None:
        """Apply the farm's events in order, each once it could be written."""
        delay = RETRY_MIN
        refused = 0
        while True:
            while not self._events:
                self._events_changed = trio.Event()
                await self._events_changed.wait()
            event = self._events[0]
            try:
                await self.apply(event)
            except (HydraDBError, NixError) as exc:
                # The database being away delays Hydra's view and is retried until it is
                # back; a statement it refuses (or a store path Nix cannot read) would be
                # refused forever, so that one event is given up after a few tries.
                refused += not (isinstance(exc, HydraDBError) and exc.transient)
                if refused >= REFUSALS:
                    log.error("gave up writing %s of step %s: %s", event.kind, event.farm_id, exc)
                    self._events.popleft()
                    refused = 0
                    continue
                log.warning(
                    "writing %s of step %s to Hydra's database: %s; retrying in %.0f s",
                    event.kind,
                    event.farm_id,
                    exc,
                    delay,
                )
                await trio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            delay = RETRY_MIN
            refused = 0
            self._events.popleft()

    async def apply(self, event: Event) -> None:
        if event.kind == "assigned":
            await self._assigned(event)
        elif event.kind == "phase":
            step = self._open.get(event.farm_id)
            if step is not None and step.attempt == event.attempt:
                await self._call(self.db.set_busy, step.build, step.stepnr, busy_of(event.phase))
        else:
            step = self._open.get(event.farm_id)
            if step is not None and step.attempt == event.attempt:
                await self._end_step(event, step)
                del self._open[event.farm_id]
            if event.kind == "finished":
                if event.state is BuildState.SUCCEEDED:
                    await self._succeeded(event, step)
                elif event.status is BuildStatus.DEPENDENCY_FAILED:
                    await self._dependency_failed(event)
                else:
                    await self._failed(event, step)

    async def _assigned(self, event: Event) -> None:
        needing = self.needing(event.farm_id)
        if not needing:
            return
        build_id = self._attributed(event.farm_id, needing)
        row = StepRow(
            build=build_id,
            drv=event.drv,
            system=event.system,
            machine=event.hostname,
            outputs=event.outputs,
        )
        stepnr = await self._call(self.db.start_step, row, event.time)
        logfile = log_path(self.config.data, event.drv)
        await trio.to_thread.run_sync(
            _link_log, self.storage.logs.path(event.farm_id, event.attempt).absolute(), logfile
        )
        self._open[event.farm_id] = OpenStep(
            build=build_id,
            stepnr=stepnr,
            attempt=event.attempt,
            start=event.time,
            machine=event.hostname,
            log=logfile,
        )

    async def _end_step(self, event: Event, step: OpenStep) -> None:
        await trio.to_thread.run_sync(
            _copy_log, self.storage.logs.path(event.farm_id, event.attempt), step.log
        )
        await self._call(
            self.db.finish_step,
            step.build,
            step.stepnr,
            step_status(event.status),
            event.error,
            max(event.time, step.start),
            str(step.log),
            step.machine,
        )

    async def _succeeded(self, event: Event, step: OpenStep | None) -> None:
        if step is not None:  # a step built for Hydra: its outputs are GC roots, as in Hydra
            try:
                await trio.to_thread.run_sync(
                    _add_roots, self._roots, [path for _, path in event.outputs]
                )
            except OSError as exc:
                log.warning("cannot add GC roots for %s in %s: %s", event.drv, self._roots, exc)
        direct = sorted(self._by_top.get(event.farm_id, ()))
        if not direct:
            return
        start = step.start if step is not None else event.time
        result = await self._success(event.outputs, start, max(start, event.time))
        attributed = step.build if step is not None else None
        pairs = [(self.builds[i], i != attributed) for i in direct]
        done = await self._call(self.db.succeed_builds, pairs, result, False)
        for build_id in direct:
            self._forget(build_id)
        log.info("Hydra builds %s succeeded", ", ".join(map(str, done)) or "(none left)")

    async def _failed(self, event: Event, step: OpenStep | None) -> None:
        needing = self.needing(event.farm_id)
        if not needing:
            return
        status = step_status(event.status)
        attributed = step.build if step is not None else None
        row = StepRow(
            build=attributed if attributed is not None else min(needing),
            drv=event.drv,
            system=event.system,
            machine=event.hostname,
            outputs=event.outputs,
        )
        start = step.start if step is not None else event.time
        builds = [(i, self.builds[i].drv == event.drv) for i in needing]
        failed = await self._call(
            self.db.fail_builds, attributed, row, builds, status, event.error, start, event.time
        )
        for build_id in needing:
            self._forget(build_id)
        log.info(
            "step %s failed (%s): Hydra builds %s finished",
            event.drv,
            status.name.lower(),
            ", ".join(map(str, failed)) or "(none left)",
        )

    async def _dependency_failed(self, event: Event) -> None:
        """A top-level step whose dependency had failed before the Hydra build was read (the
        failure itself was written for the builds known then): fail the builds on it."""
        direct = self._by_top.get(event.farm_id, set()) & set(self.builds)
        if not direct:
            return
        root = self._root_failure(event.farm_id)
        status = step_status(root.status) if root is not None else HydraStatus.ABORTED
        row = StepRow(
            build=min(direct),
            drv=root.spec.drv if root is not None else event.drv,
            system=root.spec.system if root is not None else event.system,
            machine=(root.hostname or "") if root is not None else "",
            outputs=root.spec.drv_outputs if root is not None else event.outputs,
        )
        builds = [(i, False) for i in direct]
        await self._call(
            self.db.fail_builds, None, row, builds, status, event.error, event.time, event.time
        )
        for build_id in direct:
            self._forget(build_id)

    def _root_failure(self, farm_id: str) -> Build | None:
        """The failed build at the bottom of a chain of ``dependency-failed`` ones."""
        current = self.farm.builds.get(farm_id)
        seen = set()
        while current is not None and current.status is BuildStatus.DEPENDENCY_FAILED:
            seen.add(current.id)
            deps = [
                self.farm.builds[d]
                for d in current.spec.after
                if d in self.farm.builds and d not in seen
            ]
            failed = [d for d in deps if d.state.finished and d.state is not BuildState.SUCCEEDED]
            current = failed[0] if failed else None
        return current
