"""Fuzzing the runner's connection handler with a hostile peer's arbitrary bytes.

Each example starts a farm with one well-behaved builder running two builds (one of them in its
second attempt, so its first is a real stale attempt), more builds queued, finished and
unbuildable, and opens one more connection to ``serve_builder``: the attacker, whose bytes
hypothesis draws.  They are a valid or invalid handshake (no token, the right proof, a wrong
one, one for another nonce, another machine's id, another protocol version), then any mixture
of valid messages of both directions in any order (Progress, LogChunk, Result, UploadData,
FetchRequest and Ping about the other builder's builds, its own, stale and future attempts,
queued, finished and unknown builds), raw bytes, truncated frames, length prefixes over the
frame limit, frames whose length prefix lies, valid msgpack of the wrong shape, and pauses; cut
into arbitrary chunks, and ended by EOF or not.

A model of the runner's side (the sans-IO ``Connection`` fed the same chunks at the same virtual
times, the hello checks written out again from the docs, and the two timeouts of
``serve_builder``) says how the connection must end: a protocol error, EOF, goodbye, a rejected
hello, the handshake timeout, the watchdog, or still open.  The attacker waits until every task
is blocked after each chunk, so the runner reads exactly those chunks.  After each example the
test asserts that the handler ended the connection exactly that way, at that virtual time, with
that reason (``protocol error: <the RemoteProtocolError>`` whenever the input broke the
protocol), or still answers a ping if it is open.  The one thing the model does not predict is a
protocol error raised by the session's own rules on uploads; one is accepted if it came from a
chunk carrying an upload, no later than the model's end.  Whatever the input:

- the runner logged no error (``builder connection failed`` is how a bug in it shows);
- the good builder is connected with the same session, runs the same attempts, got no Abort and
  nothing else unexpected, and every one of its pings was answered;
- builds never assigned to the attacker's machine (and not depending on one that was) are
  exactly as before; a build it ran ended (or was requeued) by a result only if it sent one for
  the attempt it ran, and the logs kept are of attempts it ran;
- the farm's invariants hold, the handshake gate is back to zero, and a closed connection left
  no partial upload behind.

``HYDRA_TRIO_FUZZ_EXAMPLES`` sets the number of examples: 200 in ``make test``, 100,000 in
``make fuzz`` (docs/security.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import itertools
import logging
import os
import re
import shutil
import tempfile
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import attrs
import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hydra_trio import auth
from hydra_trio.protocol import codec
from hydra_trio.protocol import messages as m
from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.errors import RemoteProtocolError
from hydra_trio.runner.blobs import Storage
from hydra_trio.runner.daemon import RunnerConfig, make_farm
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.handshake import HandshakeGate
from hydra_trio.runner.logs import Followers
from hydra_trio.runner.model import Build, BuildSpec, BuildState, Machine, MachineState
from hydra_trio.runner.session import SessionConfig, serve_builder

from .helpers.strategies import EXAMPLES, MESSAGES, any_message, messages_from

EXAMPLE_COUNT = int(os.environ.get("HYDRA_TRIO_FUZZ_EXAMPLES", "200"))

SYSTEM = "x86_64-linux"
HANDSHAKE_TIMEOUT = 10.0
BUILDER_TIMEOUT = 30.0
PING_INTERVAL = 10.0
TOKEN = b"the farm's token"
#: Longer than any machine id the message strategies draw (12 characters at most), so the
#: attacker claims the good builder's id only where a hello below does so on purpose.
GOOD_ID = "machine-good-builder"
ATTACKER_ID = "machine-attacker"
#: The seq of the ping that checks a connection the model says is still open.
SENTINEL = 2**62 + 7
#: The output of the finished dependency ``dep``: the input that ``child`` may fetch.
INPUT = b"an input file\n" * 8
INPUT_SHA = hashlib.sha256(INPUT).hexdigest()
MAX_FRAME = codec.DEFAULT_MAX_FRAME_SIZE
RUNNER = RunnerConfig(http=None, default_system=SYSTEM, max_tries=3)


def frame(message: m.Message) -> bytes:
    """A message's frame, whatever its size (``codec.encode`` refuses oversized ones)."""
    body = codec.encode_body(message)
    return codec.HEADER.pack(len(body)) + body


# ---------------------------------------------------------------------------------------------
# What the attacker sends: segments, each rendered to bytes when it is its turn (so a message
# can name the builds the farm has assigned by then, and a proof can answer the challenge).


@attrs.frozen
class Target:
    """A build a message is about, picked when it is sent, and the attempt it names."""

    #: good: the other builder's; own: the attacker's; queued; finished; unknown.
    whose: str
    index: int
    #: current, previous, next, zero, huge.
    attempt: str
    unknown_id: str


@attrs.frozen
class Frame:
    """Any valid message, of either direction."""

    message: m.Message

    def render(self, ctx: Attacker) -> bytes:
        return frame(self.message)


