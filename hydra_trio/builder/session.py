"""The builder's connections: the reconnect loop, the handshake, and one session's life.

Theory of operation
-------------------
``reconnect`` loops: connect (under ``connect_timeout``), run one session, wait a jittered
backoff, again.  A session is one nursery that holds the ping task, the receive loop with its
keepalive watchdog, the disk watcher, the drainer, and one task per assigned build (``Jobs``).
Any way the connection can fail ends up cancelling that nursery:

- the watchdog: a cancel scope whose deadline moves to ``now + ping_timeout`` on every frame
  received; when it expires the runner has been silent too long (a blackholed link, a frozen
  runner, a half-open socket);
- a send or receive error, EOF, or a protocol error in any task;
- a ``Goodbye`` from the runner, or a ``Reject`` of the hello (``Rejected``).

Cancelling the nursery kills every build's process group and removes its directory, so nothing
of the old connection outlives it; the runner requeues those builds under a new attempt.  How
each attempt ended is an ``Ended`` (``state.SessionEnd`` and the words logged).  Only an
incompatible protocol version ends ``reconnect`` (with ``IncompatibleVersionError``); a
drained builder returns.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from hydra_trio import auth, net, sdnotify
from hydra_trio.builder.attempt import MANY_FILES, ROUND_TRIPS, Sender
from hydra_trio.builder.backoff import Backoff
from hydra_trio.builder.config import BuilderConfig
from hydra_trio.builder.fetch import InputFetcher
from hydra_trio.builder.jobs import Jobs
from hydra_trio.builder.servers import ServerList
from hydra_trio.builder.state import BuilderState, Ended, EventKind, SessionEnd
from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.errors import HydraTrioError, IncompatibleVersionError, ProtocolError
from hydra_trio.protocol.messages import (
    FILES_MINOR,
    LISTING_MINOR,
    PROTOCOL_VERSION,
    RUNNER_STOPPING,
    Abort,
    Assign,
    Challenge,
    Drain,
    FetchData,
    Goodbye,
    Hello,
    ListData,
    Message,
    Ping,
    Pong,
    Reject,
    RejectCode,
    Role,
    Welcome,
    speaks,
)

log = logging.getLogger("hydra_trio.builder")

#: Opens a stream to the runner.
Connect = Callable[[], Awaitable[trio.abc.Stream]]


class Rejected(HydraTrioError):
    """The runner answered the hello with a ``Reject`` (other than for the version)."""

    def __init__(self, code: str, reason: str, leader: str = "") -> None:
        super().__init__(f"rejected by the queue runner ({code}): {reason}")
        self.code = code
        self.reason = reason
        #: with code ``standby``: the leader's builder address ("" when it named none).
        self.leader = leader


async def reconnect(config: BuilderConfig, state: BuilderState, connect: Connect) -> None:
    """Connect and run sessions, with backoff between them, until drained."""
    backoff = Backoff(
        base=config.reconnect_base,
        cap=config.reconnect_max,
        floor=config.reconnect_floor,
        rng=state.rng,
    )
    while not state.draining:  # without a connection there is nothing left to finish
        started = trio.current_time()
        sessions_before = state.sessions
        ended = await _connection(config, state, connect)
        if state.draining and ended.end is SessionEnd.DRAINED:
            log.info("drained: no builds left, exiting")
            return
        state.record(EventKind.DISCONNECTED, ended)
        sdnotify.notify(f"STATUS=disconnected: {ended.reason}")
        established = state.sessions > sessions_before  # a handshake completed
        if established and trio.current_time() - started >= config.effective_healthy_after:
            backoff.reset()
        delay = _next_delay(config, state, ended, established, backoff)
        log.warning("%s; reconnecting in %.1f s", ended.reason, delay)
        with trio.move_on_after(delay):
            await state.drain_event.wait()
    log.info("drained while disconnected: exiting")


#: After a runner's ``Goodbye`` ``runner-stopping``, connection failures count as its restart
#: (short pauses, no growing backoff) for this many ping timeouts.
STOPPING_WINDOW = 10


def _next_delay(
    config: BuilderConfig, state: BuilderState, ended: Ended, established: bool, backoff: Backoff
) -> float:
    """Move on to the next runner of the list, and how long to wait before trying it: at
    once while some runner of the list was not tried this round; a short pause, without
    growing the backoff, after a standby or a runner stopping on purpose (its successor is
    due within about a lease timeout); else the backoff.

    A runner that said it is stopping is usually restarted (a deploy): until one of the list
    answers again, for at most ``STOPPING_WINDOW`` ping timeouts, a refused connection is
    that restart, not a fault, and does not grow the backoff either."""
    servers = state.servers
    now = trio.current_time()
    if ended.end is SessionEnd.RUNNER_STOPPING:
        state.runner_stopped_at = now
    elif established:
        state.runner_stopped_at = None
    if established:
        servers.connected()
    restarting = (
        ended.end is SessionEnd.CONNECT_FAILED
        and state.runner_stopped_at is not None
        and now - state.runner_stopped_at < STOPPING_WINDOW * config.effective_ping_timeout
    )
    redirected = restarting or ended.end in (SessionEnd.STANDBY, SessionEnd.RUNNER_STOPPING)
    round_failed = servers.failed(ended.leader)
    if not round_failed:
        return 0.0
    if redirected:
        return state.rng.uniform(config.reconnect_floor, config.reconnect_base)
    return backoff.next_delay()


def tcp_connector(config: BuilderConfig, servers: ServerList | None = None) -> Connect:
    """TCP to the runner ``servers`` says is next (``config.server`` without a list), with
    keepalive set from the ping timeout, TLS if configured."""

    async def connect() -> trio.abc.Stream:
        server = servers.current if servers is not None else config.server
        stream = await net.open_tcp(server, keepalive_timeout=config.effective_ping_timeout)
        if config.ssl_context is None:
            return stream
        return await net.start_tls(stream, config.ssl_context, server_hostname=server.host)

    return connect


async def _connection(config: BuilderConfig, state: BuilderState, connect: Connect) -> Ended:
    """One connection attempt: open a stream, run a session on it, close it."""
    try:
        with trio.fail_after(config.connect_timeout):
            stream = await connect()
    except (OSError, trio.TooSlowError, net.ConnectionLost) as exc:
        reason = f"cannot connect to {state.servers.current}: {str(exc) or type(exc).__name__}"
        return Ended(SessionEnd.CONNECT_FAILED, reason)
    state.record(EventKind.CONNECTED)
    try:
        return await _session(config, state, stream)
    finally:
        with trio.move_on_after(1, shield=True):
            await stream.aclose()


async def _session(config: BuilderConfig, state: BuilderState, stream: trio.abc.Stream) -> Ended:
    """One connection's life: the handshake, then the session."""
    conn = Connection(
        Role.BUILDER,
        now=trio.current_time(),
        peer_timeout=config.effective_ping_timeout,
        ping_interval=config.ping_interval,
        max_frame_size=config.max_frame_size,
    )
    channel = net.FramedChannel(stream, conn)
    try:
        welcome = await handshake(config, state, channel)
    except (net.ConnectionLost, ProtocolError, trio.TooSlowError) as exc:
        reason = f"handshake failed: {str(exc) or type(exc).__name__}"
        if conn.frames_received == 0:
            reason += (
                f" before any challenge came (is {state.servers.current} the runner's builder"
                " port, its --listen (7420 by default), and not its HTTP port?)"
            )
        return Ended(SessionEnd.HANDSHAKE_FAILED, reason)
    except Rejected as exc:
        if exc.code == "standby":
            return Ended(SessionEnd.STANDBY, str(exc), exc.leader)
        if exc.code == RejectCode.DUPLICATE_MACHINE.value:
            log.error("%s", exc)  # an operator's mistake: two builders share one work dir
        return Ended(SessionEnd.REJECTED, str(exc))
    _follow_runner_timeout(config, state, channel.connection, welcome)
    state.sessions += 1
    server = state.servers.current
    log.info("connected to %s as %s (session %s)", server, state.machine_id, welcome.session_id)
    sdnotify.notify(f"STATUS=connected to {server}")
    return await Session(config, state, channel).run()


