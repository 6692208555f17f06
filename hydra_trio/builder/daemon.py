"""The builder daemon: connect, hello, then one nursery per connection; reconnect forever.

Theory of operation
-------------------
``run_builder`` loops: connect (under ``connect_timeout``), run one session, wait a jittered
backoff, again.  A session is one nursery that holds the ping task, the receive loop with its
keepalive watchdog, and one task per assigned build.  Any way the connection can fail ends up
cancelling that nursery:

- the watchdog: a cancel scope whose deadline moves to ``now + ping_timeout`` on every frame
  received; when it expires the runner has been silent too long (a blackholed link, a frozen
  runner, a half-open socket);
- a send or receive error, EOF, or a protocol error in any task;
- a ``Goodbye`` or ``Reject`` from the runner.

Cancelling the nursery kills every build's process group and removes its directory, so nothing
of the old connection outlives it; the runner requeues those builds under a new attempt.  Only
an incompatible protocol version ends ``run_builder`` (with ``IncompatibleVersionError``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import random
import shutil
import signal
import ssl
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

import attrs
import psutil
import trio

from hydra_trio import auth, net, sdnotify
from hydra_trio.builder.attempt import Send
from hydra_trio.builder.backoff import Backoff
from hydra_trio.builder.builddir import BUILD_DIR_VARIABLE
from hydra_trio.builder.executor import execute
from hydra_trio.builder.inputs import Fetch, FetchError
from hydra_trio.builder.nixexec import execute_nix
from hydra_trio.diskio import HashingFile, HashMismatch, beside, receiving
from hydra_trio.nixstore import NixStore
from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.errors import HydraTrioError, IncompatibleVersionError, ProtocolError
from hydra_trio.protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    Assign,
    BuildRef,
    BuildStatus,
    Challenge,
    Drain,
    FetchData,
    FetchRequest,
    FileInfo,
    Goodbye,
    Hello,
    Message,
    Reject,
    Result,
    Role,
    Welcome,
)
from hydra_trio.protocol.validators import is_path_component
from hydra_trio.system import default_hostname, default_system, lock_dir

log = logging.getLogger("hydra_trio.builder")

Connect = Callable[[], Awaitable[trio.abc.Stream]]
Executor = Callable[[Assign, Path, Send, dict[str, str], Fetch], Awaitable[Result]]
NixExecutor = Callable[[NixStore, Assign, Path, Send, dict[str, str], Fetch], Awaitable[Result]]

#: Input bytes asked for per FetchRequest (what the runner reads in one thread hop; it answers
#: in frames of ``codec.TRANSFER_FRAME``), and requests in flight: enough to keep a loopback or
#: LAN link busy, few enough that a fetch holds at most FETCH_WINDOW x FETCH_CHUNK in memory.
FETCH_CHUNK = 1024 * 1024
FETCH_WINDOW = 4


@attrs.frozen(kw_only=True)
class BuilderConfig:
    """Everything a builder is configured with (see CONTRACT.md for the options)."""

    server: net.HostPort = net.HostPort("127.0.0.1", 7420)
    systems: tuple[str, ...] = attrs.field(factory=lambda: (default_system(),))
    supported_features: tuple[str, ...] = ()
    mandatory_features: tuple[str, ...] = ()
    max_jobs: int = 1
    speed_factor: float = 1.0
    ping_interval: float = 10.0
    #: None: 3 x the ping interval used (ping_interval, or a third of the runner's timeout).
    ping_timeout: float | None = None
    work_dir: Path = Path("hydra-trio-builder")
    hostname: str = attrs.field(factory=default_hostname)
    connect_timeout: float = 10.0
    reconnect_base: float = 1.0
    reconnect_max: float = 60.0
    reconnect_floor: float = 0.1
    #: a session that lasted this long resets the backoff (None: 2 x ping timeout).
    healthy_after: float | None = None
    max_frame_size: int = 8 * 1024 * 1024
    #: an input fetch that receives nothing for this long fails the attempt (retried).
    fetch_timeout: float = 120.0
    #: the shared secret (``--token-file``), proven in the hello, never sent.
    token: bytes | None = attrs.field(default=None, repr=False)
    #: TLS to the runner (client side: verifies the runner's certificate against ``--tls-ca``
    #: or the system roots, and presents ``--tls-cert`` when given).  None: plain TCP.
    ssl_context: ssl.SSLContext | None = None
    #: what it runs (``--executor``): ``command`` (an Assign's command) and/or ``nix`` (an
    #: Assign's derivation, realised in ``nix_store``).
    executors: tuple[str, ...] = ("command",)
    #: a local chroot Nix store for the ``nix`` executor (``--nix-store DIR``); None: the
    #: machine's own store.
    nix_store: Path | None = None

    @property
    def effective_ping_timeout(self) -> float:
        return self.ping_timeout if self.ping_timeout is not None else 3 * self.ping_interval

    @property
    def effective_healthy_after(self) -> float:
        if self.healthy_after is not None:
            return self.healthy_after
        return 2 * self.effective_ping_timeout


class WorkDirError(HydraTrioError):
    """The work dir is in use by another builder."""


def claim_work_dir(work_dir: Path) -> IO[bytes]:
    """Take the work dir's single-instance lock (held until the returned file is closed), then
    remove what a previous builder on it left: build directories and partial fetches (a
    builder killed with -9 cannot clean up after itself).  Blocking: call through a thread."""
    lock = lock_dir(work_dir)
    if lock is None:
        raise WorkDirError(
            f"another builder is using {work_dir}: stop it, or give this one another --work-dir"
        )
    killed = kill_leftover_builds(work_dir.absolute() / "builds")
    if killed:
        log.warning(
            "killed %d processes of builds a previous builder on %s left running", killed, work_dir
        )
    removed = 0
    for leftovers in (work_dir / "builds", work_dir / "cache" / "tmp"):
        for entry in leftovers.iterdir() if leftovers.is_dir() else ():
            _remove_tree(entry)
            removed += 1
    if removed:
        log.info("removed %d build directories and partial fetches left in %s", removed, work_dir)
    return lock


def kill_leftover_builds(builds: Path) -> int:
    """SIGKILL every process (and its process group) whose environment places it in a build
    directory under ``builds``: what the builds of a builder that was itself killed (-9, OOM)
    left running.  Returns how many processes matched.  A build's processes inherit
    ``HYDRA_TRIO_BUILD_DIR`` (see ``executor``); one that scrubbed its environment is not
    found, as one that left its process group escapes the kill of a running build.

    The processes are listed with ``psutil`` (``/proc`` on Linux, ``sysctl`` on macOS and the
    BSDs).  Where the listing itself fails (no ``/proc`` mounted, a platform psutil cannot
    list), this logs a warning and kills nothing: the leftovers keep running but the builder
    starts, and a new build never shares a directory with them.  Blocking: call through a
    thread."""
    prefix = f"{builds}/"
    own_pid, own_group = os.getpid(), os.getpgid(0)
    matched = 0
    try:
        processes = list(psutil.process_iter())
    except (OSError, psutil.Error) as exc:
        log.warning("cannot list processes to find builds a previous builder left: %s", exc)
        return 0
    for process in processes:
        if process.pid == own_pid:
            continue
        try:
            environ = process.environ()
        except (psutil.Error, OSError):  # gone, a zombie, or not ours to read
            continue
        if not environ.get(BUILD_DIR_VARIABLE, "").startswith(prefix):
            continue
        matched += 1
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(process.pid)
            if group not in (own_group, 0, 1):
                os.killpg(group, signal.SIGKILL)
            os.kill(process.pid, signal.SIGKILL)
    return matched


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # as the executor removes a build directory
    else:
        path.unlink(missing_ok=True)


def load_machine_id(work_dir: Path) -> str:
    """The machine id stored in ``work_dir``; created on first use, the same ever after."""
    path = work_dir / "machine-id"
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    work_dir.mkdir(parents=True, exist_ok=True)
    machine_id = str(uuid.uuid4())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(machine_id + "\n")
    tmp.replace(path)
    return machine_id


@attrs.define(eq=False)
class _RunningBuild:
    assign: Assign
    scope: trio.CancelScope


@attrs.define(eq=False)
class BuilderState:
    """What survives between sessions of one builder process."""

    config: BuilderConfig
    machine_id: str
    rng: random.Random = attrs.field(factory=random.Random)
    #: set by SIGTERM or an operator's drain: finish running builds, then say goodbye.
    draining: bool = False
    drain_event: trio.Event = attrs.field(factory=trio.Event)
    sessions: int = 0
    #: (monotonic time, event) pairs for tests and diagnostics; bounded.
    events: list[tuple[float, str]] = attrs.field(factory=list)
    #: whether the warning about a ping interval too long for the runner was logged.
    warned_ping_interval: bool = False
    #: runs one build (replaceable by embedders and tests).
    execute: Executor = execute
    #: runs one Nix build (``Assign.drv``) in a store (replaceable by embedders and tests).
    execute_nix: NixExecutor = execute_nix
    #: the store the ``nix`` executor builds in; None: from ``config.nix_store``.
    nix_store: NixStore | None = None

    def record(self, event: str) -> None:
        self.events.append((trio.current_time(), event))
        del self.events[:-1000]

    def request_drain(self) -> None:
        self.draining = True
        self.drain_event.set()


async def run_builder(
    config: BuilderConfig,
    *,
    connect: Connect | None = None,
    state: BuilderState | None = None,
    task_status: trio.TaskStatus[BuilderState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve as a builder until drained (returns) or the runner is incompatible (raises).

    ``connect`` opens a stream to the runner; by default TCP to ``config.server`` with keepalive
    set from the ping timeout.  Each attempt is bounded by ``config.connect_timeout``.
    """
    if state is None:
        machine_id = await trio.to_thread.run_sync(load_machine_id, config.work_dir)
        state = BuilderState(config=config, machine_id=machine_id)
    if connect is None:
        connect = _tcp_connector(config)
    backoff = Backoff(
        base=config.reconnect_base,
        cap=config.reconnect_max,
        floor=config.reconnect_floor,
        rng=state.rng,
    )
    task_status.started(state)
    sdnotify.notify(f"READY=1\nSTATUS=connecting to {config.server}")
    while not state.draining:  # without a connection there is nothing left to finish
        started = trio.current_time()
        try:
            with trio.fail_after(config.connect_timeout):
                stream = await connect()
        except (OSError, trio.TooSlowError, net.ConnectionLost) as exc:
            reason = f"cannot connect to {config.server}: {str(exc) or type(exc).__name__}"
            established = False
        else:
            state.record("connected")
            sessions_before = state.sessions
            try:
                reason = await _session(config, state, stream)
            finally:
                with trio.move_on_after(1, shield=True):
                    await stream.aclose()
            established = state.sessions > sessions_before  # the handshake completed
            if state.draining and reason == "drained":
                log.info("drained: no builds left, exiting")
                return
        state.record(f"disconnected: {reason}")
        sdnotify.notify(f"STATUS=disconnected: {reason}")
        if established and trio.current_time() - started >= config.effective_healthy_after:
            backoff.reset()
        delay = backoff.next_delay()
        log.warning("%s; reconnecting in %.1f s", reason, delay)
        with trio.move_on_after(delay):
            await state.drain_event.wait()
    log.info("drained while disconnected: exiting")


