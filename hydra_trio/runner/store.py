"""The durable queue: builds, their edges and known machines, in SQLite or PostgreSQL.

Theory of operation
-------------------
The farm keeps the whole queue in memory and is the only writer of it; the store is its
durable copy.  Every transition marks builds and machines changed (``journal.Journal``); the
``persister.Persister`` task takes the changes, turns them into rows (``rows.rows``, on the
trio thread: cheap), and writes them in **one transaction per batch** on a worker thread
(``Store.save``; group commit: whatever changes while a batch is being written goes into the
next).  Callers that must not answer before their change is durable (``POST /builds``) await
``Persister.flush()``.

The transactions carry the invariants even though only one runner writes:

- A graph is inserted in one transaction with its edges: all of it or none.
- A build row is written with ``INSERT ... ON CONFLICT DO UPDATE ... WHERE``: the update applies
  only if the stored row is not finished and its attempt is not newer than the one written.  So
  committing a result is a compare-and-set on (build id, attempt): a finished build is never
  written again (committed once) and a stale attempt changes nothing.
- Requeueing a lost builder's builds marks them all dirty in one farm step, so they are written
  in the same transaction.

Blocking work (sqlite3, psycopg) runs only in ``trio.to_thread.run_sync``; one connection is
used by one thread at a time (the persister's single writer, or startup).

The database is a dependency, and may go away for a while (PostgreSQL restarted, its network
cut, SQLite's disk full).  A batch that fails for such a reason (``is_transient``) is kept and
written again, with the changes made since, after a backoff (0.1 s doubling to 5 s, with
jitter) and a new connection; meanwhile the runner keeps its builders and answers reads,
``Persister.unavailable`` says why writes wait (HTTP writes answer 503, or 507 for a full
disk), and nothing waiting on durability is told it is durable: Assigns stay held and
``flush`` raises ``StoreUnavailable``.  Any other failure (a bug, or a deposed leader's fenced
write) still ends the persister, and with it the runner.

A SQLite file belongs to one runner: the runner takes an exclusive ``flock`` on
``<file>.lock`` beside it (``lock_database``, whatever state dir the runner has) and refuses
the file if another runner holds it.
"""

from __future__ import annotations

import fcntl
import logging
import sqlite3
import threading
from pathlib import Path
from typing import IO, Any, Protocol

import attrs

from hydra_trio.protocol.errors import HydraTrioError
from hydra_trio.runner.model import Build, Machine
from hydra_trio.runner.rows import (
    build_from_row,
    machine_from_row,
    sql_machine_row,
    sql_row,
)

log = logging.getLogger("hydra_trio.runner")

