"""Command line: a click group that parses options into frozen configs and calls ``trio.run``.

Every option can also come from ``HYDRA_TRIO_<OPTION>`` or from ``--config FILE`` (TOML, same
names, either at top level or in a ``[queue-runner]`` / ``[builder]`` / ... table); precedence is
command line > environment > file > default.  User mistakes are one line on stderr and exit
status 2 (usage) or 1 (everything else), never a traceback.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import re
import shutil
import signal
import ssl
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import click
import httpx
import trio

from hydra_trio import __version__, net
from hydra_trio.protocol.errors import HydraTrioError
from hydra_trio.system import (
    default_hostname,
    default_system,
    raise_open_file_limit,
    tune_gc,
)

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_URL = "http://127.0.0.1:7421"


# ---------------------------------------------------------------------------------------------
# Option helpers.


class HostPortType(click.ParamType):  # type: ignore[type-arg]
    name = "HOST:PORT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> net.HostPort:
        if isinstance(value, net.HostPort):
            return value
        try:
            return net.HostPort.parse(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class ListType(click.ParamType):  # type: ignore[type-arg]
    """A comma-separated list (TOML lists are accepted too)."""

    name = "LIST"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, ...]:
        if isinstance(value, (list, tuple)):
            return tuple(str(v) for v in value)
        return tuple(item.strip() for item in str(value).split(",") if item.strip())


HOSTPORT = HostPortType()
LIST = ListType()
SECONDS = click.FloatRange(min=0, min_open=True)


def option(*decls: str, **kwargs: Any) -> Callable[[F], F]:
    """``click.option`` with the contract's environment variable and defaults shown."""
    long = next(d for d in decls if d.startswith("--"))
    kwargs.setdefault("envvar", "HYDRA_TRIO_" + long[2:].replace("-", "_").upper())
    kwargs.setdefault("show_default", True)
    kwargs.setdefault("show_envvar", True)
    return click.option(*decls, **kwargs)


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if not value:
        return
    try:
        with open(value, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{value} is not valid TOML: {exc}") from None
    command = ctx.info_name or ""
    merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
    section = data.get(command)
    if isinstance(section, dict):
        merged.update(section)
    ctx.default_map = {key.replace("-", "_"): v for key, v in merged.items()}


def config_option(f: F) -> F:
    return option(
        "--config",
        type=click.Path(dir_okay=False),
        callback=_load_config,
        is_eager=True,
        expose_value=False,
        help="TOML file with the same option names.",
    )(f)


def logging_options(f: F) -> F:
    f = option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        help="Least severe messages logged.",
    )(f)
    return option(
        "--log-format", type=click.Choice(["text", "json"]), default="text", help="Log line format."
    )(f)


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


def fail(message: str) -> NoReturn:
    """A user-facing error: one line, exit status 1."""
    click.echo(f"hydra-trio: error: {message}", err=True)
    sys.exit(1)


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
# Daemons.


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hydra-trio")
def main() -> None:
    """hydra-trio: a build farm whose builder connections can never die silently."""