@attrs.frozen
class SendHello:
    version: str
    #: own, or good: the good builder's machine id (only with a token and no right proof;
    #: otherwise taking over an id is what the protocol allows, see docs/security.md).
    claim: str
    #: right, none, wrong (another token), stale (the right token, another nonce).
    proof: str
    systems: tuple[str, ...]
    max_jobs: int

    def render(self, ctx: Attacker) -> bytes:
        steal = self.claim == "good" and ctx.token is not None and self.proof != "right"
        machine_id = GOOD_ID if steal else ATTACKER_ID
        token = ctx.token or b"no token is configured"
        credentials = {
            "right": auth.prove(token, ctx.nonce, machine_id),
            "none": b"",
            "wrong": auth.prove(b"not the token", ctx.nonce, machine_id),
            "stale": auth.prove(token, bytes(auth.NONCE_BYTES), machine_id),
        }[self.proof]
        hello = m.Hello(
            protocol_version=self.version,
            machine_id=machine_id,
            hostname="attacker",
            systems=self.systems,
            max_jobs=self.max_jobs,
            credentials=credentials,
        )
        return frame(hello)


@attrs.frozen
class SendProgress:
    target: Target
    phase: m.Phase

    def render(self, ctx: Attacker) -> bytes:
        build_id, attempt = ctx.ref(self.target)
        return frame(m.Progress(build_id=build_id, attempt=attempt, phase=self.phase))


@attrs.frozen
class SendLog:
    target: Target
    data: bytes
    #: >0: that many bytes instead of ``data`` (frames past the decoder's small-frame path).
    big: int

    def render(self, ctx: Attacker) -> bytes:
        build_id, attempt = ctx.ref(self.target)
        data = b"x" * self.big if self.big else self.data
        return frame(m.LogChunk(build_id=build_id, attempt=attempt, data=data))


@attrs.frozen
class SendResult:
    target: Target
    status: m.BuildStatus
    exit_code: int | None
    #: none; uploaded: the files sent so far for it, as sent; wrong: those with a bad hash;
    #: drawn: ``outputs``.
    outputs_from: str
    outputs: tuple[m.FileInfo, ...]
    error: str

    def render(self, ctx: Attacker) -> bytes:
        build_id, attempt = ctx.ref(self.target)
        outputs = self.outputs if self.outputs_from == "drawn" else ()
        if self.outputs_from in ("uploaded", "wrong"):
            outputs = tuple(
                m.FileInfo(
                    path=path,
                    size=len(data),
                    sha256=hashlib.sha256(
                        bytes(data) + (b"!" if self.outputs_from == "wrong" else b"")
                    ).hexdigest(),
                )
                for (b, a, path), data in ctx.uploaded.items()
                if (b, a) == (build_id, attempt)
            )
        result = m.Result(
            build_id=build_id,
            attempt=attempt,
            status=self.status,
            exit_code=self.exit_code,
            outputs=outputs,
            error=self.error,
        )
        return frame(result)


@attrs.frozen
class SendUpload:
    target: Target
    path: str
    #: next: where the file sent so far ends; zero; drawn: ``offset``.
    offset_from: str
    offset: int
    data: bytes
    eof: bool

    def render(self, ctx: Attacker) -> bytes:
        build_id, attempt = ctx.ref(self.target)
        sent = ctx.uploaded.setdefault((build_id, attempt, self.path), bytearray())
        offset = {"next": len(sent), "zero": 0, "drawn": self.offset}[self.offset_from]
        if offset == len(sent):
            sent += self.data
        upload = m.UploadData(
            build_id=build_id,
            attempt=attempt,
            path=self.path,
            offset=offset,
            data=self.data,
            eof=self.eof,
        )
        return frame(upload)


@attrs.frozen
class SendFetch:
    target: Target
    request_id: int
    #: whether to ask for the real input of ``child`` (else ``sha256``).
    the_input: bool
    sha256: str
    offset: int
    length: int

    def render(self, ctx: Attacker) -> bytes:
        build_id, attempt = ctx.ref(self.target)
        request = m.FetchRequest(
            request_id=self.request_id,
            build_id=build_id,
            attempt=attempt,
            sha256=INPUT_SHA if self.the_input else self.sha256,
            offset=self.offset,
            length=self.length,
        )
        return frame(request)


@attrs.frozen
class SendPing:
    seq: int
    running: tuple[Target, ...]

    def render(self, ctx: Attacker) -> bytes:
        refs = tuple(m.BuildRef(build_id=b, attempt=a) for b, a in map(ctx.ref, self.running))
        return frame(m.Ping(seq=self.seq, running=refs))


@attrs.frozen
class Raw:
    data: bytes

    def render(self, ctx: Attacker) -> bytes:
        return self.data


@attrs.frozen
class Truncated:
    """The start of a valid frame (what follows it is then read as the rest of that frame)."""

    message: m.Message
    keep: int

    def render(self, ctx: Attacker) -> bytes:
        data = frame(self.message)
        return data[: min(self.keep, len(data) - 1)]


@attrs.frozen
class Oversized:
    """A length prefix over the frame limit, and a few bytes of body."""

    length: int
    tail: bytes

    def render(self, ctx: Attacker) -> bytes:
        return codec.HEADER.pack(self.length) + self.tail


@attrs.frozen
class Misframed:
    """A valid body behind a length prefix that is off by ``delta``."""

    message: m.Message
    delta: int

    def render(self, ctx: Attacker) -> bytes:
        body = codec.encode_body(self.message)
        return codec.HEADER.pack(max(0, len(body) + self.delta)) + body


@attrs.frozen
class Mangled:
    """Valid msgpack that is not a valid message: any value, a map with a real tag and wrong
    fields, or a real message with a field dropped, replaced or added."""

    body: Any

    def render(self, ctx: Attacker) -> bytes:
        body: bytes = msgpack.packb(self.body, use_bin_type=True)
        return codec.HEADER.pack(len(body)) + body


