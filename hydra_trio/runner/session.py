"""One builder connection on the runner side, from accept to detach.

The connection's lifetime is one nursery.  ``serve_builder`` admits the connection
(``handshake``: TLS, challenge, hello), attaches its session to the farm, and runs the receive
loop (``FrameHandler`` applies each frame, with the keepalive watchdog around it) beside the
single writer and the keepalive (``outbox``), the background upload writes (``uploads``) and
the result commits (``results``).  Whatever ends the connection (goodbye, EOF, a protocol
error, the watchdog, being superseded) is an ``EndReason``; the results received before it are
settled, and the session is detached from the farm in one step on the way out.

Task layout::

    background nursery (outlives the receive loop until its results are settled)
    |-- ResultCommitter.run       checks and commits results, in order
    |-- UploadReceiver._write     a batch of an upload, written and hashed in threads
    |-- FetchServer.run           reads and answers fetch requests, a batch per thread hop
    |-- ResultCommitter.import_and_commit    a Nix build's outputs into the runner's store
    `-- session.cancel_scope: connection nursery
        |-- BuilderSession.writer       the one writer (Outbox.run)
        |-- Outbox.keepalive
        |-- net.watch_silence          the watchdog: cancels the receive loop after silence
        `-- _receive_loop              FrameHandler.handle per frame, under the watchdog
"""

from __future__ import annotations

import contextlib
import enum
import logging
import ssl
import uuid

import attrs
import trio

from hydra_trio import net
from hydra_trio.net import ConnectionLost, FramedChannel
from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.errors import ProtocolError
from hydra_trio.protocol.messages import (
    PROTOCOL_VERSION,
    Goodbye,
    Hello,
    Message,
    Reject,
    RejectCode,
    Role,
    Welcome,
)
from hydra_trio.runner.blobs import Storage
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.frames import FrameHandler
from hydra_trio.runner.handshake import HandshakeGate, accept_tls, admit
from hydra_trio.runner.logs import LogBehind
from hydra_trio.runner.model import Machine
from hydra_trio.runner.outbox import OUTBOX_SIZE, Outbox
from hydra_trio.runner.results import ResultCommitter
from hydra_trio.runner.uploads import UploadReceiver

log = logging.getLogger("hydra_trio.runner")


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


class EndReason(enum.Enum):
    """Why the receive loop of a session ended."""

    #: the builder said goodbye (after draining): its builds are not lost.
    GOODBYE = "goodbye"
    #: nothing from the builder for ``builder_timeout`` (the watchdog).
    SILENT = "silent"
    #: the stream ended or broke, or the builder broke the protocol.
    BROKEN = "broken"
    #: the runner closed the session (``BuilderSession.close``: superseded, not reading).
    CLOSED = "closed"


@attrs.frozen
class Ending:
    """How a session's receive loop ended, and the words the farm records for it."""

    reason: EndReason
    text: str


@attrs.define(eq=False)
class BuilderSession:
    """The runner's end of one builder connection (implements ``model.Session``)."""

    channel: FramedChannel
    session_id: str = attrs.field(factory=lambda: uuid.uuid4().hex[:12])
    close_reason: str | None = None
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: the protocol error that ended the connection, if one did (counted in /metrics).
    protocol_error: ProtocolError | None = None
    outbox: Outbox = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.outbox = Outbox(self.channel)

    def post(self, message: Message) -> None:
        if self.close_reason is None and not self.outbox.post(message):
            self.close(f"not reading: {OUTBOX_SIZE} frames queued")

    async def reply(self, message: Message) -> None:
        """An answer from the receive loop (``Outbox.reply``)."""
        if self.close_reason is None and not await self.outbox.reply(message):
            self.close(f"not reading: {OUTBOX_SIZE} frames queued")

    def close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self.cancel_scope.cancel()

    def broken(self, exc: ConnectionLost | ProtocolError) -> str:
        """The stream broke: record why (without cancelling anything) and return it."""
        if isinstance(exc, ProtocolError):
            self.protocol_error = self.protocol_error or exc
            text = f"protocol error: {exc}"
        else:
            text = str(exc)
        if self.close_reason is None:
            self.close_reason = text
        return self.close_reason

    async def writer(self) -> None:
        try:
            await self.outbox.run()
        except (ConnectionLost, ProtocolError) as exc:
            self.close(self.broken(exc))


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
    uploads: UploadReceiver | None = None
    reason = "closed"
    ending: Ending | None = None
    try:
        hello = None
        with trio.move_on_after(config.handshake_timeout):
            if config.ssl_context is not None:
                stream = await accept_tls(stream, config.ssl_context)
            channel = FramedChannel(stream, conn)
            hello = await admit(channel, config.token, farm.metrics)
        if hello is None:
            if conn.hello is None:
                log.info("connection closed: no hello within %g s", config.handshake_timeout)
            return
        address = net.peer_address(stream)
        if gate is not None:
            gate.leave()
            in_gate = False
        refusal: str | None = None
        machine: Machine | None = None
        # no wait on the peer inside the admitting slot (see HandshakeGate)
        async with gate.admitting if gate is not None else contextlib.nullcontext():
            refusal = _duplicate_refusal(farm, hello, address, config.builder_timeout / 2)
            if refusal is None:
                session = BuilderSession(channel)
                conn.set_peer_timeout(config.builder_timeout)
                machine = _welcome(farm, session, hello, config, address)
        if refusal is not None:
            await _refuse_duplicate(farm, channel, refusal)
            return
        assert session is not None and machine is not None
        async with trio.open_nursery() as background:
            uploads = UploadReceiver(
                storage.blobs, farm.metrics, farm.config.max_output_bytes, background
            )
            results = ResultCommitter(farm, session, machine, storage, uploads, background)
            logs = LogBehind(storage.logs, background)
            handler = FrameHandler(farm, session, machine, storage, uploads, results, logs)
            background.start_soon(results.run)
            background.start_soon(handler.fetches.run)
            with session.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(session.writer)
                    nursery.start_soon(
                        session.outbox.keepalive, hello.ping_interval, lambda: results.settling
                    )
                    watchdog = trio.CancelScope()
                    nursery.start_soon(net.watch_silence, conn, watchdog)
                    ending = await _receive_loop(session, channel, handler, config, watchdog)
                    nursery.cancel_scope.cancel()
            if ending is not None:
                reason = ending.text
                await _settle(results, ending, config)
            background.cancel_scope.cancel()
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
            said_goodbye = ending is not None and ending.reason is EndReason.GOODBYE
            farm.detach(session, reason, trio.current_time(), lost=not said_goodbye)
        with trio.move_on_after(5, shield=True):
            if uploads is not None:
                await uploads.discard_all()
            await stream.aclose()


