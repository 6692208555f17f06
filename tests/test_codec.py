"""Length-prefixed msgpack framing: chunking, hostile input, size limits, EOF and poisoning."""

from __future__ import annotations

import contextlib
import itertools
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hydra_trio.protocol import codec
from hydra_trio.protocol import messages as m
from hydra_trio.protocol.errors import LocalProtocolError, RemoteProtocolError

from .helpers.strategies import EXAMPLES, FAST, any_message


def header(length: int) -> bytes:
    return struct.pack(">I", length)


def feed_all(decoder: codec.FrameDecoder, chunks: list[bytes]) -> list[m.Message]:
    out: list[m.Message] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, deduplicated, clamped)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def test_frame_layout() -> None:
    """A frame is a 4-byte big-endian body length, then the msgpack map of the message."""
    frame = codec.encode(m.Pong(seq=7))
    body = msgpack.packb({"type": "pong", "seq": 7, "settling": 0}, use_bin_type=True)
    assert frame == header(len(body)) + body
    assert codec.encode_body(m.Pong(seq=7)) == body
    assert codec.decode_body(body) == m.Pong(seq=7)


@FAST
@given(st.lists(any_message, min_size=1, max_size=5), st.lists(st.integers(0, 2000)))
def test_round_trip_under_arbitrary_chunking(messages: list[m.Message], cuts: list[int]) -> None:
    """Any sequence of messages, cut into any chunks, decodes to the same messages."""
    stream = b"".join(codec.encode(msg) for msg in messages)
    decoder = codec.FrameDecoder()
    assert feed_all(decoder, split(stream, cuts)) == messages
    assert decoder.buffered == 0
    decoder.check_eof()


@pytest.mark.parametrize("cls", m.MESSAGE_TYPES, ids=lambda c: c.TAG)
def test_round_trip_byte_at_a_time(cls: type[m.Message]) -> None:
    """Every message type decodes when fed one byte at a time, and only on its last byte."""
    frame = codec.encode(EXAMPLES[cls])
    decoder = codec.FrameDecoder()
    for i, byte in enumerate(frame[:-1]):
        assert decoder.feed(bytes([byte])) == []
        assert decoder.buffered == i + 1
    assert decoder.feed(frame[-1:]) == [EXAMPLES[cls]]
    assert decoder.buffered == 0


def test_several_frames_in_one_chunk() -> None:
    """Every example frame concatenated into one chunk decodes to all of them, in order."""
    expected = list(EXAMPLES.values())
    decoder = codec.FrameDecoder()
    assert decoder.feed(b"".join(codec.encode(msg) for msg in expected)) == expected


def test_trailing_partial_frame_stays_buffered() -> None:
    """Complete frames are returned at once and the start of the next one waits."""
    first, second = codec.encode(m.Pong(seq=1)), codec.encode(m.Pong(seq=2))
    decoder = codec.FrameDecoder()
    assert decoder.feed(first + second[:5]) == [m.Pong(seq=1)]
    assert decoder.buffered == 5
    assert decoder.feed(second[5:]) == [m.Pong(seq=2)]


@FAST
@given(
    st.lists(any_message, min_size=1, max_size=8),
    st.lists(st.integers(0, 2000)),
    st.integers(1, 3),
    st.booleans(),
    st.booleans(),
)
def test_a_limit_decodes_the_same_frames_a_few_at_a_time(
    messages: list[m.Message], cuts: list[int], limit: int, drain: bool, mutable: bool
) -> None:
    """With a ``limit``, ``feed`` returns at most that many messages and keeps the rest of
    the chunk (``pending``) for the next call, ``feed(b"")`` or one with more data: the same
    messages come out in the same order, whatever the chunking."""
    stream = b"".join(codec.encode(msg) for msg in messages)
    decoder = codec.FrameDecoder()
    out: list[m.Message] = []
    for chunk in split(stream, cuts):
        got = decoder.feed(bytearray(chunk) if mutable else chunk, limit)
        assert len(got) <= limit
        out += got
        while drain and decoder.pending:
            got = decoder.feed(b"", limit)
            assert len(got) <= limit
            out += got
    while decoder.pending:
        out += decoder.feed(b"", limit)
    assert out == messages
    assert decoder.buffered == 0
    decoder.check_eof()


def test_a_limit_keeps_the_rest_pending() -> None:
    """Five frames and the start of a sixth, two at a time: the sixth waits for its end."""
    frames = [codec.encode(m.Pong(seq=i)) for i in range(6)]
    decoder = codec.FrameDecoder()
    assert decoder.feed(b"".join(frames[:5]) + frames[5][:3], 2) == [m.Pong(seq=0), m.Pong(seq=1)]
    assert decoder.pending
    assert decoder.feed(b"", 2) == [m.Pong(seq=2), m.Pong(seq=3)]
    assert decoder.feed(b"", 2) == [m.Pong(seq=4)]
    assert not decoder.pending
    assert decoder.buffered == 3
    assert decoder.feed(frames[5][3:], 2) == [m.Pong(seq=5)]


