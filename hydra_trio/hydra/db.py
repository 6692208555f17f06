"""Every statement hydra-trio runs on Hydra's PostgreSQL database.

Blocking (psycopg): ``HydraDB`` methods run in worker threads, one at a time per connection
(``queue.HydraQueue`` holds a ``trio.Lock`` around them).  Each method is one of the
transactions Hydra's own runner makes (``reference/hydra-db-contract.md`` section 3, cited
by section), with the NOTIFYs it sends inside them, so they are delivered on commit.  A
serialization failure or deadlock retries the whole transaction, as Hydra's runner does.

``Listener`` is a second connection, in autocommit mode, that LISTENs on the channels Hydra's
evaluator and web UI notify.

Long because it is the whole SQL contract with Hydra in one place, one method per transaction
in the order of the contract document, so a reviewer can check it against that document.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
import psycopg
from psycopg import errors as pg_errors

from hydra_trio.hydra.codes import Busy, HydraStatus, build_status
from hydra_trio.hydra.nixsupport import OutputFacts
from hydra_trio.protocol.errors import HydraTrioError

log = logging.getLogger("hydra_trio.hydra")

T = TypeVar("T")

#: The channels Hydra's runner listens on (section 2.1).
CHANNELS = (
    "builds_added",
    "builds_restarted",
    "builds_cancelled",
    "builds_deleted",
    "builds_bumped",
    "jobset_shares_changed",
)
#: hydra-notify splits nothing: a payload over this is sent as several NOTIFYs (section 2.2).
MAX_PAYLOAD = 7000
#: whole-transaction retries on serialization failures and deadlocks.
TX_RETRIES = 10


class HydraDBError(HydraTrioError):
    """Hydra's database cannot be reached (``transient``) or refused a statement."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


@attrs.frozen(kw_only=True)
class QueuedBuild:
    """One unfinished row of ``builds`` with its jobset (section 1.1)."""

    id: int
    jobset_id: int
    project: str
    jobset: str
    job: str
    drv: str
    maxsilent: int | None
    timeout: int | None
    timestamp: int
    global_priority: int
    priority: int


@attrs.frozen(kw_only=True)
class StepRow:
    """A ``buildsteps`` row as the runner writes it at dispatch or on propagation."""

    build: int
    drv: str
    system: str | None
    machine: str
    outputs: tuple[tuple[str, str], ...]


