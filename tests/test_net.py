"""Transport: FramedChannel over memory streams, real loopback TCP with keepalive, HostPort."""

from __future__ import annotations

import collections
import functools
import platform
import socket
import sys
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from hydra_trio import net
from hydra_trio.protocol import codec
from hydra_trio.protocol import messages as m
from hydra_trio.protocol.connection import Connection, ConnectionState
from hydra_trio.protocol.errors import RemoteProtocolError

from .helpers.strategies import EXAMPLES

CHALLENGE = EXAMPLES[m.Challenge]
HELLO = EXAMPLES[m.Hello]
WELCOME = EXAMPLES[m.Welcome]

StreamPair = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


def channels(
    pair: StreamPair = trio.testing.memory_stream_pair,
) -> tuple[net.FramedChannel, net.FramedChannel]:
    """A (builder, runner) pair of channels over a fresh stream pair, not yet handshaken."""
    now = trio.current_time()
    a, b = pair()
    return (
        net.FramedChannel(a, Connection(m.Role.BUILDER, now=now, peer_timeout=30.0)),
        net.FramedChannel(b, Connection(m.Role.RUNNER, now=now, peer_timeout=30.0)),
    )


async def handshake(builder: net.FramedChannel, runner: net.FramedChannel) -> None:
    """Challenge, Hello and Welcome, each side in its own task (a lockstep stream blocks the
    writer until the reader takes the bytes)."""

    async def builder_side() -> None:
        assert await builder.receive() == CHALLENGE
        await builder.send(HELLO)
        assert await builder.receive() == WELCOME

    async def runner_side() -> None:
        await runner.send(CHALLENGE)
        assert await runner.receive() == HELLO
        await runner.send(WELCOME)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(builder_side)
        nursery.start_soon(runner_side)


async def test_round_trip(autojump_clock: trio.testing.MockClock) -> None:
    """Messages sent on one channel arrive intact, in order, on the other."""
    builder, runner = channels()
    await handshake(builder, runner)
    await runner.send_all([EXAMPLES[m.Assign], m.Pong(seq=0)])
    assert await builder.receive() == EXAMPLES[m.Assign]
    assert await builder.receive() == m.Pong(seq=0)
    await builder.send(EXAMPLES[m.Result])
    assert await runner.receive() == EXAMPLES[m.Result]
    assert builder.connection.state is runner.connection.state is ConnectionState.ESTABLISHED


async def test_receive_stamps_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    """A frame's arrival time, from trio's clock, is what moves the peer's deadline."""
    builder, runner = channels()
    start = trio.current_time()
    await handshake(builder, runner)
    await trio.sleep(12.5)
    await builder.send(m.Ping(seq=0))
    await runner.receive()
    assert runner.connection.last_received - start == 12.5
    assert runner.connection.deadline - start == 42.5


@pytest.mark.parametrize(
    "pair",
    [trio.testing.memory_stream_pair, trio.testing.lockstep_stream_pair],
    ids=["memory", "lockstep"],
)
async def test_concurrent_senders(autojump_clock: trio.testing.MockClock, pair: StreamPair) -> None:
    """Many tasks sending at once never raise BusyResourceError; every frame arrives intact."""
    builder, runner = channels(pair)
    await handshake(builder, runner)
    sent = [
        m.LogChunk(build_id=f"b{i}", attempt=i, data=bytes([i % 256]) * (i * 37 % 5000))
        for i in range(100)
    ]
    received: list[m.Message] = []

    async def reader() -> None:
        while len(received) < len(sent):
            received.append(await runner.receive())

    # fail_after turns a deadlock into an error: under autojump it would otherwise spin.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for message in sent:
                nursery.start_soon(builder.send, message)
    assert sorted(received, key=lambda x: x.attempt) == sent  # type: ignore[union-attr]


async def test_eof_raises_connection_lost(autojump_clock: trio.testing.MockClock) -> None:
    """A clean EOF raises ConnectionLost, again on every later receive, and closes."""
    builder, runner = channels()
    await handshake(builder, runner)
    await runner.aclose()
    for _ in range(2):
        with pytest.raises(net.ConnectionLost, match="closed by peer"):
            await builder.receive()
    assert builder.connection.state is ConnectionState.CLOSED


