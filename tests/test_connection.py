"""The sans-I/O connection: handshake and direction rules, ping schedule, silence deadlines."""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from hydra_trio.protocol import codec
from hydra_trio.protocol import messages as m
from hydra_trio.protocol.connection import PROGRESS_BYTES, Connection, ConnectionState
from hydra_trio.protocol.errors import LocalProtocolError, RemoteProtocolError

from .helpers.strategies import EXAMPLES, MESSAGES

CHALLENGE = EXAMPLES[m.Challenge]
HELLO = EXAMPLES[m.Hello]
WELCOME = EXAMPLES[m.Welcome]
REJECT = EXAMPLES[m.Reject]
B, R = m.Role.BUILDER, m.Role.RUNNER
ONE_WAY = [cls for cls in m.MESSAGE_TYPES if len(cls.SENDERS) == 1]
HANDSHAKE_ONLY = (m.Challenge, m.Hello, m.Welcome, m.Reject)


def frame(message: m.Message) -> bytes:
    return codec.encode(message)


def state(conn: Connection) -> ConnectionState:
    """The state, read through a call so mypy does not narrow it across transitions."""
    return conn.state


def new_builder(now: float = 0.0, **kwargs: Any) -> Connection:
    """A builder connection that has neither sent nor received anything."""
    kwargs.setdefault("peer_timeout", 30.0)
    kwargs.setdefault("ping_interval", 10.0)
    return Connection(B, now=now, **kwargs)


def new_runner(now: float = 0.0, **kwargs: Any) -> Connection:
    """A runner connection that has neither sent nor received anything."""
    kwargs.setdefault("peer_timeout", 30.0)
    return Connection(R, now=now, **kwargs)


def builder(now: float = 0.0, **kwargs: Any) -> Connection:
    """A builder that has received the runner's challenge: its Hello is next."""
    conn = new_builder(now, **kwargs)
    assert conn.receive_data(frame(CHALLENGE), now) == [CHALLENGE]
    return conn


def runner(now: float = 0.0, **kwargs: Any) -> Connection:
    """A runner that has sent its challenge and waits for the Hello."""
    conn = new_runner(now, **kwargs)
    assert conn.send(CHALLENGE) == frame(CHALLENGE)
    return conn


def established_builder(now: float = 0.0, **kwargs: Any) -> Connection:
    conn = builder(now, **kwargs)
    conn.send(HELLO)
    assert conn.receive_data(frame(WELCOME), now) == [WELCOME]
    return conn


def established_runner(now: float = 0.0, **kwargs: Any) -> Connection:
    conn = runner(now, **kwargs)
    assert conn.receive_data(frame(HELLO), now) == [HELLO]
    conn.send(WELCOME)
    return conn


# -- handshake: builder side ------------------------------------------------------------------


def test_builder_handshake_welcome() -> None:
    """A builder receives Challenge, sends Hello, receives Welcome, and is then established."""
    conn = new_builder()
    assert conn.state is ConnectionState.HANDSHAKE
    assert conn.receive_data(frame(CHALLENGE), 0.5) == [CHALLENGE]
    assert conn.challenge == CHALLENGE
    assert state(conn) is ConnectionState.HANDSHAKE
    assert conn.send(HELLO) == frame(HELLO)
    assert state(conn) is ConnectionState.HANDSHAKE
    conn.receive_data(frame(WELCOME), 1.0)
    assert state(conn) is ConnectionState.ESTABLISHED
    assert conn.welcome == WELCOME


def test_builder_handshake_reject_closes() -> None:
    """A Reject in answer to the Hello closes the builder's connection."""
    conn = builder()
    conn.send(HELLO)
    assert conn.receive_data(frame(REJECT), 1.0) == [REJECT]
    assert conn.state is ConnectionState.CLOSED
    with pytest.raises(LocalProtocolError, match="closed"):
        conn.send(m.Goodbye())


@pytest.mark.parametrize("cls", [c for c in m.MESSAGE_TYPES if B in c.SENDERS], ids=lambda c: c.TAG)
def test_builder_must_receive_challenge_before_sending(cls: type[m.Message]) -> None:
    """Before the runner's Challenge the builder may send nothing, not even its Hello."""
    conn = new_builder()
    with pytest.raises(LocalProtocolError, match="before the runner's challenge"):
        conn.send(EXAMPLES[cls])
    assert conn.state is ConnectionState.HANDSHAKE
    assert conn.frames_sent == 0
    conn.receive_data(frame(CHALLENGE), 0.0)
    conn.send(HELLO)  # the refused frame did not count


