"""The daemons' options as typed records, and the daemon configs built from them.

Each record is what click parsed for one group of options (``options_record`` checks at import
that the options and the fields match).  ``RunnerOptions.runner_config`` and
``BuilderOptions.builder_config`` turn them into the frozen ``RunnerConfig``/``BuilderConfig``
the daemons take, reading the files they name (token, TLS) and turning what the configs refuse
into one-line usage errors.  The conversion lives here and not as a classmethod of the configs:
``runner/`` and ``builder/`` do not know the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import click

from hydra_trio import net
from hydra_trio.auth import MAX_TOKEN_BYTES
from hydra_trio.cli.options import (
    HOSTPORT,
    HOSTPORT_LIST,
    LIST,
    SECONDS,
    option,
    options_record,
    path_option,
    token_file_option,
)
from hydra_trio.protocol.errors import HydraTrioError
from hydra_trio.protocol.messages import NETWORK_FEATURE, ExecutorKind
from hydra_trio.system import default_hostname, default_system

if TYPE_CHECKING:
    import ssl

    from hydra_trio.builder.buildusers import BuildUsers
    from hydra_trio.builder.daemon import BuilderConfig
    from hydra_trio.builder.sandbox import Sandbox
    from hydra_trio.hydra.config import HydraConfig
    from hydra_trio.runner.daemon import RunnerConfig

#: The executors a builder can offer (``--executor``).
EXECUTORS = tuple(kind.value for kind in ExecutorKind)


def load_token(path: Path | None) -> bytes | None:
    """The token in ``path`` (None without one); a bad file is a usage error."""
    from hydra_trio.auth import load_token

    if path is None:
        return None
    try:
        return load_token(path)
    except HydraTrioError as exc:
        raise click.BadParameter(str(exc), param_hint="--token-file") from None


# ---------------------------------------------------------------------------------------------
# The queue runner.


@attrs.frozen(kw_only=True)
class ServerTlsOptions:
    """TLS on the builder port (``queue-runner`` only; ``up`` listens on loopback)."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None


server_tls_options = options_record(
    ServerTlsOptions,
    "tls",
    path_option("--tls-cert", "TLS certificate (PEM, with its chain) for the builder port."),
    path_option("--tls-key", "The TLS certificate's private key (PEM)."),
    path_option("--tls-ca", "With TLS: builders must present a certificate signed by this CA."),
)


@attrs.frozen(kw_only=True)
class RunnerOptions:
    """The queue runner's options that ``queue-runner`` and ``up`` share."""

    listen: net.HostPort
    state_dir: Path
    db: str | None
    builder_timeout: float
    handshake_timeout: float
    max_tries: int
    token_file: Path | None
    http_token_for_reads: bool
    http_public_logs: bool
    max_unauthenticated: int
    nix_store: Path | None
    hydra_db: str | None
    hydra_data: Path | None
    data_dir: Path | None
    lease_timeout: float | None
    stop_grace: float

    def runner_config(
        self, http: net.HostPort, tls: ServerTlsOptions | None = None
    ) -> RunnerConfig:
        from hydra_trio.runner.daemon import RunnerConfig

        tls = tls or ServerTlsOptions()
        try:
            return RunnerConfig(
                listen=self.listen,
                http=http,
                state_dir=self.state_dir,
                db=self.db,
                builder_timeout=self.builder_timeout,
                handshake_timeout=self.handshake_timeout,
                max_tries=self.max_tries,
                token=load_token(self.token_file),
                http_token_for_reads=self.http_token_for_reads,
                http_public_logs=self.http_public_logs,
                tls_cert=tls.tls_cert,
                tls_key=tls.tls_key,
                tls_ca=tls.tls_ca,
                max_unauthenticated=self.max_unauthenticated,
                nix_store=self.nix_store,
                hydra=self.hydra_config(),
                data_dir=self.data_dir,
                lease_timeout=self.lease_timeout,
                stop_grace=self.stop_grace,
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None

    def hydra_config(self) -> HydraConfig | None:
        """Hydra mode's settings (``--hydra-db`` with ``--hydra-data``), or None."""
        db, data = self.hydra_db, self.hydra_data
        if db is None and data is None:
            return None
        if db is None or data is None:
            raise click.UsageError("--hydra-db and --hydra-data go together (Hydra mode)")
        if not db.startswith(("postgresql://", "postgres://")):
            raise click.BadParameter("must be a postgresql:// URL", param_hint="--hydra-db")
        from hydra_trio.hydra.config import HydraConfig

        return HydraConfig(db=db, data=data)


runner_options = options_record(
    RunnerOptions,
    "runner",
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
        "Shared secret builders must prove they know, and HTTP calls that change state must carry."
    ),
    option(
        "--http-token-for-reads",
        is_flag=True,
        default=False,
        help="With --token-file, HTTP reads need the token too.",
    ),
    option(
        "--http-public-logs",
        is_flag=True,
        default=False,
        help="With --token-file, builds' logs and outputs are readable without the token.",
    ),
    option(
        "--max-unauthenticated",
        type=click.IntRange(min=1),
        default=256,
        help="Connections in their handshake at once; more are closed at once.",
    ),
    path_option(
        "--nix-store",
        "A local chroot Nix store (DIR/nix/store) to read submitted derivations from "
        "and import Nix builds' outputs into.  [default: this machine's store]",
        directory=True,
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
    option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Build outputs and logs, shared by the runners of one PostgreSQL database "
        "(e.g. on NFS).  [default: the state dir]",
    ),
    option(
        "--lease-timeout",
        type=SECONDS,
        default=None,
        help="With PostgreSQL: a leader that has not renewed its lease this long is replaced "
        "by a standby.  [default: --builder-timeout]",
    ),
    option(
        "--stop-grace",
        type=click.FloatRange(min=0),
        default=10.0,
        help="On SIGTERM, running builds get this long to finish; the rest go back to the "
        "queue without using a try (SIGINT: at once).",
    ),
)