@attrs.frozen
class Pause:
    seconds: float


Segment = (
    Frame
    | SendHello
    | SendProgress
    | SendLog
    | SendResult
    | SendUpload
    | SendFetch
    | SendPing
    | Raw
    | Truncated
    | Oversized
    | Misframed
    | Mangled
    | Pause
)


@attrs.frozen
class Piece:
    """A segment and how it is cut: at these offsets; ``hold``: its last chunk goes out with
    the next segment's first."""

    segment: Segment
    cuts: tuple[int, ...]
    hold: bool


@attrs.frozen
class Plan:
    token: bool
    #: the runner reads ``bytes`` (as from a socket, the decoder's fast path) or bytearrays.
    socket_reads: bool
    pieces: tuple[Piece, ...]
    #: the attacker closes its side at the end.
    eof: bool


# ---------------------------------------------------------------------------------------------
# Strategies.

#: Hypothesis spends most of an example's time drawing text, one character at a time; the
#: strategies below draw ids, paths and hashes from small tables or as one block of bytes, so an
#: example costs a few milliseconds to draw.  Arbitrary field contents are the business of
#: test_messages and test_codec; here they only need to reach the runner.
unknown_ids = st.sampled_from(["nope", "0123456789abcdef", "ünïcödé", "x" * 200])
hashes = st.binary(min_size=32, max_size=32).map(bytes.hex)
output_paths = st.sampled_from(
    ["out", "bin/tool", "lib/a.so", "ünï/cödé", "a" * 255, "d/" * 40 + "x"]
)
drawn_outputs = st.lists(
    st.builds(
        m.FileInfo,
        path=output_paths,
        size=st.sampled_from([0, 3, 2**63 - 1]),
        sha256=hashes,
        executable=st.booleans(),
        link=st.sampled_from(["", "", "../escape", "/etc/passwd"]),
    ),
    max_size=2,
).map(tuple)
targets = st.builds(
    Target,
    whose=st.sampled_from(["good", "good", "own", "own", "own", "queued", "finished", "unknown"]),
    index=st.integers(0, 3),
    attempt=st.sampled_from(["current", "current", "current", "previous", "next", "zero", "huge"]),
    unknown_id=unknown_ids,
)
right_hellos = st.builds(
    SendHello,
    version=st.just(m.PROTOCOL_VERSION),
    claim=st.just("own"),
    proof=st.just("right"),
    systems=st.just((SYSTEM,)),
    max_jobs=st.integers(1, 4),
)
any_hellos = st.builds(
    SendHello,
    version=st.sampled_from([m.PROTOCOL_VERSION, m.PROTOCOL_VERSION, "1.9", "2.0", "one"]),
    claim=st.sampled_from(["own", "good"]),
    proof=st.sampled_from(["right", "none", "wrong", "stale"]),
    systems=st.sampled_from([(SYSTEM,), ("riscv64-linux",), ()]),
    max_jobs=st.integers(1, 4),
)
about_builds = st.one_of(
    st.builds(SendProgress, targets, st.sampled_from(m.Phase)),
    st.builds(
        SendLog,
        targets,
        st.binary(max_size=32),
        st.sampled_from([0, 0, 0, 64 * 1024 - 40, 64 * 1024 + 100]),
    ),
    st.builds(
        SendResult,
        targets,
        st.sampled_from(m.BuildStatus),
        st.sampled_from([None, 0, 1, -9, 2**31 - 1]),
        st.sampled_from(["none", "uploaded", "uploaded", "wrong", "drawn"]),
        drawn_outputs,
        st.sampled_from(["", "it broke", "ü" * 100]),
    ),
    st.builds(
        SendUpload,
        targets,
        output_paths,
        st.sampled_from(["next", "next", "next", "zero", "drawn"]),
        st.integers(0, 2**63 - 1),
        st.binary(max_size=24),
        st.booleans(),
    ),
    st.builds(
        SendFetch,
        targets,
        st.integers(0, 2**63 - 1),
        st.booleans(),
        hashes,
        st.sampled_from([0, 1, len(INPUT) - 1, len(INPUT), len(INPUT) + 1, 2**62, 2**63 - 1]),
        st.sampled_from([1, 7, 256 * 1024, 2**63 - 1]),
    ),
    st.builds(SendPing, st.integers(0, 2**63 - 1), st.lists(targets, max_size=3).map(tuple)),
)
#: One valid message of every type, either direction (random ones come from ``MESSAGES``).
examples = st.sampled_from(list(EXAMPLES.values()))
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 3), inner, max_size=3)
    ),
    max_leaves=4,
)
FIELD_NAMES = sorted({f.name for cls in m.MESSAGE_TYPES for f in attrs.fields(cls)})
TAGS = sorted(m.BY_TAG)


def _mutate(message: m.Message, operation: str, index: int, value: Any) -> dict[Any, Any]:
    wire: dict[Any, Any] = m.to_wire(message)
    key = sorted(wire)[index % len(wire)]
    if operation == "drop":
        del wire[key]
    elif operation == "replace":
        wire[key] = value
    else:
        wire[f"new-{index}"] = value
    return wire


