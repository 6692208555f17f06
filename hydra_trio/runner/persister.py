"""The persister task: writes what changed in the farm, one transaction per batch.

It waits for the farm's journal to change, lets the tasks woken with it run first (so a new
build and the dispatcher's Assign of it share one commit), takes the changes and the Assigns
held meanwhile (``Journal.take``), turns the changes into rows on the trio thread
(``rows.rows``), commits them in a worker thread, and then releases the held Assigns
(``Farm.release_assigns``): an Assign reaches a builder only once its attempt is durable.
Whatever changes while a batch is written goes into the next (group commit).

The database is a dependency, and may go away for a while.  A batch that fails for such a
reason (``store.is_transient``) is kept and written again, with the changes made since, after
a backoff (``RETRY_BASE`` doubling to ``RETRY_CAP``, with jitter) and a new connection;
meanwhile ``unavailable`` says why writes wait, Assigns stay held and ``flush`` raises
``StoreUnavailable``.  Any other failure (a bug, or a deposed leader's fenced write) ends the
persister, and with it the runner: carrying on would answer clients with promises the runner
cannot keep after a restart.  ``flush`` waiters then get a ``StoreError``.
"""

from __future__ import annotations

import logging
import random
import time

import trio

from hydra_trio.protocol.messages import Assign
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.health import Health, is_disk_full
from hydra_trio.runner.model import Session
from hydra_trio.runner.rows import Rows, rows
from hydra_trio.runner.store import (
    Deposed,
    Store,
    StoreError,
    StoreUnavailable,
    is_transient,
)

log = logging.getLogger("hydra_trio.runner")

#: Backoff between attempts at a failed batch: from RETRY_BASE doubling to RETRY_CAP, with
#: full jitter.  A restarted PostgreSQL is back in about a second: the first retries find it.
RETRY_BASE = 0.1
RETRY_CAP = 5.0


def take_rows(farm: Farm) -> Rows:
    """The rows of everything changed since the last take (for a write without the task);
    Assigns held meanwhile are dropped."""
    changes, _held = farm.journal.take()
    return rows(changes, time.time())


def _merge(older: Rows, newer: Rows) -> Rows:
    """One batch of two: a build or machine in both is written as its newer row."""
    builds = {row[0]: row for row in older[0]}
    builds.update((row[0], row) for row in newer[0])
    machines = {row[0]: row for row in older[2]}
    machines.update((row[0], row) for row in newer[2])
    return (
        sorted(builds.values(), key=lambda row: row[1]),  # submission order, as Journal.take
        older[1] + newer[1],
        list(machines.values()),
    )


class Persister:
    """Writes the farm's changed builds and machines, one transaction per batch."""

    def __init__(self, store: Store, farm: Farm, health: Health | None = None) -> None:
        if not farm.journal.hold_assigns:
            raise ValueError("a persisted farm holds its Assigns: Journal(hold_assigns=True)")
        self.store = store
        self.farm = farm
        self.health = health if health is not None else Health()
        self._requested = 0  # batches asked for
        self._written = 0  # batches committed
        self._written_event = trio.Event()
        self.failure: BaseException | None = None
        self.batches = 0
        #: why writes cannot be made durable now (None: they can).
        self.unavailable: StoreUnavailable | None = None
        #: failed attempts at writing a batch so far.
        self.write_failures = 0
        #: a batch that failed, with its held Assigns: written with the next one.
        self._pending: Rows | None = None
        self._pending_assigns: list[tuple[Session, Assign]] = []
        self._rng = random.Random()

    async def flush(self) -> None:
        """Return once everything changed before this call is committed.  Raises
        ``StoreUnavailable`` if a write fails meanwhile (the change is kept, and written when
        the database is back, but the caller must not say it is durable)."""
        self._requested += 1
        target = self._requested
        failures = self.write_failures
        self.farm.journal.wake()
        while self._written < target:
            if isinstance(self.failure, Deposed):
                raise StoreUnavailable(str(self.failure))
            if self.failure is not None:
                raise StoreError(f"the database write failed: {self.failure}")
            if self.write_failures != failures and self.unavailable is not None:
                raise self.unavailable
            event = self._written_event
            await event.wait()

    def take(self) -> Rows:
        """The rows to write next (made on this thread): a failed batch's, with what changed
        since.  Re-arms the journal's ``changed``."""
        changes, held = self.farm.journal.take()
        self._pending_assigns += held
        taken = rows(changes, time.time())
        if self._pending is not None:
            taken = _merge(self._pending, taken)
            self._pending = None
        return taken

    async def run(self) -> None:
        delay = RETRY_BASE
        while True:
            if self._pending is None:
                await self.farm.journal.changed.wait()
            # One scheduler pass before taking the rows: tasks woken together with this one
            # run first and their changes join this commit.  A POST /builds wakes the
            # dispatcher and this at once; with the dispatcher's Assign in the same commit as
            # the new build, the Assign goes out after one fsync instead of two.
            await trio.lowlevel.checkpoint()
            target = self._requested
            builds, edges, machines = taken = self.take()
            try:
                if builds or edges or machines:
                    await trio.to_thread.run_sync(self.store.save, builds, edges, machines)
            except Exception as exc:
                if not is_transient(exc):
                    self.failure = exc
                    self._written_event.set()
                    raise
                self._pending = taken
                delay = await self._wait_for_database(exc, delay)
                continue
            self._committed(target)
            delay = RETRY_BASE

    def _committed(self, target: int) -> None:
        """A batch is durable: say so, release its Assigns, wake the flushers."""
        if self.unavailable is not None:
            log.warning("%s takes writes again", self.store.description)
            self.unavailable = None
        self.health.ok("database")
        self.batches += 1
        assigns, self._pending_assigns = self._pending_assigns, []
        self.farm.release_assigns(assigns)
        self._written = target
        self._written_event.set()
        self._written_event = trio.Event()

    async def _wait_for_database(self, exc: Exception, delay: float) -> float:
        """After a failed write: say so, wake the flushers, back off, reconnect.  Returns the
        next backoff."""
        full = is_disk_full(exc)
        what = "is full" if full else "cannot be written"
        reason = f"{self.store.description} {what}: {str(exc).strip() or type(exc).__name__}"
        if self.unavailable is None:
            log.error("%s; retrying, writes wait meanwhile", reason)
        self.unavailable = StoreUnavailable(reason, disk_full=full)
        self.health.fault("database", reason, exc)
        self.write_failures += 1
        self._written_event.set()  # flushers waiting on this batch learn it is not durable
        self._written_event = trio.Event()
        await trio.sleep(self._rng.uniform(RETRY_BASE, delay))
        try:
            await trio.to_thread.run_sync(self.store.reconnect)
        except Exception as again:  # still down: the next write fails and says so
            log.debug("reconnecting failed: %s", again)
        return min(RETRY_CAP, delay * 2)

    async def final_save(self) -> None:
        """Write what is left when the runner stops (the task is gone: directly)."""
        if self.failure is not None:
            return
        builds, edges, machines = self.take()
        if builds or edges or machines:
            await trio.to_thread.run_sync(self.store.save, builds, edges, machines)
