"""Starting the daemons from the command line: logging, ``trio.run``, signals, and the start-up
of a builder and of ``up``'s one-process farm.

``run_daemon`` owns the process: it raises the open-file limit, tunes the collector, runs the
daemon's ``main`` under ``run_until_signal`` and turns the start-up errors a user can fix (a
port in use, a locked state dir, an unreadable file, a refused database) into one line and exit
status 1.  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import attrs
import click
import trio

from hydra_trio.cli.client import RunnerClient, RunnerClientError
from hydra_trio.cli.errors import fail
from hydra_trio.protocol.errors import HydraTrioError
from hydra_trio.protocol.messages import ExecutorKind
from hydra_trio.system import (
    default_hostname,
    raise_open_file_limit,
    tune_gc,
    tune_switch_interval,
)

if TYPE_CHECKING:
    from hydra_trio.builder.daemon import BuilderConfig
    from hydra_trio.runner.daemon import RunnerConfig

log = logging.getLogger("hydra_trio.cli")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO; the only one a daemon makes is up's --submit.
    logging.getLogger("httpx").setLevel(max(root.level, logging.WARNING))


def _leaf(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc`` or in the exception groups it nests."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _leaf(inner, kind)
            if found is not None:
                return found
    return None


def run_daemon(
    main: Callable[[], Awaitable[None]], on_sigterm: Callable[[], None] | None = None
) -> None:
    """``trio.run`` a daemon until a signal; startup errors a user can fix are one line."""
    raise_open_file_limit()
    tune_gc()
    tune_switch_interval()
    try:
        trio.run(run_until_signal, main, on_sigterm)
    except BaseException as exc:
        ours = _leaf(exc, HydraTrioError)  # incompatible runner, database refused, state locked
        if ours is not None:
            fail(str(ours))
        os_error = _leaf(exc, OSError)
        if isinstance(os_error, OSError) and os_error.errno in (
            errno.EADDRINUSE,
            errno.EADDRNOTAVAIL,
            errno.EACCES,
        ):
            fail(f"cannot listen: {os_error.strerror} (is another runner using the port?)")
        if isinstance(os_error, OSError) and os_error.filename:
            fail(f"{os_error.filename}: {os_error.strerror}")
        raise


async def run_until_signal(
    main: Callable[[], Awaitable[None]], on_sigterm: Callable[[], None] | None = None
) -> None:
    """Run ``main``; SIGINT cancels it; SIGTERM calls ``on_sigterm`` (a graceful drain) if
    given, else cancels.  A second signal always cancels."""
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            graceful = on_sigterm
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    if signum == signal.SIGTERM and graceful is not None:
                        graceful()
                        graceful = None
                        continue
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch)
        await main()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------
# The queue runner.


def run_runner_daemon(config: RunnerConfig) -> None:
    """Run the queue runner; SIGTERM stops it gracefully (running builds get
    ``--stop-grace``), SIGINT at once; neither uses a build's try."""
    stops: list[trio.Event] = []

    def on_sigterm() -> None:
        for stop in stops:
            stop.set()

    run_daemon(functools.partial(_serve_runner, config, stops), on_sigterm)


async def _serve_runner(config: RunnerConfig, stops: list[trio.Event]) -> None:
    from hydra_trio.runner.daemon import serve_runner

    stop = trio.Event()
    stops.append(stop)
    await serve_runner(config, graceful_stop=stop)


# ---------------------------------------------------------------------------------------------
# A builder.


#: The variable naming the token file, which a re-executed builder's environment leaves out.
TOKEN_FILE_VARIABLE = "HYDRA_TRIO_TOKEN_FILE"


def reexec_hiding_token_file(token: bytes) -> None:
    """Execute this builder again with the token on a pipe (``--token-fd``, read once and
    closed) instead of ``--token-file`` in its argv or environment, so a build cannot find
    the file through ``/proc/<builder>/cmdline`` or ``environ``.  Returns (doing nothing)
    when nothing there names it (a ``--config`` file does) or when this process is not the
    ``hydra-trio`` command itself (an embedder, a test's ``CliRunner``)."""
    if Path(sys.argv[0]).name not in ("hydra-trio", "__main__.py"):
        return
    argv = without_token_file(sys.argv[1:])
    env = {name: value for name, value in os.environ.items() if name != TOKEN_FILE_VARIABLE}
    if argv == sys.argv[1:] and len(env) == len(os.environ):
        return
    read, write = os.pipe()
    os.write(write, token + b"\n")  # a token is far smaller than a pipe's buffer
    os.close(write)
    os.set_inheritable(read, True)
    command = [sys.executable, "-m", "hydra_trio", *argv, "--token-fd", str(read)]
    os.execve(sys.executable, command, env)


def without_token_file(args: list[str]) -> list[str]:
    """``args`` without ``--token-file FILE`` or ``--token-file=FILE``."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--token-file":
            skip = True
        elif not arg.startswith("--token-file="):
            kept.append(arg)
    return kept


def run_builder_daemon(config: BuilderConfig) -> None:
    """Run a builder on its work dir; SIGTERM drains it (finish the running builds, then stop)."""
    drains: list[Callable[[], None]] = []

    def on_sigterm() -> None:
        for request_drain in drains:
            request_drain()

    _not_dumpable()
    run_daemon(functools.partial(_serve_builder, config, drains), on_sigterm)


def _not_dumpable() -> None:
    """Linux: no core dumps, and a process of the same (non-root) user, a build's, cannot
    read this one's memory, ``environ`` or descriptors through ``/proc``, nor trace it: the
    token is in its memory."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_dumpable = 4
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)