mangled_bodies = st.one_of(
    values,
    st.builds(
        lambda tag, fields: {"type": tag, **fields},
        st.sampled_from(TAGS) | st.text(max_size=6),
        st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=4),
    ),
    st.builds(
        _mutate,
        examples,
        st.sampled_from(["drop", "replace", "add"]),
        st.integers(0, 20),
        values,
    ),
)
garbage = st.one_of(
    st.builds(Raw, st.binary(min_size=1, max_size=48)),
    st.builds(Truncated, examples, st.integers(0, 64)),
    st.builds(
        Oversized,
        st.sampled_from([MAX_FRAME + 1, 2**32 - 1]) | st.integers(MAX_FRAME + 1, 2**32 - 1),
        st.binary(max_size=8),
    ),
    st.builds(Misframed, examples, st.sampled_from([-6, -2, -1, 1, 2, 6])),
    st.builds(Mangled, mangled_bodies),
)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn with its weight (``st.one_of`` flattens nested
    choices into equal branches, which would weight a choice by how many it has)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(table.__getitem__)


#: Weighted towards what gets past the decoder, so that examples reach the farm: messages
#: about builds, then any valid message of either direction, hellos, garbage, pauses.
segments = weighted(
    (8, about_builds),
    (2, st.builds(Frame, examples)),
    (1, st.builds(Frame, messages_from(m.Role.BUILDER))),
    (1, st.builds(Frame, any_message)),
    (1, any_hellos),
    (2, garbage),
    (1, st.builds(Pause, st.sampled_from([0.3, 4.7, 11.9, 33.1]))),
)
#: Mostly a hello the runner accepts, so that most examples test the established connection.
openings = weighted(
    (7, right_hellos),
    (2, any_hellos),
    (1, st.builds(Frame, MESSAGES[m.Hello])),
    (1, segments),
)


cuts = st.integers(1, 80)


def pieces(segment: st.SearchStrategy[Segment]) -> st.SearchStrategy[Piece]:
    return st.builds(
        Piece,
        segment,
        st.one_of(st.just(()), st.tuples(cuts), st.tuples(cuts, cuts)),
        st.sampled_from([False] * 7 + [True]),
    )


plans = st.builds(
    Plan,
    token=st.booleans(),
    socket_reads=st.booleans(),
    pieces=st.builds(
        lambda first, rest: (first, *rest),
        pieces(openings),
        st.lists(pieces(segments), min_size=1, max_size=12),
    ),
    eof=st.booleans(),
)


# ---------------------------------------------------------------------------------------------
# The model of the runner's side of the attacker's connection.


@attrs.frozen
class Outcome:
    """How the connection ends (or ``open``), when, and the reason the runner must give."""

    kind: str
    at: float | None
    reason: str


@attrs.define(eq=False)
class Model:
    """``serve_builder`` as the protocol defines it, fed the attacker's chunks as they are sent:
    the sans-IO connection, the hello checks, the handshake timeout and the watchdog."""

    token: bytes | None
    nonce: bytes
    started: float
    conn: Connection
    hello: m.Hello | None = None
    outcome: Outcome | None = None
    #: an event fell exactly on a deadline: which came first is not defined.
    ambiguous: bool = False
    #: messages the runner acted on after the handshake.
    accepted: list[m.Message] = attrs.field(factory=list)
    #: chunks fed so far; the number of each chunk that carried an upload; after which chunk
    #: the connection ended.
    chunks: int = 0
    upload_chunks: set[int] = attrs.field(factory=set)
    ended_after: int | None = None
    #: bytes of an incomplete frame held (found by walking length prefixes).
    _tail: bytearray = attrs.field(factory=bytearray)

    @classmethod
    def start(cls, challenge: m.Challenge, now: float, token: bytes | None) -> Model:
        conn = Connection(
            m.Role.RUNNER, now=now, peer_timeout=HANDSHAKE_TIMEOUT, max_frame_size=MAX_FRAME
        )
        conn.send(challenge)
        return cls(token=token, nonce=challenge.nonce, started=now, conn=conn)

    def _end(self, kind: str, at: float, reason: str) -> None:
        self.outcome = Outcome(kind, at, reason)
        self.ended_after = self.chunks

    def _deadline(self) -> tuple[float, str, str]:
        if self.hello is None:
            return self.started + HANDSHAKE_TIMEOUT, "handshake-timeout", "no hello in time"
        return self.conn.deadline, "silent", f"silent for {BUILDER_TIMEOUT:g} s"

    def _check_time(self, now: float) -> None:
        deadline, kind, reason = self._deadline()
        if now > deadline:
            self._end(kind, deadline, reason)
        elif now == deadline:
            self.ambiguous = True

    def feed(self, data: bytes | bytearray, now: float) -> bool:
        """The runner reads ``data`` at ``now``; False if it has closed the connection by then."""
        if self.outcome is None:
            self._check_time(now)
        if self.outcome is not None:
            return False
        self.chunks += 1
        self._walk(data)
        try:
            received = self.conn.receive_data(data, now)
        except RemoteProtocolError as exc:
            self._end("protocol", now, f"protocol error: {exc}")
            return True
        for message in received:
            if self.hello is None:
                assert isinstance(message, m.Hello)  # the connection allows nothing else
                self._on_hello(message, now)
            elif isinstance(message, m.Goodbye):
                reason = f" ({message.reason})" if message.reason else ""
                self._end("goodbye", now, f"said goodbye{reason}")
            else:
                self.accepted.append(message)
                if isinstance(message, m.UploadData):
                    self.upload_chunks.add(self.chunks)
        return True

    def _on_hello(self, hello: m.Hello, now: float) -> None:
        # The rules from docs/protocol.md and docs/security.md, written out again rather than
        # calling the code under test (a model that calls auth.verify agrees with any bug in it).
        version = re.fullmatch(r"([0-9]{1,9})\.[0-9]{1,9}", hello.protocol_version)
        proof = hmac.new(
            self.token or b"",
            b"hydra-trio builder auth v1\0" + self.nonce + hello.machine_id.encode(),
            hashlib.sha256,
        ).digest()
        if version is None or version[1] != m.PROTOCOL_VERSION.split(".")[0]:
            self._end("rejected", now, "rejected incompatible-version")
        elif self.token is not None and hello.credentials != proof:
            self._end("rejected", now, "rejected auth-failed")
        else:
            self.hello = hello
            welcome = m.Welcome(
                protocol_version=m.PROTOCOL_VERSION,
                session_id="model",
                builder_timeout=BUILDER_TIMEOUT,
            )
            self.conn.send(welcome)
            self.conn.set_peer_timeout(BUILDER_TIMEOUT)

    def _walk(self, data: bytes | bytearray) -> None:
        tail = self._tail
        tail += data
        while len(tail) >= codec.HEADER.size:
            end = codec.HEADER.size + codec.HEADER.unpack_from(tail)[0]
            if len(tail) < end:
                break
            del tail[:end]

    def eof(self, now: float) -> None:
        """The attacker closes its side at ``now``."""
        self._check_time(now)
        if self.outcome is not None:
            return
        try:
            self.conn.receive_eof()
        except RemoteProtocolError as exc:
            self._end("protocol", now, f"protocol error: {exc}")
        else:
            self._end("eof", now, "connection closed by peer")

    def expected(self, now: float) -> Outcome:
        """How the connection ends when nothing more is sent after ``now``."""
        if self.outcome is None:
            self._check_time(now)
        if self.outcome is not None:
            return self.outcome
        deadline, kind, reason = self._deadline()
        if self.hello is None or self._tail:
            return Outcome(kind, deadline, reason)
        return Outcome("open", None, "")


