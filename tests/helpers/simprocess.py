"""Processes and their sockets in a simulated farm: what a freeze, a kill -9 or a cut route does
to them, and thread work made synchronous (see ``simfarm`` for the whole).

- ``BuilderProcess``: one builder daemon (``run_builder`` under a cancel scope), with
  ``freeze``/``thaw`` (SIGSTOP/SIGCONT) and ``crash`` (kill -9).
- ``BuilderEnd``/``RunnerEnd``: the two ends of a ``sim.Link`` as each process sees them,
  remembering when that side last read anything (the liveness invariants' clock).
- ``Route``: the path between a builder and the runner, cut by partitions and drops.
- ``synchronous_threads``: ``trio.to_thread.run_sync`` on the trio thread, a commit taking
  ``COMMIT_LATENCY``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import attrs
import pytest
import trio

from hydra_trio.builder.daemon import BuilderConfig, BuilderState, Executor, run_builder
from hydra_trio.runner.store import Store

from .sim import LinkEnd
from .simjournal import Journal

T = TypeVar("T")


#: How long a database commit takes (fsync): the window in which a runner can die with a
#: batch written but not committed.  Everything else a thread does takes no time.
COMMIT_LATENCY = 0.01
#: Whether the process the current task belongs to was killed (set by each runner process).
KILLED: contextvars.ContextVar[Callable[[], bool]] = contextvars.ContextVar(
    "KILLED", default=lambda: False
)


@contextlib.contextmanager
def synchronous_threads() -> Iterator[None]:
    """Run ``trio.to_thread.run_sync`` calls on the trio thread.

    Keeps the semantics of a thread that cannot be abandoned: it raises if already cancelled,
    and otherwise finishes even if cancelled meanwhile.  Everything but a database commit takes
    no virtual time; a commit (``Store.save``) takes ``COMMIT_LATENCY`` and lands at its end,
    unless its process was killed meanwhile (kill -9 in the middle of a transaction: it never
    committed).  No time passes while the autojump clock could jump over half-done work, and a
    run is deterministic under hypothesis (which seeds trio's scheduler)."""

    async def run_sync(fn: Callable[..., T], *args: Any, **_: Any) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        if getattr(fn, "__func__", None) is Store.save:
            killed = KILLED.get()
            with trio.CancelScope(shield=True):
                await trio.sleep(COMMIT_LATENCY)
            if killed():
                await trio.lowlevel.checkpoint()  # the process is gone: this raises Cancelled
                raise AssertionError("a killed process went on")
        result = fn(*args)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trio.to_thread, "run_sync", run_sync)
        yield


# -- the network ---------------------------------------------------------------------------


class RunnerEnd(trio.abc.Stream):
    """The runner's end of a link, remembering when the runner last read anything from it."""

    def __init__(self, inner: LinkEnd) -> None:
        self.inner = inner
        self.last_received = trio.current_time()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if data:
            self.last_received = trio.current_time()
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


class BuilderEnd(trio.abc.Stream):
    """A builder process's end of a link: its socket, as far as a freeze is concerned."""

    def __init__(self, inner: LinkEnd, process: BuilderProcess, generation: int) -> None:
        self.inner = inner
        self.process = process
        #: the runner generation at the other end.
        self.generation = generation
        self.last_received = trio.current_time()
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.process.gate()
        if self.closed:
            raise trio.ClosedResourceError
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.process.gate()
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self.process.gate()
        if self.closed:
            raise trio.ClosedResourceError
        data = await self.inner.receive_some(max_bytes)
        # What the kernel received while the process was stopped is read when it runs again.
        await self.process.gate()
        if data:
            self.last_received = trio.current_time()
        return data

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.process.journal.needs_connection.setdefault(self.process.name, []).append(
                trio.current_time()
            )
            if self.process.frozen:
                self.process.deferred_closes.append(self)  # closed when it runs again
            else:
                await self.inner.aclose()
                return
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class Route:
    """The network path between one builder and the runner: cut by partitions and drops."""

    cuts: int = 0
    changed: trio.Event = attrs.field(factory=trio.Event)

    def cut(self) -> None:
        self.cuts += 1

    def heal(self) -> None:
        self.cuts -= 1
        if self.cuts == 0:
            self.changed.set()
            self.changed = trio.Event()


def directions(direction: str) -> tuple[str, ...]:
    return ("to_runner", "to_builder") if direction == "both" else (direction,)


