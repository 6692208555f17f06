"""One builder connection on the runner side: handshake, receive loop with watchdog, writer.

The connection's lifetime is one nursery holding the receive loop (with its keepalive watchdog)
and a writer task fed by a bounded memory channel.  The farm posts frames without waiting; if a
builder stops reading until the channel is full, the session is closed (it is not keeping up,
and nothing in the runner may wait on one builder).  Whatever ends the connection (EOF, a
protocol error, the watchdog, being superseded), ``serve_builder`` detaches the session from the
farm in one step on the way out.
"""

from __future__ import annotations

import logging
import uuid

import attrs
import trio

from hydra_trio.net import ConnectionLost, FramedChannel
from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.errors import ProtocolError
from hydra_trio.protocol.messages import (
    PROTOCOL_VERSION,
    Drain,
    Goodbye,
    Hello,
    LogChunk,
    Message,
    Ping,
    Pong,
    Progress,
    Reject,
    Result,
    Role,
    Welcome,
    compatible,
)
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.model import Machine

log = logging.getLogger("hydra_trio.runner")

#: Frames queued for one builder before it counts as not keeping up.  Each Assign or Pong is
#: small; a builder this far behind is stuck, and waiting on it would stall the dispatcher.
OUTBOX_SIZE = 4096
#: Frames written per send_all when several are queued.
WRITE_BATCH = 64


@attrs.frozen(kw_only=True)
class SessionConfig:
    builder_timeout: float = 30.0
    handshake_timeout: float = 10.0
    max_frame_size: int = 8 * 1024 * 1024


@attrs.define(eq=False)
class BuilderSession:
    """The runner's end of one builder connection (implements ``model.Session``)."""

    channel: FramedChannel
    session_id: str = attrs.field(factory=lambda: uuid.uuid4().hex[:12])
    close_reason: str | None = None
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _send: trio.MemorySendChannel[Message] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[Message] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Message](OUTBOX_SIZE)

    def post(self, message: Message) -> None:
        if self.close_reason is not None:
            return
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            self.close(f"not reading: {OUTBOX_SIZE} frames queued")

    def close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self.cancel_scope.cancel()

    async def writer(self) -> None:
        try:
            async for first in self._receive:
                batch = [first]
                while len(batch) < WRITE_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self.channel.send_all(batch)
        except (ConnectionLost, ProtocolError) as exc:
            self.close(str(exc))


async def serve_builder(farm: Farm, config: SessionConfig, stream: trio.abc.Stream) -> None:
    """Handle one builder connection until it ends.  Owns and closes ``stream``.

    Timeouts: the hello must arrive within ``handshake_timeout``; after it, any ``builder_timeout``
    without a frame ends the connection.
    """
    conn = Connection(
        Role.RUNNER,
        now=trio.current_time(),
        peer_timeout=config.handshake_timeout,
        max_frame_size=config.max_frame_size,
    )
    channel = FramedChannel(stream, conn)
    session: BuilderSession | None = None
    reason = "closed"
    try:
        hello = await _handshake(channel, config)
        if hello is None:
            return
        session = BuilderSession(channel)
        conn.set_peer_timeout(config.builder_timeout)
        with session.cancel_scope:
            machine = farm.attach(session, hello, trio.current_time())
            session.post(
                Welcome(
                    protocol_version=PROTOCOL_VERSION,
                    session_id=session.session_id,
                    builder_timeout=config.builder_timeout,
                )
            )
            if machine.drain_requested:
                session.post(Drain(reason="drain requested by an operator"))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.writer)
                reason = await _receive_loop(farm, session, machine, channel, config)
                nursery.cancel_scope.cancel()
        if session.close_reason is not None:
            reason = session.close_reason
    except (ConnectionLost, ProtocolError) as exc:
        reason = f"protocol error: {exc}" if isinstance(exc, ProtocolError) else str(exc)
        if session is None:
            log.info("connection closed before its hello completed: %s", reason)
    except Exception as exc:  # the one broad catch: a bug here must not take the runner down
        reason = f"internal error: {type(exc).__name__}: {exc}"
        log.exception("builder connection failed")
    finally:
        if session is not None:
            farm.detach(session, reason, trio.current_time())
        with trio.move_on_after(1, shield=True):
            await stream.aclose()


async def _handshake(channel: FramedChannel, config: SessionConfig) -> Hello | None:
    with trio.move_on_after(config.handshake_timeout):
        message = await channel.receive()
        assert isinstance(message, Hello)  # the Connection allows nothing else first
        if not compatible(PROTOCOL_VERSION, message.protocol_version):
            await channel.send(
                Reject(
                    code="incompatible-version",
                    reason=f"runner speaks protocol {PROTOCOL_VERSION}, "
                    f"builder speaks {message.protocol_version}",
                )
            )
            log.warning(
                "rejected builder %s: protocol %s is incompatible with %s",
                message.hostname,
                message.protocol_version,
                PROTOCOL_VERSION,
            )
            return None
        return message
    log.info("connection closed: no hello within %.0f s", config.handshake_timeout)
    return None


async def _receive_loop(
    farm: Farm,
    session: BuilderSession,
    machine: Machine,
    channel: FramedChannel,
    config: SessionConfig,
) -> str:
    """Apply frames until the builder leaves or goes silent; returns why the loop ended."""
    conn = channel.connection
    try:
        with trio.CancelScope(deadline=conn.deadline) as watchdog:
            while True:
                message = await channel.receive()
                watchdog.deadline = conn.deadline  # any frame counts as a sign of life
                now = trio.current_time()
                kind = type(message)
                if kind is Ping:
                    assert isinstance(message, Ping)
                    session.post(Pong(seq=message.seq))
                    farm.on_ping(session, machine, message, now)
                elif kind is LogChunk:
                    assert isinstance(message, LogChunk)
                    farm.on_log(session, machine, message)
                elif kind is Result:
                    assert isinstance(message, Result)
                    farm.on_result(session, machine, message, now)
                elif kind is Progress:
                    assert isinstance(message, Progress)
                    farm.on_progress(session, machine, message)
                elif kind is Drain:
                    farm.on_builder_drain(session, machine)
                elif kind is Goodbye:
                    assert isinstance(message, Goodbye)
                    return f"said goodbye ({message.reason})" if message.reason else "said goodbye"
    except (ConnectionLost, ProtocolError) as exc:
        session.close(str(exc) if isinstance(exc, ConnectionLost) else f"protocol error: {exc}")
        return session.close_reason or str(exc)
    if watchdog.cancelled_caught:
        return f"silent for {config.builder_timeout:g} s"
    return session.close_reason or "closed"
