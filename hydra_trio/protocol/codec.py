"""Length-prefixed msgpack framing.

Theory of operation
-------------------
A frame is a 4-byte unsigned big-endian body length followed by that many bytes of msgpack,
which must decode to exactly one map (see ``messages``).  ``FrameDecoder.feed`` accepts bytes in
any chunking and returns every message completed by them.

Rules:

- The length prefix is checked against ``max_frame_size`` *before* any of the body is buffered,
  so a peer cannot make us hold more than one maximum frame plus one read.
- Anything that is not a valid frame raises ``RemoteProtocolError`` and nothing else: msgpack's
  own exceptions, recursion limits and validation failures are all translated here.  After an
  error the decoder is poisoned; the connection must be closed.
"""

from __future__ import annotations

import struct

import msgpack

from hydra_trio.protocol.errors import LocalProtocolError, RemoteProtocolError
from hydra_trio.protocol.messages import FetchData, Message, UploadData, from_wire, to_wire

#: Default limit on one frame's body.  Large enough for a 1 MiB log or upload chunk with room to
#: spare; small enough that a hostile peer cannot make the runner buffer much per connection.
DEFAULT_MAX_FRAME_SIZE = 8 * 1024 * 1024
#: The most file bytes one ``UploadData`` or ``FetchData`` frame carries.  Liveness counts
#: complete frames (a pong queued behind a transfer arrives only after it), so a frame must
#: cross even a slow or lossy link well within a ping timeout: 64 KiB is 0.3 s at 200 KB/s, and
#: about 8 s at the ~8 KB/s TCP manages under 30 % loss with a 400 ms round trip.  Disk I/O
#: and thread hops work on 1 MiB at a time, split into frames of this size.
TRANSFER_FRAME = 64 * 1024

HEADER = struct.Struct(">I")
_HEADER_SIZE = HEADER.size
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack
_packer = msgpack.Packer(use_bin_type=True, autoreset=True)
_packb = _packer.pack
_pack_map_header = _packer.pack_map_header
_unpackb = msgpack.unpackb
#: Frames up to this size take ``FrameDecoder.feed``'s fast path, which copies the body once.
_SMALL_FRAME = 64 * 1024


def encode_body(message: Message) -> bytes:
    """The msgpack body of a message, without the length prefix."""
    return _packb(to_wire(message))  # type: ignore[no-any-return]