@pytest.mark.parametrize("cls", [c for c in m.MESSAGE_TYPES if B in c.SENDERS and c is not m.Hello])
def test_builder_must_send_hello_first(cls: type[m.Message]) -> None:
    """After the Challenge, anything but Hello as the builder's first frame is a
    LocalProtocolError."""
    conn = builder()
    with pytest.raises(LocalProtocolError, match="before the runner's welcome"):
        conn.send(EXAMPLES[cls])
    assert conn.state is ConnectionState.HANDSHAKE
    conn.send(HELLO)  # the refused frame did not count


def test_builder_sends_nothing_more_before_welcome() -> None:
    """After its Hello the builder may send nothing (not even another Hello) until Welcome."""
    conn = builder()
    conn.send(HELLO)
    for message in (HELLO, m.Ping(seq=0), m.Drain(), m.Goodbye()):
        with pytest.raises(LocalProtocolError, match="before the runner's welcome"):
            conn.send(message)


@pytest.mark.parametrize(
    "cls",
    [c for c in m.MESSAGE_TYPES if R in c.SENDERS and c is not m.Challenge],
    ids=lambda c: c.TAG,
)
def test_builder_expects_challenge_first(cls: type[m.Message]) -> None:
    """A runner frame other than Challenge first (even Welcome) is a RemoteProtocolError."""
    conn = new_builder()
    with pytest.raises(RemoteProtocolError, match=f"expected challenge first, got {cls.TAG}"):
        conn.receive_data(frame(EXAMPLES[cls]), 0.0)
    assert conn.state is ConnectionState.CLOSED
    assert conn.challenge is None


@pytest.mark.parametrize("message", [WELCOME, CHALLENGE], ids=lambda x: x.TAG)
def test_builder_receiving_before_its_hello(message: m.Message) -> None:
    """After the Challenge, a runner frame before the builder's own Hello (a Welcome, a second
    Challenge) is a RemoteProtocolError."""
    conn = builder()
    with pytest.raises(RemoteProtocolError, match=f"{message.TAG} received before our hello"):
        conn.receive_data(frame(message), 0.0)
    assert conn.state is ConnectionState.CLOSED


@pytest.mark.parametrize(
    "message", [m.Pong(seq=0), m.Drain(), m.Goodbye(), EXAMPLES[m.Assign], CHALLENGE]
)
def test_builder_expects_welcome_or_reject(message: m.Message) -> None:
    """After Hello, a runner frame other than Welcome or Reject is a RemoteProtocolError."""
    conn = builder()
    conn.send(HELLO)
    with pytest.raises(RemoteProtocolError, match=f"expected welcome or reject, got {message.TAG}"):
        conn.receive_data(frame(message), 0.0)
    assert conn.state is ConnectionState.CLOSED


# -- handshake: runner side -------------------------------------------------------------------


def test_runner_handshake() -> None:
    """A runner sends Challenge, receives Hello, keeps both, answers Welcome and is
    established."""
    conn = new_runner()
    assert conn.send(CHALLENGE) == frame(CHALLENGE)
    assert conn.challenge == CHALLENGE
    assert state(conn) is ConnectionState.HANDSHAKE
    conn.receive_data(frame(HELLO), 0.5)
    assert conn.hello == HELLO
    assert conn.state is ConnectionState.HANDSHAKE
    conn.send(WELCOME)
    assert state(conn) is ConnectionState.ESTABLISHED


def test_runner_reject_closes() -> None:
    """A runner that answers Reject is closed and may send nothing more."""
    conn = runner()
    conn.receive_data(frame(HELLO), 0.0)
    conn.send(REJECT)
    assert conn.state is ConnectionState.CLOSED
    with pytest.raises(LocalProtocolError, match="closed"):
        conn.send(m.Goodbye())


@pytest.mark.parametrize(
    "cls",
    [c for c in m.MESSAGE_TYPES if R in c.SENDERS and c is not m.Challenge],
    ids=lambda c: c.TAG,
)
def test_runner_sends_challenge_first(cls: type[m.Message]) -> None:
    """The runner's first frame must be its Challenge: anything else is a LocalProtocolError."""
    conn = new_runner()
    with pytest.raises(LocalProtocolError, match=f"cannot send {cls.TAG} before the challenge"):
        conn.send(EXAMPLES[cls])
    assert conn.state is ConnectionState.HANDSHAKE
    assert conn.frames_sent == 0
    conn.send(CHALLENGE)  # the refused frame did not count


