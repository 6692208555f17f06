"""The per-connection state machine: handshake order, ping schedule and silence detection.

Theory of operation
-------------------
One ``Connection`` per TCP connection, on each side, holding no socket and no clock: every
method that depends on time takes ``now`` (seconds on any monotonic clock) as an argument
(aioquic's ``handle_timer(now)`` style), so timeouts are tested without a clock.

States (``ConnectionState``):

- ``HANDSHAKE``: the runner sends ``Challenge`` first (a nonce for the token proof).  The
  builder sends nothing before it has received the challenge, then ``Hello``, and nothing else
  until the runner answers ``Welcome`` (-> ``ESTABLISHED``) or ``Reject`` (-> ``CLOSED``).
  After its challenge the runner may send nothing before it has received ``Hello``, and then
  only ``Welcome`` or ``Reject``.  Any other frame is a ``RemoteProtocolError`` (or
  ``LocalProtocolError`` on our side).
- ``ESTABLISHED``: any message of the right direction (``Message.SENDERS``) may flow.
- ``CLOSED``: after sending or receiving ``Reject`` or ``Goodbye``, or after an error or EOF.
  Nothing more may be sent; receiving anything more is an error.

Liveness: every frame received (any type counts) moves ``deadline`` to ``now + peer_timeout``.
``peer_silent(now)`` says the deadline has passed.  On the builder side the connection also
owns the ping schedule: ``ping_due(now)`` and ``make_ping(now, ...)`` hand out sequence numbers
and remember send times, so a ``Pong`` yields a round-trip time.
"""

from __future__ import annotations

import enum
from collections import OrderedDict

import attrs

from hydra_trio.protocol import codec
from hydra_trio.protocol.errors import LocalProtocolError, RemoteProtocolError
from hydra_trio.protocol.messages import (
    MESSAGE_TYPES,
    BuildRef,
    Challenge,
    Goodbye,
    Hello,
    Message,
    Ping,
    Pong,
    Reject,
    Role,
    Welcome,
)

# At most this many unanswered pings are remembered for RTT; older ones are forgotten (a peer
# that never answers must not make us grow a table).
_MAX_OUTSTANDING_PINGS = 64
#: After the handshake, this many bytes of a frame still arriving count as a sign of life
#: (``receive_data``): more than a whole ping, so a peer cannot stay alive on a trickle.
PROGRESS_BYTES = 1024
#: The messages of the handshake, refused once it is over.
_HANDSHAKE_ONLY: frozenset[type[Message]] = frozenset({Challenge, Hello, Welcome, Reject})


class ConnectionState(enum.Enum):
    """Where a connection is in its life."""

    #: before the runner's ``Welcome``: only ``Hello`` (builder) then ``Welcome``/``Reject``.
    HANDSHAKE = "handshake"
    #: the hello was accepted; every message of the right direction may flow.
    ESTABLISHED = "established"
    #: a ``Reject`` or ``Goodbye`` went either way, or the connection failed.
    CLOSED = "closed"