# -- builders ------------------------------------------------------------------------------


@attrs.define(eq=False)
class BuilderProcess:
    """One builder daemon process: ``run_builder`` under a cancel scope.

    ``crash`` is kill -9: the scope is cancelled (the session's nursery kills the builds, its
    sockets are closed with a FIN).  A real kill -9 would leave the builds' process groups
    running (the executor starts them with ``start_new_session`` and nothing kills them when
    the daemon dies); here they die with it, as with a cgroup-wide kill.

    ``freeze``/``thaw`` are SIGSTOP/SIGCONT.  Trio cannot stop scheduling some of its tasks, so
    a freeze is applied at the process's edges instead: while frozen, the process sends nothing
    (``send_all`` waits), reads nothing (bytes that arrive wait in the link, or, if a read was
    already under way, are handed over on thaw), opens no connection and closes none (a close
    happens on thaw), and kills no build (an executor cancelled while frozen ends on thaw).  The
    builds run on meanwhile, as a build's process group does when only the daemon is stopped.
    The waits at these edges are shielded, so whatever waits resumes where it was on thaw (and
    a kill -9 of the frozen process still ends them).  What differs from a real SIGSTOP: timers
    inside the daemon keep running, so its watchdog can expire during the freeze rather than on
    thaw, and a reconnect backoff can elapse during it.  None of their effects can leave the
    process before the thaw, so the runner sees what it would see; the builder may reconnect a
    little sooner after a thaw than a real one would, and a ping made during the freeze lists
    the builds running when it was made.
    """

    name: str
    incarnation: int
    config: BuilderConfig
    journal: Journal
    connect: Callable[[BuilderProcess], Callable[[], Awaitable[trio.abc.Stream]]]
    executor: Callable[[BuilderProcess], Executor]
    state: BuilderState = attrs.field(init=False)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    done: trio.Event = attrs.field(factory=trio.Event, init=False)
    alive: bool = attrs.field(default=True, init=False)
    #: the connection it opened last (the one its session, if any, runs on).
    stream: BuilderEnd | None = attrs.field(default=None, init=False)
    freezes: int = attrs.field(default=0, init=False)
    thawed_at: float = attrs.field(default=-math.inf, init=False)
    deferred_closes: list[BuilderEnd] = attrs.field(factory=list, init=False)
    _thawed: trio.Event = attrs.field(factory=trio.Event, init=False)
    _stopped_waits: set[trio.CancelScope] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        self.state = BuilderState(
            config=self.config,
            machine_id=f"machine-{self.name}",
            rng=random.Random(f"{self.name}/{self.incarnation}"),
            execute=self.executor(self),
        )

    @property
    def frozen(self) -> bool:
        return self.alive and self.freezes > 0

    async def run(self) -> None:
        self.journal.needs_connection.setdefault(self.name, []).append(trio.current_time())
        try:
            with self.scope:
                await run_builder(self.config, connect=self.connect(self), state=self.state)
        finally:
            self.done.set()

    async def until_thawed(self) -> None:
        """Wait, shielded, while the process is stopped (a kill -9 ends the wait)."""
        if not self.frozen:
            return
        with trio.CancelScope(shield=True) as scope:
            self._stopped_waits.add(scope)
            try:
                while self.frozen:
                    await self._thawed.wait()
            finally:
                self._stopped_waits.discard(scope)

    async def gate(self) -> None:
        """A point where the process touches the outside world: it waits while frozen, then
        gets what happened meanwhile (a cancellation, a kill)."""
        if self.frozen:
            await self.until_thawed()
            await trio.lowlevel.checkpoint()

    def freeze(self) -> None:
        if self.freezes == 0:
            self._thawed = trio.Event()
        self.freezes += 1

    async def thaw(self) -> None:
        self.freezes -= 1
        if self.freezes == 0 and self.alive:
            self.thawed_at = trio.current_time()
            self._thawed.set()
            await self._close_deferred()

    async def crash(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self.scope.cancel()
        for scope in list(self._stopped_waits):
            scope.cancel()
        self._thawed.set()
        await self._close_deferred()  # the kernel closes a killed process's sockets
        await self.done.wait()

    async def _close_deferred(self) -> None:
        closes, self.deferred_closes = self.deferred_closes, []
        for end in closes:
            await end.inner.aclose()
