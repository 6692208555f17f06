"""``FakeRunner``: the runner's end of a builder's connections, scripted by a test.

It opens every connection with a Challenge, answers the Hello with a Welcome and ``assign`` (or
with a Reject when ``reject`` is set, and hangs up), answers Pings with Pongs while ``pongs`` is
true, and hands every other message to ``answer``, whose frames it sends back.  Every message
is kept in ``seen`` with the time it came.  ``handshake`` alone is there for tests that script
what follows the Welcome byte by byte.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio
import trio.testing

from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.messages import (
    PROTOCOL_VERSION,
    Assign,
    Challenge,
    Hello,
    Message,
    Ping,
    Pong,
    Reject,
    Result,
    Role,
    UploadData,
    UploadFiles,
    Welcome,
)


class FakeRunner:
    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        assign: Assign | bytes | None = None,
        reject: str | None = None,
        builder_timeout: float = 30.0,
        nonce: bytes = bytes(32),
        answer: Callable[[Message], Sequence[Message]] | None = None,
        connections: int | None = None,
    ) -> None:
        self.nursery = nursery
        #: sent after the Welcome (a message, or raw frames a real runner would never send).
        self.assign = assign
        #: the Reject code every hello gets (None: welcome it).
        self.reject = reject
        self.builder_timeout = builder_timeout
        self.nonce = nonce
        #: the frames to send back for a message other than Hello and Ping.
        self.answer = answer
        #: how many connections it takes; later ones wait forever (None: any number).
        self.connections = connections
        #: answer Pings (a test sets it to False to make the runner go silent).
        self.pongs = True
        self.seen: list[tuple[float, Message]] = []
        self.hellos: list[Hello] = []
        self.connect_times: list[float] = []
        #: set at each connection (and replaced by a fresh one).
        self.connected = trio.Event()
        #: the builder's first Result, if any.
        self.result: Result | None = None
        #: set when a Result came or the builder hung up.
        self.done = trio.Event()

    @property
    def received(self) -> list[Message]:
        return [message for _, message in self.seen]

    async def connect(self) -> trio.abc.Stream:
        """``run_builder``'s ``connect``: a new in-memory connection served by this runner."""
        if self.connections is not None and len(self.connect_times) >= self.connections:
            await trio.sleep_forever()
        self.connect_times.append(trio.current_time())
        builder_end, runner_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.serve, runner_end)
        self.connected.set()
        self.connected = trio.Event()
        return builder_end

    async def serve(self, stream: trio.abc.Stream) -> None:
        conn = await self.handshake(stream)
        if conn is None:
            return
        while data := await stream.receive_some():
            for message in conn.receive_data(data, trio.current_time()):
                self.seen.append((trio.current_time(), message))
                await self._respond(stream, conn, message)
        self.done.set()  # the builder hung up

    async def handshake(self, stream: trio.abc.Stream) -> Connection | None:
        """Challenge, Hello, then Welcome (and ``assign``); or Reject and close (None)."""
        conn = Connection(Role.RUNNER, now=trio.current_time(), peer_timeout=1e9)
        challenge = Challenge(protocol_version=PROTOCOL_VERSION, nonce=self.nonce)
        await stream.send_all(conn.send(challenge))
        while True:
            data = await stream.receive_some()
            assert data, "the builder hung up before its hello"
            messages = conn.receive_data(data, trio.current_time())
            if messages:
                break
        hello = messages[0]
        assert isinstance(hello, Hello)
        self.seen.append((trio.current_time(), hello))
        self.hellos.append(hello)
        if self.reject is not None:
            await stream.send_all(conn.send(Reject(code=self.reject, reason="go away")))
            await stream.aclose()
            return None
        welcome = Welcome(
            protocol_version=PROTOCOL_VERSION,
            session_id="s",
            builder_timeout=self.builder_timeout,
        )
        frames = conn.send(welcome)
        if isinstance(self.assign, bytes):
            frames += self.assign
        elif self.assign is not None:
            frames += conn.send(self.assign)
        await stream.send_all(frames)
        for message in messages[1:]:
            self.seen.append((trio.current_time(), message))
            await self._respond(stream, conn, message)
        return conn

    async def _respond(self, stream: trio.abc.Stream, conn: Connection, message: Message) -> None:
        if isinstance(message, Ping):
            if self.pongs:
                await stream.send_all(conn.send(Pong(seq=message.seq)))
            return
        if isinstance(message, Result) and self.result is None:
            self.result = message
            self.done.set()
        if self.answer is not None:
            frames = self.answer(message)
            if frames:
                await stream.send_all(b"".join(conn.send(frame) for frame in frames))


def whole_uploads(received: Sequence[Message]) -> list[bytes]:
    """The contents of the files a builder uploaded whole, in order: each ``UploadData``
    from offset 0 with eof, and (1.7, which this runner speaks) each file of an
    ``UploadFiles``."""
    found: list[bytes] = []
    for message in received:
        if isinstance(message, UploadFiles):
            found.extend(message.data)
        elif isinstance(message, UploadData) and message.offset == 0 and message.eof:
            found.append(message.data)
    return found