@attrs.frozen(kw_only=True)
class Success:
    """What a successful step leaves in a build's row (section 3.4)."""

    start: int
    stop: int
    size: int
    closure_size: int
    outputs: tuple[tuple[str, str], ...]
    facts: OutputFacts


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, connect_timeout=10, autocommit=autocommit)
    except psycopg.Error as exc:
        raise HydraDBError(f"cannot connect to Hydra's database: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class HydraDB:
    """One connection to Hydra's database, reopened after it breaks."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def transaction(self, body: Callable[[psycopg.Cursor[Any]], T]) -> T:
        """Run ``body`` in one transaction, retried whole on serialization failures."""
        for attempt in range(TX_RETRIES):
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.url)
            conn = self._conn
            try:
                with conn.transaction(), conn.cursor() as cur:
                    return body(cur)
            except (pg_errors.SerializationFailure, pg_errors.DeadlockDetected):
                if attempt == TX_RETRIES - 1:
                    raise
            except psycopg.OperationalError as exc:
                self.close()
                raise HydraDBError(f"Hydra's database: {_one_line(exc)}") from None
            except psycopg.Error as exc:
                raise HydraDBError(
                    f"Hydra's database refused a statement: {_one_line(exc)}", transient=False
                ) from exc
        raise AssertionError("unreachable")

    # -- startup and queue (sections 3.1, 1.1) ------------------------------------------------

    def clear_busy(self, now: int) -> int:
        """Steps a previous runner left busy are aborted (Hydra does this at start and stop).
        ``stopTime`` gets the time of the clearing: the C++ runner wrote NULL, the Rust one 0;
        a real time keeps the web UI's durations sane."""

        def body(cur: psycopg.Cursor[Any]) -> int:
            cur.execute(
                "UPDATE buildsteps SET busy = 0, status = %s, stoptime = %s WHERE busy != 0",
                (int(HydraStatus.ABORTED), now),
            )
            return cur.rowcount

        return self.transaction(body)

    def abort_steps(self, steps: Sequence[tuple[int, int]], now: int) -> int:
        """Abort the given (build, stepnr) rows if still busy (this runner's, at its stop)."""

        def body(cur: psycopg.Cursor[Any]) -> int:
            cur.executemany(
                "UPDATE buildsteps SET busy = 0, status = %s, stoptime = %s"
                " WHERE build = %s AND stepnr = %s AND busy != 0",
                [(int(HydraStatus.ABORTED), now, build, stepnr) for build, stepnr in steps],
            )
            return len(steps)

        return self.transaction(body)

    def unfinished(self) -> list[QueuedBuild]:
        def body(cur: psycopg.Cursor[Any]) -> list[QueuedBuild]:
            cur.execute(
                "SELECT b.id, b.jobset_id, j.project, j.name, b.job, b.drvpath, b.maxsilent,"
                " b.timeout, b.timestamp, b.globalpriority, b.priority"
                " FROM builds b JOIN jobsets j ON b.jobset_id = j.id WHERE b.finished = 0"
                " ORDER BY b.globalpriority DESC, b.id"
            )
            return [
                QueuedBuild(
                    id=r[0],
                    jobset_id=r[1],
                    project=r[2],
                    jobset=r[3],
                    job=r[4],
                    drv=r[5],
                    maxsilent=r[6],
                    timeout=r[7],
                    timestamp=r[8],
                    global_priority=r[9],
                    priority=r[10],
                )
                for r in cur.fetchall()
            ]

        return self.transaction(body)

    def abort_build(self, build: int, now: int) -> None:
        """The build's drv is not in the store (section 1.3.1): aborted, no NOTIFY."""
        self.transaction(
            lambda cur: cur.execute(
                "UPDATE builds SET finished = 1, buildstatus = %s, starttime = %s, stoptime = %s"
                " WHERE id = %s AND finished = 0",
                (int(HydraStatus.ABORTED), now, now, build),
            )
        )

    # -- steps (section 3.2, 3.3) -------------------------------------------------------------

    def start_step(self, row: StepRow, now: int) -> int:
        """Insert the busy row of a dispatched step with its outputs and NOTIFY step_started
        in one transaction, then build_started in its own.  Returns the step number."""

        def body(cur: psycopg.Cursor[Any]) -> int:
            stepnr = _insert_step(
                cur, row, busy=int(Busy.PREPARING), status=None, start=now, stop=None
            )
            _notify(cur, "step_started", f"{row.build}\t{stepnr}")
            return stepnr

        stepnr = self.transaction(body)
        self.transaction(lambda cur: _notify(cur, "build_started", str(row.build)))
        return stepnr

    def set_busy(self, build: int, stepnr: int, busy: Busy) -> None:
        self.transaction(
            lambda cur: cur.execute(
                "UPDATE buildsteps SET busy = %s WHERE build = %s AND stepnr = %s"
                " AND busy != 0 AND status IS NULL",
                (int(busy), build, stepnr),
            )
        )

    def finish_step(
        self,
        build: int,
        stepnr: int,
        status: HydraStatus,
        error: str | None,
        stop: int,
        logfile: str,
        machine: str,
    ) -> None:
        """A dispatched step's attempt ended: its row is final; NOTIFY step_finished."""

        def body(cur: psycopg.Cursor[Any]) -> None:
            cur.execute(
                "UPDATE buildsteps SET busy = 0, status = %s, errormsg = %s, stoptime = %s,"
                " machine = %s WHERE build = %s AND stepnr = %s",
                (int(status), error or None, stop, machine, build, stepnr),
            )
            _notify(cur, "step_finished", f"{build}\t{stepnr}\t{logfile}")

        self.transaction(body)

    # -- builds (sections 3.4, 3.6, 1.3.3) ----------------------------------------------------

    def succeed_builds(
        self, builds: Sequence[tuple[QueuedBuild, bool]], result: Success, notify_inside: bool
    ) -> list[int]:
        """Mark ``builds`` (build, is cached) succeeded in one transaction, in id order;
        those already finished are skipped.  NOTIFY build_finished for each, inside the
        transaction for a cached build (``notify_inside``), else in a second one.  Returns
        the ids marked."""

        def body(cur: psycopg.Cursor[Any]) -> list[int]:
            done = []
            for build, cached in sorted(builds, key=lambda b: b[0].id):
                if _mark_succeeded(cur, build, cached, result):
                    done.append(build.id)
                    if notify_inside:
                        _notify(cur, "build_finished", str(build.id))
            return done

        done = self.transaction(body)
        if done and not notify_inside:

            def notify(cur: psycopg.Cursor[Any]) -> None:
                for build_id in done:
                    _notify(cur, "build_finished", str(build_id))

            self.transaction(notify)
        return done

    def fail_builds(
        self,
        attributed: int | None,
        step: StepRow,
        builds: Iterable[tuple[int, bool]],
        status: HydraStatus,
        error: str | None,
        start: int,
        stop: int,
    ) -> list[int]:
        """A step failed for good (section 3.6): each unfinished build needing it ((id, its
        top drv is this step)) gets a propagated step row and is finished with the status it
        inherits, in one transaction; then one NOTIFY build_finished naming them all."""

        def body(cur: psycopg.Cursor[Any]) -> list[int]:
            failed = []
            for build_id, is_top in sorted(builds):
                cur.execute(
                    "SELECT 1 FROM builds WHERE id = %s AND finished = 0 FOR UPDATE", (build_id,)
                )
                if cur.fetchone() is None:
                    continue
                if build_id != attributed or status in (
                    HydraStatus.CACHED_FAILURE,
                    HydraStatus.UNSUPPORTED,
                ):
                    _insert_step(
                        cur,
                        attrs.evolve(step, build=build_id),
                        busy=0,
                        status=int(status),
                        start=None,
                        stop=None,
                        error=error,
                        propagated_from=attributed if build_id != attributed else None,
                    )
                cur.execute(
                    "UPDATE builds SET finished = 1, buildstatus = %s, starttime = %s,"
                    " stoptime = %s, iscachedbuild = %s, notificationpendingsince = %s"
                    " WHERE id = %s AND finished = 0",
                    (
                        int(build_status(status, is_top)),
                        start,
                        stop,
                        int(status is HydraStatus.CACHED_FAILURE),
                        stop,
                        build_id,
                    ),
                )
                failed.append(build_id)
            return failed

        failed = self.transaction(body)
        if failed:
            first = attributed if attributed is not None else failed[0]
            self.transaction(lambda cur: _notify_finished(cur, first, failed))
        return failed

    def buildstep_count(self, build: int) -> int:
        def body(cur: psycopg.Cursor[Any]) -> int:
            cur.execute("SELECT count(*) FROM buildsteps WHERE build = %s", (build,))
            row = cur.fetchone()
            return int(row[0]) if row else 0

        return self.transaction(body)


def _insert_step(
    cur: psycopg.Cursor[Any],
    row: StepRow,
    *,
    busy: int,
    status: int | None,
    start: int | None,
    stop: int | None,
    error: str | None = None,
    propagated_from: int | None = None,
) -> int:
    """``stepnr = MAX(stepnr) + 1`` for the build, retried on a conflict (section 3.2.3)."""
    while True:
        cur.execute(
            "INSERT INTO buildsteps (build, stepnr, type, drvpath, busy, status, errormsg,"
            " starttime, stoptime, machine, system, propagatedfrom)"
            " SELECT %s, coalesce(max(stepnr), 0) + 1, 0, %s, %s, %s, %s, %s, %s, %s, %s, %s"
            " FROM buildsteps WHERE build = %s"
            " ON CONFLICT DO NOTHING RETURNING stepnr",
            (
                row.build,
                row.drv,
                busy,
                status,
                error,
                start,
                stop,
                row.machine,
                row.system,
                propagated_from,
                row.build,
            ),
        )
        found = cur.fetchone()
        if found is not None:
            stepnr = int(found[0])
            break
    cur.executemany(
        "INSERT INTO buildstepoutputs (build, stepnr, name, path) VALUES (%s, %s, %s, %s)",
        [(row.build, stepnr, name, path) for name, path in row.outputs],
    )
    return stepnr


def _mark_succeeded(
    cur: psycopg.Cursor[Any], build: QueuedBuild, cached: bool, result: Success
) -> bool:
    cur.execute("SELECT 1 FROM builds WHERE id = %s AND finished = 0 FOR UPDATE", (build.id,))
    if cur.fetchone() is None:
        return False
    facts = result.facts
    status = HydraStatus.FAILED_WITH_OUTPUT if facts.failed else HydraStatus.SUCCESS
    cur.execute(
        "UPDATE builds SET finished = 1, buildstatus = %s, starttime = %s, stoptime = %s,"
        " size = %s, closuresize = %s, releasename = %s, iscachedbuild = %s,"
        " notificationpendingsince = %s WHERE id = %s AND finished = 0",
        (
            int(status),
            result.start,
            result.stop,
            result.size,
            result.closure_size,
            facts.release_name,
            int(cached),
            result.stop,
            build.id,
        ),
    )
    cur.executemany(
        "UPDATE buildoutputs SET path = %s WHERE build = %s AND name = %s",
        [(path, build.id, name) for name, path in result.outputs],
    )
    cur.execute("DELETE FROM buildproducts WHERE build = %s", (build.id,))
    cur.executemany(
        "INSERT INTO buildproducts (build, productnr, type, subtype, filesize, sha256hash,"
        " path, name, defaultpath) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [
            (build.id, nr, p.type, p.subtype, p.file_size, p.sha256, p.path, p.name, p.default_path)
            for nr, p in enumerate(facts.products, 1)
        ],
    )
    cur.execute("DELETE FROM buildmetrics WHERE build = %s", (build.id,))
    cur.executemany(
        "INSERT INTO buildmetrics (build, name, unit, value, project, jobset, job, timestamp)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        [
            (
                build.id,
                m.name,
                m.unit,
                m.value,
                build.project,
                build.jobset,
                build.job,
                build.timestamp,
            )
            for m in facts.metrics
        ],
    )
    return True


