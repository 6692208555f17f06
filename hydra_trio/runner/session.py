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
    BuildStatus,
    Drain,
    FetchData,
    FetchRequest,
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
    UploadData,
    Welcome,
    compatible,
)
from hydra_trio.runner.blobs import BlobError, PendingUpload, Storage
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.model import Machine

log = logging.getLogger("hydra_trio.runner")

#: Frames queued for one builder before it counts as not keeping up.  Each Assign or Pong is
#: small; a builder this far behind is stuck, and waiting on it would stall the dispatcher.
OUTBOX_SIZE = 4096
#: Frames written per send_all when several are queued.
WRITE_BATCH = 64
#: The most bytes one FetchData carries, whatever the builder asks (keeps frames small, so a
#: fetch never holds up a Pong for long).
MAX_FETCH_CHUNK = 1024 * 1024


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
    #: output files arriving, by (build id, attempt, path).
    uploads: dict[tuple[str, int, str], PendingUpload] = attrs.field(factory=dict)
    #: frames posted and not yet taken by the writer (``statistics()`` would build an object
    #: per Pong just to read this).
    _queued: int = attrs.field(default=0, init=False)
    _send: trio.MemorySendChannel[Message] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[Message] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Message](OUTBOX_SIZE)

    def post(self, message: Message) -> None:
        if self.close_reason is not None:
            return
        try:
            self._send.send_nowait(message)
            self._queued += 1
        except trio.WouldBlock:
            self.close(f"not reading: {OUTBOX_SIZE} frames queued")

    async def reply(self, message: Message) -> None:
        """Send an answer from the receive loop: directly when nothing is queued (saving the
        writer task's scheduler pass on every Pong), else behind what is queued."""
        if self._queued:
            self.post(message)
        else:
            await self.channel.send(message)

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
                self._queued -= len(batch)
                await self.channel.send_all(batch)
        except (ConnectionLost, ProtocolError) as exc:
            self.close(str(exc))


async def serve_builder(
    farm: Farm, config: SessionConfig, storage: Storage, stream: trio.abc.Stream
) -> None:
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
    said_goodbye = False
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
                reason = await _receive_loop(farm, session, machine, channel, config, storage)
                said_goodbye = reason.startswith("said goodbye")
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
            farm.detach(session, reason, trio.current_time(), lost=not said_goodbye)
        with trio.move_on_after(5, shield=True):
            for upload in session.uploads.values() if session is not None else ():
                await trio.to_thread.run_sync(storage.blobs.discard, upload)
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
    storage: Storage,
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
                    await session.reply(Pong(seq=message.seq))
                    farm.on_ping(session, machine, message, now)
                elif kind is UploadData:
                    assert isinstance(message, UploadData)
                    await _on_upload(farm, session, machine, storage, message)
                elif kind is FetchRequest:
                    assert isinstance(message, FetchRequest)
                    await _on_fetch(farm, session, machine, storage, message)
                elif kind is LogChunk:
                    assert isinstance(message, LogChunk)
                    data = farm.on_log(session, machine, message)
                    if data:
                        await storage.logs.append(message.build_id, message.attempt, data)
                elif kind is Result:
                    assert isinstance(message, Result)
                    result = await _check_outputs(session, storage, message)
                    farm.on_result(session, machine, result, trio.current_time())
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


async def _on_upload(
    farm: Farm, session: BuilderSession, machine: Machine, storage: Storage, msg: UploadData
) -> None:
    """Append one chunk of an output file of the current attempt (stale chunks are dropped)."""
    if farm.current(session, machine, msg.build_id, msg.attempt) is None:
        return
    key = (msg.build_id, msg.attempt, msg.path)
    upload = session.uploads.get(key)
    if upload is None:
        if msg.offset != 0:
            return  # its start was refused; the result will say the upload failed
        upload = await trio.to_thread.run_sync(storage.blobs.begin, msg.path)
        session.uploads[key] = upload
    try:
        await trio.to_thread.run_sync(storage.blobs.append, upload, msg.offset, msg.data)
    except BlobError as exc:
        log.warning("upload of build %s: %s", msg.build_id, exc)
        await trio.to_thread.run_sync(storage.blobs.discard, upload)


async def _check_outputs(session: BuilderSession, storage: Storage, result: Result) -> Result:
    """Keep each uploaded output whose size and hash match the result's list.  A success whose
    outputs did not all arrive intact becomes ``upload-failed`` (retried elsewhere)."""
    uploads = {
        path: session.uploads.pop((b, a, path))
        for (b, a, path) in list(session.uploads)
        if b == result.build_id and a == result.attempt
    }
    problem = ""
    for info in result.outputs:
        if info.link:
            continue
        upload = uploads.pop(info.path, None)
        if upload is None:
            if await trio.to_thread.run_sync(storage.blobs.has, info.sha256):
                continue
            problem = problem or f"output {info.path} was not uploaded"
            continue
        try:
            await trio.to_thread.run_sync(storage.blobs.commit, upload, info.size, info.sha256)
        except BlobError as exc:
            problem = problem or str(exc)
    for upload in uploads.values():  # uploaded but not listed: not an output
        await trio.to_thread.run_sync(storage.blobs.discard, upload)
    if problem and result.status is BuildStatus.SUCCESS:
        log.warning("build %s attempt %d: %s", result.build_id, result.attempt, problem)
        return attrs.evolve(result, status=BuildStatus.UPLOAD_FAILED, error=problem, outputs=())
    return result


async def _on_fetch(
    farm: Farm, session: BuilderSession, machine: Machine, storage: Storage, msg: FetchRequest
) -> None:
    """Serve a chunk of an input of a build this builder runs under the current attempt."""
    build = farm.current(session, machine, msg.build_id, msg.attempt)
    if build is None:
        error = "not an input of a build you run under this attempt"
    elif not any(
        f.sha256 == msg.sha256 and not f.link
        for dep_id in build.spec.after
        for f in farm.builds[dep_id].outputs
    ):
        error = f"{msg.sha256} is not an input of build {msg.build_id}"
    else:
        try:
            data, eof = await trio.to_thread.run_sync(
                storage.blobs.read, msg.sha256, msg.offset, min(msg.length, MAX_FETCH_CHUNK)
            )
        except BlobError as exc:
            error = str(exc)
        else:
            session.post(FetchData(request_id=msg.request_id, data=data, eof=eof))
            return
    session.post(FetchData(request_id=msg.request_id, error=error))
