"""One builder connection on the runner side: handshake, receive loop with watchdog, writer.

The connection's lifetime is one nursery holding the receive loop (with its keepalive watchdog)
and a writer task fed by a bounded memory channel.  The farm posts frames without waiting; if a
builder stops reading until the channel is full, the session is closed (it is not keeping up,
and nothing in the runner may wait on one builder).  Whatever ends the connection (EOF, a
protocol error, the watchdog, being superseded), ``serve_builder`` detaches the session from the
farm in one step on the way out.
"""

from __future__ import annotations

import functools
import logging
import math
import ssl
import uuid

import attrs
import trio

from hydra_trio import auth
from hydra_trio.diskio import write_and_hash
from hydra_trio.net import ConnectionLost, FramedChannel, tls_failure
from hydra_trio.nixstore import label_path
from hydra_trio.protocol.codec import TRANSFER_FRAME
from hydra_trio.protocol.connection import Connection, ConnectionState
from hydra_trio.protocol.errors import ProtocolError, RemoteProtocolError
from hydra_trio.protocol.messages import (
    PROTOCOL_VERSION,
    BuildStatus,
    Challenge,
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
from hydra_trio.protocol.validators import MAX_LIST, tree_conflict
from hydra_trio.runner import nix
from hydra_trio.runner.blobs import BlobError, PendingUpload, Storage
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.model import Machine

log = logging.getLogger("hydra_trio.runner")

#: Frames queued for one builder before it counts as not keeping up.  Each Assign or Pong is
#: small; a builder this far behind is stuck, and waiting on it would stall the dispatcher.
OUTBOX_SIZE = 4096
#: Frames written per send_all when several are queued.
WRITE_BATCH = 64
#: The most bytes one FetchRequest is answered with, whatever the builder asks: read in one
#: thread hop, sent in frames of ``TRANSFER_FRAME`` bytes.
MAX_FETCH_CHUNK = 1024 * 1024
#: The most output files one attempt may upload: no ``Result`` can list more, so a builder
#: sending more is not a builder (each costs a temporary file and an entry here).
MAX_UPLOADS = MAX_LIST
#: Results listing more outputs than this are checked in a worker thread (~5 us an output).
_CHECK_INLINE = 1000


@attrs.frozen(kw_only=True)
class SessionConfig:
    builder_timeout: float = 30.0
    #: TLS handshake, challenge and hello must all be done within this.
    handshake_timeout: float = 10.0
    max_frame_size: int = 8 * 1024 * 1024
    #: the shared secret builders must prove they know; None: any builder is accepted.
    token: bytes | None = attrs.field(default=None, repr=False)
    #: TLS on the builder port (server side; with a CA, client certificates are required).
    ssl_context: ssl.SSLContext | None = None


@attrs.define
class HandshakeGate:
    """Bounds the connections that have not completed their handshake.

    Each costs a task and buffers until it is accepted or times out; without a bound, a
    client opening connections and sending nothing (slowloris) could hold any number of
    them.  Past the limit a new connection is closed at once, without a byte sent.
    """

    limit: int
    pending: int = 0
    refused: int = 0

    def enter(self) -> bool:
        if self.pending >= self.limit:
            self.refused += 1
            return False
        self.pending += 1
        return True

    def leave(self) -> None:
        self.pending -= 1


@attrs.define(eq=False)
class UploadTotals:
    """The uploads of one attempt on one connection, bounded against a lying builder."""

    files: int = 0
    bytes: int = 0
    #: the file being received.  A builder sends its files one after another, so this is the
    #: only one with an open descriptor: a builder cannot make the runner hold more.
    current: PendingUpload | None = None


@attrs.define(eq=False)
class BuilderSession:
    """The runner's end of one builder connection (implements ``model.Session``)."""

    channel: FramedChannel
    session_id: str = attrs.field(factory=lambda: uuid.uuid4().hex[:12])
    close_reason: str | None = None
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: output files arriving, by (build id, attempt, path).
    uploads: dict[tuple[str, int, str], PendingUpload] = attrs.field(factory=dict)
    #: what each attempt uploading on this connection has sent so far, by (build id, attempt).
    upload_totals: dict[tuple[str, int], UploadTotals] = attrs.field(factory=dict)
    #: the uploads with a write in a worker thread, and the event set when it is over.
    writes: dict[PendingUpload, trio.Event] = attrs.field(factory=dict)
    #: the protocol error that ended the connection, if one did (counted in /metrics).
    protocol_error: ProtocolError | None = None
    #: when the last frame to the builder was handed to the socket (``trio.current_time``).
    last_sent: float = attrs.field(factory=trio.current_time)
    #: the keepalive's wait: its deadline follows ``last_sent`` (``_sent``), so the keepalive
    #: task wakes only when the builder has really been sent nothing for that long, not once
    #: per pong (2,000 builders would cost 2,000 task switches a second).
    _keepalive_wait: trio.CancelScope | None = attrs.field(default=None, init=False)
    _keepalive_silence: float = attrs.field(default=math.inf, init=False)
    #: the sequence number of the last Ping received (the keepalive repeats it).
    last_ping_seq: int | None = None
    #: Nix results whose outputs are being imported into the runner's store.
    importing: int = 0
    imports_changed: trio.Event = attrs.field(factory=trio.Event)
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
        """Send an answer from the receive loop: directly when nothing is queued or being
        written (saving the writer task's scheduler pass on every Pong), else behind what is
        queued.  Never waits for another write: a receive loop stuck behind a transfer crawling
        over a slow link would stop reading, and take the builder for silent."""
        if self.channel.connection.state is ConnectionState.CLOSED:
            return  # the builder said goodbye in the same read as the frame answered here
        if self._queued or self.channel.writing:
            self.post(message)
        else:
            await self.channel.send(message)
            self._sent()

    async def keepalive(self, interval: float) -> None:
        """Send the builder a ``Pong`` of our own when we have sent it nothing for 1.5 of its
        ping intervals.  The builder's evidence that we are alive must not depend on its pings
        getting through: during an upload they wait behind its own data, and over a slow link
        with a deep queue the pong to a ping can come later than the builder's ping timeout.
        This direction is idle then, and the keepalive crosses it at once.  It repeats the
        last ping's sequence number, which the builder has already had answered, so it is not
        taken for a round trip.

        Only while the builder is heard from (a frame, or a frame's progress, within half a
        ping interval, as during an upload): a builder whose frames no longer reach us (cut
        off in one direction) must not be kept from noticing by keepalives crossing the
        other.  (With the window at 1.5 intervals, a keepalive sent 1.5 s after the builder's
        last frame delayed its detection of a builder -> runner cut to 4 s.)"""
        silence = self._keepalive_silence = 1.5 * interval  # 1 x: a pong on time is due then
        recent = 0.5 * interval
        conn = self.channel.connection
        while True:
            with trio.CancelScope(deadline=self.last_sent + silence) as self._keepalive_wait:
                await trio.sleep_forever()
            self._keepalive_wait = None
            now = trio.current_time()
            heard = now - conn.last_received < recent
            if heard and self.last_ping_seq is not None and not self._queued:
                self.post(Pong(seq=self.last_ping_seq))
            self.last_sent = now

    def _sent(self) -> None:
        """A frame went out: the keepalive's wait starts again from now."""
        now = self.last_sent = trio.current_time()
        if self._keepalive_wait is not None:
            self._keepalive_wait.deadline = now + self._keepalive_silence

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
                if self.channel.connection.state is ConnectionState.CLOSED:
                    continue  # the builder said goodbye: nothing more may be sent
                await self.channel.send_all(batch)
                self._sent()
        except (ConnectionLost, ProtocolError) as exc:
            if isinstance(exc, ProtocolError):
                self.protocol_error = self.protocol_error or exc
            self.close(str(exc))


async def serve_builder(
    farm: Farm,
    config: SessionConfig,
    storage: Storage,
    stream: trio.abc.Stream,
    *,
    gate: HandshakeGate | None = None,
) -> None:
    """Handle one builder connection until it ends.  Owns and closes ``stream``.

    Timeouts: TLS (when configured), the challenge and the hello must be done within
    ``handshake_timeout``; after that, any ``builder_timeout`` without a frame ends the
    connection.  With a ``gate``, the connection counts against its limit until then.
    """
    if gate is not None and not gate.enter():
        log.warning(
            "closed a connection: %d connections are already in their handshake", gate.limit
        )
        with trio.move_on_after(1, shield=True):
            await stream.aclose()
        return
    in_gate = gate is not None
    conn = Connection(
        Role.RUNNER,
        now=trio.current_time(),
        peer_timeout=config.handshake_timeout,
        max_frame_size=config.max_frame_size,
    )
    session: BuilderSession | None = None
    reason = "closed"
    said_goodbye = False
    try:
        hello = None
        with trio.move_on_after(config.handshake_timeout):
            if config.ssl_context is not None:
                stream = await _tls_handshake(stream, config.ssl_context)
            channel = FramedChannel(stream, conn)
            hello = await _handshake(farm, channel, config)
        if hello is None:
            if conn.hello is None:
                log.info("connection closed: no hello within %g s", config.handshake_timeout)
            return
        if gate is not None:
            gate.leave()
            in_gate = False
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
                nursery.start_soon(session.keepalive, hello.ping_interval)
                reason = await _receive_loop(
                    farm, session, machine, channel, config, storage, nursery
                )
                said_goodbye = reason.startswith("said goodbye")
                if said_goodbye:
                    # A drained builder's last results may still be importing: they finish
                    # (the builder has already done its part) before the session ends.
                    with trio.move_on_after(config.builder_timeout):
                        while session.importing:
                            await session.imports_changed.wait()
                nursery.cancel_scope.cancel()
        if session.close_reason is not None:
            reason = session.close_reason
    except (ConnectionLost, ProtocolError) as exc:
        reason = f"protocol error: {exc}" if isinstance(exc, ProtocolError) else str(exc)
        if isinstance(exc, ProtocolError):
            farm.metrics.protocol_error(exc)
        if session is None:
            log.info("connection closed before its hello completed: %s", reason)
    except Exception as exc:  # the one broad catch: a bug here must not take the runner down
        reason = f"internal error: {type(exc).__name__}: {exc}"
        log.exception("builder connection failed")
    finally:
        if in_gate:
            assert gate is not None
            gate.leave()
        if session is not None:
            if session.protocol_error is not None:
                farm.metrics.protocol_error(session.protocol_error)
            farm.detach(session, reason, trio.current_time(), lost=not said_goodbye)
        with trio.move_on_after(5, shield=True):
            for upload in session.uploads.values() if session is not None else ():
                await trio.to_thread.run_sync(storage.blobs.discard, upload)
            await stream.aclose()


async def _tls_handshake(
    stream: trio.abc.Stream, context: ssl.SSLContext
) -> trio.SSLStream[trio.abc.Stream]:
    tls = trio.SSLStream(stream, context, server_side=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        raise ConnectionLost(f"TLS handshake failed: {tls_failure(exc)}") from None
    return tls


async def _handshake(farm: Farm, channel: FramedChannel, config: SessionConfig) -> Hello | None:
    """Challenge, hello, and the checks on it; None when the builder was rejected."""
    challenge = Challenge(
        protocol_version=PROTOCOL_VERSION,
        nonce=auth.new_nonce(),
        token_required=config.token is not None,
    )
    await channel.send(challenge)
    hello = await channel.receive()
    assert isinstance(hello, Hello)  # the Connection allows nothing else first
    if not compatible(PROTOCOL_VERSION, hello.protocol_version):
        await _reject(
            farm,
            channel,
            hello,
            "incompatible-version",
            f"runner speaks protocol {PROTOCOL_VERSION}, builder speaks {hello.protocol_version}",
        )
        return None
    if config.token is not None and not auth.verify(
        config.token, challenge.nonce, hello.machine_id, hello.credentials
    ):
        why = "no token given" if not hello.credentials else "wrong token"
        await _reject(
            farm,
            channel,
            hello,
            "auth-failed",
            f"{why}: give the builder the runner's token (--token-file)",
        )
        return None
    return hello


async def _reject(farm: Farm, channel: FramedChannel, hello: Hello, code: str, why: str) -> None:
    farm.metrics.handshake_rejected(code)
    log.warning("rejected builder %s (%s): %s: %s", hello.hostname, hello.machine_id, code, why)
    await channel.send(Reject(code=code, reason=why))


async def _receive_loop(
    farm: Farm,
    session: BuilderSession,
    machine: Machine,
    channel: FramedChannel,
    config: SessionConfig,
    storage: Storage,
    nursery: trio.Nursery,
) -> str:
    """Apply frames until the builder leaves or goes silent; returns why the loop ended.
    Slow work a frame starts (importing a Nix build's outputs) runs in ``nursery``, the
    connection's, so the loop goes on reading frames (pings) meanwhile."""
    conn = channel.connection
    try:
        with trio.CancelScope(deadline=conn.deadline) as watchdog:
            channel.watchdog = watchdog  # any frame (or a frame's progress) is a sign of life
            while True:
                message = await channel.receive()
                now = trio.current_time()
                kind = type(message)
                if kind is Ping:
                    assert isinstance(message, Ping)
                    session.last_ping_seq = message.seq
                    await session.reply(Pong(seq=message.seq))
                    farm.on_ping(session, machine, message, now)
                elif kind is UploadData:
                    assert isinstance(message, UploadData)
                    await _on_upload(farm, session, machine, storage, message, nursery)
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
                    # Only a current result has its uploads checked and kept: one from
                    # another machine's build or an old attempt is counted and dropped.
                    ref = message.build_id, message.attempt
                    build = farm.current(session, machine, *ref, kind="result")
                    if build is not None:
                        result = await _check_outputs(session, storage, message)
                        if build.spec.drv and result.status is BuildStatus.SUCCESS:
                            nursery.start_soon(
                                _import_and_commit, farm, session, machine, storage, result
                            )
                        else:
                            farm.on_result(session, machine, result, trio.current_time())
                    await _drop_stale_uploads(session, machine, storage)
                elif kind is Progress:
                    assert isinstance(message, Progress)
                    farm.on_progress(session, machine, message)
                elif kind is Drain:
                    farm.on_builder_drain(session, machine)
                elif kind is Goodbye:
                    assert isinstance(message, Goodbye)
                    return f"said goodbye ({message.reason})" if message.reason else "said goodbye"
    except (ConnectionLost, ProtocolError) as exc:
        if isinstance(exc, ProtocolError):
            session.protocol_error = session.protocol_error or exc
        session.close(str(exc) if isinstance(exc, ConnectionLost) else f"protocol error: {exc}")
        return session.close_reason or str(exc)
    if watchdog.cancelled_caught:
        return f"silent for {config.builder_timeout:g} s"
    return session.close_reason or "closed"


async def _import_and_commit(
    farm: Farm, session: BuilderSession, machine: Machine, storage: Storage, result: Result
) -> None:
    """Import a Nix build's output closure into the runner's store, then commit its result
    (``upload-failed`` if the import failed).  The build stays running on its machine
    meanwhile: if the connection dies first, this is cancelled with it and the build is
    requeued as for any lost builder; a result no longer current is dropped by the farm."""
    build = farm.builds.get(result.build_id)
    if build is None:
        return
    session.importing += 1
    try:
        outputs = build.spec.drv_outputs
        result = await nix.import_outputs(storage.nix, storage.blobs, outputs, result)
        # The uploaded files are exports of paths now in the runner's store: later
        # submissions that find those paths valid use them instead of exporting again.
        storage.nix_exports.update((label_path(f.path), f) for f in result.outputs)
        farm.on_result(session, machine, result, trio.current_time())
    finally:
        session.importing -= 1
        session.imports_changed.set()
        session.imports_changed = trio.Event()


async def _on_upload(
    farm: Farm,
    session: BuilderSession,
    machine: Machine,
    storage: Storage,
    msg: UploadData,
    nursery: trio.Nursery,
) -> None:
    """Append one chunk of an output file of a build this builder runs under the current
    attempt; any other chunk is counted and dropped (``Farm.current``).  An attempt that
    uploads more than ``max_output_bytes``, more files than a result can list, or starts a
    file before finishing the last, is a protocol violation: the connection ends.

    ``msg.path`` is a label for the result to match, never a file name: the data goes to a
    temporary file in the blob store and, once checked, to a name made of its hash.  Chunks
    are written a batch at a time in a worker thread, in the background (``_write_behind``)."""
    if farm.current(session, machine, msg.build_id, msg.attempt, kind="upload") is None:
        return
    ref = f"build {msg.build_id} attempt {msg.attempt}"
    totals = session.upload_totals.setdefault((msg.build_id, msg.attempt), UploadTotals())
    totals.bytes += len(msg.data)
    limit = farm.config.max_output_bytes
    if totals.bytes > limit:
        raise RemoteProtocolError(f"{ref}: uploaded more than max_output_bytes ({limit})")
    key = (msg.build_id, msg.attempt, msg.path)
    upload = session.uploads.get(key)
    if upload is None:
        if msg.offset != 0:
            return  # its start was refused; the result will say the upload failed
        previous = totals.current
        if previous is not None and not (previous.complete or previous.done):
            raise RemoteProtocolError(
                f"{ref}: started {msg.path!r} before finishing {previous.path!r}"
            )
        if totals.files >= MAX_UPLOADS:
            raise RemoteProtocolError(f"{ref}: uploaded more than {MAX_UPLOADS} files")
        totals.files += 1
        upload = await trio.to_thread.run_sync(storage.blobs.begin, msg.path)
        session.uploads[key] = totals.current = upload
    if upload.done:
        return  # refused already; the result will say the upload failed
    try:
        due = storage.blobs.stage(upload, msg.offset, msg.data, msg.eof)
    except BlobError as exc:
        log.warning("upload of %s: %s", ref, exc)
        await _discard(session, storage, upload)
        return
    farm.metrics.uploaded_bytes.inc(len(msg.data))
    if due:
        await _write_behind(session, storage, upload, nursery, ref)


async def _write_behind(
    session: BuilderSession,
    storage: Storage,
    upload: PendingUpload,
    nursery: trio.Nursery,
    ref: str,
) -> None:
    """Write (and hash) what is staged of ``upload`` in a worker thread, without waiting for
    it: the receive loop goes on reading the next frames meanwhile, so the network and the
    disk work at the same time.  It waits for the upload's previous write first (writes are
    in order, and at most two batches of an upload are held: one written, one staged)."""
    await _settled(session, upload)
    if upload.done:
        return  # the previous write failed: discarded
    chunks, last = storage.blobs.take_staged(upload)
    session.writes[upload] = over = trio.Event()
    nursery.start_soon(_write, session, storage, upload, chunks, last, over, ref)


async def _write(
    session: BuilderSession,
    storage: Storage,
    upload: PendingUpload,
    chunks: list[bytes],
    last: bool,
    over: trio.Event,
    ref: str,
) -> None:
    blobs = storage.blobs
    try:
        await write_and_hash(
            sum(map(len, chunks)),
            functools.partial(blobs.write_unhashed, upload, chunks, last),
            functools.partial(blobs.hash_chunks, upload, chunks),
            functools.partial(blobs.write_chunks, upload, chunks, last),
        )
    except OSError as exc:  # the disk is full, or failing: this upload cannot be kept
        log.warning("upload of %s: %s", ref, exc)
        blobs.failed(exc)
        await trio.to_thread.run_sync(storage.blobs.discard, upload)
    finally:
        del session.writes[upload]
        over.set()


async def _settled(session: BuilderSession, upload: PendingUpload) -> None:
    """Wait until no write of ``upload`` is in flight (before committing or discarding it)."""
    over = session.writes.get(upload)
    if over is not None:
        await over.wait()


async def _discard(session: BuilderSession, storage: Storage, upload: PendingUpload) -> None:
    await _settled(session, upload)
    await trio.to_thread.run_sync(storage.blobs.discard, upload)


def _listing_problem(result: Result) -> str:
    """Why the outputs a result lists could not all exist in one ``$OUT`` (so could not all
    be placed in a dependent's ``$IN``), or "".  A builder scanning a real directory never
    lists such a thing."""
    problem = tree_conflict(info.path for info in result.outputs)
    if problem is not None:
        return f"the builder's list of outputs is impossible: {problem}"
    if any("\0" in info.link for info in result.outputs):
        return "the builder's list of outputs has a link target with a NUL"
    return ""


async def _drop_stale_uploads(session: BuilderSession, machine: Machine, storage: Storage) -> None:
    """Discard uploads of attempts that are no longer current here (aborted, cancelled or
    requeued): no result can commit them, and they would hold disk until the session ends."""
    for key in list(session.uploads):
        build = machine.running.get(key[0])
        if build is None or build.attempts != key[1]:
            await _discard(session, storage, session.uploads.pop(key))
    for ref in list(session.upload_totals):
        build = machine.running.get(ref[0])
        if build is None or build.attempts != ref[1]:
            del session.upload_totals[ref]


async def _check_outputs(session: BuilderSession, storage: Storage, result: Result) -> Result:
    """Keep each uploaded output whose size and hash match the result's list.  A success whose
    outputs did not all arrive intact becomes ``upload-failed`` (retried elsewhere), as does
    one whose list could not be a directory tree (a path twice, or a file also used as a
    directory: placing those under a dependent's ``$IN`` would go through a link)."""
    session.upload_totals.pop((result.build_id, result.attempt), None)
    uploads = {
        path: session.uploads.pop((b, a, path))
        for (b, a, path) in list(session.uploads)
        if b == result.build_id and a == result.attempt
    }
    if len(result.outputs) > _CHECK_INLINE:
        problem = await trio.to_thread.run_sync(_listing_problem, result)
    else:
        problem = _listing_problem(result)
    for info in () if problem else result.outputs:
        if info.link:
            continue
        upload = uploads.pop(info.path, None)
        if upload is None:
            if await trio.to_thread.run_sync(storage.blobs.has, info.sha256):
                continue
            problem = problem or f"output {info.path} was not uploaded"
            continue
        await _settled(session, upload)
        try:
            await trio.to_thread.run_sync(storage.blobs.commit, upload, info.size, info.sha256)
        except BlobError as exc:
            problem = problem or str(exc)
    for upload in uploads.values():  # uploaded but not listed: not an output
        await _discard(session, storage, upload)
    if not problem:
        return result
    if result.status is BuildStatus.SUCCESS:
        log.warning("build %s attempt %d: %s", result.build_id, result.attempt, problem)
        return attrs.evolve(result, status=BuildStatus.UPLOAD_FAILED, error=problem, outputs=())
    return attrs.evolve(result, outputs=())


async def _on_fetch(
    farm: Farm, session: BuilderSession, machine: Machine, storage: Storage, msg: FetchRequest
) -> None:
    """Serve a chunk of an input of a build this builder runs under the current attempt."""
    build = farm.current(session, machine, msg.build_id, msg.attempt, kind="fetch")
    if build is None:
        error = "not an input of a build you run under this attempt"
    elif not farm.is_input(build, msg.sha256):
        error = f"{msg.sha256} is not an input of build {msg.build_id}"
    else:
        try:
            pieces, eof = await trio.to_thread.run_sync(
                storage.blobs.read_pieces,
                msg.sha256,
                msg.offset,
                min(msg.length, MAX_FETCH_CHUNK),
                TRANSFER_FRAME,
            )
        except BlobError as exc:
            error = str(exc)
        except (OSError, OverflowError) as exc:  # the offset comes from the builder
            why = getattr(exc, "strerror", None) or exc
            error = f"cannot read {msg.sha256} at offset {msg.offset}: {why}"
        else:
            last = len(pieces) - 1
            for index, piece in enumerate(pieces):
                session.post(
                    FetchData(request_id=msg.request_id, data=piece, eof=eof and index == last)
                )
            farm.metrics.fetched_bytes.inc(sum(map(len, pieces)))
            return
    session.post(FetchData(request_id=msg.request_id, error=error))