def test_runner_cannot_send_a_second_challenge() -> None:
    """A second Challenge, before or after the Hello arrived, is a LocalProtocolError."""
    conn = runner()
    with pytest.raises(LocalProtocolError, match="cannot send a second challenge"):
        conn.send(attrs.evolve(CHALLENGE, nonce=bytes(16)))
    conn.receive_data(frame(HELLO), 0.0)
    with pytest.raises(LocalProtocolError, match="cannot send a second challenge"):
        conn.send(CHALLENGE)
    assert conn.challenge == CHALLENGE
    assert conn.state is ConnectionState.HANDSHAKE
    conn.send(WELCOME)


@pytest.mark.parametrize("message", [WELCOME, REJECT, m.Pong(seq=0), m.Goodbye()])
def test_runner_sends_nothing_before_hello(message: m.Message) -> None:
    """After its Challenge and before a Hello arrives the runner may send nothing, not even
    Welcome or Reject."""
    with pytest.raises(LocalProtocolError, match="before accepting a hello"):
        runner().send(message)


@pytest.mark.parametrize("message", [EXAMPLES[m.Assign], m.Pong(seq=0), m.Drain(), m.Goodbye()])
def test_runner_answers_hello_only_with_welcome_or_reject(message: m.Message) -> None:
    """After the Hello, the runner's first frame must be Welcome or Reject."""
    conn = runner()
    conn.receive_data(frame(HELLO), 0.0)
    with pytest.raises(LocalProtocolError, match="before accepting a hello"):
        conn.send(message)
    conn.send(WELCOME)


@pytest.mark.parametrize(
    "message", [m.Ping(seq=0), m.Drain(), m.Goodbye(), EXAMPLES[m.Result]], ids=lambda x: x.TAG
)
def test_runner_expects_hello_first(message: m.Message) -> None:
    """A builder frame other than Hello first is a RemoteProtocolError."""
    conn = runner()
    with pytest.raises(
        RemoteProtocolError, match=f"expected hello after the challenge, got {message.TAG}"
    ):
        conn.receive_data(frame(message), 0.0)
    assert conn.state is ConnectionState.CLOSED


def test_runner_refuses_hello_before_its_challenge() -> None:
    """A Hello that arrives before the runner sent its Challenge is a RemoteProtocolError: the
    builder cannot have answered a nonce it has not seen."""
    conn = new_runner()
    with pytest.raises(RemoteProtocolError, match="expected hello after the challenge, got hello"):
        conn.receive_data(frame(HELLO), 0.0)
    assert conn.state is ConnectionState.CLOSED
    assert conn.hello is None
    with pytest.raises(LocalProtocolError, match="closed"):
        conn.send(CHALLENGE)


def test_runner_refuses_second_hello() -> None:
    """A second Hello, before or after the Welcome, is a RemoteProtocolError."""
    conn = runner()
    with pytest.raises(RemoteProtocolError, match="expected hello after the challenge, got hello"):
        conn.receive_data(frame(HELLO) + frame(HELLO), 0.0)
    conn = established_runner()
    with pytest.raises(RemoteProtocolError, match="hello after the handshake"):
        conn.receive_data(frame(HELLO), 0.0)


def test_builder_refuses_second_welcome() -> None:
    """A Challenge, Welcome or Reject after the handshake is a RemoteProtocolError on the
    builder."""
    for late in (CHALLENGE, WELCOME, REJECT):
        conn = established_builder()
        with pytest.raises(RemoteProtocolError, match=f"{late.TAG} after the handshake"):
            conn.receive_data(frame(late), 0.0)
        assert conn.state is ConnectionState.CLOSED


@pytest.mark.parametrize("late", [CHALLENGE, HELLO, WELCOME, REJECT], ids=lambda x: x.TAG)
def test_handshake_messages_cannot_be_sent_after_it(late: m.Message) -> None:
    """Challenge, Hello, Welcome and Reject are refused locally once the connection is
    established."""
    conn = established_builder() if B in late.SENDERS else established_runner()
    with pytest.raises(LocalProtocolError, match="only valid during the handshake"):
        conn.send(late)
    assert conn.state is ConnectionState.ESTABLISHED