# ---------------------------------------------------------------------------------------------
# The peers.


class SocketLike(trio.abc.Stream):
    """A memory stream whose reads return ``bytes``, as a socket's do."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.inner.aclose()


class GoodBuilder:
    """A well-behaved builder: answers the challenge, pings with what it runs, never ends a
    build by itself (so its builds can only change if the runner misapplies something)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = Connection(m.Role.BUILDER, now=trio.current_time(), peer_timeout=1e9)
        self.inbox: list[m.Message] = []
        self.running: dict[str, int] = {}
        self.unexpected: list[m.Message] = []
        self.pings = 0
        self.pongs = 0
        #: why the connection failed, if it did.
        self.broken: str | None = None

    async def send(self, message: m.Message) -> None:
        if isinstance(message, m.Result):
            del self.running[message.build_id]
        await self.stream.send_all(self.conn.send(message))

    async def _next(self) -> m.Message:
        while not self.inbox:
            data = await self.stream.receive_some()
            assert data, "the runner closed the good builder's connection"
            self.inbox.extend(self.conn.receive_data(data, trio.current_time()))
        return self.inbox.pop(0)

    async def handshake(self, token: bytes | None) -> m.Welcome:
        challenge = await self._next()
        assert isinstance(challenge, m.Challenge)
        hello = m.Hello(
            protocol_version=m.PROTOCOL_VERSION,
            machine_id=GOOD_ID,
            hostname="good",
            systems=(SYSTEM,),
            max_jobs=2,
            credentials=auth.prove(token, challenge.nonce, GOOD_ID) if token else b"",
        )
        await self.send(hello)
        welcome = await self._next()
        assert isinstance(welcome, m.Welcome)
        return welcome

    def _on(self, message: m.Message) -> None:
        if isinstance(message, m.Assign):
            self.running[message.build_id] = message.attempt
        elif isinstance(message, m.Pong):
            self.pongs += 1
        else:
            self.unexpected.append(message)

    async def read_forever(self) -> None:
        for message in self.inbox:
            self._on(message)
        self.inbox.clear()
        try:
            while data := await self.stream.receive_some():
                for message in self.conn.receive_data(data, trio.current_time()):
                    self._on(message)
        except RemoteProtocolError as exc:
            self.broken = f"the runner sent the good builder an invalid frame: {exc}"
        else:
            self.broken = "the runner closed the good builder's connection"

    async def ping_forever(self) -> None:
        try:
            while True:
                refs = tuple(m.BuildRef(build_id=b, attempt=a) for b, a in self.running.items())
                await self.send(self.conn.make_ping(trio.current_time(), running=refs))
                self.pings += 1
                await trio.sleep(PING_INTERVAL)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = "the runner closed the good builder's connection"