async def test_eof_mid_frame_is_a_protocol_error(autojump_clock: trio.testing.MockClock) -> None:
    """A stream that ends inside a frame raises RemoteProtocolError."""
    builder, runner = channels()
    runner.connection.send(CHALLENGE)  # bytes not sent: only the state matters here
    await builder.stream.send_all(codec.encode(HELLO)[:10])
    await builder.aclose()
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        await runner.receive()


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xff\xff\xff", b"\x00\x00\x00\x01\xc1", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
    ids=["huge-length", "bad-msgpack", "http"],
)
async def test_garbage_raises_remote_protocol_error(
    autojump_clock: trio.testing.MockClock, garbage: bytes
) -> None:
    """Bytes that are not frames raise RemoteProtocolError on receive."""
    builder, runner = channels()
    await builder.stream.send_all(garbage)
    with pytest.raises(RemoteProtocolError):
        await runner.receive()
    assert runner.connection.state is ConnectionState.CLOSED


async def test_protocol_violation_raises_remote_protocol_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A well-formed frame that breaks the handshake rules raises RemoteProtocolError."""
    builder, runner = channels()
    runner.connection.send(CHALLENGE)
    await builder.stream.send_all(codec.encode(m.Ping(seq=0)))
    with pytest.raises(RemoteProtocolError, match="expected hello after the challenge"):
        await runner.receive()


async def test_send_to_closed_peer_raises_connection_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Sending after the stream broke raises ConnectionLost, not a trio exception."""
    _builder, runner = channels()
    await runner.aclose()
    with pytest.raises(net.ConnectionLost, match="send failed"):
        await runner.send(CHALLENGE)


async def test_configure_keepalive_without_socket_is_a_no_op() -> None:
    """configure_keepalive leaves a stream without a socket (a memory stream) alone."""
    a, _ = trio.testing.memory_stream_pair()
    net.configure_keepalive(a, 30.0)


def expected_keepalive(timeout: float) -> dict[str, int]:
    """What configure_keepalive promises for ``timeout`` seconds, for the options we have."""
    wanted = {
        "SO_KEEPALIVE": 1,
        net.KEEPIDLE_NAME: max(1, int(timeout / 2)),
        "TCP_KEEPINTVL": max(1, int(timeout / 6)),
        "TCP_KEEPCNT": 3,
        "TCP_USER_TIMEOUT": max(1000, int(4 * timeout * 1000)),
        "TCP_NOTSENT_LOWAT": net.NOTSENT_LOWAT,
    }
    settings = {k: v for k, v in wanted.items() if k == "SO_KEEPALIVE" or hasattr(socket, k)}
    if sys.platform == "linux":
        settings["TCP_THIN_LINEAR_TIMEOUTS"] = 1
        if _kernel_at_least(6, 11):
            settings["TCP_RTO_MAX_MS"] = net.RTO_MAX_MS
    return settings


def _kernel_at_least(*version: int) -> bool:
    release = platform.release().split("-")[0].split(".")
    return tuple(int(part) for part in release[:2] if part.isdigit()) >= version


