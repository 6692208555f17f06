"""What a builder is configured with: ``BuilderConfig``, built by the CLI or an embedder."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from pathlib import Path

import attrs

from hydra_trio import net
from hydra_trio.builder.buildusers import BuildUsers
from hydra_trio.builder.sandbox import Sandbox
from hydra_trio.protocol.messages import NETWORK_FEATURE, ExecutorKind
from hydra_trio.system import default_hostname, default_system


def _executor_kinds(names: Iterable[str]) -> tuple[ExecutorKind, ...]:
    return tuple(ExecutorKind(name) for name in names)


@attrs.frozen(kw_only=True)
class BuilderConfig:
    """Everything a builder is configured with: the `builder` options (`hydra-trio builder
    --help`, docs/deploy.md) as attributes."""

    server: net.HostPort = net.HostPort("127.0.0.1", 7420)
    #: every runner that may lead (``--server A,B``), tried in turn; empty: just ``server``.
    servers: tuple[net.HostPort, ...] = ()
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
    #: below this many free bytes in the work dir, the builder's pings say ``low_disk`` and
    #: the runner sends it no new build until there is room again.
    min_free_disk: int = 256 * 1024 * 1024
    #: the shared secret (``--token-file``), proven in the hello, never sent.
    token: bytes | None = attrs.field(default=None, repr=False)
    #: TLS to the runner (client side: verifies the runner's certificate against ``--tls-ca``
    #: or the system roots, and presents ``--tls-cert`` when given).  None: plain TCP.
    ssl_context: ssl.SSLContext | None = None
    #: what it runs (``--executor``): ``command`` (an Assign's command) and/or ``nix`` (an
    #: Assign's derivation, realised in ``nix_store``).
    executors: tuple[ExecutorKind, ...] = attrs.field(
        default=(ExecutorKind.COMMAND,), converter=_executor_kinds
    )
    #: a local chroot Nix store for the ``nix`` executor (``--nix-store DIR``); None: the
    #: machine's own store.
    nix_store: Path | None = None
    #: the users builds of the ``command`` executor run as, one per running build
    #: (``--build-users``, see ``buildusers``); None: as the builder's own user.
    build_users: BuildUsers | None = None
    #: run each command build in its own namespaces (``--sandbox``, Linux: ``sandbox``);
    #: None: builds run unsandboxed, as the builder's user.
    sandbox: Sandbox | None = None

    @property
    def gives_network(self) -> bool:
        """Whether a build that asks for the network gets it here: unsandboxed builds all
        have it; sandboxed ones only with ``--sandbox-allow-network``."""
        return self.sandbox is None or self.sandbox.allow_network

    @property
    def advertised_features(self) -> tuple[str, ...]:
        """The features the hello offers: ``supported_features``, with ``NETWORK_FEATURE``
        where builds can have the network (so the runner sends builds that ask for it only
        here) and never where they cannot."""
        features = tuple(f for f in self.supported_features if f != NETWORK_FEATURE)
        return (*features, NETWORK_FEATURE) if self.gives_network else features

    @property
    def addresses(self) -> tuple[net.HostPort, ...]:
        """The runners to try, in turn (``servers``, or ``server`` alone)."""
        return self.servers or (self.server,)

    @property
    def effective_ping_timeout(self) -> float:
        return self.ping_timeout if self.ping_timeout is not None else 3 * self.ping_interval

    @property
    def effective_healthy_after(self) -> float:
        if self.healthy_after is not None:
            return self.healthy_after
        return 2 * self.effective_ping_timeout
