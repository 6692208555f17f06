"""An in-process network for daemon tests: links between builders and the runner that can be
paused (bytes held, delivered on resume, like TCP retransmitting across a short blip) or
blackholed (bytes accepted and never delivered, no FIN, no RST: a silently dead path).

Everything runs on trio's clock, so tests use ``autojump_clock`` and assert times exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing

from hydra_trio.builder.daemon import BuilderConfig, BuilderState, run_builder
from hydra_trio.runner.blobs import Storage
from hydra_trio.runner.daemon import RunnerConfig, make_farm, open_storage
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.model import MachineState
from hydra_trio.runner.session import serve_builder

from .fake_builder import FakeBuilder


@attrs.define(eq=False)
class _Direction:
    buffer: bytearray = attrs.field(factory=bytearray)
    eof: bool = False
    paused: bool = False
    blackholed: bool = False
    #: the receiving end was closed: sending now fails, as a TCP reset would.
    reader_closed: bool = False
    #: bytes sent while paused, delivered on resume.
    held: bytearray = attrs.field(factory=bytearray)
    changed: trio.Event = attrs.field(factory=trio.Event)

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class LinkEnd(trio.abc.Stream):
    def __init__(self, outgoing: _Direction, incoming: _Direction) -> None:
        self._out = outgoing
        self._in = incoming
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError
        out = self._out
        if out.blackholed:
            return
        if out.reader_closed and not out.paused:
            raise trio.BrokenResourceError("connection reset by peer")
        if out.paused:
            out.held += data
            return
        out.buffer += data
        out.wake()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            if self._closed:
                raise trio.ClosedResourceError
            incoming = self._in
            if incoming.buffer:
                size = max_bytes or len(incoming.buffer)
                data = bytes(incoming.buffer[:size])
                del incoming.buffer[:size]
                await trio.lowlevel.checkpoint()
                return data
            if incoming.eof and not incoming.blackholed and not incoming.paused:
                await trio.lowlevel.checkpoint()
                return b""
            await incoming.changed.wait()

    async def aclose(self) -> None:
        self._closed = True
        # A FIN travels like data: lost in a black hole, held while paused.
        self._out.eof = True
        self._in.reader_closed = True
        self._out.wake()
        self._in.wake()
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class Link:
    """One connection: ``builder_end`` <-> ``runner_end``."""

    to_runner: _Direction = attrs.field(factory=_Direction)
    to_builder: _Direction = attrs.field(factory=_Direction)
    builder_end: LinkEnd = attrs.field(init=False)
    runner_end: LinkEnd = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.builder_end = LinkEnd(self.to_runner, self.to_builder)
        self.runner_end = LinkEnd(self.to_builder, self.to_runner)

    def _directions(self, direction: str) -> list[_Direction]:
        return {
            "both": [self.to_runner, self.to_builder],
            "to_runner": [self.to_runner],
            "to_builder": [self.to_builder],
        }[direction]

    def blackhole(self, direction: str = "both") -> None:
        for d in self._directions(direction):
            d.blackholed = True
            d.buffer.clear()
            d.wake()

    def pause(self, direction: str = "both") -> None:
        for d in self._directions(direction):
            d.paused = True

    def resume(self, direction: str = "both") -> None:
        for d in self._directions(direction):
            d.paused = False
            d.buffer += d.held
            d.held.clear()
            d.wake()


@attrs.define(eq=False)
class Network:
    """Connects builders to a runner handler; ``links[key]`` are the connections made by the
    builder named ``key``, oldest first.  ``down`` makes new connections fail."""

    nursery: trio.Nursery
    handler: Callable[[trio.abc.Stream], Awaitable[Any]]
    links: dict[str, list[Link]] = attrs.field(factory=dict)
    connect_times: dict[str, list[float]] = attrs.field(factory=dict)
    down: bool = False

    def connector(self, key: str) -> Callable[[], Awaitable[trio.abc.Stream]]:
        async def connect() -> trio.abc.Stream:
            await trio.lowlevel.checkpoint()
            self.connect_times.setdefault(key, []).append(trio.current_time())
            if self.down:
                raise ConnectionRefusedError("runner down")
            link = Link()
            self.links.setdefault(key, []).append(link)
            self.nursery.start_soon(self.handler, link.runner_end)
            return link.builder_end

        return connect

    def current(self, key: str) -> Link:
        return self.links[key][-1]


@attrs.define(eq=False)
class Farmlet:
    """A runner (farm + dispatcher, no TCP or HTTP) and builders, all on one network; or
    ``FakeBuilder``s connected to its sessions directly (``connect``)."""

    nursery: trio.Nursery
    runner_config: RunnerConfig
    state_dir: Path
    storage: Storage = attrs.field(init=False)
    farm: Farm = attrs.field(init=False)
    network: Network = attrs.field(init=False)
    builders: dict[str, BuilderState] = attrs.field(factory=dict)
    #: ``FakeBuilder`` connections made so far.
    connections: int = 0
    #: when each ``FakeBuilder`` connection's handler returned, by connection number.
    ended: dict[int, float] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.runner_config = attrs.evolve(self.runner_config, state_dir=self.state_dir)
        self.farm, dispatcher = make_farm(self.runner_config, persisted=False)
        self.storage = open_storage(self.runner_config, self.farm)
        self.nursery.start_soon(dispatcher.run, self.farm)
        handler = functools.partial(
            serve_builder, self.farm, self.runner_config.session_config(), self.storage
        )
        self.network = Network(self.nursery, handler)

    def connect(self) -> FakeBuilder:
        """A new connection to a runner session, its builder's end driven by the test."""
        runner_end, builder_end = trio.testing.memory_stream_pair()
        number = self.connections
        self.connections += 1

        async def serve() -> None:
            await self.network.handler(runner_end)
            self.ended[number] = trio.current_time()

        self.nursery.start_soon(serve)
        return FakeBuilder(builder_end)

    async def add_builder(self, name: str, config: BuilderConfig, **state_kw: Any) -> BuilderState:
        config = attrs.evolve(config, hostname=name)
        state = BuilderState(config=config, machine_id=f"machine-{name}", **state_kw)
        await self.nursery.start(
            functools.partial(
                run_builder, config, connect=self.network.connector(name), state=state
            )
        )
        self.builders[name] = state
        machine_id = f"machine-{name}"
        with trio.fail_after(60):
            while (
                machine_id not in self.farm.machines
                or self.farm.machines[machine_id].state is MachineState.DISCONNECTED
            ):
                await trio.sleep(0.001)
        return state

    def machine(self, name: str) -> Any:
        return self.farm.machines[f"machine-{name}"]