# -- direction --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ONE_WAY, ids=lambda c: c.TAG)
def test_wrong_direction_is_refused_on_receive(cls: type[m.Message]) -> None:
    """A message received by the role that sends it is a RemoteProtocolError, in any state."""
    (sender,) = cls.SENDERS
    for conn in (
        Connection(sender, now=0, peer_timeout=1),
        established_builder() if sender is B else established_runner(),
    ):
        with pytest.raises(
            RemoteProtocolError, match=f"a {sender.value} does not receive {cls.TAG}"
        ):
            conn.receive_data(frame(EXAMPLES[cls]), 1.0)
        assert conn.state is ConnectionState.CLOSED


@pytest.mark.parametrize("cls", ONE_WAY, ids=lambda c: c.TAG)
def test_wrong_direction_is_refused_on_send(cls: type[m.Message]) -> None:
    """Sending a message of the other role is a LocalProtocolError, in any state."""
    (sender,) = cls.SENDERS
    other = R if sender is B else B
    for conn in (
        Connection(other, now=0, peer_timeout=1),
        established_runner() if other is R else established_builder(),
    ):
        with pytest.raises(LocalProtocolError, match=f"a {other.value} cannot send {cls.TAG}"):
            conn.send(EXAMPLES[cls])


@pytest.mark.parametrize(
    "cls", [c for c in ONE_WAY if c not in HANDSHAKE_ONLY], ids=lambda c: c.TAG
)
def test_established_traffic_flows(cls: type[m.Message]) -> None:
    """Once established, every non-handshake message flows in its direction."""
    (sender,) = cls.SENDERS
    src = established_builder() if sender is B else established_runner()
    dst = established_runner() if sender is B else established_builder()
    assert dst.receive_data(src.send(EXAMPLES[cls]), 1.0) == [EXAMPLES[cls]]
    assert src.state is dst.state is ConnectionState.ESTABLISHED


# -- closing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [B, R])
def test_goodbye_closes_both_sides(role: m.Role) -> None:
    """Goodbye closes the sender when sent and the receiver when received."""
    src = established_builder() if role is B else established_runner()
    dst = established_runner() if role is B else established_builder()
    dst.receive_data(src.send(m.Goodbye(reason="bye")), 1.0)
    assert src.state is dst.state is ConnectionState.CLOSED
    with pytest.raises(LocalProtocolError, match="closed"):
        src.send(m.Drain())
    with pytest.raises(RemoteProtocolError, match="after the connection was closed"):
        dst.receive_data(frame(m.Drain()), 2.0)


def test_frames_after_goodbye_in_the_same_chunk() -> None:
    """A frame following Goodbye in the same read is a RemoteProtocolError."""
    conn = established_runner()
    with pytest.raises(RemoteProtocolError, match="drain received after the connection was closed"):
        conn.receive_data(frame(m.Goodbye()) + frame(m.Drain()), 1.0)


def test_eof_between_frames_closes() -> None:
    """EOF between frames closes the connection without error."""
    conn = established_runner()
    conn.receive_eof()
    assert conn.state is ConnectionState.CLOSED


def test_eof_mid_frame_raises() -> None:
    """EOF in the middle of a frame closes the connection and raises RemoteProtocolError."""
    conn = established_runner()
    conn.receive_data(frame(m.Ping(seq=0))[:5], 1.0)
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        conn.receive_eof()
    assert conn.state is ConnectionState.CLOSED


def test_bad_frame_closes() -> None:
    """An undecodable frame closes the connection."""
    conn = established_runner(max_frame_size=300)
    with pytest.raises(RemoteProtocolError, match="announced"):
        conn.receive_data(b"\x00\x00\x10\x00", 1.0)
    assert conn.state is ConnectionState.CLOSED


def test_send_respects_max_frame_size() -> None:
    """A frame over the connection's max_frame_size is a LocalProtocolError and not counted."""
    conn = established_builder(max_frame_size=300)
    with pytest.raises(LocalProtocolError, match="exceeds the 300-byte limit"):
        conn.send(m.LogChunk(build_id="b", attempt=0, data=bytes(300)))
    assert conn.frames_sent == 1  # the hello
    assert conn.state is ConnectionState.ESTABLISHED