def _tcp_connector(config: BuilderConfig) -> Connect:
    async def connect() -> trio.abc.Stream:
        stream = await net.open_tcp(config.server, keepalive_timeout=config.effective_ping_timeout)
        if config.ssl_context is None:
            return stream
        return await net.start_tls(stream, config.ssl_context, server_hostname=config.server.host)

    return connect


async def _session(config: BuilderConfig, state: BuilderState, stream: trio.abc.Stream) -> str:
    """One connection's life; returns why it ended (``"drained"`` after a clean drain)."""
    ping_timeout = config.effective_ping_timeout
    conn = Connection(
        Role.BUILDER,
        now=trio.current_time(),
        peer_timeout=ping_timeout,
        ping_interval=config.ping_interval,
        max_frame_size=config.max_frame_size,
    )
    channel = net.FramedChannel(stream, conn)
    try:
        welcome = await _handshake(config, state, channel)
    except (net.ConnectionLost, ProtocolError, trio.TooSlowError) as exc:
        return f"handshake failed: {str(exc) or type(exc).__name__}"
    if isinstance(welcome, str):
        return welcome
    _follow_runner_timeout(config, state, channel.connection, welcome)
    state.sessions += 1
    log.info(
        "connected to %s as %s (session %s)", config.server, state.machine_id, welcome.session_id
    )
    sdnotify.notify(f"STATUS=connected to {config.server}")
    session = _Session(config, state, channel)
    return await session.run()


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