@attrs.define(eq=False)
class Connection:
    """Protocol state of one connection, seen from ``role``'s side.

    ``peer_timeout`` is how long the peer may stay silent (builder: ``--ping-timeout``; runner:
    ``--builder-timeout``, or ``--handshake-timeout`` until the hello).  ``ping_interval`` is
    the builder's ping period (ignored on the runner side); the runner's ``Welcome`` lowers it
    to a third of the runner's builder timeout when it is longer, so a builder whose own flag
    says otherwise is never dropped for pinging too rarely.
    """

    role: Role
    now: float = attrs.field(kw_only=True)
    peer_timeout: float = attrs.field(kw_only=True)
    ping_interval: float = attrs.field(default=10.0, kw_only=True)
    max_frame_size: int = attrs.field(default=codec.DEFAULT_MAX_FRAME_SIZE, kw_only=True)

    state: ConnectionState = attrs.field(default=ConnectionState.HANDSHAKE, init=False)
    #: the runner's challenge: sent (runner side) or received (builder side).
    challenge: Challenge | None = attrs.field(default=None, init=False)
    #: the peer's hello (runner side) once received.
    hello: Hello | None = attrs.field(default=None, init=False)
    #: the runner's welcome (builder side) once received.
    welcome: Welcome | None = attrs.field(default=None, init=False)
    #: when the last frame arrived (initially: when the connection was made).
    last_received: float = attrs.field(init=False)
    #: the most recent round-trip time measured from a Pong, in seconds.
    rtt: float | None = attrs.field(default=None, init=False)
    frames_received: int = attrs.field(default=0, init=False)
    frames_sent: int = attrs.field(default=0, init=False)

    _decoder: codec.FrameDecoder = attrs.field(init=False)
    _sent_hello: bool = attrs.field(default=False, init=False)
    _next_seq: int = attrs.field(default=0, init=False)
    _next_ping_at: float = attrs.field(init=False)
    _outstanding: OrderedDict[int, float] = attrs.field(factory=OrderedDict, init=False)
    #: bytes of an unfinished frame received since the deadline last moved.
    _progress: int = attrs.field(default=0, init=False)
    #: the message types this side may send, and those only the peer sends (``SENDERS``,
    #: looked up once: checked on every frame, by the type's hash instead of the role's).
    _sendable: frozenset[type[Message]] = attrs.field(init=False)
    _foreign: frozenset[type[Message]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.peer_timeout <= 0 or self.ping_interval <= 0:
            raise ValueError("peer_timeout and ping_interval must be positive")
        role = self.role
        self._sendable = frozenset(cls for cls in MESSAGE_TYPES if role in cls.SENDERS)
        self._foreign = frozenset(
            cls for cls in MESSAGE_TYPES if role in cls.SENDERS and len(cls.SENDERS) == 1
        )
        self._decoder = codec.FrameDecoder(self.max_frame_size)
        self.last_received = self.now
        self._next_ping_at = self.now

    # -- liveness ---------------------------------------------------------------------------

    @property
    def deadline(self) -> float:
        """When the peer counts as silent unless another frame arrives."""
        return self.last_received + self.peer_timeout

    def peer_silent(self, now: float) -> bool:
        return now >= self.deadline

    def set_peer_timeout(self, peer_timeout: float) -> None:
        """Change the silence limit (e.g. from handshake timeout to builder timeout)."""
        if peer_timeout <= 0:
            raise ValueError("peer_timeout must be positive")
        self.peer_timeout = peer_timeout

    # -- pings (builder side) ---------------------------------------------------------------

    @property
    def next_ping_at(self) -> float:
        return self._next_ping_at

    def ping_due(self, now: float) -> bool:
        return (
            self.role is Role.BUILDER
            and self.state is ConnectionState.ESTABLISHED
            and now >= self._next_ping_at
        )

    def make_ping(
        self,
        now: float,
        *,
        load: float = 0.0,
        disk_free: int = 0,
        running: tuple[BuildRef, ...] = (),
        low_disk: bool = False,
    ) -> Ping:
        """The next ``Ping``: allocates its sequence number and schedules the one after."""
        if self.role is not Role.BUILDER:
            raise LocalProtocolError("only builders ping")
        seq = self._next_seq
        self._next_seq += 1
        self._outstanding[seq] = now
        while len(self._outstanding) > _MAX_OUTSTANDING_PINGS:
            self._outstanding.popitem(last=False)
        # Schedule from `now`, not from the previous due time: a late ping must not be followed
        # by a burst of catch-up pings.
        self._next_ping_at = now + self.ping_interval
        return Ping(seq=seq, load=load, disk_free=disk_free, running=running, low_disk=low_disk)

    # -- sending ----------------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Check that ``message`` may be sent now and return its frame."""
        self._check_outgoing(message)
        data = codec.encode(message, self.max_frame_size)
        self.frames_sent += 1
        return data

    def send_parts(self, message: Message) -> list[bytes]:
        """``send``, as ``codec.encode_parts`` buffers (a bulk frame's data is not copied)."""
        self._check_outgoing(message)
        parts = codec.encode_parts(message, self.max_frame_size)
        self.frames_sent += 1
        return parts

    def _check_outgoing(self, message: Message) -> None:
        if type(message) not in self._sendable:
            raise LocalProtocolError(f"a {self.role.value} cannot send {message.TAG}")
        state = self.state
        if state is ConnectionState.CLOSED:
            raise LocalProtocolError(f"cannot send {message.TAG}: the connection is closed")
        if state is ConnectionState.HANDSHAKE:
            if self.role is Role.BUILDER:
                if self.challenge is None:
                    raise LocalProtocolError(
                        f"cannot send {message.TAG} before the runner's challenge"
                    )
                if self._sent_hello or type(message) is not Hello:
                    raise LocalProtocolError(
                        f"cannot send {message.TAG} before the runner's welcome"
                    )
                self._sent_hello = True
                return
            if type(message) is Challenge:
                if self.challenge is not None:
                    raise LocalProtocolError("cannot send a second challenge")
                assert isinstance(message, Challenge)
                self.challenge = message
                return
            if self.challenge is None:
                raise LocalProtocolError(f"cannot send {message.TAG} before the challenge")
            if self.hello is None or type(message) not in (Welcome, Reject):
                raise LocalProtocolError(f"cannot send {message.TAG} before accepting a hello")
            if type(message) is Welcome:
                self.state = ConnectionState.ESTABLISHED
            else:
                self.state = ConnectionState.CLOSED
            return
        # Reject answers a hello, like Welcome: the receiving side refuses it after the
        # handshake, so sending it here would only get us a protocol error back.
        if type(message) in _HANDSHAKE_ONLY:
            raise LocalProtocolError(f"{message.TAG} is only valid during the handshake")
        if type(message) is Goodbye:
            self.state = ConnectionState.CLOSED

    # -- receiving --------------------------------------------------------------------------

    def receive_data(
        self, data: bytes | bytearray | memoryview, now: float, limit: int = 0
    ) -> list[Message]:
        """Feed received bytes; return the messages they complete, checked for order.  With
        a ``limit``, at most that many: the rest is decoded by later calls (``pending``;
        ``receive_data(b"", now, limit)``)."""
        if self.state is ConnectionState.CLOSED and data:
            raise RemoteProtocolError("data received after the connection was closed")
        try:
            messages = self._decoder.feed(data, limit)
        except RemoteProtocolError:
            self.state = ConnectionState.CLOSED
            raise
        if messages:
            self.last_received = now
            self._progress = 0
            self.frames_received += len(messages)
            for message in messages:
                self._check_incoming(message, now)
        elif self.state is ConnectionState.ESTABLISHED:
            # A frame in progress counts too, once PROGRESS_BYTES of it have arrived: on a
            # link so lossy that TCP delivers a few hundred bytes a second, one 32 KiB frame
            # can take longer than the timeout although the peer is sending all along.  A
            # peer whose event loop stopped stops adding bytes; what its kernel still holds
            # (TCP_NOTSENT_LOWAT bounds it) drains at the link's speed, and then it is silent.
            self._progress += len(data)
            if self._progress >= PROGRESS_BYTES:
                self.last_received = now
                self._progress = 0
        return messages

    @property
    def pending(self) -> bool:
        """Whether bytes received earlier are still to be decoded (see ``receive_data``)."""
        return self._decoder.pending

    def receive_eof(self) -> None:
        """The peer closed its side.  Raises if it did so in the middle of a frame."""
        self.state = ConnectionState.CLOSED
        self._decoder.check_eof()

    def _check_incoming(self, message: Message, now: float) -> None:
        kind = type(message)
        if kind in self._foreign:
            self.state = ConnectionState.CLOSED
            raise RemoteProtocolError(f"a {self.role.value} does not receive {message.TAG}")
        state = self.state
        if state is ConnectionState.ESTABLISHED:
            if kind is Pong:
                assert isinstance(message, Pong)
                sent = self._outstanding.pop(message.seq, None)
                if sent is not None:
                    self.rtt = now - sent
            elif kind is Goodbye:
                self.state = ConnectionState.CLOSED
            elif kind in _HANDSHAKE_ONLY:
                self.state = ConnectionState.CLOSED
                raise RemoteProtocolError(f"{message.TAG} after the handshake")
            return
        if state is ConnectionState.CLOSED:
            raise RemoteProtocolError(f"{message.TAG} received after the connection was closed")
        # HANDSHAKE
        if self.role is Role.RUNNER:
            if kind is not Hello or self.hello is not None or self.challenge is None:
                self.state = ConnectionState.CLOSED
                raise RemoteProtocolError(f"expected hello after the challenge, got {message.TAG}")
            assert isinstance(message, Hello)
            self.hello = message
            return
        if self.challenge is None:
            if kind is not Challenge:
                self.state = ConnectionState.CLOSED
                raise RemoteProtocolError(f"expected challenge first, got {message.TAG}")
            assert isinstance(message, Challenge)
            self.challenge = message
            return
        if not self._sent_hello:
            self.state = ConnectionState.CLOSED
            raise RemoteProtocolError(f"{message.TAG} received before our hello")
        if kind is Welcome:
            assert isinstance(message, Welcome)
            self.welcome = message
            self.state = ConnectionState.ESTABLISHED
            # At least three pings per builder timeout: one lost or late ping must not be
            # enough for the runner to call us silent.
            self.ping_interval = min(self.ping_interval, message.builder_timeout / 3)
            self._next_ping_at = now  # the first ping goes out right after the welcome
        elif kind is Reject:
            self.state = ConnectionState.CLOSED
        else:
            self.state = ConnectionState.CLOSED
            raise RemoteProtocolError(f"expected welcome or reject, got {message.TAG}")