#: The schema this code writes.  A database with a newer version is refused.
SCHEMA_VERSION = 1

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS builds (
        id TEXT PRIMARY KEY,
        seq BIGINT NOT NULL,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        status TEXT,
        attempts INTEGER NOT NULL,
        infra_failures INTEGER NOT NULL,
        machine_id TEXT,
        hostname TEXT,
        exit_code INTEGER,
        error TEXT NOT NULL,
        submitted_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        outputs TEXT NOT NULL,
        timings TEXT NOT NULL,
        failed_on TEXT NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS builds_unfinished ON builds (state)""",
    """CREATE TABLE IF NOT EXISTS build_deps (
        build_id TEXT NOT NULL,
        dep_id TEXT NOT NULL,
        PRIMARY KEY (build_id, dep_id)
    )""",
    """CREATE TABLE IF NOT EXISTS machines (
        machine_id TEXT PRIMARY KEY,
        hostname TEXT NOT NULL,
        info TEXT NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        succeeded INTEGER NOT NULL,
        failed INTEGER NOT NULL,
        lost INTEGER NOT NULL
    )""",
]

_BUILD_COLUMNS = (
    "id, seq, spec, state, status, attempts, infra_failures, machine_id, hostname, exit_code,"
    " error, submitted_at, started_at, finished_at, outputs, timings, failed_on"
)
_FINISHED = ("succeeded", "failed", "cancelled")
_UPSERT_BUILD = f"""
    INSERT INTO builds ({_BUILD_COLUMNS}) VALUES ({", ".join(["?"] * 17)})
    ON CONFLICT (id) DO UPDATE SET
        state = excluded.state, status = excluded.status, attempts = excluded.attempts,
        infra_failures = excluded.infra_failures, machine_id = excluded.machine_id,
        hostname = excluded.hostname, exit_code = excluded.exit_code, error = excluded.error,
        started_at = excluded.started_at, finished_at = excluded.finished_at,
        outputs = excluded.outputs, timings = excluded.timings, failed_on = excluded.failed_on
    WHERE builds.state NOT IN {_FINISHED!r} AND builds.attempts <= excluded.attempts
"""
_INSERT_EDGE = """
    INSERT INTO build_deps (build_id, dep_id) VALUES (?, ?) ON CONFLICT DO NOTHING
"""
_UPSERT_MACHINE = """
    INSERT INTO machines (machine_id, hostname, info, last_seen, succeeded, failed, lost)
    VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (machine_id) DO UPDATE SET
        hostname = excluded.hostname, info = excluded.info, last_seen = excluded.last_seen,
        succeeded = excluded.succeeded, failed = excluded.failed, lost = excluded.lost
"""


class StoreError(HydraTrioError):
    """The database cannot be used (newer schema, unreachable, locked)."""


class StoreUnavailable(StoreError):
    """A write could not be made durable now: the database is unreachable or full.  The
    runner keeps the change and writes it once the database is back."""

    def __init__(self, reason: str, *, disk_full: bool = False) -> None:
        super().__init__(reason)
        self.disk_full = disk_full


class Deposed(StoreError):
    """A fenced write found another leader's epoch in the lease: this runner no longer leads,
    and the write was not made."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failed write is the database's trouble (worth retrying on a new
    connection), rather than a bug or a refusal."""
    if isinstance(exc, sqlite3.OperationalError | OSError):
        return True  # disk full, I/O error, database locked
    try:
        import psycopg
    except ImportError:  # pragma: no cover - only with PostgreSQL in use
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


@attrs.frozen
class Snapshot:
    builds: list[Build]
    edges: list[tuple[str, str]]
    machines: list[Machine]


# ---------------------------------------------------------------------------------------------
# Backends.  Both speak DB-API 2; they differ in placeholders and in how they connect.


class _Connection(Protocol):
    def cursor(self) -> Any: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


class Store:
    """The queue's tables over one DB-API connection.  Every method blocks: call it from a
    worker thread (``trio.to_thread.run_sync``), one call at a time."""

    placeholder = "?"

    def __init__(self, connection: _Connection, description: str) -> None:
        self._conn = connection
        self.description = description
        self._lock = threading.Lock()  # one thread in the connection at a time, whatever calls
        #: the leader's lease epoch every batch is conditional on (``fence``); None: unfenced.
        self.epoch: int | None = None

    def _sql(self, statement: str) -> str:
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)

    def _transaction(self, work: Any) -> Any:
        with self._lock:
            cursor = self._conn.cursor()
            try:
                result = work(cursor)
                self._conn.commit()
                return result
            except BaseException:
                try:
                    self._conn.rollback()
                except Exception:  # a lost connection cannot roll back: the original counts
                    log.debug("rollback failed", exc_info=True)
                raise

    def migrate(self) -> None:
        """Create or upgrade the schema; refuse a database written by newer code."""

        def work(cursor: Any) -> None:
            for statement in _SCHEMA:
                cursor.execute(statement)
            cursor.execute("SELECT version FROM schema_version")
            rows = cursor.fetchall()
            if not rows:
                cursor.execute(
                    self._sql("INSERT INTO schema_version VALUES (?)"), (SCHEMA_VERSION,)
                )
            elif rows[0][0] > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.description} has schema version {rows[0][0]}; this hydra-trio "
                    f"knows up to {SCHEMA_VERSION}: upgrade hydra-trio, or use another database"
                )

        self._transaction(work)

    def save(
        self,
        builds: list[tuple[Any, ...]],
        edges: list[tuple[str, str]],
        machines: list[tuple[Any, ...]],
    ) -> None:
        """Write one batch in one transaction: build rows (``build_row``; new or changed), the
        edges of new builds, and machine rows (``machine_row``)."""

        def work(cursor: Any) -> None:
            if self.epoch is not None:
                self._check_epoch(cursor, self.epoch)
            if builds:
                cursor.executemany(self._sql(_UPSERT_BUILD), [sql_row(b) for b in builds])
            if edges:
                cursor.executemany(self._sql(_INSERT_EDGE), edges)
            if machines:
                cursor.executemany(
                    self._sql(_UPSERT_MACHINE), [sql_machine_row(m) for m in machines]
                )

        self._transaction(work)

    def load(self) -> Snapshot:
        def work(cursor: Any) -> Snapshot:
            cursor.execute(f"SELECT {_BUILD_COLUMNS} FROM builds ORDER BY seq")
            builds = [build_from_row(row) for row in cursor.fetchall()]
            cursor.execute("SELECT build_id, dep_id FROM build_deps")
            edges = [(a, b) for a, b in cursor.fetchall()]
            cursor.execute(
                "SELECT machine_id, hostname, info, last_seen, succeeded, failed, lost "
                "FROM machines"
            )
            machines = [machine_from_row(row) for row in cursor.fetchall()]
            return Snapshot(builds=builds, edges=edges, machines=machines)

        result: Snapshot = self._transaction(work)
        return result

    def reconnect(self) -> None:
        """Open a new connection after a transient failure (PostgreSQL); SQLite keeps its."""

    def fence(self, epoch: int, lease_timeout: float) -> None:
        """Make every later ``save`` conditional on the leadership lease still being at
        ``epoch`` (see ``runner.leadership``): one that finds another raises ``Deposed``."""
        raise StoreError(f"{self.description} has no leadership lease: only PostgreSQL has")

    def _check_epoch(self, cursor: Any, epoch: int) -> None:
        # FOR SHARE: a takeover (an UPDATE of the row) waits until this transaction ends,
        # so the new leader reads everything committed under the old epoch.
        cursor.execute("SELECT epoch FROM runner_lease WHERE id = 1 FOR SHARE")
        row = cursor.fetchone()
        if row is None or int(row[0]) != epoch:
            current = None if row is None else int(row[0])
            raise Deposed(
                f"this runner's leadership (epoch {epoch}) ended: the lease is at epoch "
                f"{current}; nothing was written"
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SqliteStore(Store):
    placeholder = "?"

    @classmethod
    def open(cls, path: Path) -> SqliteStore:
        """WAL mode with ``synchronous=FULL``: a committed transaction survives a power loss,
        and readers never block the writer."""
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        return cls(conn, f"SQLite database {path}")


def sqlite_path(url: str | None, state_dir: Path) -> Path | None:
    """The file of a SQLite ``--db``; None for PostgreSQL."""
    if url is None:
        return state_dir / "queue.sqlite"
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///") :])
    return None


def lock_database(url: str | None, state_dir: Path) -> IO[bytes] | None:
    """A runner's claim on its SQLite database, whatever its state dir: an exclusive flock
    on ``<file>.lock``, held until the returned file is closed.  Raises ``StoreError`` when
    another runner holds it.  None for PostgreSQL, which runners share (with a lease)."""
    path = sqlite_path(url, state_dir)
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return _lock_file(Path(f"{path}.lock"), path)


def _lock_file(lock_path: Path, database: Path) -> IO[bytes]:
    """Take ``lock_path``'s exclusive flock without waiting (held until the file is closed)."""
    lock = lock_path.open("a+b")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StoreError(
            f"{database} is in use by another queue runner (it holds {lock_path}): a SQLite "
            "database belongs to one runner; stop the other, or share PostgreSQL instead"
        ) from None
    return lock