def _runner_options(f: F) -> F:
    for decorator in reversed(
        [
            option(
                "--listen",
                type=HOSTPORT,
                default="127.0.0.1:7420",
                help="Where builders connect ([::]:7420 for every interface).",
            ),
            option(
                "--state-dir",
                type=click.Path(file_okay=False, path_type=Path),
                default="./hydra-trio-state",
                help="Database, logs and build outputs.",
            ),
            option(
                "--db",
                default=None,
                help="sqlite:///PATH or postgresql://...  [default: <state-dir>/queue.sqlite]",
            ),
            option(
                "--builder-timeout",
                type=SECONDS,
                default=30.0,
                help="A builder silent this long is disconnected and its builds rescheduled.",
            ),
            option(
                "--handshake-timeout",
                type=SECONDS,
                default=10.0,
                help="A connection without a hello by then is closed.",
            ),
            option(
                "--max-tries",
                type=click.IntRange(min=1),
                default=3,
                help="Attempts per build for infrastructure failures.",
            ),
            token_file_option(
                "Shared secret builders must prove they know, and HTTP calls that change state "
                "must carry."
            ),
            option(
                "--http-token-for-reads",
                is_flag=True,
                default=False,
                help="With --token-file, HTTP reads need the token too.",
            ),
            option(
                "--max-unauthenticated",
                type=click.IntRange(min=1),
                default=256,
                help="Connections in their handshake at once; more are closed at once.",
            ),
            _nix_store_option(
                "A local chroot Nix store (DIR/nix/store) to read submitted derivations from "
                "and import Nix builds' outputs into.  [default: this machine's store]"
            ),
            option(
                "--hydra-db",
                default=None,
                help="Hydra mode: serve the queue of this Hydra database "
                "(postgresql://.../hydra), as hydra-queue-runner does.",
            ),
            option(
                "--hydra-data",
                type=click.Path(file_okay=False, path_type=Path),
                default=None,
                help="Hydra mode: Hydra's data dir (HYDRA_DATA; logs go to its build-logs/).",
            ),
        ]
    ):
        f = decorator(f)
    return f


def _hydra_config(db: str | None, data: Path | None) -> Any:
    if db is None and data is None:
        return None
    if db is None or data is None:
        raise click.UsageError("--hydra-db and --hydra-data go together (Hydra mode)")
    if not db.startswith(("postgresql://", "postgres://")):
        raise click.BadParameter("must be a postgresql:// URL", param_hint="--hydra-db")
    from hydra_trio.hydra.config import HydraConfig

    return HydraConfig(db=db, data=data)


def _nix_store_option(help: str) -> Callable[[F], F]:
    return option(
        "--nix-store", type=click.Path(file_okay=False, path_type=Path), default=None, help=help
    )


#: The executors a builder can offer (``--executor``).
EXECUTORS = ("command", "nix")


async def _check_nix(store_root: Path | None) -> None:
    """Refuse to start a nix-executor builder where Nix cannot build (``NixSetupError``, one
    line saying what to set up), instead of failing every build it is given as
    ``internal-error``."""
    from hydra_trio.nixstore import NixStore

    await NixStore(root=store_root).check_can_build()


