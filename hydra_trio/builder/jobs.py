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
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from hydra_trio import net
from hydra_trio.builder.attempt import Send
from hydra_trio.builder.config import BuilderConfig
from hydra_trio.builder.inputs import Fetch, FetchError
from hydra_trio.builder.state import BuilderState
from hydra_trio.builder.workdir import build_dir_name
from hydra_trio.nixstore import NixStore
from hydra_trio.protocol import codec
from hydra_trio.protocol.errors import LocalProtocolError, ProtocolError
from hydra_trio.protocol.messages import (
    Assign,
    BuildRef,
    BuildStatus,
    ExecutorKind,
    FileInfo,
    InputSpec,
    OutputList,
    Result,
)

#: Fetches the listing of an input sent with ``listed`` (``InputFetcher.listing``).
Listing = Callable[[Assign, InputSpec], Awaitable[tuple[FileInfo, ...]]]
#: A Result lists its outputs itself up to this many bytes (about); beyond, to a 1.3 runner,
#: they go first in ``OutputList`` frames of about this size each.  The runner decodes a frame
#: in one go on its event loop: ~3 ms for 64 KiB of listing on an idle core (~550 files), 12
#: ms for 256 KiB, several times that beside a busy disk (a 100,000-file result's pieces were
#: the runner's longest pauses at 256 KiB).
OUTPUT_PIECE_BYTES = 64 * 1024
_FILE_INFO_BYTES = 120

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
    #: (1.3) fetches a listed input's files; None: the runner sends them in the Assign.
    listing: Listing | None = None
    #: (1.3) the runner takes output listings in pieces (``OutputList``).
    pieces: bool = False
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
                await self._send_result(result)
                status = result.status.value
                log.info("build %s attempt %d: %s", assign.build_id, assign.attempt, status)
        except (net.ConnectionLost, ProtocolError):
            pass  # the session is closing; the runner requeues the build
        finally:
            del self._running[assign.build_id]
            self._changed.set()

    async def _send_result(self, result: Result) -> None:
        """Send ``result``; a long output listing goes first in ``OutputList`` pieces (to a
        1.3 runner), so no frame grows with the number of outputs."""
        outputs = result.outputs
        if not self.pieces and len(outputs) > _CHECK_FIT:
            result = _fitting(result)
        if not self.pieces or _piece_end(outputs, 0) == len(outputs):
            await self.send(result)
            return
        start = 0
        while start < len(outputs):
            stop = _piece_end(outputs, start)
            await self.send(
                OutputList(
                    build_id=result.build_id, attempt=result.attempt, files=outputs[start:stop]
                )
            )
            start = stop
        await self.send(attrs.evolve(result, outputs=(), listed_outputs=len(outputs)))

    async def _listed(self, assign: Assign) -> Assign:
        """``assign`` with the files of its inputs sent with ``listed`` asked for."""
        if not any(spec.listed for spec in assign.inputs):
            return assign
        if self.listing is None:
            raise FetchError("this builder cannot ask for input listings")
        inputs = []
        for spec in assign.inputs:
            if spec.listed:
                files = await self.listing(assign, spec)
                spec = attrs.evolve(spec, files=files, listed=False)
            inputs.append(spec)
        return attrs.evolve(assign, inputs=tuple(inputs))

    async def _result(self, assign: Assign, build_dir: Path) -> Result:
        """Run the build; an internal error (a bug, an OS failure) is its result."""
        try:
            try:
                assign = await self._listed(assign)
            except FetchError as exc:
                return Result(
                    build_id=assign.build_id,
                    attempt=assign.attempt,
                    status=BuildStatus.FETCH_FAILED,
                    error=str(exc),
                )
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


#: Results with more outputs than this are checked against the frame limit before they go to a
#: runner older than 1.3 (which takes the whole listing in the Result).
_CHECK_FIT = 1000


def _fitting(result: Result) -> Result:
    """``result``, or if it is too large for one frame, a ``build-failed`` saying why (a
    frame over the limit would end the connection instead)."""
    try:
        codec.encode(result)
    except LocalProtocolError:
        error = (
            f"{len(result.outputs)} outputs: their listing does not fit in one frame, and "
            "the runner (protocol older than 1.3) cannot take it in pieces"
        )
        return attrs.evolve(result, status=BuildStatus.BUILD_FAILED, outputs=(), error=error)
    return result


def _piece_end(files: tuple[FileInfo, ...], start: int) -> int:
    """Where a piece of ``files`` from ``start`` ends: at most about OUTPUT_PIECE_BYTES on
    the wire (one file at least, while there are any)."""
    stop, budget = start, OUTPUT_PIECE_BYTES
    while stop < len(files):
        cost = len(files[stop].path) + len(files[stop].link) + _FILE_INFO_BYTES
        if cost > budget and stop > start:
            break
        budget -= cost
        stop += 1
    return stop


def _internal_error(assign: Assign, error: str) -> Result:
    return Result(
        build_id=assign.build_id,
        attempt=assign.attempt,
        status=BuildStatus.INTERNAL_ERROR,
        error=error,
    )


def _base_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}
