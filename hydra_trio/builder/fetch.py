"""Fetching input files from the runner into the builder's verified cache.

An ``InputFetcher`` is the builder's end of one session's input transfers.  ``fetch`` returns
the cached file at ``<work dir>/cache/<sha256[:2]>/<sha256>`` when it is there, else pulls
the file with ``FetchRequest``s of ``FETCH_CHUNK`` bytes, ``FETCH_WINDOW`` of them in flight.
The session hands each ``FetchData`` frame to ``deliver``; a runner that sends more than was
asked for is refused (``deliver`` returns False and the session ends), so it can never make
the builder buffer more than the window.  The file is written and hashed as it arrives
(``diskio.HashingFile``, in worker threads beside the receiving) and enters the cache,
read-only, only if its size and hash are the ones the runner listed.  Nothing arriving for
``fetch_timeout`` seconds, an error from the runner, or a mismatch raises ``FetchError``
(the attempt fails as ``fetch-failed`` and is retried); a disk error raises ``OSError``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import attrs
import trio

from hydra_trio.builder.attempt import Send
from hydra_trio.builder.inputs import FetchError
from hydra_trio.diskio import HashingFile, HashMismatch, beside, receiving
from hydra_trio.protocol.messages import (
    Assign,
    FetchData,
    FetchRequest,
    FileInfo,
    InputSpec,
    ListData,
    ListRequest,
)
from hydra_trio.protocol.validators import MAX_LIST

#: Input bytes asked for per FetchRequest (what the runner reads in one thread hop; it answers
#: in frames of ``codec.TRANSFER_FRAME``), and requests in flight: enough to keep a loopback or
#: LAN link busy, few enough that a fetch holds at most FETCH_WINDOW x FETCH_CHUNK in memory.
FETCH_CHUNK = 1024 * 1024
FETCH_WINDOW = 4


@attrs.define(eq=False)
class InputFetcher:
    """Fetches input files over one session into ``cache`` (see the module docstring)."""

    cache: Path
    send: Send
    fetch_timeout: float
    _transfers: dict[int, _Transfer] = attrs.field(factory=dict, init=False)
    _next_request: int = attrs.field(default=0, init=False)
    #: (1.3) the listing requests waiting for their one ``ListData``.
    _listings: dict[int, trio.MemorySendChannel[ListData]] = attrs.field(factory=dict, init=False)

    def deliver_listing(self, message: ListData) -> bool:
        """Hand a ``ListData`` frame to its request (that of a request that is over is
        dropped).  False: a second answer to one request, a protocol violation."""
        waiting = self._listings.get(message.request_id)
        if waiting is None:
            return True
        try:
            waiting.send_nowait(message)
        except trio.WouldBlock:
            return False
        return True

    async def listing(self, assign: Assign, spec: InputSpec) -> tuple[FileInfo, ...]:
        """(1.3) The output listing of the input ``spec`` (sent with ``listed``), asked for
        piece by piece (``ListRequest``, one in flight); a runner error, nothing arriving for
        ``fetch_timeout`` or a listing longer than a result can hold raises ``FetchError``."""
        files: list[FileInfo] = []
        while True:
            request_id = self._next_request
            self._next_request += 1
            send, receive = trio.open_memory_channel[ListData](1)
            self._listings[request_id] = send
            try:
                await self.send(
                    ListRequest(
                        request_id=request_id,
                        build_id=assign.build_id,
                        attempt=assign.attempt,
                        of=spec.build_id,
                        start=len(files),
                    )
                )
                with trio.move_on_after(self.fetch_timeout) as stall:
                    answer = await receive.receive()
            finally:
                del self._listings[request_id]
            where = f"listing $IN/{spec.name}"
            if stall.cancelled_caught:
                raise FetchError(f"{where}: nothing received for {self.fetch_timeout:g} s")
            if answer.error:
                raise FetchError(f"{where}: {answer.error}")
            if not answer.files and not answer.end:
                raise FetchError(f"{where}: the runner sent an empty piece before the end")
            files.extend(answer.files)
            if len(files) > MAX_LIST:
                raise FetchError(f"{where}: more than {MAX_LIST} files")
            if answer.end:
                return tuple(files)

    def deliver(self, message: FetchData) -> bool:
        """Hand a ``FetchData`` frame to its fetch (the frame of a fetch that is over is
        dropped).  False: it carries more than was asked for, a protocol violation."""
        transfer = self._transfers.get(message.request_id)
        return transfer is None or transfer.deliver(message)

    async def fetch(self, assign: Assign, info: FileInfo) -> Path:
        """Bring one input file into the cache (unless it is there) and return its path.

        Chunks are pulled FETCH_WINDOW at a time; nothing arriving for ``fetch_timeout``
        raises ``FetchError``, as does a size or hash that does not match."""
        target = self.cache / info.sha256[:2] / info.sha256
        if await trio.to_thread.run_sync(_cached, target, info.size):
            return target
        request_id = self._next_request
        self._next_request += 1
        transfer = self._transfers[request_id] = _Transfer(assign, info, request_id)
        try:
            async with receiving(self.cache / "tmp" / f"{request_id}-{info.sha256}") as file:
                # Disk and network at the same time: the frames received go to a task that
                # writes (and hashes) them in a worker thread while the next ones arrive.  The
                # window counts bytes taken from the inbox, and the hand-over holds one batch,
                # so a slow disk closes the window instead of letting the frames pile up.
                batches, taken = trio.open_memory_channel[list[bytes]](1)

                async def receive() -> None:
                    async with batches:
                        await self._receive(transfer, batches)

                await beside(receive, functools.partial(_write_behind, file, taken))
                await trio.to_thread.run_sync(_keep, file, target, info)
        finally:
            del self._transfers[request_id]
        return target

    async def _receive(
        self, transfer: _Transfer, batches: trio.MemorySendChannel[list[bytes]]
    ) -> None:
        """Request the file's chunks (FETCH_WINDOW in flight) and pass what arrives on to
        ``batches`` about FETCH_CHUNK bytes at a time, until the end of the file."""
        pending: list[bytes] = []
        pending_size = 0
        while transfer.wanted:
            await transfer.fill_window(self.send)
            with trio.move_on_after(self.fetch_timeout) as stall:
                batch = await transfer.next_batch()
            if stall.cancelled_caught:
                where = transfer.info.path
                raise FetchError(f"fetching {where}: nothing received for {self.fetch_timeout:g} s")
            for chunk in batch:
                pending.append(chunk.data)
                pending_size += len(chunk.data)
            if pending_size >= FETCH_CHUNK or transfer.ended:
                await batches.send(pending)
                pending, pending_size = [], 0
            if transfer.ended:
                break


@attrs.define(eq=False)
class _Transfer:
    """One file being fetched: what was requested and received, and the ``FetchData``
    frames delivered and not yet taken.  ``expected`` counts the bytes asked for and not
    yet delivered, so a runner sending more than that cannot make the builder buffer it."""

    assign: Assign
    info: FileInfo
    request_id: int
    requested: int = 0
    received: int = 0
    expected: int = 0
    #: the last frame ended the file (or was empty: the runner has no more).
    ended: bool = False
    _send: trio.MemorySendChannel[FetchData] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[FetchData] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # Unbounded, but never beyond ``expected``: bounded by the window (see ``deliver``).
        self._send, self._receive = trio.open_memory_channel[FetchData](math.inf)

    def deliver(self, message: FetchData) -> bool:
        """Queue a frame for the fetch; False if it carries more than was asked for (or
        nothing, without being the end of the file or an error: the runner never sends that)."""
        if len(message.data) > self.expected or not (message.data or message.eof or message.error):
            return False
        self.expected -= len(message.data)
        self._send.send_nowait(message)
        return True

    async def fill_window(self, send: Send) -> None:
        """Request chunks until FETCH_WINDOW x FETCH_CHUNK bytes are in flight (or all of the
        file is requested; an empty file takes one request)."""
        size = self.info.size
        while self.requested - self.received < FETCH_WINDOW * FETCH_CHUNK and (
            self.requested < size or self.requested == 0
        ):
            # Counted before it is sent: the answer may arrive before send returns.
            self.expected += FETCH_CHUNK
            offset, self.requested = self.requested, self.requested + FETCH_CHUNK
            await send(
                FetchRequest(
                    request_id=self.request_id,
                    build_id=self.assign.build_id,
                    attempt=self.assign.attempt,
                    sha256=self.info.sha256,
                    offset=offset,
                    length=FETCH_CHUNK,
                )
            )

    async def next_batch(self) -> list[FetchData]:
        """Wait for the next frame and take whatever else has arrived with it; raise
        ``FetchError`` if the runner reports an error."""
        batch = [await self._receive.receive()]
        while not (batch[-1].eof or batch[-1].error or not batch[-1].data):
            try:
                batch.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        last = batch[-1]
        if last.error:
            raise FetchError(f"fetching {self.info.path}: {last.error}")
        self.received += sum(len(chunk.data) for chunk in batch)
        self.ended = last.eof or not last.data
        return batch

    @property
    def wanted(self) -> bool:
        """Bytes of the file are still to come (an empty file: until its one request)."""
        return self.received < self.info.size or (self.info.size == 0 and self.requested == 0)


async def _write_behind(file: HashingFile, batches: trio.MemoryReceiveChannel[list[bytes]]) -> None:
    """Write (and hash) the batches of a fetch in worker threads, one at a time, in order.  A
    failed write propagates and so cancels the receiving (``beside``); the channel is left
    open for that, as closing it would fail the receiver's send with a second error."""
    async for chunks in batches:
        await file.write(chunks)


def _keep(file: HashingFile, target: Path, info: FileInfo) -> None:
    """Move a fetched file into the cache, read-only, if it is what was asked for."""
    try:
        file.commit(target, info.size, info.sha256)
    except HashMismatch as exc:
        raise FetchError(
            f"fetched {exc.size} bytes with sha256 {exc.sha256}, "
            f"expected {exc.expected_size} bytes with {exc.expected_sha256}"
        ) from None


def _cached(target: Path, size: int) -> bool:
    try:
        return target.stat().st_size == size
    except FileNotFoundError:
        return False