def test_frame_counters() -> None:
    """frames_sent and frames_received count whole frames."""
    conn = established_builder()
    conn.send(conn.make_ping(0.0))
    conn.receive_data(frame(m.Pong(seq=0)) + frame(m.Drain()), 1.0)
    # sent: hello, ping; received: challenge, welcome, pong, drain
    assert (conn.frames_sent, conn.frames_received) == (2, 4)


def test_constructor_checks_times() -> None:
    """A non-positive peer_timeout or ping_interval is refused."""
    with pytest.raises(ValueError, match="positive"):
        Connection(B, now=0, peer_timeout=0)
    with pytest.raises(ValueError, match="positive"):
        Connection(B, now=0, peer_timeout=1, ping_interval=-1)


# -- pings ------------------------------------------------------------------------------------


def test_no_ping_before_welcome() -> None:
    """A builder is never due to ping before the Welcome, nor is a runner ever."""
    conn = builder()
    conn.send(HELLO)
    assert not conn.ping_due(1000.0)
    assert not established_runner().ping_due(1000.0)
    with pytest.raises(LocalProtocolError, match="only builders ping"):
        established_runner().make_ping(0.0)


def test_first_ping_due_right_after_welcome() -> None:
    """The first ping is due at the moment the Welcome arrives."""
    conn = builder(now=0.0)
    conn.send(HELLO)
    conn.receive_data(frame(WELCOME), 7.0)
    assert conn.next_ping_at == 7.0
    assert not conn.ping_due(6.999)
    assert conn.ping_due(7.0)


def test_pings_scheduled_from_send_time() -> None:
    """Each ping schedules the next one ping_interval after it was sent, with no catch-up."""
    conn = established_builder(ping_interval=10.0)
    assert conn.make_ping(0.0).seq == 0
    assert conn.next_ping_at == 10.0
    assert not conn.ping_due(9.99)
    assert conn.ping_due(10.0)
    late = conn.make_ping(35.0)  # three intervals late
    assert late.seq == 1
    assert conn.next_ping_at == 45.0  # not 20.0: no burst of catch-up pings
    assert not conn.ping_due(44.0)


def test_welcome_lowers_the_ping_interval_to_a_third_of_the_builder_timeout() -> None:
    """A builder whose ping interval exceeds a third of the runner's builder timeout pings
    every third of it once the Welcome arrives."""
    conn = builder(ping_interval=10.0)
    conn.send(HELLO)
    conn.receive_data(frame(attrs.evolve(WELCOME, builder_timeout=3.0)), 0.0)
    assert conn.ping_interval == 1.0
    conn.make_ping(0.0)
    assert conn.next_ping_at == 1.0
    assert not conn.ping_due(0.999)
    assert conn.ping_due(1.0)


def test_welcome_keeps_a_shorter_ping_interval() -> None:
    """A ping interval already under a third of the builder timeout is kept as it is."""
    conn = builder(ping_interval=2.0)
    conn.send(HELLO)
    conn.receive_data(frame(attrs.evolve(WELCOME, builder_timeout=30.0)), 0.0)
    assert conn.ping_interval == 2.0


def test_ping_carries_status() -> None:
    """make_ping puts load, disk_free and running builds in the ping."""
    refs = (m.BuildRef(build_id="b", attempt=3),)
    ping = established_builder().make_ping(0.0, load=1.5, disk_free=9, running=refs)
    assert ping == m.Ping(seq=0, load=1.5, disk_free=9, running=refs)


def test_rtt_from_pong() -> None:
    """A Pong yields the round-trip time of the ping with its seq; others are ignored."""
    conn = established_builder()
    conn.send(conn.make_ping(10.0))
    conn.send(conn.make_ping(20.0))
    assert conn.rtt is None
    conn.receive_data(frame(m.Pong(seq=1)), 20.25)
    assert conn.rtt == 0.25
    conn.receive_data(frame(m.Pong(seq=0)), 21.0)
    assert conn.rtt == 11.0
    conn.receive_data(frame(m.Pong(seq=0)), 30.0)  # answered already
    conn.receive_data(frame(m.Pong(seq=99)), 30.0)  # never sent
    assert conn.rtt == 11.0


def test_outstanding_pings_are_bounded() -> None:
    """Only the 64 most recent unanswered pings are remembered for RTT."""
    conn = established_builder()
    for i in range(65):
        conn.make_ping(float(i))
    conn.receive_data(frame(m.Pong(seq=0)), 100.0)
    assert conn.rtt is None
    conn.receive_data(frame(m.Pong(seq=1)), 100.0)
    assert conn.rtt == 99.0


