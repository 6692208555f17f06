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
from hydra_trio.protocol.messages import Message, from_wire, to_wire

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
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack
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
        self._failed: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        if self._failed is not None:
            raise self._failed
        buffer = self._buffer
        # The usual case on an interactive link (pings, pongs, progress): `data` is exactly one
        # small frame.  Decode it straight away, without the general loop's views and
        # bookkeeping; anything else (several frames, a partial one, a large one) takes the loop.
        if not buffer and type(data) is bytes and _HEADER_SIZE < len(data) <= _SMALL_FRAME:
            (length,) = _unpack_header(data)
            if length == len(data) - _HEADER_SIZE and length <= self.max_frame_size:
                try:
                    return [decode_body(data[_HEADER_SIZE:])]  # (a copy, of a small frame)
                except RemoteProtocolError as exc:
                    self._failed = exc
                    raise
        # Usually nothing is pending: parse frames straight out of `data` and keep only an
        # incomplete tail, instead of copying every received byte through the buffer.
        source: bytes | bytearray | memoryview = buffer if buffer else data
        if buffer:
            buffer += data
        messages: list[Message] = []
        offset = 0
        try:
            with memoryview(source) as view:
                end = len(view)
                while end - offset >= _HEADER_SIZE:
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
        except RemoteProtocolError as exc:
            self._failed = exc
            buffer.clear()
            raise
        if source is buffer:
            del buffer[:offset]  # (only once no view of the buffer is left)
        elif offset < len(data):
            buffer += data[offset:]
        return messages

    def check_eof(self) -> None:
        """Call at end of stream: raises ``RemoteProtocolError`` if a frame was cut short."""
        if self._buffer:
            raise RemoteProtocolError(
                f"connection closed in the middle of a frame ({len(self._buffer)} bytes pending)"
            )
