"""The skeleton every executor's attempt shares: directory, phases, timings, result.

``async with attempt(assign, path, send) as phases:`` prepares the build directory (a spare
renamed into place on the event loop, else in a thread) and removes or recycles it afterwards
(likewise: on the loop when its subdirectories are empty), however the block ends: cancelled (an
``Abort``, the connection dying), raising, or returning.  Inside, each phase is
``async with phases.timed(Phase.X):``, which reports it to the runner (``Progress``) and
records its duration in the result's ``timings`` if it ends without raising; the block ends
with ``return phases.result(status, ...)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

import attrs
import trio

from hydra_trio.builder import builddir
from hydra_trio.builder.builddir import BuildDir
from hydra_trio.protocol.messages import (
    Assign,
    BuildStatus,
    FileInfo,
    Message,
    Phase,
    Progress,
    Result,
)

#: How a build sends its frames (progress, log, uploads) to the runner.
Send = Callable[[Message], Awaitable[None]]
#: Several frames in one write (``net.FramedChannel.send_all``).
SendAll = Callable[[list[Message]], Awaitable[None]]


@attrs.frozen
class Sender:
    """A session's ``Send`` that can also hand several frames to the socket in one write
    (``many``): what a build is given, so that a large upload can go out several frames per
    ``sendmsg`` (``send_many``)."""

    one: Send
    many: SendAll

    async def __call__(self, message: Message) -> None:
        await self.one(message)


async def send_many(send: Send, messages: list[Message]) -> None:
    """``messages`` in one write if ``send`` can (a ``Sender``), else one ``send`` each."""
    if isinstance(send, Sender):
        await send.many(messages)
        return
    for message in messages:
        await send(message)


class RoundTrips(Protocol):
    """The session's pings, for a sender of many frames to pace itself by: a Pong says the
    runner has handled every frame sent before its Ping (the session's ``Session.mark``,
    ``Session.answered``)."""

    async def mark(self) -> int:
        """Send a ping now; its sequence number."""

    async def answered(self, seq: int) -> None:
        """Wait until the Pong of ping ``seq`` (or a later one) has arrived."""


#: The round trips of the session a build's task runs in (set by ``Session.run`` for the
#: tasks it starts; None outside a session, as in tests that run an executor alone).
ROUND_TRIPS: contextvars.ContextVar[RoundTrips | None] = contextvars.ContextVar(
    "round_trips", default=None
)

#: (1.7) Whether the session's runner takes many small files per frame (``FetchFiles``,
#: ``UploadFiles``); set by ``Session.run`` with ``ROUND_TRIPS``.
MANY_FILES: contextvars.ContextVar[bool] = contextvars.ContextVar("many_files", default=False)

#: The key of each phase's duration in ``Result.timings``.
TIMING_KEYS = {Phase.FETCHING: "fetch", Phase.BUILDING: "build", Phase.UPLOADING: "upload"}
#: Seconds the removal of a build directory may take once its attempt is over (shielded, so
#: a cancelled attempt still cleans up; bounded, in case the file system hangs).
REMOVE_GRACE = 30.0


@attrs.define(eq=False)
class Phases:
    """One attempt in progress: its build, directory, and the phases it has been through."""

    assign: Assign
    dir: BuildDir
    send: Send
    timings: dict[str, float] = attrs.field(factory=dict)

    @contextlib.asynccontextmanager
    async def timed(self, phase: Phase) -> AsyncIterator[None]:
        """Report ``phase`` to the runner, then time the block (if it does not raise)."""
        await self.send(
            Progress(build_id=self.assign.build_id, attempt=self.assign.attempt, phase=phase)
        )
        started = time.monotonic()
        yield
        self.timings[TIMING_KEYS[phase]] = round(time.monotonic() - started, 6)

    def result(
        self,
        status: BuildStatus,
        *,
        exit_code: int | None = None,
        error: str = "",
        outputs: Sequence[FileInfo] = (),
    ) -> Result:
        """How the attempt ended, with the timings of the phases so far."""
        return Result(
            build_id=self.assign.build_id,
            attempt=self.assign.attempt,
            status=status,
            exit_code=exit_code,
            timings=dict(self.timings),
            outputs=tuple(outputs),
            error=error,
        )


@contextlib.asynccontextmanager
async def attempt(assign: Assign, path: Path, send: Send) -> AsyncIterator[Phases]:
    """Run an attempt of ``assign`` in the build directory ``path``: prepared fresh for the
    block, removed (or kept as a spare) after it, within ``REMOVE_GRACE`` seconds."""
    prepared: BuildDir | None = None
    try:
        prepared = builddir.prepare_quick(path)
        if prepared is None:
            prepared = await trio.to_thread.run_sync(builddir.prepare, path)
        yield Phases(assign=assign, dir=prepared, send=send)
    finally:
        if prepared is None or not builddir.remove_quick(prepared):
            with trio.move_on_after(REMOVE_GRACE, shield=True):
                await trio.to_thread.run_sync(builddir.remove, prepared or path)