class PostgresStore(Store):
    placeholder = "%s"

    @classmethod
    def open(cls, url: str) -> PostgresStore:
        try:
            import psycopg
        except ImportError:
            raise StoreError(
                "PostgreSQL needs psycopg: pip install 'hydra-trio[postgresql]'"
            ) from None
        try:
            conn = psycopg.connect(url, connect_timeout=10)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to {_redact(url)}: {exc}") from None
        store = cls(conn, f"PostgreSQL database {_redact(url)}")
        store._url = url
        return store

    _url: str = ""
    #: with a lease (``fence``): the most a transaction may sit idle, so that a leader frozen
    #: inside one cannot hold the lease row (and a takeover) for longer.
    _idle_timeout_ms: int | None = None

    def reconnect(self) -> None:
        import psycopg

        with self._lock:
            try:
                self._conn.close()
            except Exception:
                log.debug("closing a lost connection failed", exc_info=True)
            self._conn = psycopg.connect(self._url, connect_timeout=10)
        if self._idle_timeout_ms is not None:
            self._set_idle_timeout()

    def fence(self, epoch: int, lease_timeout: float) -> None:
        self._idle_timeout_ms = max(1, round(lease_timeout * 1000))
        self._set_idle_timeout()
        self.epoch = epoch

    def _set_idle_timeout(self) -> None:
        self._transaction(
            lambda cursor: cursor.execute(
                f"SET idle_in_transaction_session_timeout = {self._idle_timeout_ms}"
            )
        )


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}@{host}"


def open_store(url: str | None, state_dir: Path) -> Store:
    """``None`` or ``sqlite:///PATH`` -> SQLite; ``postgresql://...`` -> PostgreSQL."""
    path = sqlite_path(url, state_dir)
    if path is not None:
        return SqliteStore.open(path)
    assert url is not None
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore.open(url)
    raise StoreError(f"unsupported --db URL {_redact(url)!r}: use sqlite:///PATH or postgresql://")