# -- silence ----------------------------------------------------------------------------------


def test_deadline_starts_at_creation() -> None:
    """Before any frame arrives, the deadline is creation time + peer_timeout (sending the
    challenge does not move it)."""
    conn = runner(now=100.0, peer_timeout=5.0)
    assert conn.deadline == 105.0
    assert not conn.peer_silent(104.999)
    assert conn.peer_silent(105.0)


def test_any_frame_moves_the_deadline() -> None:
    """Every received frame, whatever its type, moves the deadline to now + peer_timeout."""
    conn = established_runner(now=0.0, peer_timeout=30.0)
    for t, message in [(10.0, m.Ping(seq=0)), (25.0, EXAMPLES[m.LogChunk]), (50.0, m.Drain())]:
        conn.receive_data(frame(message), t)
        assert conn.last_received == t
        assert conn.deadline == t + 30.0
        assert not conn.peer_silent(t + 29.999)
        assert conn.peer_silent(t + 30.0)


def test_partial_frame_does_not_count() -> None:
    """Bytes that do not complete a frame do not move the deadline."""
    conn = established_runner(now=0.0, peer_timeout=30.0)
    data = frame(m.Ping(seq=0))
    conn.receive_data(data[:-1], 20.0)
    assert conn.deadline == 30.0
    conn.receive_data(data[-1:], 25.0)
    assert conn.deadline == 55.0


def test_a_large_frame_still_arriving_counts_once_a_kibibyte_of_it_has_come() -> None:
    """After the handshake, a frame in progress moves the deadline each time another
    PROGRESS_BYTES of it arrive (a lossy link can take longer than the timeout to deliver one
    transfer frame); fewer bytes do not, so a peer cannot stay alive on a trickle."""
    conn = established_runner(now=0.0, peer_timeout=30.0)
    data = frame(m.LogChunk(build_id="b", attempt=1, data=b"x" * 65536))
    conn.receive_data(data[: PROGRESS_BYTES - 1], 20.0)
    assert conn.deadline == 30.0
    sent, t = PROGRESS_BYTES - 1, 0.0
    while len(data) - sent > PROGRESS_BYTES:
        t += 25.0  # each piece within the timeout of the last: never silent
        piece = data[sent : sent + PROGRESS_BYTES]
        assert not conn.peer_silent(t)
        conn.receive_data(piece, t)
        sent += len(piece)
        assert conn.deadline == t + 30.0
    [message] = conn.receive_data(data[sent:], t + 1.0)
    assert isinstance(message, m.LogChunk)
    assert conn.deadline == t + 31.0


def test_a_frame_in_progress_does_not_count_during_the_handshake() -> None:
    """Before the Welcome only complete frames count: a half-sent hello gets the handshake
    timeout however many bytes of it arrive."""
    conn = runner(now=0.0, peer_timeout=10.0)
    big = attrs.evolve(HELLO, systems=tuple(f"sys{i}-linux" for i in range(200)))
    data = frame(big)
    assert len(data) > 2 * PROGRESS_BYTES
    conn.receive_data(data[:-1], 5.0)
    assert conn.deadline == 10.0


def test_set_peer_timeout() -> None:
    """set_peer_timeout changes the silence limit from the last frame; it must be positive."""
    conn = runner(now=0.0, peer_timeout=5.0)
    conn.receive_data(frame(HELLO), 2.0)
    conn.set_peer_timeout(60.0)
    assert conn.deadline == 62.0
    with pytest.raises(ValueError, match="positive"):
        conn.set_peer_timeout(0)


# -- a builder and a runner over a fake link --------------------------------------------------


@attrs.define(eq=False)
class Pipe:
    """One direction of a reliable byte stream that can stall (TCP holding data in a partition)."""

    receiver: Connection
    buffer: bytearray = attrs.field(factory=bytearray)
    #: frames written and not yet fully delivered, with the stream offset where each ends.
    in_flight: deque[tuple[int, m.Message]] = attrs.field(factory=deque)
    written: int = 0
    delivered: int = 0
    #: the model's own record of when the receiver last completed a frame.
    last_frame_at: float = 0.0

    def write(self, data: bytes, message: m.Message) -> None:
        self.buffer += data
        self.written += len(data)
        self.in_flight.append((self.written, message))

    def deliver(self, sizes: list[int], now: float) -> list[m.Message]:
        received: list[m.Message] = []
        for size in sizes:
            chunk = bytes(self.buffer[:size])
            if not chunk:
                break
            del self.buffer[:size]
            self.delivered += len(chunk)
            received.extend(self.receiver.receive_data(chunk, now))
        expected: list[m.Message] = []
        while self.in_flight and self.in_flight[0][0] <= self.delivered:
            expected.append(self.in_flight.popleft()[1])
        assert received == expected
        if expected:
            self.last_frame_at = now
        return received