def _follow_runner_timeout(
    config: BuilderConfig, state: BuilderState, conn: Connection, welcome: Welcome
) -> None:
    """Ping often enough for the runner, whatever our own flags say.

    The Connection already lowered its ping interval to a third of ``welcome.builder_timeout``
    (a runner with ``--builder-timeout 3`` and builders left at ``--ping-interval 10`` would
    otherwise drop every builder every 3 s, and its builds with it).  A ping timeout that was
    not given follows the interval actually used (3 x it), as it follows the flag.
    """
    interval = conn.ping_interval
    if config.ping_timeout is None:
        conn.set_peer_timeout(3 * interval)
    if interval < config.ping_interval and not state.warned_ping_interval:
        state.warned_ping_interval = True
        log.warning(
            "--ping-interval %g s is longer than a third of the runner's --builder-timeout "
            "%g s: pinging every %g s instead (give --ping-interval %g to silence this)",
            config.ping_interval,
            welcome.builder_timeout,
            interval,
            interval,
        )


async def handshake(
    config: BuilderConfig, state: BuilderState, channel: net.FramedChannel
) -> Welcome:
    """Answer the runner's challenge with our hello; its ``Welcome``, or ``Rejected`` (or
    ``IncompatibleVersionError``), within ``config.connect_timeout``."""
    with trio.fail_after(config.connect_timeout):
        challenge = await channel.receive()
        assert isinstance(challenge, Challenge)  # the Connection allows nothing else first
        await channel.send(_hello(config, state, challenge))
        reply = await channel.receive()
    if isinstance(reply, Reject):
        if reply.code == RejectCode.INCOMPATIBLE_VERSION.value:
            raise IncompatibleVersionError(f"the queue runner rejected us: {reply.reason}")
        raise Rejected(reply.code, reply.reason, reply.leader)
    assert isinstance(reply, Welcome)
    return reply


