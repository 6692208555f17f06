"""Leadership among runners sharing one PostgreSQL database: a lease with a fencing epoch.

Theory of operation
-------------------
The database holds one row, ``runner_lease``: the leader's ``epoch``, who holds it (its
builder address and HTTP URL, for the standbys to point at) and ``expires_at``, on the
database's clock (so the runners' clocks never matter).

- **Taking the lease** is one ``UPDATE ... SET epoch = epoch + 1 ... WHERE expires_at < now()``:
  at most one runner wins it per epoch, and the epoch only grows.
- **Holding it**: the leader renews it about every second (``renew_interval``) with ``UPDATE ...
  WHERE epoch = <mine>``.  It counts its lease as valid until the time it *sent* its last
  successful renewal plus ``lease_timeout``, on its own monotonic clock: earlier than the
  database's expiry, never later.  When that passes without a renewal (the database is
  unreachable, or the process was frozen), or a renewal finds another epoch, it steps down
  at once: its term is cancelled, its builders are disconnected, it answers as a standby.
- **Fencing**: a lease alone cannot stop a leader that was frozen past it and wakes up
  believing it still leads (Kleppmann, "How to do distributed locking").  Every transaction
  the leader's store commits first reads the lease row ``FOR SHARE`` and aborts unless the
  epoch is still its own (``Store.fence``), so a deposed leader can never commit a result, an
  attempt number (no ``Assign`` leaves before its attempt is committed) or a submission.  The
  share lock also makes a takeover wait for a leader's transaction in flight, so the new
  leader's first read of the queue sees everything the old one committed.  A leader frozen
  *inside* a transaction cannot hold the row forever: its connection has
  ``idle_in_transaction_session_timeout`` = the lease timeout.
- **Standby**: a runner without the lease polls for it every ``renew_interval`` (and learns
  who leads).  Its builder port answers every hello with ``Reject`` code ``standby`` naming
  the leader (``refuse_as_standby``); its HTTP API answers as ``runner.front`` says.

A SQLite database needs none of this: it belongs to one runner (``store.lock_database``).

All database work is blocking and runs in worker threads, on a connection of its own (the
lease is never renewed behind a large batch of the persister's).
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from typing import Any

import attrs
import trio

from hydra_trio import auth
from hydra_trio.net import ConnectionLost, FramedChannel
from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.errors import ProtocolError
from hydra_trio.protocol.messages import PROTOCOL_VERSION, Challenge, Reject, RejectCode, Role
from hydra_trio.runner.handshake import accept_tls
from hydra_trio.runner.session import SessionConfig
from hydra_trio.runner.store import StoreError, _redact

log = logging.getLogger("hydra_trio.runner")

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS runner_lease (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        epoch BIGINT NOT NULL,
        holder TEXT NOT NULL,
        builders TEXT NOT NULL,
        http TEXT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    )""",
    """INSERT INTO runner_lease (id, epoch, holder, builders, http, expires_at)
       VALUES (1, 0, '', '', '', 'epoch') ON CONFLICT (id) DO NOTHING""",
]
_ACQUIRE = """
    UPDATE runner_lease SET epoch = epoch + 1, holder = %s, builders = %s, http = %s,
        expires_at = clock_timestamp() + make_interval(secs => %s)
    WHERE id = 1 AND (expires_at < clock_timestamp() OR holder = '')
    RETURNING epoch
"""
_RENEW = """
    UPDATE runner_lease SET expires_at = clock_timestamp() + make_interval(secs => %s)
    WHERE id = 1 AND epoch = %s RETURNING epoch
"""
_RELEASE = """
    UPDATE runner_lease SET holder = '', expires_at = clock_timestamp() WHERE id = 1 AND epoch = %s
"""
_READ = """
    SELECT epoch, holder, builders, http, expires_at > clock_timestamp() FROM runner_lease
    WHERE id = 1
"""


def renew_interval(lease_timeout: float) -> float:
    """How often the leader renews (and a standby polls): about every second, and at least
    three times per lease timeout."""
    return min(1.0, lease_timeout / 3)


