"""Serving a builder's ``FetchRequest``s: many small reads per thread hop, off the receive loop.

The receive loop checks each request (fencing, the input list, the length) and queues it, with
its error if it has one, on ``FetchServer.queue``; ``FetchServer.run``, a task of the session's
background nursery, takes every request queued meanwhile (at most ``SERVE_BATCH`` requests and
about ``SERVE_BATCH_BYTES``, 1 MiB: a large file's requests go one per hop), reads them all in
one worker thread (``READERS`` batches at once) and posts the answers, in the order the
requests arrived.  A builder fetching 100,000 small files with several requests in flight so
costs the runner a thread hop per batch instead of one per file, and its receive loop goes on
reading (pings included) while the reads run.  The queue is bounded (``QUEUE_SIZE``): a
builder asking faster than the disk reads finds the receive loop waiting, as it did when each
request was served inline.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from hydra_trio.protocol.messages import (
    MAX_FETCH_FILES_BYTES,
    FetchData,
    FetchFiles,
    FetchRequest,
    Message,
)
from hydra_trio.runner.blobs import BlobError, BlobStore
from hydra_trio.runner.metrics import FarmMetrics

#: Requests read in one thread hop (a ``FetchFiles`` counts as its files), and about this many
#: bytes (the sum of their lengths).  The
#: byte cap is one ``MAX_FETCH_CHUNK`` (1 MiB): a large file's requests are read one per hop, so
#: the frames of the first go out while the next is read, instead of a whole window (up to
#: 8 MiB before) being read before any frame of it is posted.  Small files still share a hop.
SERVE_BATCH = 128
SERVE_BATCH_BYTES = 1024 * 1024
#: What a ``FetchFiles`` counts towards ``SERVE_BATCH_BYTES`` (its answer holds at most
#: ``MAX_FETCH_FILES_BYTES``, the reference builder's at most 256 KiB).
FILES_WEIGHT = SERVE_BATCH_BYTES // 4
#: Requests queued and not yet read before the receive loop waits.
QUEUE_SIZE = 256
#: Batches read at once, each in its worker thread.  One at a time, the reading thread waited
#: for the event loop twice a batch (a thread hop there and back: 0.8 ms a 1 MiB request on a
#: busy runner), and reading a large upload back from the disk (``diskio.read_direct``, not
#: from the page cache) took 1.4 ms: the hops were a third of a fetch's time on the runner.
READERS = 2


#: A request and the error to answer it with ("": read it).
Queued = tuple["FetchRequest | FetchFiles", str]


@attrs.define(eq=False)
class FetchServer:
    """Answers one session's fetch requests (see the module docstring)."""

    blobs: BlobStore
    metrics: FarmMetrics
    #: ``BuilderSession.post``: queue a frame for the builder.
    post: Callable[[Message], None]
    #: the size of the pieces an answer is cut into (``codec.TRANSFER_FRAME``).
    piece: int
    _send: trio.MemorySendChannel[Queued] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[Queued] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel(QUEUE_SIZE)

    async def queue(self, request: FetchRequest | FetchFiles, error: str = "") -> None:
        """Answer ``request`` after those queued before it: with ``error`` if one is given."""
        await self._send.send((request, error))

    async def run(self) -> None:
        """Read and answer the queued requests, a batch per thread hop, until cancelled:
        ``READERS`` batches read at once, their answers posted in the order they arrived."""
        readers = trio.Semaphore(READERS)
        posted = trio.Event()
        posted.set()
        async with trio.open_nursery() as nursery:
            await readers.acquire()  # (before taking a batch: it takes all queued by then)
            async for first in self._receive:
                batch = [first]
                files, size = _weight(first[0])
                while files < SERVE_BATCH and size < SERVE_BATCH_BYTES:
                    try:
                        item = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    batch.append(item)
                    more, bytes_ = _weight(item[0])
                    files, size = files + more, size + bytes_
                before, posted = posted, trio.Event()
                nursery.start_soon(self._answer, batch, before, posted, readers)
                await readers.acquire()

    async def _answer(
        self,
        batch: list[Queued],
        before: trio.Event,
        posted: trio.Event,
        readers: trio.Semaphore,
    ) -> None:
        """Read ``batch`` in a worker thread, then post its answers once those of the batch
        before it are (``before``); ``posted`` then, and a reader freed."""
        try:
            answers = await trio.to_thread.run_sync(self._read, batch)
            await before.wait()
            sent = 0
            for frames in answers:
                for frame in frames:
                    self.post(frame)
                    sent += len(frame.data)
            self.metrics.fetched_bytes.inc(sent)
            posted.set()
        finally:
            readers.release()

    def _read(self, batch: list[Queued]) -> list[list[FetchData]]:
        """The answer to each request (in a worker thread)."""
        answers: list[list[FetchData]] = []
        for msg, error in batch:
            if not error:
                try:
                    if isinstance(msg, FetchFiles):
                        answers.append(self._files(msg))
                        continue
                    pieces, eof = self.blobs.read_pieces(
                        msg.sha256, msg.offset, msg.length, self.piece
                    )
                except BlobError as exc:
                    error = str(exc)
                except (OSError, OverflowError) as exc:  # the offset comes from the builder
                    why = getattr(exc, "strerror", None) or exc
                    where = "a file"
                    if isinstance(msg, FetchRequest):
                        where = f"{msg.sha256} at offset {msg.offset}"
                    error = f"cannot read {where}: {why}"
                else:
                    last = len(pieces) - 1
                    answers.append(
                        [
                            FetchData(request_id=msg.request_id, data=p, eof=eof and i == last)
                            for i, p in enumerate(pieces)
                        ]
                    )
                    continue
            answers.append([FetchData(request_id=msg.request_id, error=error)])
        return answers

    def _files(self, msg: FetchFiles) -> list[FetchData]:
        """(1.7) The answer to a ``FetchFiles``: each file whole, one after the other, in
        pieces of ``piece`` bytes, the last with ``eof``; one ``error`` frame if they hold more
        than ``MAX_FETCH_FILES_BYTES`` together (``BlobError``, ``OSError``: the caller's)."""
        contents = self.blobs.read_many(msg.files, MAX_FETCH_FILES_BYTES)
        if contents is None:
            return [
                FetchData(
                    request_id=msg.request_id,
                    error=f"the files hold more than {MAX_FETCH_FILES_BYTES} bytes",
                )
            ]
        joined = b"".join(contents)  # (one piece: itself, not a copy)
        step = self.piece
        pieces = [joined[at : at + step] for at in range(0, len(joined), step)] or [b""]
        last = len(pieces) - 1
        return [
            FetchData(request_id=msg.request_id, data=p, eof=i == last)
            for i, p in enumerate(pieces)
        ]


def _weight(msg: FetchRequest | FetchFiles) -> tuple[int, int]:
    """What a request counts towards a thread hop's ``SERVE_BATCH`` files and
    ``SERVE_BATCH_BYTES``: a ``FetchFiles`` its files and ``FILES_WEIGHT`` bytes (its size is
    known only once read), so a hop reads at most 4 of them, 4 MiB at the very most."""
    if isinstance(msg, FetchFiles):
        return len(msg.files), FILES_WEIGHT
    return 1, msg.length