# ---------------------------------------------------------------------------------------------
# The builder.


@attrs.frozen(kw_only=True)
class BuilderOptions:
    """Everything ``builder`` takes besides logging."""

    server: tuple[net.HostPort, ...]
    systems: tuple[str, ...]
    features: tuple[str, ...]
    mandatory_features: tuple[str, ...]
    max_jobs: int
    speed_factor: float
    ping_interval: float
    ping_timeout: float | None
    reconnect_max: float
    work_dir: Path
    hostname: str
    token_file: Path | None
    token_fd: int | None
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    tls: bool
    executor: tuple[str, ...]
    nix_store: Path | None
    sandbox: bool
    sandbox_path: tuple[str, ...]
    sandbox_allow_network: bool
    build_users: str | None

    def builder_config(self) -> BuilderConfig:
        from hydra_trio.builder.daemon import BuilderConfig

        if not self.systems:
            raise click.BadParameter("at least one system is needed", param_hint="--systems")
        if not self.server:
            raise click.BadParameter("at least one address is needed", param_hint="--server")
        return BuilderConfig(
            server=self.server[0],
            servers=self.server if len(self.server) > 1 else (),
            systems=self.systems,
            supported_features=self.features,
            mandatory_features=self.mandatory_features,
            max_jobs=self.max_jobs,
            speed_factor=self.speed_factor,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            work_dir=self.work_dir,
            hostname=self.hostname,
            reconnect_max=self.reconnect_max,
            token=self.token(),
            ssl_context=self.ssl_context(),
            executors=self.executors(),
            nix_store=self.nix_store,
            sandbox=self.sandboxing(),
            build_users=self.parsed_build_users(),
        )

    def parsed_build_users(self) -> BuildUsers | None:
        from hydra_trio.builder.buildusers import BuildUsers

        if self.build_users is None:
            return None
        try:
            return BuildUsers.parse(self.build_users)
        except HydraTrioError as exc:
            raise click.BadParameter(str(exc), param_hint="--build-users") from None

    def check_build_users(self) -> None:
        """Refuse (``BuildUsersError``, one line) build users this builder cannot use safely:
        without the rights to switch to them, fewer than ``--max-jobs``, or with a token file
        they could read (checked before the token is read)."""
        from hydra_trio.builder import buildusers

        users = self.parsed_build_users()
        if users is None:
            return
        buildusers.check_privileges()
        buildusers.check_max_jobs(users, self.max_jobs)
        if self.token_file is not None:
            buildusers.check_token_file(users, self.token_file)

    def sandboxing(self) -> Sandbox | None:
        """``--sandbox`` and its options (checked to work at start, ``Sandbox.check``)."""
        from hydra_trio.builder.sandbox import Sandbox, SandboxPath

        if not self.sandbox:
            if self.sandbox_path or self.sandbox_allow_network:
                raise click.UsageError("--sandbox-path and --sandbox-allow-network need --sandbox")
            return None
        try:
            paths = tuple(SandboxPath.parse(text) for text in self.sandbox_path)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--sandbox-path") from None
        if NETWORK_FEATURE in self.features and not self.sandbox_allow_network:
            raise click.BadParameter(
                f"{NETWORK_FEATURE}: a sandboxed builder gives builds the network only with "
                "--sandbox-allow-network",
                param_hint="--features",
            )
        return Sandbox(paths=paths, allow_network=self.sandbox_allow_network)

    def token(self) -> bytes | None:
        """The token: from ``--token-fd`` (a pipe the builder re-executing itself left open,
        read and closed here) before ``--token-file``."""
        if self.token_fd is None:
            return load_token(self.token_file)
        with os.fdopen(self.token_fd, "rb") as pipe:
            token = pipe.read(MAX_TOKEN_BYTES + 1).strip()
        if not token:
            raise click.BadParameter("no token on this descriptor", param_hint="--token-fd")
        return token

    def ssl_context(self) -> ssl.SSLContext | None:
        """The builder's TLS context: with any TLS option (``--tls`` alone uses the system
        roots)."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together")
        if not (self.tls or self.tls_ca or self.tls_cert):
            return None
        try:
            return net.client_tls_context(self.tls_ca, self.tls_cert, self.tls_key)
        except HydraTrioError as exc:
            raise click.UsageError(str(exc)) from None

    def executors(self) -> tuple[str, ...]:
        unknown = [name for name in self.executor if name not in EXECUTORS]
        if unknown or not self.executor:
            raise click.BadParameter(
                f"{','.join(unknown) or '(none)'}: give one or more of {', '.join(EXECUTORS)}",
                param_hint="--executor",
            )
        return self.executor


builder_options = options_record(
    BuilderOptions,
    "options",
    option(
        "--server",
        type=HOSTPORT_LIST,
        required=True,
        help="The queue runner's builder port; several runners sharing a database as a "
        "comma list (the builder settles on the leader).",
    ),
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
    option(
        "--ping-interval",
        type=SECONDS,
        default=10.0,
        help="Seconds between pings (at most a third of the runner's --builder-timeout, "
        "which the runner tells the builder).",
    ),
    option(
        "--ping-timeout",
        type=SECONDS,
        default=None,
        help="No frame from the runner this long: reconnect.  [default: 3 x interval]",
    ),
    option("--reconnect-max", type=SECONDS, default=60.0, help="Cap of reconnect backoff."),
    option(
        "--work-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default="./hydra-trio-builder",
        help="Build directories and the machine id.",
    ),
    option("--hostname", default=default_hostname(), help="Shown in /status."),
    token_file_option("The runner's shared secret (proven, never sent)."),
    option(
        "--token-fd",
        type=click.IntRange(min=3),
        default=None,
        hidden=True,
        help="Read the token from this open descriptor (how the builder re-executes itself).",
    ),
    path_option("--tls-ca", "Connect with TLS; verify the runner against this CA."),
    path_option("--tls-cert", "Connect with TLS; present this client certificate (PEM)."),
    path_option("--tls-key", "The client certificate's private key (PEM)."),
    option(
        "--tls", is_flag=True, default=False, help="Connect with TLS, verified by system roots."
    ),
    option(
        "--executor",
        type=LIST,
        default=ExecutorKind.COMMAND.value,
        help="What it runs: command (COMMAND builds), nix (derivations), or command,nix.",
    ),
    path_option(
        "--nix-store",
        "A local chroot Nix store (DIR/nix/store) for the nix executor.  [default: this machine's]",
        directory=True,
    ),
    option(
        "--sandbox",
        is_flag=True,
        default=False,
        help="Linux: run each command build in its own namespaces (bubblewrap): it sees only "
        "its build dir, $IN read-only, the system's programs and the --sandbox-path paths, "
        "and has no network (docs/security.md).",
    ),
    option(
        "--sandbox-path",
        multiple=True,
        metavar="PATH[=INSIDE]",
        help="With --sandbox: also let builds read PATH, at INSIDE (repeatable).",
    ),
    option(
        "--sandbox-allow-network",
        is_flag=True,
        default=False,
        help="With --sandbox: a build that asks for the network (submit --network) gets the "
        "builder's; others still have none.",
    ),
    option(
        "--build-users",
        default=None,
        metavar="GROUP|FIRST-LAST[:GROUP]",
        help="Run each command build as a user of its own, never two at once: the members of "
        "GROUP (as Nix's nixbld), or the uids FIRST..LAST that no account uses (gid: the same "
        "number, or GROUP).  Builds then cannot read the work dir, the token or each other's "
        "files.  Needs root; at least --max-jobs users; a token file only the builder can read.",
    ),
)