def test_memoryview_and_bytearray_input() -> None:
    """feed accepts bytearray and memoryview as well as bytes."""
    frame = codec.encode(m.Pong(seq=1))
    decoder = codec.FrameDecoder()
    assert decoder.feed(bytearray(frame[:3])) == []
    assert decoder.feed(memoryview(frame)[3:]) == [m.Pong(seq=1)]


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_remote_protocol_error(data: bytes) -> None:
    """Random bytes either decode or raise RemoteProtocolError, never anything else."""
    decoder = codec.FrameDecoder(max_frame_size=1 << 16)
    try:
        decoder.feed(data)
        decoder.check_eof()
    except RemoteProtocolError:
        pass


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bodies_raise_only_remote_protocol_error(body: bytes) -> None:
    """Random bytes framed with a correct length raise nothing but RemoteProtocolError."""
    with contextlib.suppress(RemoteProtocolError):
        codec.FrameDecoder().feed(header(len(body)) + body)


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@FAST
@given(
    st.sampled_from(sorted(m.BY_TAG)),
    st.dictionaries(
        st.sampled_from(
            [
                "seq",
                "build_id",
                "attempt",
                "data",
                "running",
                "outputs",
                "inputs",
                "limits",
                "status",
                "phase",
                "command",
                "env",
                "timings",
                "files",
            ]
        ),
        MSGPACK_VALUES,
        max_size=6,
    ),
)
def test_arbitrary_msgpack_maps_raise_only_remote_protocol_error(
    tag: str, fields: dict[str, object]
) -> None:
    """Well-formed msgpack maps with a known tag and junk fields raise only RemoteProtocolError."""
    body = msgpack.packb({"type": tag, **fields}, use_bin_type=True)
    with contextlib.suppress(RemoteProtocolError):
        codec.FrameDecoder().feed(header(len(body)) + body)


@FAST
@given(any_message, st.data())
def test_mutated_frames_raise_only_remote_protocol_error(
    message: m.Message, data: st.DataObject
) -> None:
    """A valid frame with bytes flipped, inserted or deleted raises only RemoteProtocolError."""
    frame = bytearray(codec.encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        at = data.draw(st.integers(0, len(frame) - 1)) if frame else 0
        if op == "flip" and frame:
            frame[at] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            frame.insert(at, data.draw(st.integers(0, 255)))
        elif frame:
            del frame[at]
    decoder = codec.FrameDecoder(max_frame_size=1 << 16)
    try:
        decoder.feed(bytes(frame))
        decoder.check_eof()
    except RemoteProtocolError:
        pass


def test_oversized_length_is_refused_on_the_header() -> None:
    """A length prefix past the limit is refused as soon as the 4 header bytes arrive."""
    decoder = codec.FrameDecoder(max_frame_size=1000)
    assert decoder.feed(header(1001)[:3]) == []
    with pytest.raises(
        RemoteProtocolError, match="frame of 1001 bytes announced, the limit is 1000"
    ):
        decoder.feed(header(1001)[3:])
    assert decoder.buffered == 0


def test_huge_length_buffers_nothing_of_the_body() -> None:
    """A 4 GiB announcement fails before any of its body is held."""
    decoder = codec.FrameDecoder()
    with pytest.raises(RemoteProtocolError, match="announced"):
        decoder.feed(header(2**32 - 1))
    assert decoder.buffered == 0
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"\0" * 1000)
    assert decoder.buffered == 0


def test_oversized_frame_after_a_good_one() -> None:
    """An oversized header right after a complete frame is still refused on its header."""
    decoder = codec.FrameDecoder(max_frame_size=100)
    decoder.feed(codec.encode(m.Pong(seq=1)))
    with pytest.raises(RemoteProtocolError, match="announced"):
        decoder.feed(header(101))


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    """A body of exactly max_frame_size bytes is within the limit, on both sides."""
    body = codec.encode_body(m.LogChunk(build_id="b", attempt=0, data=b"x" * 50))
    frame = codec.encode(m.LogChunk(build_id="b", attempt=0, data=b"x" * 50), len(body))
    decoder = codec.FrameDecoder(max_frame_size=len(body))
    assert decoder.feed(frame) == [m.LogChunk(build_id="b", attempt=0, data=b"x" * 50)]


def test_encode_refuses_too_large_message() -> None:
    """encode raises LocalProtocolError for a body larger than max_frame_size."""
    message = m.LogChunk(build_id="b", attempt=0, data=b"x" * 1000)
    with pytest.raises(LocalProtocolError, match=r"^log frame of \d+ bytes exceeds the 1000-byte"):
        codec.encode(message, max_frame_size=1000)


