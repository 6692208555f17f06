"""hydra-trio: a build farm whose builder connections can never die silently.

The public API, for programs that embed a queue runner or a builder (docs/embedding.md):

- ``serve_runner(config, *, task_status)``: the queue runner until cancelled;
  ``nursery.start`` returns its ``RunnerAddresses`` (builder ports, HTTP URLs).
- ``RunnerConfig``: its configuration (the ``queue-runner`` options).
- ``run_builder(config, *, task_status)``: a builder until drained or cancelled;
  ``nursery.start`` returns its ``BuilderState``.
- ``BuilderConfig``: its configuration (the ``builder`` options).
- ``HostPort``: a ``HOST:PORT`` (``HostPort.parse("[::1]:7420")``).
- ``HydraTrioError``: the root of the errors this package raises.
- ``PROTOCOL_VERSION``: the wire protocol version this code speaks (docs/protocol.md).

Everything else (``hydra_trio.runner.*``, ``hydra_trio.builder.*``) may change between releases.
The names are imported on first use, so ``import hydra_trio`` alone loads neither daemon.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it.
_PUBLIC = {
    "serve_runner": "hydra_trio.runner.daemon",
    "RunnerConfig": "hydra_trio.runner.daemon",
    "RunnerAddresses": "hydra_trio.runner.daemon",
    "run_builder": "hydra_trio.builder.daemon",
    "BuilderConfig": "hydra_trio.builder.config",
    "BuilderState": "hydra_trio.builder.state",
    "HostPort": "hydra_trio.net",
    "HydraTrioError": "hydra_trio.protocol.errors",
    "PROTOCOL_VERSION": "hydra_trio.protocol.messages",
}

__all__ = [
    "PROTOCOL_VERSION",
    "BuilderConfig",
    "BuilderState",
    "HostPort",
    "HydraTrioError",
    "RunnerAddresses",
    "RunnerConfig",
    "__version__",
    "run_builder",
    "serve_runner",
]

if TYPE_CHECKING:
    from hydra_trio.builder.config import BuilderConfig
    from hydra_trio.builder.daemon import run_builder
    from hydra_trio.builder.state import BuilderState
    from hydra_trio.net import HostPort
    from hydra_trio.protocol.errors import HydraTrioError
    from hydra_trio.protocol.messages import PROTOCOL_VERSION
    from hydra_trio.runner.daemon import RunnerAddresses, RunnerConfig, serve_runner


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'hydra_trio' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