async def _handshake(
    config: BuilderConfig, state: BuilderState, channel: net.FramedChannel
) -> Welcome | str:
    with trio.fail_after(config.connect_timeout):
        challenge = await channel.receive()
        assert isinstance(challenge, Challenge)  # the Connection allows nothing else first
        if challenge.token_required and config.token is None:
            log.warning("the queue runner requires a token: give this builder --token-file")
        credentials = b""
        if config.token is not None:
            credentials = auth.prove(config.token, challenge.nonce, state.machine_id)
        await channel.send(
            Hello(
                protocol_version=PROTOCOL_VERSION,
                machine_id=state.machine_id,
                hostname=config.hostname,
                systems=config.systems,
                supported_features=config.supported_features,
                mandatory_features=config.mandatory_features,
                max_jobs=config.max_jobs,
                speed_factor=config.speed_factor,
                ping_interval=config.ping_interval,
                credentials=credentials,
                executors=config.executors,
            )
        )
        reply = await channel.receive()
    if isinstance(reply, Reject):
        if reply.code == "incompatible-version":
            raise IncompatibleVersionError(f"the queue runner rejected us: {reply.reason}")
        return f"rejected by the queue runner ({reply.code}): {reply.reason}"
    assert isinstance(reply, Welcome)
    return reply