def _executors(value: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [name for name in value if name not in EXECUTORS]
    if unknown or not value:
        raise click.BadParameter(
            f"{','.join(unknown) or '(none)'}: give one or more of {', '.join(EXECUTORS)}",
            param_hint="--executor",
        )
    return value


def token_file_option(help: str) -> Callable[[F], F]:
    return option(
        "--token-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=help,
    )


def _tls_file(help: str, name: str) -> Callable[[F], F]:
    return option(name, type=click.Path(dir_okay=False, path_type=Path), default=None, help=help)


def _token(path: Path | None) -> bytes | None:
    """The token in ``path`` (None without one); a bad file is a usage error."""
    from hydra_trio.auth import load_token

    if path is None:
        return None
    try:
        return load_token(path)
    except HydraTrioError as exc:
        raise click.BadParameter(str(exc), param_hint="--token-file") from None


def _runner_config(**kw: Any) -> Any:
    from hydra_trio.runner.daemon import RunnerConfig

    try:
        return RunnerConfig(
            listen=kw["listen"],
            http=kw["http"],
            state_dir=kw["state_dir"],
            db=kw["db"],
            builder_timeout=kw["builder_timeout"],
            handshake_timeout=kw["handshake_timeout"],
            max_tries=kw["max_tries"],
            token=_token(kw["token_file"]),
            http_token_for_reads=kw["http_token_for_reads"],
            tls_cert=kw.get("tls_cert"),
            tls_key=kw.get("tls_key"),
            tls_ca=kw.get("tls_ca"),
            max_unauthenticated=kw["max_unauthenticated"],
            nix_store=kw.get("nix_store"),
            hydra=_hydra_config(kw.get("hydra_db"), kw.get("hydra_data")),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@main.command("queue-runner")
@config_option
@_runner_options
@option("--http", type=HOSTPORT, default="127.0.0.1:7421", help="HTTP API, metrics, dashboard.")
@_tls_file("TLS certificate (PEM, with its chain) for the builder port.", "--tls-cert")
@_tls_file("The TLS certificate's private key (PEM).", "--tls-key")
@_tls_file("With TLS: builders must present a certificate signed by this CA.", "--tls-ca")
@logging_options
def queue_runner(log_level: str, log_format: str, **kw: Any) -> None:
    """Run the queue runner: builders dial in, builds are handed out."""
    from hydra_trio.runner.daemon import serve_runner

    setup_logging(log_level, log_format)
    config = _runner_config(**kw)
    run_daemon(functools.partial(serve_runner, config))


def _builder_options(f: F) -> F:
    for decorator in reversed(
        [
            option("--systems", type=LIST, default=default_system(), help="Comma-separated."),
            option("--features", type=LIST, default="", help="Supported features."),
            option(
                "--mandatory-features",
                type=LIST,
                default="",
                help="Features every build run here must require.",
            ),
            option("--max-jobs", type=click.IntRange(min=1), default=1, help="Job slots."),
            option("--speed-factor", type=SECONDS, default=1.0, help="Preference among machines."),
            option("--ping-interval", type=SECONDS, default=10.0, help="Seconds between pings."),
            option(
                "--ping-timeout",
                type=SECONDS,
                default=None,
                help="No frame from the runner this long: reconnect.  [default: 3 x interval]",
            ),
            option("--reconnect-max", type=SECONDS, default=60.0, help="Cap of reconnect backoff."),
        ]
    ):
        f = decorator(f)
    return f


@main.command("builder")
@config_option
@option("--server", type=HOSTPORT, required=True, help="The queue runner's builder port.")
@_builder_options
@option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="./hydra-trio-builder",
    help="Build directories and the machine id.",
)
@option("--hostname", default=default_hostname(), help="Shown in /status.")
@token_file_option("The runner's shared secret (proven, never sent).")
@_tls_file("Connect with TLS; verify the runner against this CA.", "--tls-ca")
@_tls_file("Connect with TLS; present this client certificate (PEM).", "--tls-cert")
@_tls_file("The client certificate's private key (PEM).", "--tls-key")
@option("--tls", is_flag=True, default=False, help="Connect with TLS, verified by system roots.")
@option(
    "--executor",
    type=LIST,
    default="command",
    help="What it runs: command (COMMAND builds), nix (derivations), or command,nix.",
)
@_nix_store_option(
    "A local chroot Nix store (DIR/nix/store) for the nix executor.  [default: this machine's]"
)
@logging_options
def builder(log_level: str, log_format: str, **kw: Any) -> None:
    """Run a builder: connect to the queue runner and run what it assigns."""
    from hydra_trio.builder.daemon import BuilderConfig, BuilderState, claim_work_dir, run_builder

    setup_logging(log_level, log_format)
    if not kw["systems"]:
        raise click.BadParameter("at least one system is needed", param_hint="--systems")
    config = BuilderConfig(
        server=kw["server"],
        systems=kw["systems"],
        supported_features=kw["features"],
        mandatory_features=kw["mandatory_features"],
        max_jobs=kw["max_jobs"],
        speed_factor=kw["speed_factor"],
        ping_interval=kw["ping_interval"],
        ping_timeout=kw["ping_timeout"],
        work_dir=kw["work_dir"],
        hostname=kw["hostname"],
        reconnect_max=kw["reconnect_max"],
        token=_token(kw["token_file"]),
        ssl_context=_builder_tls(kw["tls"], kw["tls_ca"], kw["tls_cert"], kw["tls_key"]),
        executors=_executors(kw["executor"]),
        nix_store=kw["nix_store"],
    )

    async def serve() -> None:
        if "nix" in config.executors:
            await _check_nix(config.nix_store)
        lock = await trio.to_thread.run_sync(claim_work_dir, config.work_dir)
        try:
            async with trio.open_nursery() as nursery:
                state: BuilderState = await nursery.start(functools.partial(run_builder, config))
                drains.append(state.request_drain)
        finally:
            lock.close()

    drains: list[Callable[[], None]] = []

    def on_sigterm() -> None:
        for request_drain in drains:
            request_drain()

    run_daemon(serve, on_sigterm)


def _builder_tls(
    tls: bool, ca: Path | None, cert: Path | None, key: Path | None
) -> ssl.SSLContext | None:
    """The builder's TLS context: with any TLS option (``--tls`` alone uses the system roots)."""
    if (cert is None) != (key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if not (tls or ca or cert):
        return None
    try:
        return net.client_tls_context(ca, cert, key)
    except HydraTrioError as exc:
        raise click.UsageError(str(exc)) from None


@main.command("up")
@config_option
@option("--builders", type=click.IntRange(min=0), default=2, help="Local builders to start.")
@option("--http", type=HOSTPORT, default="127.0.0.1:7421", help="HTTP API and dashboard.")
@_runner_options
@option("--max-jobs", type=click.IntRange(min=1), default=2, help="Job slots per builder.")
@option("--ping-interval", type=SECONDS, default=10.0, help="Builders' ping interval.")
@option(
    "--submit",
    "graph_file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="A TOML graph to submit once the farm is up (something to look at).",
)
@logging_options
def up(
    log_level: str,
    log_format: str,
    builders: int,
    max_jobs: int,
    ping_interval: float,
    graph_file: str | None,
    **kw: Any,
) -> None:
    """A queue runner and N local builders in one process (trying it out; one-machine farms)."""
    from hydra_trio.builder.daemon import BuilderConfig, claim_work_dir, run_builder
    from hydra_trio.runner.daemon import RunnerAddresses, make_farm, serve_runner
    from hydra_trio.runner.specs import SpecError, parse_graph

    setup_logging(log_level, log_format)
    config = _runner_config(**kw)
    hostname = default_hostname()
    graph: tuple[list[Any], list[str]] | None = None
    if graph_file is not None:
        try:
            graph = parse_graph(load_graph(graph_file), config.default_system)
        except SpecError as exc:
            raise click.BadParameter(str(exc), param_hint="--submit") from None

    async def serve() -> None:
        locks: list[IO[bytes]] = []  # each builder's work dir, held while this runs
        try:
            await serve_farm(locks)
        finally:
            for lock in locks:
                lock.close()

    async def serve_farm(locks: list[IO[bytes]]) -> None:
        farm, dispatcher = make_farm(config)
        async with trio.open_nursery() as nursery:
            addresses: RunnerAddresses = await nursery.start(
                functools.partial(serve_runner, config, farm=farm, dispatcher=dispatcher)
            )
            if graph is not None:
                specs, names = graph
                positions = {name: i for i, name in enumerate(names)}
                submitted = farm.submit_graph(specs, trio.current_time(), positions.get)
                for name, build in zip(names, submitted, strict=True):
                    click.echo(f"submitted {name} {build.id}", err=True)
            server = addresses.builders[0]
            for index in range(builders):
                work_dir = config.state_dir / "builders" / str(index + 1)
                locks.append(await trio.to_thread.run_sync(claim_work_dir, work_dir))
                nursery.start_soon(
                    functools.partial(
                        run_builder,
                        BuilderConfig(
                            server=server,
                            hostname=f"{hostname}-builder{index + 1}",
                            work_dir=work_dir,
                            max_jobs=max_jobs,
                            ping_interval=ping_interval,
                            token=config.token,
                        ),
                    )
                )
            url = addresses.http[0] if addresses.http else None
            if url:
                click.echo(
                    f"\nhydra-trio is up: {builders} builders x {max_jobs} slots.\n"
                    f"  dashboard and API: {url}/\n"
                    f"  try:  hydra-trio submit --url {url} --wait -- sh -c 'echo hello > $OUT/x'\n"
                    f"        hydra-trio status --url {url}\n"
                    "  stop with Ctrl-C\n",
                    err=True,
                )

    run_daemon(serve)


# ---------------------------------------------------------------------------------------------
# Client commands.


def client_options(f: F) -> F:
    f = token_file_option("The runner's token, sent as 'Authorization: Bearer' on every call.")(f)
    f = option("--url", default=DEFAULT_URL, help="The queue runner's HTTP API.")(f)
    return config_option(f)


def _auth_headers(token: bytes | None) -> dict[str, str]:
    if token is None:
        return {}
    return {"Authorization": "Bearer " + token.decode("ascii")}  # load_token checked it


def _check(response: httpx.Response, token: bytes | None) -> None:
    """A runner's error answer as a one-line error (the body must have been read)."""
    if response.status_code < 400:
        return
    try:
        message = response.json().get("error", response.text)
    except ValueError:
        message = response.text.strip() or response.reason_phrase
    if response.status_code == 403:
        hint = "is --token-file the runner's token?" if token else "pass --token-file"
        fail(f"the queue runner refused the request: {message} ({hint})")
    fail(f"{message} (HTTP {response.status_code})")


def _request(method: str, url: str, path: str, token: bytes | None, **kwargs: Any) -> Any:
    try:
        response = httpx.request(
            method,
            url.rstrip("/") + path,
            headers=_auth_headers(token),
            timeout=30.0,
            **kwargs,
        )
    except httpx.InvalidURL as exc:
        fail(f"invalid --url {url!r}: {exc}")
    except httpx.HTTPError as exc:
        fail(f"cannot reach the queue runner at {url}: {exc} (is it running? `hydra-trio up`)")
    _check(response, token)
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return response.text


@main.command("submit")
@client_options
@option("--name", default="", help="A name for the build (its input dir for dependents).")
@option("--system", default=None, help="Required system [default: the runner's].")
@option("--feature", "features", multiple=True, help="Required feature (repeatable).")
@option("--after", multiple=True, help="Build id that must succeed first (repeatable).")
@option("--priority", type=int, default=0, help="Higher runs first.")
@option("--timeout", type=SECONDS, default=None, help="Wall-clock limit in seconds.")
@option("--max-silent", type=SECONDS, default=None, help="Limit on seconds without output.")
@option(
    "--file",
    "graph_file",
    type=click.Path(dir_okay=False, exists=True),
    help="A TOML graph of named builds (instead of COMMAND).",
)
@option(
    "--drv",
    default=None,
    help="Build this Nix derivation (/nix/store/...drv in the runner's store) and every "
    "missing dependency (instead of COMMAND).",
)
@option("--wait", is_flag=True, help="Wait for the build(s); exit 0 if all succeeded.")
@click.argument("command", nargs=-1)
def submit(
    url: str,
    token_file: Path | None,
    name: str,
    system: str | None,
    features: tuple[str, ...],
    after: tuple[str, ...],
    priority: int,
    timeout: float | None,
    max_silent: float | None,
    graph_file: str | None,
    drv: str | None,
    wait: bool,
    command: tuple[str, ...],
) -> None:
    """Submit a build: hydra-trio submit [OPTIONS] -- COMMAND [ARG]...

    With --file GRAPH.toml, submit a whole graph and print one NAME ID line per build.
    With --drv /nix/store/...drv, build a Nix derivation: one build per derivation whose
    outputs the runner's store lacks; prints the top derivation's build id."""
    if drv is not None:
        if command or graph_file is not None:
            raise click.UsageError("give either --drv, --file or a COMMAND, not two of them")
        if name or system or features or after:
            raise click.UsageError("--name, --system, --feature and --after do not go with --drv")
        _submit_drv(url, _token(token_file), drv, priority, timeout, max_silent, wait)
        return
    if graph_file is not None:
        if command:
            raise click.UsageError("give either --file or a COMMAND, not both")
        graph = load_graph(graph_file)
        token = _token(token_file)
        ids = _request("POST", url, "/builds", token, json=graph)["ids"]
        for build_name, build_id in ids.items():
            click.echo(f"{build_name} {build_id}")
        if wait:
            sys.exit(max(_wait(url, token, build_id) for build_id in ids.values()))
        return
    if not command:
        raise click.UsageError("give the COMMAND to run after --, or --file GRAPH.toml")
    token = _token(token_file)
    body: dict[str, Any] = {
        "command": list(command),
        "name": name,
        "after": list(after),
        "requiredFeatures": list(features),
        "priority": priority,
    }
    if system:
        body["system"] = system
    if timeout is not None:
        body["timeout"] = timeout
    if max_silent is not None:
        body["maxSilent"] = max_silent
    build_id = _request("POST", url, "/builds", token, json=body)["id"]
    click.echo(build_id)
    if wait:
        sys.exit(_wait(url, token, build_id))


def _submit_drv(
    url: str,
    token: bytes | None,
    drv: str,
    priority: int,
    timeout: float | None,
    max_silent: float | None,
    wait: bool,
) -> None:
    if not (drv.startswith("/nix/store/") and drv.endswith(".drv")):
        raise click.BadParameter(
            f"{drv} is not a derivation (/nix/store/...drv)", param_hint="--drv"
        )
    body: dict[str, Any] = {"drv": drv, "priority": priority}
    if timeout is not None:
        body["timeout"] = timeout
    if max_silent is not None:
        body["maxSilent"] = max_silent
    answer = _request("POST", url, "/builds", token, json=body)
    build_id = answer.get("id")
    if build_id is None:
        paths = " ".join(answer.get("storePaths", {}).values())
        click.echo(f"nothing to build: {paths} already valid in the runner's store", err=True)
        return
    click.echo(build_id)
    if wait:
        sys.exit(_wait(url, token, build_id))


_GRAPH_KEYS = {
    "command": "command",
    "system": "system",
    "features": "requiredFeatures",
    "required-features": "requiredFeatures",
    "requiredFeatures": "requiredFeatures",
    "after": "after",
    "priority": "priority",
    "timeout": "timeout",
    "max-silent": "maxSilent",
    "maxSilent": "maxSilent",
    "env": "env",
}


def load_graph(path: str) -> dict[str, Any]:
    """Read a TOML graph: ``[build.NAME]`` tables (or ``[[build]]`` with ``name``), each with
    ``command`` and optionally ``after``, ``system``, ``features``, ``priority``, ``timeout``,
    ``max-silent``, ``env``.  Returns the ``POST /builds`` body; mistakes are usage errors."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid TOML: {exc}", param_hint="--file") from None
    table = data.get("build")
    if isinstance(table, dict):
        entries = [
            {"name": key, **value} for key, value in table.items() if isinstance(value, dict)
        ]
    elif isinstance(table, list):
        entries = [dict(entry) for entry in table if isinstance(entry, dict)]
    else:
        raise click.BadParameter(f"{path}: no [build.NAME] tables", param_hint="--file")
    builds = []
    for entry in entries:
        unknown = sorted(set(entry) - set(_GRAPH_KEYS) - {"name"})
        if unknown:
            raise click.BadParameter(
                f"{path}: build {entry.get('name')!r} has unknown keys {', '.join(unknown)}",
                param_hint="--file",
            )
        builds.append(
            {"name": entry.get("name")}
            | {_GRAPH_KEYS[k]: v for k, v in entry.items() if k != "name"}
        )
    return {"builds": builds}


def _wait(url: str, token: bytes | None, build_id: str) -> int:
    """Follow a build until it ends; 0 if it succeeded, else 1.  On a terminal, one line
    rewritten in place (state, phase, machine, elapsed, the log's last line); otherwise a
    plain line per change of state, phase, machine or attempt."""
    live = sys.stderr.isatty()
    last = None
    started = time.monotonic()
    while True:
        build = _request("GET", url, f"/builds/{build_id}", token)
        elapsed = time.monotonic() - started
        where = f" on {build['machine']}" if build.get("machine") else ""
        phase = f" ({build['phase']})" if build.get("phase") else ""
        summary = f"[{elapsed:6.1f}s] {build['state']}{phase}{where} attempt {build['attempts']}"
        finished = build["state"] in ("succeeded", "failed", "cancelled")
        if live:
            tail = _last_line(_request("GET", url, f"/builds/{build_id}/log?tail=2048", token))
            line = summary + (f" | {tail}" if tail else "")
            width = shutil.get_terminal_size().columns - 1
            click.echo("\r\x1b[K" + line[:width], err=True, nl=finished)
        else:
            shown = (build["state"], build.get("phase"), build.get("machine"), build["attempts"])
            if shown != last:
                click.echo(summary, err=True)
                last = shown
        if finished:
            if build["state"] != "succeeded":
                click.echo(
                    f"build {build_id} {build['state']}: {build['status']}"
                    + (f" ({build['error']})" if build.get("error") else ""),
                    err=True,
                )
            return 0 if build["state"] == "succeeded" else 1
        time.sleep(0.5)


#: Terminal escape sequences (colours, cursor moves) that builds print.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _last_line(log: object) -> str:
    """The last non-empty line of a log tail, printable (control characters dropped)."""
    text = _ANSI.sub("", log) if isinstance(log, str) else ""
    for line in reversed(text.splitlines()):
        shown = "".join(c for c in line if c.isprintable()).strip()
        if shown:
            return shown
    return ""


def _age(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


@main.command("status")
@client_options
@option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def status(url: str, token_file: Path | None, as_json: bool) -> None:
    """Machines and queue counts."""
    data = _request("GET", url, "/status", _token(token_file))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = [("HOSTNAME", "STATE", "JOBS", "SINCE PING", "OK/FAILED/LOST")]
    for m in data["machines"]:
        rows.append(
            (
                m["hostname"],
                m["state"],
                f"{m['currentJobs']}/{m['maxJobs']}",
                _age(m["sinceLastPing"]),
                f"{m['succeededBuilds']}/{m['failedBuilds']}/{m['lostBuilds']}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    q = data["queue"]
    click.echo("\nqueue: " + ", ".join(f"{q[k]} {k}" for k in q))


@main.command("show")
@client_options
@click.argument("build_id")
@option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def show(url: str, token_file: Path | None, build_id: str, as_json: bool) -> None:
    """One build's state."""
    data = _request("GET", url, f"/builds/{build_id}", _token(token_file))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key in ("id", "name", "drv", "state", "status", "attempts", "machine", "exitCode", "error"):
        if data.get(key) is not None:
            click.echo(f"{key}: {data[key]}")
    for output_name, store_path in (data.get("storePaths") or {}).items():
        click.echo(f"store path: {store_path} ({output_name})")
    for output in data.get("outputs", []):
        click.echo(f"output: {output['path']} ({output['size']} bytes)")


@main.command("log")
@client_options
@click.argument("build_id")
@option("--follow", "-f", is_flag=True, help="Keep printing until the build ends.")
def log_command(url: str, token_file: Path | None, build_id: str, follow: bool) -> None:
    """A build's log (of its current attempt)."""
    token = _token(token_file)
    if not follow:
        click.echo(_request("GET", url, f"/builds/{build_id}/log", token), nl=False)
        return
    _request("GET", url, f"/builds/{build_id}", token)  # a clear error for an unknown id
    out = sys.stdout.buffer
    try:
        with httpx.stream(
            "GET",
            url.rstrip("/") + f"/builds/{build_id}/log?follow=1",
            headers=_auth_headers(token),
            timeout=None,
        ) as response:
            if response.status_code >= 400:
                response.read()
                _check(response, token)
            for chunk in response.iter_bytes():
                out.write(chunk)
                out.flush()
    except httpx.HTTPError as exc:
        fail(f"lost the log stream from {url}: {exc}")


@main.command("cancel")
@client_options
@click.argument("build_id")
def cancel(url: str, token_file: Path | None, build_id: str) -> None:
    """Cancel a queued or running build."""
    data = _request("POST", url, f"/builds/{build_id}/cancel", _token(token_file))
    click.echo(f"{data['id']}: {data['state']}")


@main.command("drain")
@client_options
@click.argument("machine")
def drain(url: str, token_file: Path | None, machine: str) -> None:
    """Stop giving a machine (hostname or machine id) new builds."""
    data = _request("POST", url, f"/machines/{machine}/drain", _token(token_file))
    click.echo(f"{data['hostname']}: {data['state']}")
