"""The builds a session runs: one task each, in the session's nursery, under its own scope.

``Jobs.start`` takes an ``Assign`` and runs it with the executor it asks for (``command`` or
``nix``; one this builder lacks gives ``internal-error``), in ``<work dir>/builds/<name>``,
then sends its ``Result``.  An ``Abort`` cancels the build's scope (the executor kills its
processes and removes its directory); so does the session's end, and then no result is sent:
the runner requeues the build under a new attempt.  An exception other than the connection's
failing becomes an ``internal-error`` result, never the end of the session.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import attrs
import trio

from hydra_trio import net
from hydra_trio.builder.attempt import Send
from hydra_trio.builder.config import BuilderConfig
from hydra_trio.builder.inputs import Fetch
from hydra_trio.builder.state import BuilderState
from hydra_trio.builder.workdir import build_dir_name
from hydra_trio.nixstore import NixStore
from hydra_trio.protocol.errors import ProtocolError
from hydra_trio.protocol.messages import Assign, BuildRef, BuildStatus, ExecutorKind, Result

log = logging.getLogger("hydra_trio.builder")


@attrs.define(eq=False)
class _RunningBuild:
    assign: Assign
    scope: trio.CancelScope


@attrs.define(eq=False)
class Jobs:
    """The running builds of one session (see the module docstring)."""

    config: BuilderConfig
    state: BuilderState
    send: Send
    fetch: Fetch
    nursery: trio.Nursery
    _running: dict[str, _RunningBuild] = attrs.field(factory=dict, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)

    def start(self, assign: Assign) -> None:
        """Start running ``assign`` (a second assignment of a running build is ignored)."""
        if assign.build_id in self._running:
            log.warning("ignoring a second assignment of build %s", assign.build_id)
            return
        running = _RunningBuild(assign=assign, scope=trio.CancelScope())
        self._running[assign.build_id] = running
        self.nursery.start_soon(self._build, running)

    def abort(self, build_id: str, attempt: int, reason: str) -> None:
        """Cancel that attempt of that build, if it is the one running."""
        running = self._running.get(build_id)
        if running is not None and running.assign.attempt == attempt:
            log.info("build %s attempt %d aborted: %s", build_id, attempt, reason)
            running.scope.cancel()

    def refs(self) -> tuple[BuildRef, ...]:
        """The running builds, as a ``Ping`` lists them."""
        return tuple(
            BuildRef(build_id=b.assign.build_id, attempt=b.assign.attempt)
            for b in self._running.values()
        )

    async def wait_idle(self) -> None:
        """Return once no build is running."""
        while self._running:
            self._changed = trio.Event()
            await self._changed.wait()

    async def _build(self, running: _RunningBuild) -> None:
        assign = running.assign
        build_dir = self.config.work_dir.absolute() / "builds" / build_dir_name(assign)
        command = " ".join(assign.command)[:200]
        log.info("build %s attempt %d: %s", assign.build_id, assign.attempt, command)
        try:
            with running.scope:
                result = await self._result(assign, build_dir)
                await self.send(result)
                status = result.status.value
                log.info("build %s attempt %d: %s", assign.build_id, assign.attempt, status)
        except (net.ConnectionLost, ProtocolError):
            pass  # the session is closing; the runner requeues the build
        finally:
            del self._running[assign.build_id]
            self._changed.set()

    async def _result(self, assign: Assign, build_dir: Path) -> Result:
        """Run the build; an internal error (a bug, an OS failure) is its result."""
        try:
            return await self._execute(assign, build_dir)
        except (net.ConnectionLost, ProtocolError):
            raise
        except Exception as exc:  # a bug or an OS failure must not end the session
            log.exception("build %s attempt %d: internal error", assign.build_id, assign.attempt)
            error = f"builder internal error: {type(exc).__name__}: {exc}"
            return _internal_error(assign, error)

    async def _execute(self, assign: Assign, build_dir: Path) -> Result:
        """Run a build with the executor its Assign asks for, if this builder has it."""
        kind = assign.executor
        if kind not in self.config.executors:
            return _internal_error(assign, f"this builder has no {kind} executor (--executor)")
        if kind is ExecutorKind.NIX:
            return await self.state.execute_nix(
                self._nix_store(), assign, build_dir, self.send, _base_env(), self.fetch
            )
        return await self.state.execute(assign, build_dir, self.send, _base_env(), self.fetch)

    def _nix_store(self) -> NixStore:
        if self.state.nix_store is not None:
            return self.state.nix_store
        features = (*self.config.supported_features, *self.config.mandatory_features)
        return NixStore(self.config.nix_store, system_features=tuple(sorted(set(features))))


def _internal_error(assign: Assign, error: str) -> Result:
    return Result(
        build_id=assign.build_id,
        attempt=assign.attempt,
        status=BuildStatus.INTERNAL_ERROR,
        error=error,
    )


def _base_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}