async def _serve_builder(config: BuilderConfig, drains: list[Callable[[], None]]) -> None:
    from hydra_trio.builder.buildusers import check_sandbox, lock_pool
    from hydra_trio.builder.daemon import BuilderState, claim_work_dir, run_builder

    if ExecutorKind.NIX in config.executors:
        await _check_nix(config.nix_store)
    if config.sandbox is not None:
        # as the nix executor checks its store: refuse to start (one line, SandboxError)
        # rather than fail every build it is given
        await trio.to_thread.run_sync(config.sandbox.check)
        if config.build_users is not None:  # and then bubblewrap runs unprivileged
            user = config.build_users.users[0]
            await trio.to_thread.run_sync(check_sandbox, config.sandbox, user)
    with contextlib.ExitStack() as held:
        if config.build_users is not None:
            held.enter_context(lock_pool(config.build_users))
        lock = await trio.to_thread.run_sync(claim_work_dir, config.work_dir, config.build_users)
        held.callback(lock.close)
        async with trio.open_nursery() as nursery:
            state: BuilderState = await nursery.start(functools.partial(run_builder, config))
            drains.append(state.request_drain)


async def _check_nix(store_root: Path | None) -> None:
    """Refuse to start a nix-executor builder where Nix cannot build (``NixSetupError``, one
    line saying what to set up), instead of failing every build it is given as
    ``internal-error``."""
    from hydra_trio.nixstore import NixStore

    await NixStore(root=store_root).check_can_build()


# ---------------------------------------------------------------------------------------------
# up: a runner and local builders in one process.


@attrs.frozen(kw_only=True)
class LocalFarm:
    """What ``up`` starts."""

    runner: RunnerConfig
    builders: int
    max_jobs: int
    ping_interval: float
    #: a ``POST /builds`` graph body to submit once the runner is up (already validated).
    graph: dict[str, Any] | None = None


def run_local_farm(farm: LocalFarm) -> None:
    run_daemon(functools.partial(_serve_local_farm, farm))


async def _serve_local_farm(farm: LocalFarm) -> None:
    locks: list[IO[bytes]] = []  # each builder's work dir, held while this runs
    try:
        async with trio.open_nursery() as nursery:
            await _start_local_farm(farm, nursery, locks)
    finally:
        for lock in locks:
            lock.close()


async def _start_local_farm(farm: LocalFarm, nursery: trio.Nursery, locks: list[IO[bytes]]) -> None:
    from hydra_trio.builder.daemon import BuilderConfig, claim_work_dir, run_builder
    from hydra_trio.runner.daemon import RunnerAddresses, serve_runner

    config = farm.runner
    addresses: RunnerAddresses = await nursery.start(functools.partial(serve_runner, config))
    url = addresses.http[0] if addresses.http else None
    if farm.graph is not None and url is not None:
        await _submit_graph(RunnerClient(url, config.token), farm.graph)
    server = addresses.builders[0]
    hostname = default_hostname()
    for index in range(farm.builders):
        work_dir = config.state_dir / "builders" / str(index + 1)
        locks.append(await trio.to_thread.run_sync(claim_work_dir, work_dir))
        builder = BuilderConfig(
            server=server,
            hostname=f"{hostname}-builder{index + 1}",
            work_dir=work_dir,
            max_jobs=farm.max_jobs,
            ping_interval=farm.ping_interval,
            token=config.token,
        )
        nursery.start_soon(functools.partial(run_builder, builder))
    if url:
        me = program()
        click.echo(
            f"\nhydra-trio is up: {farm.builders} builders x {farm.max_jobs} slots.\n"
            f"  dashboard and API: {url}/\n"
            f"  try:  {me} submit --url {url} --wait -- sh -c 'echo hello > $OUT/x'\n"
            f"        {me} status --url {url}\n"
            "  stop with Ctrl-C\n",
            err=True,
        )


async def _submit_graph(client: RunnerClient, graph: dict[str, Any]) -> None:
    """Submit ``up --submit``'s graph through the runner's HTTP API, as ``submit --file``
    would; a refusal is one logged line and the farm keeps running."""
    try:
        ids = await trio.to_thread.run_sync(client.submit_graph, graph)
    except RunnerClientError as exc:
        log.error("could not submit the --submit graph: %s", exc)
        return
    for name, build_id in ids.items():
        click.echo(f"submitted {name} {build_id}", err=True)


def program(argv0: str | None = None) -> str:
    """How to run this hydra-trio again from the user's shell: ``hydra-trio`` where PATH finds
    this very program, else the path it was started by (``make run`` starts
    ``.venv/bin/hydra-trio``, which is not on PATH), else ``python -m hydra_trio``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    found = shutil.which("hydra-trio")
    if found is not None and os.path.realpath(found) == os.path.realpath(argv0):
        return "hydra-trio"
    if os.path.basename(argv0) == "hydra-trio":
        return argv0
    return f"{sys.executable} -m hydra_trio"
