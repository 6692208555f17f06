"""The queue runner's configuration: every ``queue-runner`` option as a typed attribute
(``hydra-trio queue-runner --help``, docs/deploy.md), and where a started runner listens."""

from __future__ import annotations

import math
from pathlib import Path

import attrs

from hydra_trio import net
from hydra_trio.hydra.config import HydraConfig
from hydra_trio.runner.session import SessionConfig
from hydra_trio.system import default_system


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
    #: with a token, builds' logs and outputs are readable without it (``--http-public-logs``).
    http_public_logs: bool = False
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
    #: build outputs and logs (``--data-dir``), shared by the runners of one PostgreSQL
    #: database; None: the state dir.
    data_dir: Path | None = None
    #: with PostgreSQL: how long the leadership lease lasts unrenewed (``--lease-timeout``);
    #: None: the builder timeout.
    lease_timeout: float | None = None

    #: on SIGTERM, how long running builds get to finish before they go back to the queue
    #: (``--stop-grace``; without using a try either way).
    stop_grace: float = 10.0

    @property
    def effective_lease_timeout(self) -> float:
        return self.lease_timeout if self.lease_timeout is not None else self.builder_timeout

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