@attrs.frozen
class LeaseHolder:
    """What the lease row says about who leads."""

    epoch: int
    holder: str
    #: the leader's builder address, ``HOST:PORT``.
    builders: str
    #: the leader's HTTP URL.
    http: str
    #: the lease has not expired (on the database's clock).
    live: bool


class LeaseStore:
    """The lease row, on a PostgreSQL connection of its own.  Every method blocks (call it in
    a worker thread); they take turns (a call abandoned by its caller's deadline may still
    run in its thread when the next one starts, and two threads sharing the connection could
    each open one and drop the other's unclosed)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None
        self._turn = threading.RLock()

    def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            try:
                # autocommit: each statement is its own transaction, and a lock it cannot
                # get quickly (a leader's batch in flight holds the row) fails it, not waits.
                self._conn = psycopg.connect(
                    self.url,
                    connect_timeout=5,
                    autocommit=True,
                    options="-c lock_timeout=2000 -c statement_timeout=5000",
                )
            except psycopg.Error as exc:
                raise StoreError(f"cannot connect to {_redact(self.url)}: {exc}") from None
        return self._conn

    def _execute(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with self._turn:
            try:
                cursor = self._connection().execute(statement, args)
                return list(cursor.fetchall()) if cursor.description else []
            except psycopg.Error:
                self.close()  # a new connection next time
                raise

    def migrate(self) -> None:
        for statement in _SCHEMA:
            self._execute(statement)

    def acquire(self, holder: str, builders: str, http: str, timeout: float) -> int | None:
        """Take the lease if it has lapsed; returns the new epoch, or None."""
        rows = self._execute(_ACQUIRE, (holder, builders, http, timeout))
        return int(rows[0][0]) if rows else None

    def renew(self, epoch: int, timeout: float) -> bool:
        """Extend the lease of ``epoch``; False when another runner holds it now."""
        return bool(self._execute(_RENEW, (timeout, epoch)))

    def release(self, epoch: int) -> None:
        """Let the lease lapse now (a leader stopping on purpose hands over at once)."""
        self._execute(_RELEASE, (epoch,))

    def read(self) -> LeaseHolder:
        epoch, holder, builders, http, live = self._execute(_READ)[0]
        return LeaseHolder(int(epoch), holder, builders, http, bool(live))

    def close(self) -> None:
        with self._turn:
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception:
                    log.debug("closing the lease connection failed", exc_info=True)
                self._conn = None


@attrs.define(eq=False)
class Leadership:
    """This runner's side of the lease: campaign while standing by, renew while leading."""

    lease: LeaseStore
    lease_timeout: float
    #: where this runner serves, for the standbys to point builders and clients at.
    builders: str = ""
    http: str = ""
    holder: str = attrs.field(factory=lambda: uuid.uuid4().hex[:12])
    #: the epoch this runner leads under, None while it stands by.
    epoch: int | None = None
    #: until when (``trio.current_time()``) the lease is surely still this runner's.
    valid_until: float = -math.inf
    #: the last known leader (another runner, while this one stands by).
    leader: LeaseHolder | None = None
    terms: int = 0

    @property
    def interval(self) -> float:
        return renew_interval(self.lease_timeout)

    def leads(self) -> bool:
        """Whether this runner may act as the leader right now."""
        return self.epoch is not None and trio.current_time() < self.valid_until

    def standby_info(self) -> dict[str, Any] | None:
        """For ``runner.front``: None while leading, else whom to ask instead."""
        if self.leads():
            return None
        leader = self.leader
        if leader is None or not leader.live or leader.holder in ("", self.holder):
            return {"leader": None}
        return {"leader": leader.http or None, "leaderBuilders": leader.builders or None}

    def leader_builders(self) -> str:
        leader = self.leader
        if leader is None or not leader.live or leader.holder == self.holder:
            return ""
        return leader.builders

    async def campaign(self) -> int:
        """Stand by until this runner takes the lease; returns its epoch."""
        announced = None
        while True:
            started = trio.current_time()
            try:
                epoch = await trio.to_thread.run_sync(
                    self.lease.acquire, self.holder, self.builders, self.http, self.lease_timeout
                )
                if epoch is None:
                    self.leader = await trio.to_thread.run_sync(self.lease.read)
            except Exception as exc:  # the database is away: keep standing by
                epoch = None
                if announced != "error":
                    log.warning("standby: cannot reach the lease: %s", exc)
                    announced = "error"
            if epoch is not None:
                self.epoch = epoch
                self.valid_until = started + self.lease_timeout
                self.terms += 1
                self.leader = LeaseHolder(epoch, self.holder, self.builders, self.http, True)
                log.info("took the leadership lease: epoch %d", epoch)
                return epoch
            leader = self.leader
            if leader is not None and announced != leader.holder:
                announced = leader.holder
                log.info(
                    "standing by: the leader is %s (epoch %d, builders %s)",
                    leader.http or leader.holder,
                    leader.epoch,
                    leader.builders,
                )
            await trio.sleep(self.interval)

    async def hold(self) -> str:
        """Renew the lease until it is lost; returns why it was lost.  Never returns while
        the lease is held: cancel it to stop leading (then ``release``)."""
        epoch = self.epoch
        assert epoch is not None
        while True:
            await trio.sleep_until(min(self.valid_until, trio.current_time() + self.interval))
            sent = trio.current_time()
            if sent >= self.valid_until:
                return self._lost("the lease lapsed before it could be renewed")
            with trio.move_on_at(self.valid_until):
                try:
                    renewed = await trio.to_thread.run_sync(
                        self.lease.renew, epoch, self.lease_timeout, abandon_on_cancel=True
                    )
                except Exception as exc:
                    log.warning("could not renew the leadership lease: %s", exc)
                    continue
                if not renewed:
                    return self._lost("another runner took the lease over")
                self.valid_until = sent + self.lease_timeout
            if trio.current_time() >= self.valid_until:
                return self._lost("the lease lapsed before it could be renewed")

    def _lost(self, why: str) -> str:
        log.error("lost the leadership (epoch %s): %s; standing by", self.epoch, why)
        self.epoch = None
        self.valid_until = -math.inf
        return why

    async def release(self) -> None:
        """Stop leading and let the lease lapse now (a graceful stop hands over at once)."""
        epoch, self.epoch = self.epoch, None
        self.valid_until = -math.inf
        if epoch is None:
            return
        with trio.move_on_after(2, shield=True):
            try:
                await trio.to_thread.run_sync(self.lease.release, epoch, abandon_on_cancel=True)
            except Exception as exc:
                log.warning("could not release the leadership lease: %s", exc)