@pytest.mark.realnet
async def test_loopback_tcp_with_keepalive() -> None:
    """serve_tcp and open_tcp exchange frames over 127.0.0.1 with keepalive set on both ends."""
    server_settings: dict[str, int] = {}

    async def handler(stream: trio.SocketStream) -> None:
        server_settings.update(net.keepalive_settings(stream))
        channel = net.FramedChannel(
            stream, Connection(m.Role.RUNNER, now=trio.current_time(), peer_timeout=30.0)
        )
        await channel.send(CHALLENGE)
        assert await channel.receive() == HELLO
        await channel.send(WELCOME)
        await channel.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            serve = functools.partial(net.serve_tcp, keepalive_timeout=1.5)
            bound = await nursery.start(serve, handler, net.HostPort("127.0.0.1", 0))
            assert len(bound) == 1
            assert bound[0].host == "127.0.0.1"
            assert bound[0].port > 0
            stream = await net.open_tcp(bound[0], keepalive_timeout=30.0)
            assert net.keepalive_settings(stream) == expected_keepalive(30.0)
            channel = net.FramedChannel(
                stream, Connection(m.Role.BUILDER, now=trio.current_time(), peer_timeout=30.0)
            )
            assert await channel.receive() == CHALLENGE
            await channel.send(HELLO)
            assert await channel.receive() == WELCOME
            with pytest.raises(net.ConnectionLost):
                await channel.receive()
            await channel.aclose()
            nursery.cancel_scope.cancel()
    # 1.5 s exercises the clamps: at least 1 s idle and interval; the user timeout is 4 x.
    assert server_settings == expected_keepalive(1.5)
    assert server_settings.get("TCP_USER_TIMEOUT", 6000) == 6000


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:7420", "127.0.0.1", 7420),
        ("localhost:0", "localhost", 0),
        ("example.org:65535", "example.org", 65535),
        ("[::1]:7420", "::1", 7420),
        ("[::]:80", "::", 80),
        ("[fe80::1%eth0]:1", "fe80::1%eth0", 1),
    ],
)
def test_hostport_parse(text: str, host: str, port: int) -> None:
    """HOST:PORT parses IPv4, names and bracketed IPv6, and prints back the same way."""
    parsed = net.HostPort.parse(text)
    assert parsed == net.HostPort(host, port)
    assert str(parsed) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("::1:7420", "put an IPv6 address in brackets"),
        ("fe80::1", "put an IPv6 address in brackets"),
        ("[::1:7420", "unbalanced brackets"),
        ("localhost", "is not HOST:PORT"),
        (":7420", "is not HOST:PORT"),
        ("", "is not HOST:PORT"),
        ("host:", "the port must be a number from 0 to 65535"),
        ("host:65536", "the port must be a number from 0 to 65535"),
        ("host:-1", "the port must be a number from 0 to 65535"),
        ("host:http", "the port must be a number from 0 to 65535"),
        ("host: 80", "the port must be a number from 0 to 65535"),
    ],
)
def test_hostport_parse_refuses(text: str, message: str) -> None:
    """Malformed addresses, bare IPv6 and bad ports raise ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=message):
        net.HostPort.parse(text)


async def test_a_vectored_write_the_kernel_takes_in_pieces_sends_every_byte_in_order() -> None:
    class Trickle:
        """A socket whose buffer takes at most 1000 bytes per call."""

        def __init__(self) -> None:
            self.received = bytearray()
            self.calls = 0

        async def sendmsg(self, buffers: list[bytes | memoryview]) -> int:
            await trio.lowlevel.checkpoint()
            self.calls += 1
            taken = b"".join(bytes(b) for b in buffers)[:1000]
            self.received += taken
            return len(taken)

    buffers: list[bytes | memoryview] = [b"", bytes(range(256)) * 9, b"x", b"", b"yz" * 700, b""]
    expected = b"".join(bytes(b) for b in buffers)
    sock = Trickle()
    await net._send_vectored(sock, buffers)  # type: ignore[arg-type]
    assert bytes(sock.received) == expected
    assert sock.calls == -(-len(expected) // 1000)


def established(
    a: trio.socket.SocketType, b: trio.socket.SocketType
) -> tuple[net.FramedChannel, net.FramedChannel]:
    """A (builder, runner) pair of channels over a socket pair, past their handshake."""
    left = net.FramedChannel(
        trio.SocketStream(a), Connection(m.Role.BUILDER, now=0, peer_timeout=9)
    )
    right = net.FramedChannel(
        trio.SocketStream(b), Connection(m.Role.RUNNER, now=0, peer_timeout=9)
    )
    for conn in (left.connection, right.connection):
        conn.state = ConnectionState.ESTABLISHED
    return left, right


async def test_bulk_frames_cross_a_real_socket_pair_with_pings_between() -> None:
    a, b = trio.socket.socketpair()
    left, right = established(a, b)
    data = [bytes([i]) * (codec.TRANSFER_FRAME - i) for i in range(40)]
    frames: list[m.Message] = []
    for i, piece in enumerate(data):
        frames.append(
            m.UploadData(build_id="b", attempt=1, path="f", offset=i, data=piece, eof=i == 39)
        )
        if i % 7 == 0:
            frames.append(m.Ping(seq=i))
    got: list[m.Message] = []
    async with trio.open_nursery() as nursery:

        async def receive() -> None:
            while len(got) < len(frames):
                got.append(await right.receive())

        nursery.start_soon(receive)
        await left.send_all(frames[:10])
        for frame in frames[10:]:
            await left.send(frame)
    assert got == frames
    a.close()
    b.close()


async def test_a_sender_cancelled_mid_write_loses_no_frame_of_its_own_or_of_others() -> None:
    """A task whose send is cancelled while the socket is full (a build aborted while it
    sends) puts back what the kernel has not taken: the frames another task queued meanwhile,
    which returned as sent, reach the peer, and so does the rest of the frame it had begun,
    so the stream stays whole.  (Before, the batch was dropped: a build's Result queued
    behind an aborted build's frames never arrived, and the runner kept it running.)"""
    a, b = trio.socket.socketpair()
    left, right = established(a, b)
    bulk: list[m.Message] = [
        m.UploadData(build_id="a", attempt=1, path="f", offset=i, data=bytes([i]) * 65000)
        for i in range(60)  # far more than the socket pair's buffers hold
    ]
    result = m.Result(build_id="b", attempt=1, status=m.BuildStatus.SUCCESS)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            aborted = trio.CancelScope()

            async def aborted_build() -> None:
                with aborted:
                    await left.send_all(bulk)

            nursery.start_soon(aborted_build)
            while not left.writing:  # blocked on the full socket, holding the write lock
                await trio.sleep(0.01)
            await trio.sleep(0.05)
            nursery.start_soon(left.send, result)  # queued behind it
            await trio.sleep(0.05)
            aborted.cancel()
            got: list[m.Message] = []
            while len(got) < len(bulk) + 1:
                got.append(await right.receive())
    assert aborted.cancelled_caught
    assert got == [*bulk, result]
    a.close()
    b.close()


async def test_frames_one_read_brought_are_decoded_and_applied_letting_other_tasks_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read can bring thousands of small frames that need no waiting to apply (a runner
    stages small uploads in memory; 2,000 fit in a read of 256 KiB): ``receive`` decodes
    them and returns them ``BACKLOG_RUN`` at a time, letting the other tasks (another
    builder's ping) run in between, not after the whole backlog (decoding them all before
    returning the first was the runner's longest pong gap during a 100,000-file upload)."""
    a, b = trio.socket.socketpair()
    left, right = established(a, b)
    count = 64 * net.BACKLOG_RUN
    await left.send_all([m.Ping(seq=i) for i in range(count)])  # all in the socket
    ticks = 0
    returned_at: list[int] = []
    decoded_at: list[int] = []
    decode_body = codec.decode_body

    def counting_decode(body: Any) -> m.Message:
        decoded_at.append(ticks)
        return decode_body(body)

    monkeypatch.setattr(codec, "decode_body", counting_decode)
    received: list[m.Message] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def other_task() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(other_task)
            for _ in range(count):
                received.append(await right.receive())
                returned_at.append(ticks)
            nursery.cancel_scope.cancel()
    assert [r.seq for r in received if isinstance(r, m.Ping)] == list(range(count))
    # The frames came in one read or a few (the socket buffer holds them all); the other
    # task ran between runs of them, at most two runs between two of its turns (trio runs a
    # batch of tasks in either order), each of BACKLOG_RUN frames (and one completing an
    # earlier read's).
    assert len(set(returned_at[1:])) >= 10
    runs = collections.Counter(decoded_at)
    assert len(runs) >= 10, runs
    assert max(runs.values()) <= 2 * net.BACKLOG_RUN + 1, runs
    a.close()
    b.close()
