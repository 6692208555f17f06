"""The queue runner daemon: builder port, HTTP API, and the terms it leads the queue for.

The listeners (builder port, HTTP) live for the whole run in the outer nursery.  The queue is
served in a *term*: the farm loaded from the database, its persister, its dispatcher, and the
builder sessions attached to it (each in a cancel scope the term ends).  With SQLite the runner
leads one term, from start to stop.  With PostgreSQL it stands by until it takes the
leadership lease (``runner.leadership``), leads a term until it loses it, then stands by
again with a fresh farm: a deposed leader's memory of the queue is never trusted again.

Past 400 lines because the runner's whole lifecycle (start-up locks, listeners, terms under the
lease, the ordered stop) reads in one place; its configuration is ``runner.config``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import socket
import time
from pathlib import Path
from typing import IO, Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.routing import BaseRoute

from hydra_trio import net, sdnotify
from hydra_trio.net import ConnectionLost
from hydra_trio.protocol.errors import HydraTrioError, ProtocolError
from hydra_trio.protocol.messages import RUNNER_STOPPING, Goodbye
from hydra_trio.runner.blobs import Storage
from hydra_trio.runner.config import RunnerAddresses as RunnerAddresses  # embedders' import
from hydra_trio.runner.config import RunnerConfig as RunnerConfig  # embedders' import
from hydra_trio.runner.farm import Farm, FarmConfig
from hydra_trio.runner.front import Front
from hydra_trio.runner.handshake import HandshakeGate
from hydra_trio.runner.health import Health
from hydra_trio.runner.http import create_app
from hydra_trio.runner.journal import Journal
from hydra_trio.runner.leadership import Leadership, LeaseStore, refuse_as_standby
from hydra_trio.runner.logs import Followers
from hydra_trio.runner.persister import Persister
from hydra_trio.runner.session import BuilderSession, SessionConfig, serve_builder
from hydra_trio.runner.store import (
    Deposed,
    StoreError,
    StoreUnavailable,
    lock_database,
    open_store,
)
from hydra_trio.system import lock_dir

log = logging.getLogger("hydra_trio.runner")


class Dispatcher:
    """Runs ``farm.dispatch`` whenever woken, and when a delayed retry becomes due."""

    def __init__(self) -> None:
        self._wakeup = trio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self, farm: Farm) -> None:
        while True:
            self._wakeup = trio.Event()
            next_due = farm.dispatch(trio.current_time())
            with trio.move_on_at(next_due if next_due is not None else math.inf):
                await self._wakeup.wait()


def make_farm(
    config: RunnerConfig, *, persisted: bool = True, followers: Followers | None = None
) -> tuple[Farm, Dispatcher]:
    """The runner's farm and its dispatcher.  Call it inside ``trio.run``: the farm's wall
    clock is ``trio.current_time()`` + an offset taken here.

    ``persisted``: a ``Persister`` will write the farm (``serve_runner`` makes one), so its
    Assigns wait for its commits; False (tests, benchmarks without a store): they go out at
    once.  ``followers``: waiters woken on every build change (by default, new ones)."""
    dispatcher = Dispatcher()
    farm = Farm(
        config=FarmConfig(max_tries=config.max_tries),
        on_change=dispatcher.wake,
        followers=followers if followers is not None else Followers(),
        journal=Journal(hold_assigns=persisted),
        epoch=time.time() - trio.current_time(),
    )
    return farm, dispatcher


def lock_state_dir(state_dir: Path) -> IO[bytes]:
    """Take the state dir's single-instance lock (held until the returned file is closed)."""
    lock = lock_dir(state_dir)
    if lock is None:
        raise StoreError(
            f"another queue runner is using {state_dir}: stop it, or give this one "
            "another --state-dir"
        )
    return lock


def open_storage(config: RunnerConfig, farm: Farm, health: Health | None = None) -> Storage:
    """The data dir's files; log followers are the farm's, woken on every build change."""
    return Storage.in_dir(
        config.data_dir or config.state_dir, config.nix_store, health, followers=farm.followers
    )


@attrs.define(eq=False)
class Term:
    """One stretch of leading: the queue in memory and the tasks that keep it."""

    farm: Farm
    persister: Persister
    #: the dispatcher's task: cancelled first when the runner stops (no new assignments).
    dispatching: trio.CancelScope
    #: the cancel scopes of the builder sessions of this term (ended with it).
    sessions: set[trio.CancelScope] = attrs.field(factory=set)


