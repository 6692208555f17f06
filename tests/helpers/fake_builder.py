"""``FakeBuilder``: the builder's end of one connection to a real runner session, driven step
by step by a test (``Farmlet.connect`` makes one)."""

from __future__ import annotations

import trio

from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.messages import (
    PROTOCOL_VERSION,
    Challenge,
    Hello,
    Message,
    Pong,
    Role,
    Welcome,
)

from .common import SYSTEM


def hello(machine_id: str = "m1", version: str = PROTOCOL_VERSION) -> Hello:
    return Hello(
        protocol_version=version, machine_id=machine_id, hostname=machine_id, systems=(SYSTEM,)
    )


class FakeBuilder:
    """The builder's end of one connection, driven step by step by a test."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = Connection(Role.BUILDER, now=trio.current_time(), peer_timeout=1e9)
        self.received: list[Message] = []

    async def send(self, message: Message) -> None:
        await self.stream.send_all(self.conn.send(message))

    async def receive(self) -> Message:
        while not self.received:
            data = await self.stream.receive_some()
            assert data, "the runner closed the connection"
            self.received.extend(self.conn.receive_data(data, trio.current_time()))
        return self.received.pop(0)

    async def closed(self) -> bytes:
        """Wait for the runner to close the connection; returns what it sent before."""
        data = b""
        while chunk := await self.stream.receive_some():
            data += chunk
        return data

    async def challenge(self) -> Challenge:
        """The runner's first frame, which must come before our hello."""
        challenge = await self.receive()
        assert isinstance(challenge, Challenge)
        return challenge

    async def handshake(self, machine_id: str) -> Welcome:
        await self.challenge()
        await self.send(hello(machine_id))
        welcome = await self.receive()
        assert isinstance(welcome, Welcome)
        return welcome

    async def ping(self) -> Pong:
        """Ping and return the Pong that says every frame sent before was handled
        (``settling`` 0; a first one with ``settling`` > 0 comes while results settle)."""
        await self.send(self.conn.make_ping(trio.current_time()))
        while True:
            pong = await self.receive()
            assert isinstance(pong, Pong)
            if pong.settling == 0:
                return pong