@attrs.define(eq=False)
class Attacker:
    """The attacker's end: what segments need to render, and what the runner sent it."""

    farm: Farm
    token: bytes | None
    nonce: bytes = b""
    model: Model | None = None
    received: list[m.Message] = attrs.field(factory=list)
    closed_at: float | None = None
    closed: trio.Event = attrs.field(factory=trio.Event)
    #: per (build id, attempt, path): the bytes sent at offsets that continue the file.
    uploaded: dict[tuple[str, int, str], bytearray] = attrs.field(factory=dict)

    @property
    def machine(self) -> Machine | None:
        """The attacker's machine, once the runner accepted its hello."""
        accepted = self.model is not None and self.model.hello is not None
        return self.farm.machines.get(self.machine_id) if accepted else None

    @property
    def machine_id(self) -> str:
        hello = self.model.hello if self.model is not None else None
        return hello.machine_id if hello is not None else ATTACKER_ID

    def ref(self, target: Target) -> tuple[str, int]:
        farm = self.farm
        if target.whose in ("good", "own"):
            machine = farm.machines.get(GOOD_ID if target.whose == "good" else self.machine_id)
            builds = list(machine.running.values()) if machine is not None else []
        elif target.whose == "queued":
            builds = [b for b in farm.builds.values() if b.state is BuildState.QUEUED]
        elif target.whose == "finished":
            builds = [b for b in farm.builds.values() if b.state.finished]
        else:
            builds = []
        if builds:
            build = builds[target.index % len(builds)]
            build_id, current = build.id, build.attempts
        else:
            build_id, current = target.unknown_id, 1
        attempt = {
            "current": current,
            "previous": max(0, current - 1),
            "next": current + 1,
            "zero": 0,
            "huge": 2**63 - 1,
        }[target.attempt]
        return build_id, attempt

    async def read(self, stream: trio.abc.ReceiveStream) -> None:
        decoder = codec.FrameDecoder()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await stream.receive_some():
                self.received.extend(decoder.feed(data))  # the runner sends only valid frames
        decoder.check_eof()  # ... and only whole ones
        self.closed_at = trio.current_time()
        self.closed.set()


# ---------------------------------------------------------------------------------------------
# The farm and its checks.


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def captured_logs() -> Iterator[Records]:
    """Every INFO+ record of hydra_trio, kept from pytest's capture (which would hold all of
    them for the whole run of examples)."""
    logger = logging.getLogger("hydra_trio")
    handler = Records()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