async def refuse_as_standby(config: SessionConfig, leader: str, stream: trio.abc.Stream) -> None:
    """Answer one builder connection of a standby: challenge, hello, ``Reject`` code
    ``standby`` naming ``leader``, close.  Owns and closes ``stream``; bounded by the
    handshake timeout."""
    conn = Connection(
        Role.RUNNER,
        now=trio.current_time(),
        peer_timeout=config.handshake_timeout,
        max_frame_size=config.max_frame_size,
    )
    try:
        with trio.move_on_after(config.handshake_timeout):
            if config.ssl_context is not None:
                stream = await accept_tls(stream, config.ssl_context)
            channel = FramedChannel(stream, conn)
            await channel.send(
                Challenge(
                    protocol_version=PROTOCOL_VERSION,
                    nonce=auth.new_nonce(),
                    token_required=config.token is not None,
                )
            )
            await channel.receive()  # the Hello (the Connection allows nothing else)
            where = f"the leader is {leader}" if leader else "no leader is elected yet"
            await channel.send(
                Reject(
                    code=RejectCode.STANDBY.value,
                    reason=f"this runner is a standby; {where}",
                    leader=leader,
                )
            )
    except (ConnectionLost, ProtocolError) as exc:
        log.debug("standby: a builder connection ended: %s", exc)
    finally:
        with trio.move_on_after(1, shield=True):
            await stream.aclose()
