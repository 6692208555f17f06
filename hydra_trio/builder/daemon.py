"""The builder daemon's entry point: ``run_builder``.

A builder dials the queue runner, says hello, pings, runs the builds it is assigned, and
reconnects whenever the connection fails, forever (until drained).  The pieces:

- ``config``: ``BuilderConfig``, what it is configured with;
- ``workdir``: claiming the work dir, clearing what a killed predecessor left, the machine id;
- ``state``: ``BuilderState``, what outlives a connection, and how sessions end;
- ``session``: the reconnect loop, the handshake, one session's tasks;
- ``jobs``: the builds a session runs; ``fetch``: their inputs, into the verified cache;
- ``executor`` and ``nixexec``: one attempt of a build (on ``attempt``, ``builddir``,
  ``inputs``, ``process``, ``outputs``).

The names embedders use (the CLI, tests) are importable from here.
"""

from __future__ import annotations

import trio

from hydra_trio import sdnotify
from hydra_trio.builder.config import BuilderConfig
from hydra_trio.builder.session import Connect, reconnect, tcp_connector
from hydra_trio.builder.state import BuilderState, Executor, NixExecutor
from hydra_trio.builder.workdir import (
    WorkDirError,
    claim_work_dir,
    kill_leftover_builds,
    load_machine_id,
)

__all__ = [
    "BuilderConfig",
    "BuilderState",
    "Connect",
    "Executor",
    "NixExecutor",
    "WorkDirError",
    "claim_work_dir",
    "kill_leftover_builds",
    "load_machine_id",
    "run_builder",
]


async def run_builder(
    config: BuilderConfig,
    *,
    connect: Connect | None = None,
    state: BuilderState | None = None,
    task_status: trio.TaskStatus[BuilderState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve as a builder until drained (returns) or the runner is incompatible (raises).

    ``connect`` opens a stream to the runner; by default TCP to ``config.server`` with keepalive
    set from the ping timeout.  Each attempt is bounded by ``config.connect_timeout``.  The
    caller owns the work dir's lock (``claim_work_dir``); ``state`` defaults to a new one with
    the work dir's machine id, and is what ``task_status.started`` reports.
    """
    if state is None:
        machine_id = await trio.to_thread.run_sync(load_machine_id, config.work_dir)
        state = BuilderState(config=config, machine_id=machine_id)
    if state.standby is not None:  # started, then told to move: no mkdir waits on a move
        state.standby.fill(enter=False)
        state.standby.enter()
    try:
        task_status.started(state)
        sdnotify.notify(f"READY=1\nSTATUS=connecting to {config.server}")
        await reconnect(config, state, connect or tcp_connector(config, state.servers))
    finally:
        if state.standby is not None:
            state.standby.close()
