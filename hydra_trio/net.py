"""Transport: frames over trio streams, and TCP with keepalive.  The only module touching sockets.

``FramedChannel`` joins a ``trio.abc.Stream`` (a TCP stream, a TLS stream, or a memory stream in
tests) to a sans-I/O ``Connection``.  It has exactly one writer at a time: ``send`` may be called
by any number of tasks concurrently; frames queued while a write is in flight are coalesced into
the next ``send_all`` (never a ``BusyResourceError``, and fewer system calls under load).

TCP options complement the application ping, they do not replace it: keepalive and
``TCP_USER_TIMEOUT`` bound how long a write into a black hole can hang and let the kernel notice
a vanished peer on an idle link, but only the ping proves the peer's event loop is running (see
``configure_keepalive`` for why each option has the value it has).
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.errors import HydraTrioError
from hydra_trio.protocol.messages import Message

RECEIVE_SIZE = 256 * 1024
#: Frames ``receive`` decodes and returns from what one read brought before it lets other
#: tasks run (a read of 256 KiB can hold 2,000 small uploads: decoding them took ~20 ms on an
#: idle core, applying them ~100 ms on a busy runner).
BACKLOG_RUN = 32


class ConnectionLost(HydraTrioError):
    """The peer closed the stream, or the stream broke."""


class FramedChannel:
    """Frames over one stream.  The caller owns ``stream``; ``aclose`` closes it."""

    def __init__(self, stream: trio.abc.Stream, connection: Connection) -> None:
        self.stream = stream
        self.connection = connection
        self._pending: list[bytes | memoryview] = []
        self._write_lock = trio.Lock()
        #: decoded frames not yet returned: at most BACKLOG_RUN from one decoding
        self._received: deque[Message] = deque()
        self._eof = False
        # On TCP, read and write the stream's trio socket directly: SocketStream's
        # receive_some/send_all wrap every call in two context managers (one translating
        # errors, one detecting concurrent use) that cost more Python per frame than the whole
        # protocol layer.  This class already has exactly one reader (``receive`` is not meant
        # for concurrent use) and one writer (the lock), and translates errors the same way.
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None

    async def send(self, message: Message) -> None:
        """Send one message.  Returns once it has been handed to the stream.

        The frame is queued synchronously; whichever task holds the write lock flushes
        everything queued, so a task cancelled while waiting may still have its frame sent.
        """
        self._pending.extend(self.connection.send_parts(message))
        await self._flush()

    @property
    def writing(self) -> bool:
        """Whether a write is in flight (a ``send`` now would wait for it)."""
        return self._write_lock.locked()

    async def send_all(self, messages: list[Message]) -> None:
        """Send several messages in one write."""
        send_parts, pending = self.connection.send_parts, self._pending
        for message in messages:
            pending.extend(send_parts(message))
        await self._flush()

    async def _flush(self) -> None:
        lock = self._write_lock
        # Uncontended (the usual case): take the lock without Lock.acquire's checkpoint, which
        # costs a whole scheduler pass per frame.  stream.send_all is itself a checkpoint, so
        # send() still always is one; contending senders queue and their frames are batched.
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            pending = self._pending
            sock = self._socket
            while pending:
                try:
                    if sock is not None:
                        # Whatever the kernel has not taken goes back to the front of the
                        # queue if this task is cancelled (by its build's Abort, say): the
                        # batch holds other tasks' frames, which returned as sent, and maybe
                        # the rest of a frame already begun.  The next flush sends it.
                        buffers: list[bytes | memoryview] = [*pending]
                        pending.clear()
                        try:
                            await _send_vectored(sock, buffers)
                        finally:
                            if buffers:
                                pending[:0] = buffers
                        continue
                    data = pending[0] if len(pending) == 1 else b"".join(pending)
                    pending.clear()
                    await self.stream.send_all(data)  # (TLS: a cancelled send breaks it)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise ConnectionLost(f"send failed: {exc or type(exc).__name__}") from exc
        finally:
            lock.release()

    async def receive(self) -> Message:
        """The next message.  Raises ``ConnectionLost`` at EOF and ``RemoteProtocolError``
        for an invalid frame."""
        received = self._received
        data: bytes | bytearray
        if received:
            return received.popleft()
        while not received:
            if self.connection.pending:
                # The rest of an earlier read, decoded BACKLOG_RUN frames at a time with other
                # tasks let run in between (another connection's ping), as a read would have:
                # applying a backlog need not wait for anything (a small upload is staged in
                # memory), and decoding a read of 2,000 small frames at once held the event
                # loop ~20 ms on an idle core, 100+ ms on a busy one.
                await trio.lowlevel.checkpoint()
                received.extend(self.connection.receive_data(b"", trio.current_time(), BACKLOG_RUN))
                continue
            if self._eof:
                raise ConnectionLost("connection closed by peer")
            try:
                if self._socket is not None:
                    data = await self._socket.recv(RECEIVE_SIZE)
                else:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionLost(f"receive failed: {exc or type(exc).__name__}") from exc
            if not data:
                self._eof = True
                self.connection.receive_eof()
                raise ConnectionLost("connection closed by peer")
            received.extend(self.connection.receive_data(data, trio.current_time(), BACKLOG_RUN))
        return received.popleft()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def watch_silence(connection: Connection, watchdog: trio.CancelScope) -> None:
    """Cancel ``watchdog`` once nothing has been heard from the peer for its timeout (both
    sides run it beside their receive loop).

    Lazy: it sleeps until the connection's deadline as it stood, then looks again, since any
    frame (or a frame's progress, or a backlog of frames read earlier being decoded: see
    ``Connection.receive_data``) has moved it.  The receive loop thus moves no cancel scope's
    deadline per frame or read (trio's setter costs more than a Pong's encoding), and this task
    wakes about once per timeout, not once per frame."""
    while True:
        deadline = connection.deadline
        if deadline <= trio.current_time():
            watchdog.cancel()
            return
        await trio.sleep_until(deadline)


#: Buffers per ``sendmsg`` at most (Linux's ``IOV_MAX`` is 1024).
_IOV_MAX = 512


async def _send_vectored(sock: trio.socket.SocketType, buffers: list[bytes | memoryview]) -> None:
    """Send ``buffers`` one after the other, as few ``send``/``sendmsg`` calls as the
    socket's buffer allows (usually one); a buffer the kernel took only part of goes on as a
    view of the rest.  What was sent is removed from ``buffers``, also when this raises: a
    cancelled send has sent nothing (trio checks for cancellation before the system call and
    never after one that sent), so ``buffers`` is then exactly what is still to be sent."""
    index, count = 0, len(buffers)
    try:
        while index < count:
            if index + 1 == count:
                sent = await sock.send(buffers[index])
            else:
                sent = await sock.sendmsg(buffers[index : index + _IOV_MAX])
            while index < count and sent >= len(buffers[index]):
                sent -= len(buffers[index])
                index += 1
            if sent:
                buffers[index] = memoryview(buffers[index])[sent:]
    finally:
        del buffers[:index]


# ---------------------------------------------------------------------------------------------
# Addresses and TCP.


@attrs.frozen
class HostPort:
    """A ``HOST:PORT`` as given on the command line; ``host`` has no brackets."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """``127.0.0.1:7420``, ``[::1]:7420``, ``localhost:7420``; ValueError otherwise."""
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not HOST:PORT")
        if host.startswith("["):
            if not host.endswith("]"):
                raise ValueError(f"{text!r}: unbalanced brackets around the IPv6 address")
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:7420")
        if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


#: Linux option numbers the ``socket`` module does not name (``linux/tcp.h``).
TCP_THIN_LINEAR_TIMEOUTS = getattr(socket, "TCP_THIN_LINEAR_TIMEOUTS", 16)
TCP_RTO_MAX_MS = 44  # Linux >= 6.11
#: The option of the idle time before the first keepalive probe: Linux and the BSDs call it
#: ``TCP_KEEPIDLE``, macOS ``TCP_KEEPALIVE``.
KEEPIDLE_NAME = "TCP_KEEPIDLE" if hasattr(socket, "TCP_KEEPIDLE") else "TCP_KEEPALIVE"
#: Unsent bytes the kernel holds for a connection before ``send`` waits: a ping or pong queued
#: behind a transfer waits for at most this much (plus what is in flight) on a slow link.
NOTSENT_LOWAT = 128 * 1024
#: The longest retransmission timeout, where the kernel lets us set it (Linux >= 6.11).
RTO_MAX_MS = 2000


def configure_keepalive(stream: trio.abc.Stream, timeout: float) -> None:
    """Set the TCP options of a farm connection from ``timeout`` (seconds: the application's
    own liveness deadline on this side):

    - ``SO_KEEPALIVE`` with ``TCP_KEEPIDLE/INTVL/CNT``: an idle dead peer is probed after
      timeout/2 and given up on after about ``timeout``;
    - ``TCP_USER_TIMEOUT`` = 4 x timeout: data unacknowledged that long fails the connection.
      A backstop only (the application's watchdog cancels a write into a black hole, and
      closes the socket): Linux counts it from the first retransmission of a loss episode,
      which on a lossy but live link may go on for a long time, so at 1 x the kernel gave up
      on connections that still carried frames both ways, and at 2 x still did, rarely
      (docs/reliability.md, finding 3);
    - ``TCP_THIN_LINEAR_TIMEOUTS`` and, where the kernel has it, ``TCP_RTO_MAX_MS`` = 2 s: a
      connection with little in flight (pings) retransmits at a steady pace instead of backing
      off exponentially, which on a 30 % lossy link alone stalls it past 30 s (finding 4);
    - ``TCP_NOTSENT_LOWAT`` (``NOTSENT_LOWAT``): a ping is not queued behind megabytes of
      transfer in the kernel (finding 2).

    Options this platform lacks are skipped: macOS has keepalive (its idle time is named
    ``TCP_KEEPALIVE``), ``TCP_KEEPINTVL``/``TCP_KEEPCNT`` and ``TCP_NOTSENT_LOWAT``, but no
    ``TCP_USER_TIMEOUT``, thin-stream or RTO options; there the application's watchdog alone
    bounds a write into a black hole (docs/protocol.md, "TCP options by platform")."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return
    idle = max(1, int(timeout / 2))
    interval = max(1, int(timeout / 6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        (KEEPIDLE_NAME, idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", max(1000, int(4 * timeout * 1000))),
        ("TCP_NOTSENT_LOWAT", NOTSENT_LOWAT),
    ):
        option = getattr(socket, name, None)
        if option is not None:  # not every platform has every option
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    if sys.platform == "linux":
        for option, value in ((TCP_THIN_LINEAR_TIMEOUTS, 1), (TCP_RTO_MAX_MS, RTO_MAX_MS)):
            with contextlib.suppress(OSError):  # ENOPROTOOPT: an older kernel
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


def keepalive_settings(stream: trio.abc.Stream) -> dict[str, int]:
    """Read the TCP options back (for tests and diagnostics); ``TCP_RTO_MAX_MS`` only where
    the kernel has it."""
    sock = stream.socket  # type: ignore[attr-defined]
    settings = {"SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)}
    names = (
        KEEPIDLE_NAME,
        "TCP_KEEPINTVL",
        "TCP_KEEPCNT",
        "TCP_USER_TIMEOUT",
        "TCP_NOTSENT_LOWAT",
    )
    for name in names:
        option = getattr(socket, name, None)
        if option is not None:
            settings[name] = sock.getsockopt(socket.IPPROTO_TCP, option)
    if sys.platform == "linux":
        settings["TCP_THIN_LINEAR_TIMEOUTS"] = sock.getsockopt(
            socket.IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS
        )
        with contextlib.suppress(OSError):
            settings["TCP_RTO_MAX_MS"] = sock.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS)
    return settings


def peer_address(stream: trio.abc.Stream) -> str:
    """The other end of a TCP stream (through TLS) as ``HOST:PORT``; ``"?"`` for a stream
    that has no socket (an in-memory one in tests) or a closed one."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else None
    except OSError:
        peer = None
    if not isinstance(peer, tuple) or len(peer) < 2:
        return "?"
    return str(HostPort(str(peer[0]), int(peer[1])))


async def open_tcp(address: HostPort, *, keepalive_timeout: float) -> trio.SocketStream:
    """Connect to ``address`` with keepalive set.  Callers bound it with ``fail_after``."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    configure_keepalive(stream, keepalive_timeout)
    return stream


async def serve_tcp(
    handler: Callable[[trio.SocketStream], Awaitable[Any]],
    address: HostPort,
    *,
    keepalive_timeout: float,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[list[HostPort]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``address`` forever; reports the bound addresses when listening.

    ``::`` and ``0.0.0.0`` mean every interface; ``::`` listens on IPv6 and IPv4.  With
    ``handler_nursery``, connections run there, so cancelling this stops accepting without
    ending them (ordered shutdown, as hypercorn's trio worker does).
    """
    host: str | None = None if address.host in ("::", "") else address.host
    listeners = await trio.open_tcp_listeners(address.port, host=host)

    async def configured(stream: trio.SocketStream) -> None:
        configure_keepalive(stream, keepalive_timeout)
        await handler(stream)

    bound = [HostPort(*listener.socket.getsockname()[:2]) for listener in listeners]
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                trio.serve_listeners, configured, listeners, handler_nursery=handler_nursery
            )
        )
        task_status.started(bound)


class TLSError(HydraTrioError):
    """TLS could not be set up or negotiated; the message says why."""


def server_tls_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """The runner's TLS context for the builder port: its certificate, and with ``ca``,
    mutual TLS (every builder must present a certificate signed by ``ca``)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if ca is not None:
            context.load_verify_locations(cafile=ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"cannot load the TLS files ({cert}, {key}, {ca}): {exc}") from None
    return context


def client_tls_context(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A builder's TLS context: verifies the runner against ``ca`` (or the system roots) and
    presents ``cert``/``key`` when given (for a runner that requires mutual TLS)."""
    try:
        context = ssl.create_default_context(cafile=ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"cannot load the TLS files ({ca}, {cert}, {key}): {exc}") from None
    return context


def tls_failure(exc: BaseException) -> str:
    """One line on why a TLS handshake failed (trio wraps the ``ssl`` error)."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    return str(cause) or "connection closed during the TLS handshake"


async def start_tls(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    server_side: bool = False,
) -> trio.SSLStream[trio.abc.Stream]:
    """Wrap a connected ``stream`` in TLS and complete the handshake: as a client of
    ``server_hostname``, or (``server_side``) as the server.  Callers bound it with their
    deadline.  Raises ``ConnectionLost`` if it fails, with ``stream`` closed."""
    tls = trio.SSLStream(stream, context, server_side=server_side, server_hostname=server_hostname)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        peer = "" if server_side else f" with {server_hostname}"
        raise ConnectionLost(f"TLS handshake{peer} failed: {tls_failure(exc)}") from None
    return tls