class _Session:
    """The builder's end of one established connection."""

    def __init__(
        self, config: BuilderConfig, state: BuilderState, channel: net.FramedChannel
    ) -> None:
        self.config = config
        self.state = state
        self.channel = channel
        self.builds: dict[str, _RunningBuild] = {}
        self.reason: str | None = None
        self.scope = trio.CancelScope()
        self.builds_changed = trio.Event()
        self.fetches: dict[int, _FetchInbox] = {}
        self.disk_free = 0
        self._next_request = 0

    def close(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()

    async def send(self, message: Message) -> None:
        try:
            await self.channel.send(message)
        except (net.ConnectionLost, ProtocolError) as exc:
            self.close(str(exc))
            raise

    async def run(self) -> str:
        with self.scope:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._pinger)
                nursery.start_soon(self._disk_watcher)
                nursery.start_soon(self._drainer)
                await self._receive_loop()
                nursery.cancel_scope.cancel()
        return self.reason or "closed"

    async def _receive_loop(self) -> None:
        conn = self.channel.connection
        timeout = conn.peer_timeout
        try:
            with trio.CancelScope(deadline=conn.deadline) as watchdog:
                self.channel.watchdog = watchdog  # any frame (or its progress) proves it alive
                while True:
                    message = await self.channel.receive()
                    if isinstance(message, Assign):
                        self._start_build(message)
                    elif isinstance(message, Abort):
                        running = self.builds.get(message.build_id)
                        if running is not None and running.assign.attempt == message.attempt:
                            log.info(
                                "build %s attempt %d aborted: %s",
                                message.build_id,
                                message.attempt,
                                message.reason,
                            )
                            running.scope.cancel()
                    elif isinstance(message, FetchData):
                        inbox = self.fetches.get(message.request_id)
                        if inbox is not None and not inbox.deliver(message):
                            self.close("the runner sent more fetch data than requested")
                            return
                    elif isinstance(message, Drain):
                        log.info("the runner asked us to drain: %s", message.reason)
                        self.state.request_drain()
                    elif isinstance(message, Goodbye):
                        self.close(f"the runner said goodbye ({message.reason})")
                        return
        except (net.ConnectionLost, ProtocolError) as exc:
            self.close(str(exc))
            return
        if watchdog.cancelled_caught:
            self.state.record("watchdog")
            self.close(f"no frame from the runner for {timeout:g} s")

    async def _pinger(self) -> None:
        conn = self.channel.connection
        while True:
            await trio.sleep_until(conn.next_ping_at)
            ping = conn.make_ping(
                trio.current_time(),
                load=_load(),
                disk_free=self.disk_free,
                running=tuple(
                    BuildRef(build_id=b.assign.build_id, attempt=b.assign.attempt)
                    for b in self.builds.values()
                ),
            )
            try:
                await self.send(ping)
            except (net.ConnectionLost, ProtocolError):
                return

    async def _disk_watcher(self) -> None:
        # statvfs can hang on a sick file system: it runs in a thread, in its own task, so a
        # ping never waits for it (pings carry the last value measured).
        while True:
            self.disk_free = await trio.to_thread.run_sync(
                _disk_free, self.config.work_dir, abandon_on_cancel=True
            )
            await trio.sleep(self.config.ping_interval)

    async def _drainer(self) -> None:
        await self.state.drain_event.wait()
        try:
            await self.send(Drain(reason="builder shutting down"))
            while self.builds:
                self.builds_changed = trio.Event()
                await self.builds_changed.wait()
            await self.send(Goodbye(reason="drained"))
        except (net.ConnectionLost, ProtocolError):
            return
        self.close("drained")

    def _start_build(self, assign: Assign) -> None:
        if assign.build_id in self.builds:
            log.warning("ignoring a second assignment of build %s", assign.build_id)
            return
        running = _RunningBuild(assign=assign, scope=trio.CancelScope())
        self.builds[assign.build_id] = running
        self.nursery.start_soon(self._build, running)

    async def _build(self, running: _RunningBuild) -> None:
        assign = running.assign
        build_dir = self.config.work_dir.absolute() / "builds" / _build_dir_name(assign)
        log.info(
            "build %s attempt %d: %s",
            assign.build_id,
            assign.attempt,
            " ".join(assign.command)[:200],
        )
        try:
            with running.scope:
                try:
                    result = await self._execute(assign, build_dir)
                except (net.ConnectionLost, ProtocolError):
                    raise
                except Exception as exc:  # a bug or an OS failure must not end the session
                    log.exception(
                        "build %s attempt %d: internal error", assign.build_id, assign.attempt
                    )
                    result = Result(
                        build_id=assign.build_id,
                        attempt=assign.attempt,
                        status=BuildStatus.INTERNAL_ERROR,
                        error=f"builder internal error: {type(exc).__name__}: {exc}",
                    )
                await self.send(result)
                log.info(
                    "build %s attempt %d: %s", assign.build_id, assign.attempt, result.status.value
                )
        except (net.ConnectionLost, ProtocolError):
            pass  # the session is closing; the runner requeues the build
        finally:
            del self.builds[assign.build_id]
            self.builds_changed.set()

    async def _execute(self, assign: Assign, build_dir: Path) -> Result:
        """Run a build with the executor its Assign asks for, if this builder has it."""
        kind = "nix" if assign.drv else "command"
        if kind not in self.config.executors:
            return Result(
                build_id=assign.build_id,
                attempt=assign.attempt,
                status=BuildStatus.INTERNAL_ERROR,
                error=f"this builder has no {kind} executor (--executor)",
            )
        if assign.drv:
            features = (*self.config.supported_features, *self.config.mandatory_features)
            store = self.state.nix_store or NixStore(
                self.config.nix_store, system_features=tuple(sorted(set(features)))
            )
            return await self.state.execute_nix(
                store, assign, build_dir, self.send, _base_env(), self.fetch
            )
        return await self.state.execute(assign, build_dir, self.send, _base_env(), self.fetch)

    async def fetch(self, assign: Assign, info: FileInfo) -> Path:
        """Bring one input file into the cache (unless it is there) and return its path.

        Chunks are pulled FETCH_WINDOW at a time; nothing arriving for ``fetch_timeout``
        raises ``FetchError``, as does a size or hash that does not match."""
        cache = self.config.work_dir.absolute() / "cache"
        target = cache / info.sha256[:2] / info.sha256
        if await trio.to_thread.run_sync(_cached, target, info.size):
            return target
        request_id = self._next_request
        self._next_request += 1
        inbox = self.fetches[request_id] = _FetchInbox()
        try:
            async with receiving(cache / "tmp" / f"{request_id}-{info.sha256}") as file:
                # Disk and network at the same time: the frames received go to a task that
                # writes (and hashes) them in a worker thread while the next ones arrive.  The
                # window counts bytes taken from the inbox, and the hand-over holds one batch,
                # so a slow disk closes the window instead of letting the frames pile up.
                batches, taken = trio.open_memory_channel[list[bytes]](1)

                async def receive() -> None:
                    async with batches:
                        await self._receive_input(assign, info, request_id, inbox, batches)

                await beside(receive, functools.partial(_write_behind, file, taken))
                await trio.to_thread.run_sync(_keep, file, target, info)
        finally:
            del self.fetches[request_id]
        return target

    async def _receive_input(
        self,
        assign: Assign,
        info: FileInfo,
        request_id: int,
        inbox: _FetchInbox,
        batches: trio.MemorySendChannel[list[bytes]],
    ) -> None:
        """Request the file's chunks (FETCH_WINDOW in flight) and pass what arrives on to
        ``batches`` about FETCH_CHUNK bytes at a time, until the end of the file."""
        requested = received = 0
        pending: list[bytes] = []
        pending_size = 0
        while received < info.size or (info.size == 0 and requested == 0):
            while requested - received < FETCH_WINDOW * FETCH_CHUNK and (
                requested < info.size or requested == 0
            ):
                # Counted before it is sent: the answer may arrive before send returns.
                inbox.expected += FETCH_CHUNK
                offset, requested = requested, requested + FETCH_CHUNK
                await self.send(
                    FetchRequest(
                        request_id=request_id,
                        build_id=assign.build_id,
                        attempt=assign.attempt,
                        sha256=info.sha256,
                        offset=offset,
                        length=FETCH_CHUNK,
                    )
                )
            with trio.move_on_after(self.config.fetch_timeout) as stall:
                batch = [await inbox.receive.receive()]
            if stall.cancelled_caught:
                raise FetchError(
                    f"fetching {info.path}: nothing received for {self.config.fetch_timeout:g} s"
                )
            # Whatever else has arrived is taken too.
            while not (batch[-1].eof or batch[-1].error or not batch[-1].data):
                try:
                    batch.append(inbox.receive.receive_nowait())
                except trio.WouldBlock:
                    break
            last = batch[-1]
            if last.error:
                raise FetchError(f"fetching {info.path}: {last.error}")
            for chunk in batch:
                pending.append(chunk.data)
                pending_size += len(chunk.data)
                received += len(chunk.data)
            done = last.eof or not last.data
            if pending_size >= FETCH_CHUNK or done:
                await batches.send(pending)
                pending, pending_size = [], 0
            if done:
                break