def encode(message: Message, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """One complete frame.  Raises ``LocalProtocolError`` if it exceeds ``max_frame_size``."""
    body = _packb(to_wire(message))
    if len(body) > max_frame_size:
        raise LocalProtocolError(
            f"{message.TAG} frame of {len(body)} bytes exceeds the {max_frame_size}-byte limit"
        )
    return _pack_header(len(body)) + body  # type: ignore[no-any-return]


#: The messages carrying file bytes in ``data``, and how long ``data`` must be for
#: ``encode_parts`` to leave it out of the frame's other bytes.
_BULK = frozenset({UploadData, FetchData})
ZERO_COPY_MIN = 16 * 1024
_DATA_KEY = _packb("data")
_BIN8, _BIN16, _BIN32 = struct.Struct(">BB"), struct.Struct(">BH"), struct.Struct(">BI")


def _bin_header(length: int) -> bytes:
    """The msgpack header of a ``bin`` of ``length`` bytes (as ``msgpack.packb`` writes it)."""
    if length < 0x100:
        return _BIN8.pack(0xC4, length)
    if length < 0x10000:
        return _BIN16.pack(0xC5, length)
    return _BIN32.pack(0xC6, length)


def encode_parts(message: Message, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> list[bytes]:
    """One complete frame, as buffers to be sent one after the other: the same bytes as
    ``encode``, but the ``data`` of an ``UploadData`` or ``FetchData`` of ``ZERO_COPY_MIN``
    bytes or more is a part of its own, the object itself, not a copy (a vectored write sends
    it straight from there).  Raises ``LocalProtocolError`` if it exceeds ``max_frame_size``."""
    if type(message) not in _BULK:
        return [encode(message, max_frame_size)]
    data: bytes = message.data  # type: ignore[union-attr,assignment]
    if len(data) < ZERO_COPY_MIN:
        return [encode(message, max_frame_size)]
    wire = to_wire(message)
    before = [_pack_map_header(len(wire))]
    after: list[bytes] = []
    into = before
    for key, value in wire.items():
        if key == "data":
            before.append(_DATA_KEY)
            before.append(_bin_header(len(data)))
            into = after
        else:
            into.append(_packb(key))
            into.append(_packb(value))
    head, tail = b"".join(before), b"".join(after)
    length = len(head) + len(data) + len(tail)
    if length > max_frame_size:
        raise LocalProtocolError(
            f"{message.TAG} frame of {length} bytes exceeds the {max_frame_size}-byte limit"
        )
    return [_pack_header(length) + head, data, tail]


def decode_body(body: bytes | memoryview) -> Message:
    """Decode one frame body into a message, or raise ``RemoteProtocolError``."""
    try:
        raw = _unpackb(body)  # msgpack >= 1.0 defaults: raw=False, strict_map_key, use_list
    except Exception as exc:  # msgpack raises many kinds; every one means a bad frame
        raise RemoteProtocolError(
            f"frame body is not valid msgpack ({type(exc).__name__}: {exc})"
        ) from None
    return from_wire(raw)


class FrameDecoder:
    """Incremental decoder: ``feed(data)`` returns the messages completed by ``data``."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_frame_size <= 0:
            raise ValueError("max_frame_size must be positive")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        #: what a ``feed`` with a ``limit`` left undecoded: bytes beginning at a frame boundary
        #: at the offset given (complete frames, then perhaps the start of one).
        self._rest: tuple[bytes, int] | None = None
        self._failed: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    @property
    def pending(self) -> bool:
        """Whether bytes fed earlier are still to be decoded (``feed(b"")`` decodes them)."""
        return self._rest is not None

    def feed(self, data: bytes | bytearray | memoryview, limit: int = 0) -> list[Message]:
        """The messages ``data`` completes; with a ``limit``, at most that many, the rest of
        ``data`` kept for the next call (``pending``): one read of 256 KiB can bring 2,000
        small frames, ~20 ms to decode on an idle core and more on a busy one, which the
        caller may want to interleave with other work."""
        if self._failed is not None:
            raise self._failed
        start = 0
        if self._rest is not None:
            rest, start = self._rest
            self._rest = None
            if data:  # (not how a channel feeds: it takes what is pending first)
                data, start = rest[start:] + bytes(data), 0
            else:
                data = rest
        buffer = self._buffer
        # The usual case on an interactive link (pings, pongs, progress): `data` is exactly one
        # small frame.  Decode it straight away, without the general loop's views and
        # bookkeeping; anything else (several frames, a partial one, a large one) takes the loop.
        if (
            not start
            and not buffer
            and type(data) is bytes
            and _HEADER_SIZE < len(data) <= _SMALL_FRAME
        ):
            (length,) = _unpack_header(data)
            if length == len(data) - _HEADER_SIZE and length <= self.max_frame_size:
                try:
                    return [decode_body(data[_HEADER_SIZE:])]  # (a copy, of a small frame)
                except RemoteProtocolError as exc:
                    self._failed = exc
                    raise
        # Parse frames straight out of `data` and keep only an incomplete tail, instead of
        # copying every received byte through the buffer.  A frame begun by an earlier read
        # is completed first, with just the bytes of `data` it still needs.
        messages: list[Message] = []
        offset = start
        try:
            with memoryview(data) as view:
                end = len(view)
                if buffer:
                    offset = self._complete(buffer, view, messages)
                    if offset < 0:
                        return messages  # all of `data` went into the buffer
                while end - offset >= _HEADER_SIZE:
                    if limit and len(messages) >= limit:
                        self._rest = (data if type(data) is bytes else bytes(view), offset)
                        return messages
                    (length,) = _unpack_header(view, offset)
                    if length > self.max_frame_size:
                        raise RemoteProtocolError(
                            f"frame of {length} bytes announced, the limit is {self.max_frame_size}"
                        )
                    start = offset + _HEADER_SIZE
                    if end - start < length:
                        break
                    with view[start : start + length] as body:
                        messages.append(decode_body(body))
                    offset = start + length
                if offset < end:
                    buffer += view[offset:]
        except RemoteProtocolError as exc:
            self._failed = exc
            buffer.clear()
            raise
        return messages

    def _complete(self, buffer: bytearray, view: memoryview, messages: list[Message]) -> int:
        """Add to ``buffer`` (a frame's beginning) what ``view`` has of the rest; decode the
        frame into ``messages`` if that completes it.  Returns how much of ``view`` was used,
        or -1 when all of it was and the frame is still incomplete."""
        offset = 0
        if len(buffer) < _HEADER_SIZE:
            offset = min(_HEADER_SIZE - len(buffer), len(view))
            buffer += view[:offset]
            if len(buffer) < _HEADER_SIZE:
                return -1
        (length,) = _unpack_header(buffer)
        if length > self.max_frame_size:
            raise RemoteProtocolError(
                f"frame of {length} bytes announced, the limit is {self.max_frame_size}"
            )
        need: int = _HEADER_SIZE + length - len(buffer)
        if len(view) - offset < need:
            buffer += view[offset:]
            return -1
        buffer += view[offset : offset + need]
        with memoryview(buffer) as whole, whole[_HEADER_SIZE:] as body:
            messages.append(decode_body(body))
        buffer.clear()  # (only once no view of it is left)
        return offset + need

    def check_eof(self) -> None:
        """Call at end of stream: raises ``RemoteProtocolError`` if a frame was cut short."""
        if self._buffer:
            raise RemoteProtocolError(
                f"connection closed in the middle of a frame ({len(self._buffer)} bytes pending)"
            )