def _duplicate_refusal(farm: Farm, hello: Hello, address: str, quiet: float) -> str | None:
    """Why ``hello`` is refused as a second builder process with a live machine's id (one
    that pinged within ``quiet`` seconds: a builder pings three times per builder timeout),
    logged as an error; or None."""
    other = farm.duplicate_of(hello, trio.current_time(), quiet)
    if other is None:
        return None
    why = (
        f"machine id {hello.machine_id} is already connected from {other.address} by another "
        f"builder process; refused the one from {address}: each builder needs its own "
        "--work-dir (a copied work dir or VM image shares its machine-id file)"
    )
    log.error("refused builder %s from %s: %s", hello.hostname, address, why)
    return why


async def _refuse_duplicate(farm: Farm, channel: FramedChannel, why: str) -> None:
    """Answer with ``Reject`` code ``duplicate-machine``, counted."""
    farm.metrics.handshake_rejected(RejectCode.DUPLICATE_MACHINE.value)
    await channel.send(Reject(code=RejectCode.DUPLICATE_MACHINE.value, reason=why))


def _welcome(
    farm: Farm, session: BuilderSession, hello: Hello, config: SessionConfig, address: str = ""
) -> Machine:
    """Attach the admitted builder's session to the farm and greet it."""
    machine = farm.attach(session, hello, trio.current_time(), address)
    session.post(
        Welcome(
            protocol_version=PROTOCOL_VERSION,
            session_id=session.session_id,
            builder_timeout=config.builder_timeout,
        )
    )
    if machine.drain_requested:
        # Not sent again: the runner keeps it from getting builds until undrain, and a
        # builder restarted after a drain must not exit because of it.
        log.info(
            "builder %s (%s) is drained by an operator: no builds until hydra-trio undrain %s",
            machine.hostname,
            machine.machine_id,
            machine.machine_id,
        )
    return machine


async def _settle(results: ResultCommitter, ending: Ending, config: SessionConfig) -> None:
    """The receive loop ended by itself: settle the results it received (and after a
    goodbye, let a drained builder's Nix imports finish: it has done its part), within
    ``builder_timeout``."""
    with trio.move_on_after(config.builder_timeout):
        await results.finish(imports=ending.reason is EndReason.GOODBYE)


async def _receive_loop(
    session: BuilderSession,
    channel: FramedChannel,
    handler: FrameHandler,
    config: SessionConfig,
    watchdog: trio.CancelScope,
) -> Ending:
    """Apply frames until the builder leaves or goes silent (``watchdog`` cancelled by
    ``net.watch_silence``); returns why the loop ended."""
    try:
        with watchdog:
            while True:
                message = await channel.receive()
                if isinstance(message, Goodbye):
                    text = f"said goodbye ({message.reason})" if message.reason else "said goodbye"
                    return Ending(EndReason.GOODBYE, text)
                await handler.handle(message)
    except (ConnectionLost, ProtocolError) as exc:
        return Ending(EndReason.BROKEN, session.broken(exc))
    if watchdog.cancelled_caught:
        return Ending(EndReason.SILENT, f"silent for {config.builder_timeout:g} s")
    return Ending(EndReason.CLOSED, session.close_reason or "closed")