async def run_inline(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Stands in for ``trio.to_thread.run_sync`` (blob and log files, tiny here).

    With the autojump clock, virtual time leaps to the next deadline whenever every task waits,
    including while one waits for a worker thread: a runner task in a thread would let the
    watchdog or a timeout fire at a virtual time that depends on the machine's speed, and
    hypothesis needs each example to replay identically.  Running the call in place keeps the
    same checkpoint and the same code paths (and is cheaper).
    """
    await trio.lowlevel.checkpoint()
    return fn(*args)


def snapshot(build: Build) -> tuple[Any, ...]:
    return (
        build.state,
        build.status,
        build.attempts,
        build.infra_failures,
        build.machine_id,
        build.phase,
        build.exit_code,
        build.error,
        build.outputs,
        dict(build.timings),
        build.log_size,
        build.not_before,
        tuple(build.failed_on),
        frozenset(build.waiting_for),
    )


def check_no_internal_error(records: list[logging.LogRecord]) -> None:
    """The runner logged no error: ``builder connection failed`` is a bug in the runner."""
    failures = [r for r in records if r.levelno >= logging.ERROR]
    assert not failures, "\n".join(
        r.getMessage()
        + "\n"
        + "".join(traceback.format_exception(*r.exc_info) if r.exc_info else ())
        for r in failures
    )


def check_farm_invariants(farm: Farm) -> None:
    """The farm's documented invariants: a machine runs exactly its RUNNING builds; a
    disconnected machine has no session and runs nothing."""
    for machine in farm.machines.values():
        running = {
            b.id
            for b in farm.builds.values()
            if b.state is BuildState.RUNNING and b.machine_id == machine.machine_id
        }
        assert set(machine.running) == running, machine.machine_id
        assert all(farm.builds[b] is build for b, build in machine.running.items())
        if machine.state is MachineState.DISCONNECTED:
            assert machine.session is None and not machine.running
        else:
            assert machine.session is not None


def spec(
    name: str, *, priority: int = 0, after: tuple[str, ...] = (), system: str = SYSTEM
) -> BuildSpec:
    return BuildSpec(command=(name,), name=name, system=system, priority=priority, after=after)


async def send_plan(
    plan: Plan, attacker: Attacker, send: Callable[[bytes], Awaitable[bool]]
) -> None:
    """Render and send the plan's segments, chunk by chunk, until the runner has closed."""
    held = b""
    for piece in plan.pieces:
        segment = piece.segment
        if isinstance(segment, Pause):
            await trio.sleep(segment.seconds)
            continue
        data = held + segment.render(attacker)
        points = sorted({0, len(data), *(c for c in piece.cuts if c < len(data))})
        chunks = [data[a:b] for a, b in itertools.pairwise(points)]
        held = chunks.pop() if piece.hold and chunks else b""
        for chunk in chunks:
            if not await send(chunk):
                return
    if held:
        await send(held)


async def fuzz_one(plan: Plan, state_dir: Path, records: list[logging.LogRecord]) -> None:
    token = TOKEN if plan.token else None
    config = SessionConfig(
        builder_timeout=BUILDER_TIMEOUT, handshake_timeout=HANDSHAKE_TIMEOUT, token=token
    )
    #: (build id, attempt) the farm assigned to a machine other than the good builder's: the
    #: attacker's.
    attacker_attempts: set[tuple[str, int]] = set()

    class Watch(Followers):
        def notify(self, build_id: str) -> None:
            build = farm.builds[build_id]
            if build.state is BuildState.RUNNING and build.machine_id != GOOD_ID:
                attacker_attempts.add((build_id, build.attempts))
            super().notify(build_id)

    followers = Watch()
    farm, dispatcher = make_farm(RUNNER, persisted=False, followers=followers)
    storage = Storage.in_dir(state_dir, followers=followers)
    blob = storage.blobs.path_of(INPUT_SHA)
    blob.parent.mkdir()
    blob.write_bytes(INPUT)
    gate = HandshakeGate(limit=10)
    now = trio.current_time()
    builds: dict[str, Build] = {}
    for name, priority, after, system in [
        ("dep", 100, (), SYSTEM),
        ("good2", 90, (), SYSTEM),
        ("good3", 80, (), SYSTEM),
        ("child", 50, ("dep",), SYSTEM),
        ("q1", 0, (), SYSTEM),
        ("p", 0, (), SYSTEM),
        ("pc", 0, ("p",), SYSTEM),
        ("riscv", 0, (), "riscv64-linux"),
        ("cancelled", 0, (), SYSTEM),
    ]:
        deps = tuple(builds[a].id for a in after)
        builds[name] = farm.submit(spec(name, priority=priority, after=deps, system=system), now)
    farm.cancel(builds["cancelled"].id, now)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.run, farm)

        # The good builder: finishes dep (so child has an input), fails good2's first attempt
        # (so good2 runs in attempt 2, and attempt 1 is a real stale one), then runs good2
        # and good3 for the rest of the example.
        runner_end, good_end = trio.testing.memory_stream_pair()
        nursery.start_soon(
            functools.partial(serve_builder, farm, config, storage, runner_end, gate=gate)
        )
        good = GoodBuilder(good_end)
        welcome = await good.handshake(token)
        nursery.start_soon(good.read_forever)
        nursery.start_soon(good.ping_forever)
        await trio.testing.wait_all_tasks_blocked()
        dep, good2 = builds["dep"], builds["good2"]
        output = m.FileInfo(path="data", size=len(INPUT), sha256=INPUT_SHA)
        await good.send(
            m.Result(build_id=dep.id, attempt=1, status=m.BuildStatus.SUCCESS, outputs=(output,))
        )
        await good.send(m.Result(build_id=good2.id, attempt=1, status=m.BuildStatus.FETCH_FAILED))
        await trio.testing.wait_all_tasks_blocked()
        good_machine = farm.machines[GOOD_ID]
        good_session = good_machine.session
        assert good.running == {good2.id: 2, builds["good3"].id: 1}
        assert dep.state is BuildState.SUCCEEDED and builds["child"].state is BuildState.QUEUED
        before = {b.id: snapshot(b) for b in farm.builds.values()}
        good_counts = (
            good_machine.succeeded_builds,
            good_machine.failed_builds,
            good_machine.lost_builds,
            good_machine.sessions,
        )

        # The attacker.
        runner_end, attacker_end = trio.testing.memory_stream_pair()
        attacker = Attacker(farm, token)
        handler_done: list[float] = []
        #: how many chunks the model had been fed when the handler returned.
        done_after: list[int] = []
        handler_ended = trio.Event()

        async def serve() -> None:
            stream = SocketLike(runner_end) if plan.socket_reads else runner_end
            await serve_builder(farm, config, storage, stream, gate=gate)
            handler_done.append(trio.current_time())
            done_after.append(model.chunks)
            handler_ended.set()

        started = trio.current_time()
        nursery.start_soon(serve)
        nursery.start_soon(attacker.read, attacker_end.receive_stream)
        await trio.testing.wait_all_tasks_blocked()
        challenge = attacker.received[0]
        assert isinstance(challenge, m.Challenge)
        assert challenge.token_required is (token is not None)
        attacker.nonce = challenge.nonce
        model = attacker.model = Model.start(challenge, started, token)

        async def send(data: bytes) -> bool:
            chunk: bytes | bytearray = data if plan.socket_reads else bytearray(data)
            if not model.feed(chunk, trio.current_time()):
                return False
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await attacker_end.send_all(data)
            await trio.testing.wait_all_tasks_blocked()
            return model.outcome is None

        await send_plan(plan, attacker, send)

        # The end: EOF, or nothing more; then wait for the runner to close, or check that the
        # connection still works.
        if plan.eof:
            model.eof(trio.current_time())
            await attacker_end.send_stream.aclose()
        expected = model.expected(trio.current_time())
        if model.ambiguous and not plan.eof:
            await attacker_end.send_stream.aclose()
        if expected.kind == "open" and not model.ambiguous:
            with contextlib.suppress(trio.BrokenResourceError):
                await attacker_end.send_all(frame(m.Ping(seq=SENTINEL)))
            await trio.testing.wait_all_tasks_blocked()
        else:
            with trio.fail_after(HANDSHAKE_TIMEOUT + BUILDER_TIMEOUT + 60):
                await handler_ended.wait()
                await attacker.closed.wait()
            await trio.testing.wait_all_tasks_blocked()

        # The checks.
        check_no_internal_error(records)
        attacker_machine = attacker.machine
        reason = observed_reason(records, attacker_machine) if handler_done else None
        if model.ambiguous:
            outcome = "ambiguous"
        elif handler_done and reason != expected.reason:
            # The session's own rules on uploads (docs/security.md) may end the connection
            # with a protocol error of their own, which a model of the connection does not
            # predict: it must have come from a chunk carrying an upload, no later than the
            # model's end.
            outcome = "session rule"
            assert reason is not None and reason.startswith("protocol error: "), reason
            assert done_after[0] in model.upload_chunks, (reason, expected)
            assert model.ended_after is None or done_after[0] <= model.ended_after, expected
            assert attacker.closed_at == handler_done[0]
        elif expected.kind == "open":
            outcome = "open"
            assert not handler_done, f"closed: {reason}"
            assert m.Pong(seq=SENTINEL) in attacker.received
            assert attacker_machine is not None
            assert attacker_machine.state is not MachineState.DISCONNECTED
        else:
            outcome = expected.kind
            assert handler_done == [expected.at], (expected, handler_done, reason)
            assert attacker.closed_at == expected.at
            assert reason == expected.reason
            if expected.kind == "rejected":
                code = expected.reason.removeprefix("rejected ")
                assert farm.metrics.handshakes_rejected == {code: 1}
                assert [type(r) for r in attacker.received] == [m.Challenge, m.Reject]
        event(f"outcome: {outcome}")
        event(f"builds assigned to the attacker: {len(attacker_attempts)}")
        event(f"messages acted on after the handshake: {min(len(model.accepted), 5)}")
        if outcome == "protocol":
            event(f"protocol error: {expected.reason.split(':')[1].split()[0]}")
        assert gate.pending == 0
        if handler_done:
            blobs = state_dir / "blobs"
            left = [*(blobs / "tmp").iterdir(), *blobs.glob("??/.upload-*")]
            assert not left, "a partial upload was left"
            if attacker_machine is not None:
                assert attacker_machine.state is MachineState.DISCONNECTED
        check_farm_invariants(farm)

        # The good builder: untouched.
        assert good.broken is None, good.broken
        assert good.unexpected == [], good.unexpected
        assert good.pongs == good.pings
        assert good_machine.session is good_session
        assert good_session is not None and good_session.session_id == welcome.session_id
        assert good_session.close_reason is None  # type: ignore[attr-defined]
        assert good_machine.state is MachineState.CONNECTED
        assert {b: build.attempts for b, build in good_machine.running.items()} == good.running
        assert (
            good_machine.succeeded_builds,
            good_machine.failed_builds,
            good_machine.lost_builds,
            good_machine.sessions,
        ) == good_counts

        # Builds: only the attacker's own (and what depends on them) may have changed; one it
        # ran ended (or was requeued) by a result only if it sent one for the attempt it ran,
        # and it has logs only of attempts it ran.
        attacker_builds = {build_id for build_id, _ in attacker_attempts}
        touched = set(attacker_builds)
        for build_id in attacker_builds:
            stack = [build_id]
            while stack:
                for dependent in farm.builds[stack.pop()].dependents:
                    if dependent not in touched:
                        touched.add(dependent)
                        stack.append(dependent)
        for build_id, was in before.items():
            if build_id not in touched:
                assert snapshot(farm.builds[build_id]) == was, farm.builds[build_id].name
        results = {(r.build_id, r.attempt) for r in model.accepted if isinstance(r, m.Result)}
        for build_id in touched:
            build = farm.builds[build_id]
            if build_id not in attacker_builds:
                assert build.state is BuildState.QUEUED or (
                    build.status is m.BuildStatus.DEPENDENCY_FAILED
                )
            elif build.state is not BuildState.RUNNING and build.status not in (
                None,
                m.BuildStatus.BUILDER_LOST,
                m.BuildStatus.DEPENDENCY_FAILED,
            ):
                ran = (build_id, build.attempts)
                assert ran in results and ran in attacker_attempts, (build.name, build.status)
        for log_file in (state_dir / "logs").iterdir():
            build_id, attempt, _ = log_file.name.split(".")
            assert (build_id, int(attempt)) in attacker_attempts, log_file.name
        nursery.cancel_scope.cancel()


