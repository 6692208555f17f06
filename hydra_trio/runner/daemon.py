"""The queue runner daemon: builder port, HTTP API and dispatcher in one nursery."""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import IO

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from hydra_trio import net, sdnotify
from hydra_trio.hydra.config import HydraConfig
from hydra_trio.runner.blobs import Storage
from hydra_trio.runner.farm import Farm, FarmConfig
from hydra_trio.runner.front import Front
from hydra_trio.runner.handshake import HandshakeGate
from hydra_trio.runner.http import create_app
from hydra_trio.runner.journal import Journal
from hydra_trio.runner.logs import Followers
from hydra_trio.runner.persister import Persister
from hydra_trio.runner.session import SessionConfig, serve_builder
from hydra_trio.runner.store import StoreError, lock_database, open_store
from hydra_trio.system import default_system, lock_dir

log = logging.getLogger("hydra_trio.runner")


@attrs.frozen(kw_only=True)
class RunnerConfig:
    """Everything the queue runner is configured with: the `queue-runner` options
    (`hydra-trio queue-runner --help`, docs/deploy.md) as attributes."""

    listen: net.HostPort = net.HostPort("127.0.0.1", 7420)
    http: net.HostPort | None = net.HostPort("127.0.0.1", 7421)
    state_dir: Path = Path("hydra-trio-state")
    #: None: ``sqlite:///<state_dir>/queue.sqlite``.
    db: str | None = None
    builder_timeout: float = attrs.field(default=30.0)
    handshake_timeout: float = 10.0
    max_tries: int = 3
    default_system: str = attrs.field(factory=default_system)
    max_frame_size: int = 8 * 1024 * 1024
    #: the shared secret (``--token-file``): builders must prove they know it, and HTTP calls
    #: that change state must carry it.  None: no authentication.
    token: bytes | None = attrs.field(default=None, repr=False)
    #: with a token, HTTP reads need it too (``--http-token-for-reads``).
    http_token_for_reads: bool = False
    #: TLS on the builder port (``--tls-cert``/``--tls-key``); with ``tls_ca``, builders must
    #: present a client certificate signed by it.
    tls_cert: Path | None = None
    tls_key: Path | None = attrs.field(default=None)
    tls_ca: Path | None = None
    #: connections that have not completed their hello, at most; more are closed at once.
    max_unauthenticated: int = 256
    #: a local chroot Nix store (``--nix-store DIR``) for ``drv`` submissions and Nix build
    #: outputs; None: the machine's own store.
    nix_store: Path | None = None
    #: Hydra mode (``--hydra-db``, ``--hydra-data``): serve a Hydra database's queue.
    hydra: HydraConfig | None = None

    @builder_timeout.validator
    def _positive(self, attribute: attrs.Attribute[float], value: float) -> None:
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"{attribute.name} must be a positive number of seconds")

    @tls_key.validator
    def _tls_pair(self, attribute: attrs.Attribute[Path | None], value: Path | None) -> None:
        if (self.tls_cert is None) != (value is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key (TLS on the builder port)")

    def session_config(self) -> SessionConfig:
        """Loads the TLS files, if any (raises ``net.TLSError`` when they cannot be used)."""
        ssl_context = None
        if self.tls_cert is not None and self.tls_key is not None:
            ssl_context = net.server_tls_context(self.tls_cert, self.tls_key, self.tls_ca)
        return SessionConfig(
            builder_timeout=self.builder_timeout,
            handshake_timeout=self.handshake_timeout,
            max_frame_size=self.max_frame_size,
            token=self.token,
            ssl_context=ssl_context,
        )


@attrs.frozen
class RunnerAddresses:
    """Where a started runner listens."""

    builders: list[net.HostPort]
    http: list[str]


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


def open_storage(config: RunnerConfig, farm: Farm) -> Storage:
    """The state dir's files; log followers are the farm's, woken on every build change."""
    return Storage.in_dir(config.state_dir, config.nix_store, followers=farm.followers)


async def serve_runner(
    config: RunnerConfig,
    *,
    farm: Farm | None = None,
    dispatcher: Dispatcher | None = None,
    task_status: trio.TaskStatus[RunnerAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the queue runner until cancelled.  Reports where it listens once it does.

    ``farm``/``dispatcher`` may be given by embedders and tests (``make_farm``); otherwise they
    are created here.
    """
    session_config = await trio.to_thread.run_sync(config.session_config)  # reads TLS files
    if farm is None or dispatcher is None:
        farm, dispatcher = make_farm(config)
    storage = await trio.to_thread.run_sync(open_storage, config, farm)
    lock = await trio.to_thread.run_sync(lock_state_dir, config.state_dir)
    try:
        db_lock = await trio.to_thread.run_sync(lock_database, config.db, config.state_dir)
    except BaseException:
        lock.close()
        raise
    removed = await trio.to_thread.run_sync(storage.blobs.remove_partial_uploads)
    if removed:
        log.info("removed %d partial uploads left by a previous runner", removed)
    try:
        store = await trio.to_thread.run_sync(open_store, config.db, config.state_dir)
    except BaseException:
        lock.close()
        if db_lock is not None:
            db_lock.close()
        raise
    persister = Persister(store, farm, storage.health)
    try:
        await trio.to_thread.run_sync(store.migrate)
        snapshot = await trio.to_thread.run_sync(store.load)
        farm.restore(snapshot, trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(persister.run)
            await _serve(
                config, session_config, farm, dispatcher, storage, persister, nursery, task_status
            )
    finally:
        # Whatever ends the runner, what changed until now is written if the database lets us.
        # (The persister task is gone with its nursery: write the last batch directly.)
        try:
            with trio.move_on_after(10, shield=True):
                try:
                    await persister.final_save()
                except Exception as exc:  # e.g. the database is still down: say what waits
                    log.error("could not write the last changes: %s", exc)
                finally:
                    await trio.to_thread.run_sync(store.close)
        finally:
            lock.close()
            if db_lock is not None:
                db_lock.close()


async def _serve(
    config: RunnerConfig,
    session_config: SessionConfig,
    farm: Farm,
    dispatcher: Dispatcher,
    storage: Storage,
    persister: Persister,
    nursery: trio.Nursery,
    task_status: trio.TaskStatus[RunnerAddresses],
) -> None:
    """Start the dispatcher, the builder port and the HTTP API in ``nursery``."""
    nursery.start_soon(dispatcher.run, farm)
    if config.hydra is not None:
        from hydra_trio.hydra.queue import HydraQueue

        await nursery.start(HydraQueue(config.hydra, farm, storage).run)
    gate = HandshakeGate(config.max_unauthenticated)
    handler = functools.partial(serve_builder, farm, session_config, storage, gate=gate)
    builders = await nursery.start(
        functools.partial(
            net.serve_tcp, handler, config.listen, keepalive_timeout=config.builder_timeout
        )
    )
    http: list[str] = []
    if config.http is not None:
        app = create_app(
            farm,
            storage,
            default_system=config.default_system,
            persist=persister.flush,
            token=config.token,
            token_for_reads=config.http_token_for_reads,
        )
        hc = HypercornConfig()
        hc.bind = [str(config.http)]
        hc.accesslog = None
        hc.errorlog = logging.getLogger("hydra_trio.http")
        hc.graceful_timeout = 1.0
        front = Front(app, unavailable=lambda: persister.unavailable)
        serve_http = functools.partial(hypercorn_serve, front, hc)  # type: ignore[arg-type]
        http = await nursery.start(serve_http)
    log.info(
        "queue runner listening for builders on %s, HTTP on %s",
        ", ".join(map(str, builders)),
        ", ".join(http) or "(off)",
    )
    task_status.started(RunnerAddresses(builders=builders, http=http))
    where = f"builders on {builders[0]}, HTTP on {http[0] if http else 'off'}"
    sdnotify.notify(f"READY=1\nSTATUS={where}")
