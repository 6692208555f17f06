"""What many daemon tests share: the system they build for, a runner and a builder config,
a build spec, and polling in virtual time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from hydra_trio.builder.daemon import BuilderConfig
from hydra_trio.runner.daemon import RunnerConfig
from hydra_trio.runner.model import BuildSpec

SYSTEM = "x86_64-linux"
#: The runner of the in-memory tests: no HTTP, the contract's timeouts.
RUNNER = RunnerConfig(
    builder_timeout=30.0, handshake_timeout=10.0, http=None, default_system=SYSTEM
)


def builder_config(tmp_path: Path, name: str, **kw: Any) -> BuilderConfig:
    """A builder for SYSTEM pinging every 10 s, working in ``tmp_path / name``; ``kw``
    overrides any field."""
    config = BuilderConfig(systems=(SYSTEM,), ping_interval=10.0, work_dir=tmp_path / name)
    return attrs.evolve(config, **kw)


def spec(*command: str) -> BuildSpec:
    return BuildSpec(command=command or ("true",), system=SYSTEM)


async def wait_until(
    predicate: Callable[[], object], *, step: float = 0.01, limit: float = 100_000
) -> float:
    """Poll ``predicate`` in virtual time; returns the time it became true.

    ``limit`` is virtual time too, and under the autojump clock polling moves it on while a
    worker thread is busy: a few hundred virtual seconds per real second of thread work (one
    poll every ``step``, some 25 us of real time each).  So a limit is a guard against a hang,
    far above what the work takes, never an assertion that real work ends within it."""
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(step)
    return trio.current_time()


def state_of(thing: Any) -> Any:
    """Read a state another task changes (keeps mypy from narrowing it across awaits)."""
    return thing.state