def _notify(cur: psycopg.Cursor[Any], channel: str, payload: str) -> None:
    cur.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def _notify_finished(cur: psycopg.Cursor[Any], first: int, builds: list[int]) -> None:
    """``build_finished`` naming the attributed build then every build failed with it, split
    into NOTIFYs of at most ``MAX_PAYLOAD`` bytes that each repeat the first id."""
    head = str(first)
    payload = head
    for build_id in builds:
        field = f"\t{build_id}"
        if len(payload) + len(field) > MAX_PAYLOAD:
            _notify(cur, "build_finished", payload)
            payload = head
        payload += field
    _notify(cur, "build_finished", payload)


class Listener:
    """A connection LISTENing on Hydra's queue channels (blocking)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None

    def _open(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            conn = connect(self.url, autocommit=True)
            for channel in CHANNELS:
                conn.execute(f"LISTEN {channel}")
            self._conn = conn
        return self._conn

    def open(self) -> None:
        self._open()

    def wait(self, timeout: float) -> list[str]:
        """The channels notified within ``timeout`` seconds (empty if none)."""
        try:
            conn = self._open()
            return [n.channel for n in conn.notifies(timeout=timeout, stop_after=100)]
        except psycopg.Error as exc:
            self.close()
            raise HydraDBError(f"listening on Hydra's database: {_one_line(exc)}") from None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