def _hello(config: BuilderConfig, state: BuilderState, challenge: Challenge) -> Hello:
    if challenge.token_required and config.token is None:
        log.warning("the queue runner requires a token: give this builder --token-file")
    credentials = b""
    if config.token is not None:
        credentials = auth.prove(config.token, challenge.nonce, state.machine_id)
    return Hello(
        protocol_version=PROTOCOL_VERSION,
        machine_id=state.machine_id,
        hostname=config.hostname,
        systems=config.systems,
        supported_features=config.advertised_features,
        mandatory_features=config.mandatory_features,
        max_jobs=config.max_jobs,
        speed_factor=config.speed_factor,
        ping_interval=config.ping_interval,
        credentials=credentials,
        executors=tuple(kind.value for kind in config.executors),
        instance=state.instance,
    )


class Session:
    """The builder's end of one established connection; ``run`` is its whole life."""

    def __init__(
        self, config: BuilderConfig, state: BuilderState, channel: net.FramedChannel
    ) -> None:
        self.config = config
        self.state = state
        self.channel = channel
        self.ended: Ended | None = None
        self.scope = trio.CancelScope()
        self.fetcher = InputFetcher(
            cache=config.work_dir.absolute() / "cache",
            send=self.send,
            fetch_timeout=config.fetch_timeout,
            send_all=self.send_all,
        )
        self.disk_free = 0
        #: the last measure of the work dir found less than ``min_free_disk`` free.
        self.low_disk = False
        #: the highest ``seq`` a Pong has answered, and the event set at the next Pong.
        self._ponged = -1
        self._pong = trio.Event()
        self._jobs: Jobs | None = None

    def close(self, end: SessionEnd, reason: str) -> None:
        """End the session (the first reason given is the one kept)."""
        if self.ended is None:
            self.ended = Ended(end, reason)
        self.scope.cancel()

    def _lost(self, exc: net.ConnectionLost | ProtocolError) -> None:
        lost = isinstance(exc, net.ConnectionLost)
        self.close(SessionEnd.CONNECTION_LOST if lost else SessionEnd.PROTOCOL_ERROR, str(exc))

    async def send(self, message: Message) -> None:
        try:
            await self.channel.send(message)
        except (net.ConnectionLost, ProtocolError) as exc:
            self._lost(exc)
            raise

    async def send_all(self, messages: list[Message]) -> None:
        """Several frames in one write (``send``'s errors)."""
        try:
            await self.channel.send_all(messages)
        except (net.ConnectionLost, ProtocolError) as exc:
            self._lost(exc)
            raise

    async def run(self) -> Ended:
        # The builds' tasks, started from here on, pace their uploads by this session's pings
        # (``attempt.ROUND_TRIPS``); reset as it ends, so no later task sees an ended one.
        token = ROUND_TRIPS.set(self)
        welcome = self.channel.connection.welcome
        many = welcome is not None and speaks(welcome.protocol_version, FILES_MINOR)
        files_token = MANY_FILES.set(many)
        try:
            return await self._run()
        finally:
            MANY_FILES.reset(files_token)
            ROUND_TRIPS.reset(token)

    async def _run(self) -> Ended:
        with self.scope:
            async with trio.open_nursery() as nursery:
                welcome = self.channel.connection.welcome
                self.fetcher.many = MANY_FILES.get()
                jobs = Jobs(
                    self.config,
                    self.state,
                    Sender(self.send, self.send_all),
                    self.fetcher,
                    nursery,
                    listing=self.fetcher.listing,
                    pieces=welcome is not None and speaks(welcome.protocol_version, LISTING_MINOR),
                )
                self._jobs = jobs
                nursery.start_soon(self._pinger, jobs)
                nursery.start_soon(self._disk_watcher)
                nursery.start_soon(self._drainer, jobs)
                watchdog = trio.CancelScope()
                nursery.start_soon(net.watch_silence, self.channel.connection, watchdog)
                await self._receive_loop(jobs, watchdog)
                nursery.cancel_scope.cancel()
        return self.ended or Ended(SessionEnd.CLOSED, "closed")

    async def _receive_loop(self, jobs: Jobs, watchdog: trio.CancelScope) -> None:
        """Act on the runner's frames until the session ends, or until ``watchdog`` is
        cancelled (``net.watch_silence``: any frame, or a frame's progress, proves it alive)."""
        conn = self.channel.connection
        try:
            with watchdog:
                while self._on_message(await self.channel.receive(), jobs):
                    pass
        except (net.ConnectionLost, ProtocolError) as exc:
            self._lost(exc)
            return
        if watchdog.cancelled_caught:
            self.state.record(EventKind.WATCHDOG)
            timeout = conn.peer_timeout
            self.close(SessionEnd.RUNNER_SILENT, f"no frame from the runner for {timeout:g} s")

    def _on_message(self, message: Message, jobs: Jobs) -> bool:
        """Act on one frame from the runner; False when it ends the session."""
        match message:
            case Assign():
                jobs.start(message)
            case Abort():
                jobs.abort(message.build_id, message.attempt, message.reason)
            case ListData():
                if not self.fetcher.deliver_listing(message):
                    reason = "the runner answered a listing request twice"
                    self.close(SessionEnd.PROTOCOL_ERROR, reason)
                    return False
            case FetchData():
                if not self.fetcher.deliver(message):
                    reason = "the runner sent more fetch data than requested"
                    self.close(SessionEnd.PROTOCOL_ERROR, reason)
                    return False
            case Pong():
                if message.seq > self._ponged:
                    self._ponged = message.seq
                    self._pong.set()
                    self._pong = trio.Event()
            case Drain():
                log.info("the runner asked us to drain: %s", message.reason)
                self.state.request_drain()
            case Goodbye():
                reason = f"the runner said goodbye ({message.reason})"
                stopping = message.reason == RUNNER_STOPPING
                self.close(SessionEnd.RUNNER_STOPPING if stopping else SessionEnd.GOODBYE, reason)
                return False
        return True

    async def _pinger(self, jobs: Jobs) -> None:
        conn = self.channel.connection
        while True:
            await trio.sleep_until(conn.next_ping_at)
            try:
                await self.send(self._ping(jobs))
            except (net.ConnectionLost, ProtocolError):
                return

    def _ping(self, jobs: Jobs) -> Ping:
        return self.channel.connection.make_ping(
            trio.current_time(),
            load=_load(),
            disk_free=self.disk_free,
            running=jobs.refs(),
            low_disk=self.low_disk,
        )

    async def mark(self) -> int:
        """``RoundTrips.mark``: a ping now (the next periodic one is due an interval later)."""
        assert self._jobs is not None, "a mark before the session runs"
        ping = self._ping(self._jobs)
        await self.send(ping)
        return ping.seq

    async def answered(self, seq: int) -> None:
        """``RoundTrips.answered``: Pongs come in the order of the pings (the runner answers
        each as it reads it), so the highest answered so far says it.  A runner that never
        answers is one the watchdog ends the session for (and this wait with it)."""
        while self._ponged < seq:
            await self._pong.wait()

    async def _disk_watcher(self) -> None:
        # statvfs can hang on a sick file system: it runs in a thread, in its own task, so a
        # ping never waits for it (pings carry the last value measured).
        while True:
            free = await trio.to_thread.run_sync(
                _disk_free, self.config.work_dir, abandon_on_cancel=True
            )
            self.disk_free = free or 0
            low = free is not None and free < self.config.min_free_disk
            if low != self.low_disk:
                free, least = self.disk_free >> 20, self.config.min_free_disk >> 20
                if low:
                    log.warning("low disk: %d MiB free, under %d MiB: no new builds", free, least)
                else:
                    log.info("disk space back: %d MiB free: taking builds again", free)
                self.low_disk = low
            await trio.sleep(self.config.ping_interval)

    async def _drainer(self, jobs: Jobs) -> None:
        await self.state.drain_event.wait()
        try:
            await self.send(Drain(reason="builder shutting down"))
            await jobs.wait_idle()
            await self.send(Goodbye(reason="drained"))
        except (net.ConnectionLost, ProtocolError):
            return
        self.close(SessionEnd.DRAINED, "drained")


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _disk_free(path: Path) -> int | None:
    """Free bytes where ``path`` is; None if it cannot be measured (not there yet)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