def observed_reason(records: list[logging.LogRecord], machine: Any) -> str:
    """Why the runner says the attacker's connection ended (from its log and the farm)."""
    for record in records:
        if record.msg == "connection closed before its hello completed: %s":
            assert isinstance(record.args, tuple)
            return str(record.args[0])
        if str(record.msg).startswith("connection closed: no hello within"):
            return "no hello in time"
        if str(record.msg).startswith("rejected builder"):
            assert isinstance(record.args, tuple)
            return f"rejected {record.args[2]}"
    assert machine is not None, [r.getMessage() for r in records]
    return str(machine.disconnect_reason)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where each example's state dir is made and removed: in memory where there is a tmpfs
    (on a disk, the directories alone cost several milliseconds per example)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="hydra-trio-fuzz-", dir=shm))
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("fuzz")


@settings(
    max_examples=EXAMPLE_COUNT,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(plan=plans)
def test_the_connection_handler_survives_any_peer(plan: Plan, fuzz_dir: Path) -> None:
    """Any bytes from a peer end its connection with a protocol error (or keep it, correctly),
    and change nothing the protocol does not let that peer change."""
    state_dir = fuzz_dir / "state"
    shutil.rmtree(state_dir, ignore_errors=True)
    with captured_logs() as handler, mock.patch.object(trio.to_thread, "run_sync", run_inline):
        clock = trio.testing.MockClock(autojump_threshold=0)
        trio.run(fuzz_one, plan, state_dir, handler.records, clock=clock)