@attrs.define(eq=False)
class Runner:
    """The runner's parts that outlive a term: listeners, files, the lease."""

    config: RunnerConfig
    session_config: SessionConfig
    storage: Storage
    front: Front
    #: None with SQLite (one runner, always leading).
    leadership: Leadership | None
    gate: HandshakeGate
    term: Term | None = None

    def standby_info(self) -> dict[str, Any] | None:
        """For ``Front``: None while this runner serves as the leader."""
        if self.term is not None and (self.leadership is None or self.leadership.leads()):
            return None
        if self.leadership is None:
            return {"leader": None}
        return self.leadership.standby_info() or {"leader": None}

    def unavailable(self) -> StoreUnavailable | None:
        return None if self.term is None else self.term.persister.unavailable

    async def handle_builder(self, stream: trio.SocketStream) -> None:
        term = self.term
        if term is None or (self.leadership is not None and not self.leadership.leads()):
            leader = self.leadership.leader_builders() if self.leadership is not None else ""
            await refuse_as_standby(self.session_config, leader, stream)
            return
        with trio.CancelScope() as scope:
            term.sessions.add(scope)
            try:
                await serve_builder(
                    term.farm, self.session_config, self.storage, stream, gate=self.gate
                )
            finally:
                term.sessions.discard(scope)

    async def stop(self, grace: float) -> None:
        """The graceful part of stopping: no new assignments; running builds get ``grace``
        seconds to finish (their results are committed); then every builder is told the
        runner is going and what it still runs goes back to the queue without using a try
        (``Farm.stop_session``), and that is written."""
        term = self.term
        if term is None:
            return
        farm = term.farm
        term.dispatching.cancel()
        changed = trio.Event()
        notify = farm.on_change

        def on_change() -> None:
            notify()
            changed.set()

        farm.on_change = on_change
        with trio.move_on_after(grace):
            while farm.queue_counts()["running"]:
                await changed.wait()
                changed = trio.Event()
        now = trio.current_time()
        goodbye = Goodbye(reason=RUNNER_STOPPING)
        sessions = [m.session for m in farm.machines.values() if m.session is not None]
        for session in sessions:
            farm.stop_session(session, "the runner stopped", now)
        async with trio.open_nursery() as nursery:
            for session in sessions:
                if isinstance(session, BuilderSession):
                    nursery.start_soon(_say_goodbye, session, goodbye)
            with trio.move_on_after(5):
                await term.persister.flush()

    async def lead(
        self,
        farm: Farm,
        dispatcher: Dispatcher,
        epoch: int | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the queue as its leader until cancelled (or the database refuses a write
        for good: then raise).  Reports once the queue is loaded and served."""
        config = self.config
        store = await trio.to_thread.run_sync(open_store, config.db, config.state_dir)
        persister = Persister(store, farm, self.storage.health)
        term = None
        try:
            if epoch is not None:
                await trio.to_thread.run_sync(store.fence, epoch, config.effective_lease_timeout)
            await trio.to_thread.run_sync(store.migrate)
            # Only the leader writes the data dir, so only it may clean up after a
            # predecessor (standbys may share the data dir).
            removed = await trio.to_thread.run_sync(self.storage.blobs.remove_partial_uploads)
            if removed:
                log.info("removed %d partial uploads left by a previous runner", removed)
            snapshot = await trio.to_thread.run_sync(store.load)
            farm.restore(snapshot, trio.current_time())
            dispatching = trio.CancelScope()

            async def dispatch() -> None:
                with dispatching:
                    await dispatcher.run(farm)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(persister.run)
                nursery.start_soon(dispatch)
                extra_routes: list[BaseRoute] = []
                if config.hydra is not None:
                    from hydra_trio.hydra import status
                    from hydra_trio.hydra.queue import HydraQueue

                    queue = HydraQueue(config.hydra, farm, self.storage)
                    await nursery.start(queue.run)
                    extra_routes = status.routes(queue)
                self.front.app = create_app(
                    farm,
                    self.storage,
                    default_system=config.default_system,
                    persist=persister.flush,
                    token=config.token,
                    token_for_reads=config.http_token_for_reads,
                    extra_routes=extra_routes,
                    public_logs=config.http_public_logs,
                )
                self.term = term = Term(farm=farm, persister=persister, dispatching=dispatching)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.term = None
            for scope in term.sessions if term is not None else ():
                scope.cancel()
            # Whatever ends the term, what changed until now is written if the database
            # lets us (and, with a lease, only while this runner still holds it: fenced).
            with trio.move_on_after(10, shield=True):
                try:
                    await persister.final_save()
                except Exception as exc:  # e.g. the database is still down: say what waits
                    log.error("could not write the last changes: %s", exc)
                finally:
                    await trio.to_thread.run_sync(store.close)


async def serve_runner(
    config: RunnerConfig,
    *,
    farm: Farm | None = None,
    dispatcher: Dispatcher | None = None,
    graceful_stop: trio.Event | None = None,
    task_status: trio.TaskStatus[RunnerAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the queue runner until ``graceful_stop`` is set (SIGTERM: running builds get
    ``stop_grace`` to finish, then return) or until cancelled (SIGINT: the same steps
    without the grace).  Either way no build uses a try and no builder counts as lost.
    Reports where it listens once it does: with SQLite once it serves the queue, with
    PostgreSQL once it stands by (it leads when it takes the lease, ``runner.leadership``).

    ``farm``/``dispatcher`` may be given by embedders and tests (``make_farm``) for the first
    term; otherwise (and for later terms, after losing and retaking the lease) they are
    created here.
    """
    session_config = await trio.to_thread.run_sync(config.session_config)  # reads TLS files
    lock = await trio.to_thread.run_sync(lock_state_dir, config.state_dir)
    try:
        db_lock = await trio.to_thread.run_sync(lock_database, config.db, config.state_dir)
    except BaseException:
        lock.close()
        raise
    leases = None
    try:
        leadership = None
        if db_lock is None:
            assert config.db is not None
            leases = LeaseStore(config.db)
            await trio.to_thread.run_sync(leases.migrate)
            leadership = Leadership(leases, config.effective_lease_timeout)
        if farm is None or dispatcher is None:
            farm, dispatcher = make_farm(config)
        # Every term's farm wakes the same log followers (the storage outlives terms).
        followers = farm.followers
        storage = await trio.to_thread.run_sync(
            functools.partial(
                Storage.in_dir,
                config.data_dir or config.state_dir,
                config.nix_store,
                followers=followers,
            )
        )
        runner = Runner(
            config=config,
            session_config=session_config,
            storage=storage,
            front=Front(_starting),
            leadership=leadership,
            gate=HandshakeGate(config.max_unauthenticated),
        )
        runner.front.unavailable = runner.unavailable
        runner.front.standby = runner.standby_info
        stop = _Stop()
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(_run, runner, farm, dispatcher, stop)
            task_status.started(addresses)
            try:
                await (graceful_stop if graceful_stop is not None else trio.Event()).wait()
                stop.grace = config.stop_grace
            finally:
                stop.event.set()  # the ordered stop in ``_run`` (the caller may cancel us)
    finally:
        lock.close()
        if db_lock is not None:
            db_lock.close()
        if leases is not None:
            leases.close()


async def _say_goodbye(session: BuilderSession, goodbye: Goodbye) -> None:
    with trio.move_on_after(1), contextlib.suppress(ConnectionLost, ProtocolError):
        await session.channel.send(goodbye)  # (unless the builder is gone already)
    session.close("the runner stopped")


@attrs.define(eq=False)
class _Stop:
    """The request to stop: set ``event``; ``grace`` is what running builds get."""

    event: trio.Event = attrs.field(factory=trio.Event)
    grace: float = 0.0


async def _run(
    runner: Runner,
    farm: Farm,
    dispatcher: Dispatcher,
    stop: _Stop,
    *,
    task_status: trio.TaskStatus[RunnerAddresses],
) -> None:
    """Serve until ``stop``, then stop in order: stop accepting (builder port, HTTP), let
    running builds finish for ``stop.grace``, tell the builders the runner is going
    (``Goodbye`` ``runner-stopping``) and put what they still run back in the queue without
    using a try, write the last changes, let the lease go.

    Shielded once started: the caller's cancellation reaches this only through ``stop``, so
    the steps run in that order; the stop as a whole is bounded by the grace plus a few
    seconds."""
    leadership = runner.leadership
    with trio.CancelScope() as shield:
        async with trio.open_nursery() as core:  # terms and builder connections
            listening = trio.CancelScope()
            if leadership is None:
                await core.start(runner.lead, farm, dispatcher, None)
            addresses = await core.start(_listen, runner, listening, core)
            if leadership is not None:
                leadership.builders = _advertised(addresses.builders[0])
                leadership.http = addresses.http[0] if addresses.http else ""
                core.start_soon(_lead_when_elected, runner, leadership, farm, dispatcher)
            task_status.started(addresses)
            shield.shield = True
            await stop.event.wait()
            log.info("stopping: no new connections; running builds have %g s", stop.grace)
            listening.cancel()
            with trio.move_on_after(stop.grace + 5):
                await runner.stop(stop.grace)
            core.cancel_scope.cancel()  # the term writes its last changes on the way out


async def _starting(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("Front answers by itself until the first term starts")


def _advertised(address: net.HostPort) -> str:
    """The builder address standbys name: the bound one, or this host's name for a wildcard."""
    if address.host in ("0.0.0.0", "::", ""):
        return str(net.HostPort(socket.getfqdn(), address.port))
    return str(address)


async def _lead_when_elected(
    runner: Runner, leadership: Leadership, farm: Farm, dispatcher: Dispatcher
) -> None:
    """Stand by, lead when elected, stand by again when the lease is lost, forever."""
    while True:
        epoch = await leadership.campaign()
        try:
            async with trio.open_nursery() as term:
                await term.start(runner.lead, farm, dispatcher, epoch)

                async def hold() -> None:
                    await leadership.hold()
                    term.cancel_scope.cancel()

                term.start_soon(hold)
        except* Deposed as group:
            first: BaseException = group
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            log.error("%s: standing by", first)
        finally:
            await leadership.release()
        # A term's queue in memory is never reused: the next one is loaded from the
        # database, where the new leader may have changed everything.
        farm, dispatcher = make_farm(runner.config, followers=runner.storage.logs.followers)


async def _listen(
    runner: Runner,
    scope: trio.CancelScope,
    connections: trio.Nursery,
    *,
    task_status: trio.TaskStatus[RunnerAddresses],
) -> None:
    """Serve the builder port and the HTTP API until ``scope`` is cancelled; builder
    connections run in ``connections``, which outlives it (ordered shutdown)."""
    with scope:
        async with trio.open_nursery() as nursery:
            addresses = await _open_listeners(runner, nursery, connections)
            task_status.started(addresses)


async def _open_listeners(
    runner: Runner, nursery: trio.Nursery, connections: trio.Nursery
) -> RunnerAddresses:
    config = runner.config
    serve_builders = functools.partial(
        net.serve_tcp,
        runner.handle_builder,
        config.listen,
        keepalive_timeout=config.builder_timeout,
        handler_nursery=connections,
    )
    builders = await _start_listener(nursery, serve_builders, "builders (--listen)", config.listen)
    http: list[str] = []
    if config.http is not None:
        hc = HypercornConfig()
        hc.bind = [str(config.http)]
        hc.accesslog = None
        hc.errorlog = logging.getLogger("hydra_trio.http")
        hc.graceful_timeout = 1.0
        serve_http = functools.partial(hypercorn_serve, runner.front, hc)  # type: ignore[arg-type]
        http = await _start_listener(nursery, serve_http, "HTTP (--http)", config.http)
    log.info(
        "queue runner listening for builders on %s, HTTP on %s",
        ", ".join(map(str, builders)),
        ", ".join(http) or "(off)",
    )
    where = f"builders on {builders[0]}, HTTP on {http[0] if http else 'off'}"
    sdnotify.notify(f"READY=1\nSTATUS={where}")
    return RunnerAddresses(builders=builders, http=http)


class ListenError(HydraTrioError):
    """A port the runner was told to listen on cannot be bound."""


async def _start_listener(
    nursery: trio.Nursery, serve: Any, what: str, address: net.HostPort
) -> list[Any]:
    """``nursery.start(serve)``, where a bind error becomes one line naming the port and the
    option that set it (the kernel's ``Address already in use`` names neither)."""
    try:
        started: list[Any] = await nursery.start(serve)
    except OSError as exc:
        hint = " (is another runner using the port?)" if exc.errno == errno.EADDRINUSE else ""
        raise ListenError(
            f"cannot listen for {what} on {address}: {exc.strerror or exc}{hint}"
        ) from None
    return started