async def _write_behind(file: HashingFile, batches: trio.MemoryReceiveChannel[list[bytes]]) -> None:
    """Write (and hash) the batches of a fetch in worker threads, one at a time, in order.  A
    failed write propagates and so cancels the receiving (``beside``); the channel is left
    open for that, as closing it would fail the receiver's send with a second error."""
    async for chunks in batches:
        await file.write(chunks)


def _keep(file: HashingFile, target: Path, info: FileInfo) -> None:
    """Move a fetched file into the cache, read-only, if it is what was asked for."""
    try:
        file.commit(target, info.size, info.sha256)
    except HashMismatch as exc:
        raise FetchError(
            f"fetched {exc.size} bytes with sha256 {exc.sha256}, "
            f"expected {exc.expected_size} bytes with {exc.expected_sha256}"
        ) from None


@attrs.define(eq=False)
class _FetchInbox:
    """Where the session delivers the ``FetchData`` frames of one fetch.  The runner answers a
    request in as many frames as it likes; ``expected`` counts the bytes asked for and not yet
    delivered, so a runner sending more than that cannot make the builder buffer it."""

    send: trio.MemorySendChannel[FetchData] = attrs.field(init=False)
    receive: trio.MemoryReceiveChannel[FetchData] = attrs.field(init=False)
    expected: int = 0

    def __attrs_post_init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[FetchData](math.inf)

    def deliver(self, message: FetchData) -> bool:
        """Queue a frame for the fetch; False if it carries more than was asked for (or
        nothing, without being the end of the file or an error: the runner never sends that)."""
        if len(message.data) > self.expected or not (message.data or message.eof or message.error):
            return False
        self.expected -= len(message.data)
        self.send.send_nowait(message)
        return True


def _build_dir_name(assign: Assign) -> str:
    """The directory a build runs in, under ``<work dir>/builds``.  The build id is the
    runner's word: it names the directory only when it is a plain, short file name, else its
    hash does, so an id like ``../../x`` cannot make the builder create (or remove) a
    directory anywhere else."""
    build_id = assign.build_id
    if not (is_path_component(build_id) and len(build_id) <= 100):
        build_id = hashlib.sha256(build_id.encode()).hexdigest()[:32]
    return f"{build_id}-{assign.attempt}"


def _cached(target: Path, size: int) -> bool:
    try:
        return target.stat().st_size == size
    except FileNotFoundError:
        return False


def _base_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _disk_free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0