def arbitrary(role: m.Role) -> st.SearchStrategy[m.Message]:
    """Messages ``role`` might try to send, except pings and pongs (the schedule owns those)."""
    return st.one_of(
        *(s for cls, s in MESSAGES.items() if role in cls.SENDERS and cls not in (m.Ping, m.Pong))
    )


class LinkMachine(RuleBasedStateMachine):
    """A builder and a runner connection joined by a fake link that can stall and resume."""

    @initialize(
        start=st.floats(0, 1e6),
        interval=st.floats(0.5, 30),
        builder_factor=st.floats(1.05, 4),
        runner_factor=st.floats(1.05, 4),
    )
    def connect(
        self, start: float, interval: float, builder_factor: float, runner_factor: float
    ) -> None:
        self.now = start
        self.interval = interval
        self.builder = Connection(
            B, now=start, peer_timeout=interval * builder_factor, ping_interval=interval
        )
        self.runner = Connection(R, now=start, peer_timeout=interval * runner_factor)
        self.to_runner = Pipe(self.runner, last_frame_at=start)
        self.to_builder = Pipe(self.builder, last_frame_at=start)
        self.up = True
        self.ever_cut = False
        self.closing = False
        self.unanswered: list[int] = []
        self.ping_sent_at: OrderedDict[int, float] = OrderedDict()
        self.last_seq = -1
        self.last_pong_seq = -1
        self.next_ping_at = start  # due right after the welcome
        self._send(self.runner, CHALLENGE)
        self.to_builder.deliver([len(self.to_builder.buffer)], start)
        self._send(self.builder, HELLO)
        self.to_runner.deliver([len(self.to_runner.buffer)], start)
        # The runner announces its own silence limit; the builder pings at least three times
        # within it (``interval`` may be longer than that third).
        self._send(self.runner, attrs.evolve(WELCOME, builder_timeout=self.runner.peer_timeout))
        self.to_builder.deliver([len(self.to_builder.buffer)], start)
        assert self.builder.state is self.runner.state is ConnectionState.ESTABLISHED
        self.interval = min(interval, self.runner.peer_timeout / 3)
        assert self.builder.ping_interval == self.interval

    def _send(self, conn: Connection, message: m.Message) -> None:
        pipe = self.to_runner if conn is self.builder else self.to_builder
        pipe.write(conn.send(message), message)

    def _receive(self, pipe: Pipe, sizes: list[int]) -> None:
        rtt = self.builder.rtt
        for message in pipe.deliver(sizes, self.now):
            if isinstance(message, m.Ping):
                self.unanswered.append(message.seq)
            elif isinstance(message, m.Pong):
                assert message.seq > self.last_pong_seq
                self.last_pong_seq = message.seq
                sent = self.ping_sent_at.pop(message.seq, None)
                if sent is not None:
                    rtt = self.now - sent
            elif isinstance(message, m.Goodbye):
                assert pipe.receiver.state is ConnectionState.CLOSED
        # several pongs may arrive in one delivery: the last one's round trip is kept
        assert self.builder.rtt == rtt

    def _settle(self) -> None:
        """Both sides do everything due at this instant and the link delivers it all."""
        while True:
            if not self.closing and self.builder.ping_due(self.now):
                self.builder_pings()
            if not self.closing and self.unanswered:
                self.runner_pongs()
            if not (self.to_runner.buffer or self.to_builder.buffer):
                return
            for pipe in (self.to_runner, self.to_builder):
                self._receive(pipe, [len(pipe.buffer)])

    @rule(fraction=st.floats(0, 3))
    def advance(self, fraction: float) -> None:
        """Time passes.  While the link is up, both sides first finish what is due (the
        builder never sleeps through a ping) and time stops at the next ping."""
        now = self.now + fraction * self.interval
        if self.up:
            self._settle()
            if not self.closing:
                now = min(now, self.builder.next_ping_at)
        self.now = now

    @precondition(lambda self: not self.up)
    @rule(runner_side=st.booleans())
    def jump_to_deadline(self, runner_side: bool) -> None:
        """While the link is cut, time jumps to exactly one side's silence deadline."""
        self.now = max(self.now, (self.runner if runner_side else self.builder).deadline)

    @precondition(lambda self: not self.closing and self.builder.ping_due(self.now))
    @rule()
    def builder_pings(self) -> None:
        """The builder sends its due ping."""
        ping = self.builder.make_ping(self.now)
        assert ping.seq > self.last_seq
        self.last_seq = ping.seq
        self.ping_sent_at[ping.seq] = self.now
        self.next_ping_at = self.now + self.interval
        while len(self.ping_sent_at) > 64:
            self.ping_sent_at.popitem(last=False)
        self._send(self.builder, ping)

    @precondition(lambda self: not self.closing and self.unanswered)
    @rule()
    def runner_pongs(self) -> None:
        """The runner answers every ping it has received."""
        for seq in self.unanswered:
            self._send(self.runner, m.Pong(seq=seq))
        self.unanswered.clear()

    @precondition(lambda self: not self.closing)
    @rule(
        to_runner=st.booleans(),
        builder_msg=arbitrary(B),
        runner_msg=arbitrary(R),
    )
    def send_other(self, to_runner: bool, builder_msg: m.Message, runner_msg: m.Message) -> None:
        """A side sends any other message; if send() accepts it, the peer must accept it too."""
        conn, message = (self.builder, builder_msg) if to_runner else (self.runner, runner_msg)
        before = conn.state
        try:
            self._send(conn, message)
        except LocalProtocolError:
            assert conn.state is before
            return
        if isinstance(message, m.Goodbye):
            # The sender closes after a Goodbye and reads no more: frames already crossing
            # towards it (a ping, say) are never delivered, as on a real closed socket.
            self.closing = True
            inbound = self.to_builder if conn is self.builder else self.to_runner
            inbound.buffer.clear()
            inbound.in_flight.clear()

    @precondition(lambda self: self.up and (self.to_runner.buffer or self.to_builder.buffer))
    @rule(to_runner=st.booleans(), sizes=st.lists(st.integers(1, 48), min_size=1, max_size=8))
    def deliver(self, to_runner: bool, sizes: list[int]) -> None:
        """Some pending bytes arrive, cut into arbitrary chunks."""
        self._receive(self.to_runner if to_runner else self.to_builder, sizes)

    @precondition(lambda self: self.up)
    @rule()
    def cut(self) -> None:
        """The link stalls: bytes are held, nothing arrives."""
        self.up = False
        self.ever_cut = True

    @precondition(lambda self: not self.up)
    @rule()
    def heal(self) -> None:
        """The link resumes delivering what it held."""
        self.up = True

    @invariant()
    def silence_is_exactly_the_deadline(self) -> None:
        """Each side is silent exactly when now >= its last completed frame + peer_timeout."""
        if not hasattr(self, "now"):
            return
        for conn, pipe in ((self.runner, self.to_runner), (self.builder, self.to_builder)):
            assert conn.last_received == pipe.last_frame_at
            assert conn.peer_silent(self.now) == (
                self.now >= pipe.last_frame_at + conn.peer_timeout
            )

    @invariant()
    def pings_follow_the_schedule(self) -> None:
        """The next ping is due one interval after the last was sent (first: at the welcome)."""
        if hasattr(self, "now"):
            assert self.builder.next_ping_at == self.next_ping_at

    @invariant()
    def never_silent_while_the_link_delivers(self) -> None:
        """With an uninterrupted link and pings on schedule, neither side is ever silent."""
        if not hasattr(self, "now") or self.ever_cut or self.closing:
            return
        assert not self.runner.peer_silent(self.now)
        assert not self.builder.peer_silent(self.now)

    @invariant()
    def goodbye_closes_everything(self) -> None:
        """Once a Goodbye has been sent and everything delivered, both sides are closed."""
        if getattr(self, "closing", False) and not (
            self.to_runner.buffer or self.to_builder.buffer
        ):
            assert self.builder.state is self.runner.state is ConnectionState.CLOSED


TestLink = LinkMachine.TestCase
TestLink.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