def test_encode_default_limit() -> None:
    """The default limit admits a 1 MiB log chunk and refuses one past 8 MiB."""
    assert codec.encode(m.LogChunk(build_id="b", attempt=0, data=bytes(1 << 20)))
    with pytest.raises(LocalProtocolError):
        codec.encode(m.LogChunk(build_id="b", attempt=0, data=bytes(codec.DEFAULT_MAX_FRAME_SIZE)))


def test_check_eof_on_partial_frame() -> None:
    """EOF in the middle of a frame (header or body) is a RemoteProtocolError."""
    frame = codec.encode(m.Pong(seq=1))
    for cut in (1, 4, len(frame) - 1):
        decoder = codec.FrameDecoder()
        decoder.feed(frame[:cut])
        with pytest.raises(RemoteProtocolError, match=f"middle of a frame \\({cut} bytes pending"):
            decoder.check_eof()


def test_check_eof_between_frames() -> None:
    """EOF right after a complete frame (or before any) is clean."""
    decoder = codec.FrameDecoder()
    decoder.check_eof()
    decoder.feed(codec.encode(m.Pong(seq=1)))
    decoder.check_eof()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),  # a reserved byte
        (msgpack.packb({"type": "pong", "seq": 1}) + b"\x00", "not valid msgpack"),  # extra data
        (msgpack.packb([1, 2]), "frame is a list, not a map"),
        (msgpack.packb({1: 2}), "not valid msgpack"),  # strict_map_key: keys are strings
        (b"\x91" * 100_000 + b"\xc0", "not valid msgpack"),  # nesting deeper than msgpack allows
        (b"\x81\xa4type\xa4p\xffng", "not valid msgpack"),  # invalid UTF-8 in a string
    ],
    ids=["empty", "reserved", "extra", "array", "int-key", "deep", "bad-utf8"],
)
def test_bad_bodies(body: bytes, message: str) -> None:
    """Bodies that are not exactly one msgpack map of strings are RemoteProtocolErrors."""
    with pytest.raises(RemoteProtocolError, match=message):
        codec.FrameDecoder().feed(header(len(body)) + body)


def test_decoder_stays_failed() -> None:
    """After an error the decoder raises the same error for any later input, even valid."""
    decoder = codec.FrameDecoder()
    with pytest.raises(RemoteProtocolError) as first:
        decoder.feed(header(1) + b"\xc1")
    for later in (codec.encode(m.Pong(seq=1)), b""):
        with pytest.raises(RemoteProtocolError) as again:
            decoder.feed(later)
        assert again.value is first.value
    assert decoder.buffered == 0


def test_bad_frame_after_good_ones_in_one_chunk() -> None:
    """A bad frame in a chunk fails the whole feed: the connection is over either way."""
    decoder = codec.FrameDecoder()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(codec.encode(m.Pong(seq=1)) + header(1) + b"\xc1")


def test_max_frame_size_must_be_positive() -> None:
    """A decoder with a non-positive limit is a programming error."""
    with pytest.raises(ValueError, match="positive"):
        codec.FrameDecoder(max_frame_size=0)


def test_unencodable_string_is_refused_at_construction() -> None:
    """A str field msgpack cannot encode is refused when the message is built, not at send."""
    with pytest.raises(ValueError, match="path: not valid Unicode"):
        m.UploadData(build_id="b", attempt=0, path="\udcff", offset=0)
    with pytest.raises(ValueError, match="command: not valid Unicode"):
        m.Assign(build_id="b", attempt=1, command=("\ud800",))
    with pytest.raises(ValueError, match="env: not valid Unicode"):
        m.Assign(build_id="b", attempt=1, command=("x",), env={"A": "\ud800"})


@pytest.mark.parametrize("size", [0, 1, 255, 256, 16 * 1024 - 1, 16 * 1024, 65535, 65536, 70000])
def test_encode_parts_is_encode_with_the_data_left_uncopied(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    for message in (
        m.UploadData(build_id="b", attempt=2, path="out/x", offset=7, data=data, eof=True),
        m.FetchData(request_id=3, data=data, eof=size % 2 == 0),
    ):
        parts = codec.encode_parts(message)
        assert b"".join(parts) == codec.encode(message)
        if size >= codec.ZERO_COPY_MIN:
            assert len(parts) == 3 and parts[1] is data
        else:
            assert len(parts) == 1
        assert codec.FrameDecoder().feed(b"".join(parts)) == [message]


def test_encode_parts_checks_the_frame_size() -> None:
    message = m.FetchData(request_id=1, data=bytes(codec.ZERO_COPY_MIN))
    with pytest.raises(LocalProtocolError, match="exceeds"):
        codec.encode_parts(message, max_frame_size=codec.ZERO_COPY_MIN)
