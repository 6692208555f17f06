"""Fetching input files from the runner into the builder's verified cache, and into ``$IN``.

An ``InputFetcher`` is the builder's end of one session's input transfers.  ``place`` puts a
build's input files under ``$IN``: it checks which contents the cache (``cache.InputCache``)
lacks, a batch of files per thread hop, fetches those, and links the cache entries into place
(reflink, hard link, or copy as a fallback; read-only), again a batch per thread hop.

Small files (up to ``SMALL_FILE`` bytes) are fetched pipelined: from a runner of 1.7 on
(``many``), a ``FetchFiles`` for up to ``FILES_PER_REQUEST`` of them (``FILES_REQUEST_BYTES``
together), answered by their bytes one after the other; from an older one, a ``FetchRequest``
each for the whole file.  Up to ``SMALL_WINDOW`` requests (and ``SMALL_WINDOW_BYTES``) are in
flight, sent several per write; what arrives is checked (size, sha256), written into the
cache where it stays and linked at its targets at once (``InputCache.write``) by a writer task
beside the receiving, as many files per thread hop as have arrived meanwhile.
Larger files are pulled one at a time by ``fetch`` with ``FetchRequest``s of ``FETCH_CHUNK``
bytes, ``FETCH_WINDOW`` of them in flight, written and hashed as they arrive
(``diskio.HashingFile``, in worker threads beside the receiving).

The session hands each ``FetchData`` frame to ``deliver``; a runner that sends more than was
asked for is refused (``deliver`` returns False and the session ends), so it can never make
the builder buffer more than the window.  A file enters the cache, read-only, only if its size
and hash are the ones the runner listed.  Nothing arriving for ``fetch_timeout`` seconds
while requests are in flight, an error from the runner, or a mismatch raises ``FetchError``
(the attempt fails as ``fetch-failed`` and is retried); a disk error raises ``OSError``.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import attrs
import trio

from hydra_trio.builder.attempt import Send, SendAll
from hydra_trio.builder.cache import Fetched, InputCache, Target
from hydra_trio.builder.inputs import FetchError, Placement
from hydra_trio.diskio import HashingFile, HashMismatch, beside, receiving
from hydra_trio.protocol.messages import (
    Assign,
    FetchData,
    FetchFiles,
    FetchRequest,
    FileInfo,
    InputSpec,
    ListData,
    ListRequest,
    Message,
)
from hydra_trio.protocol.validators import MAX_LIST

#: Input bytes asked for per FetchRequest (what the runner reads in one thread hop; it answers
#: in frames of ``codec.TRANSFER_FRAME``), and requests in flight: enough to keep a loopback or
#: LAN link busy, few enough that a fetch holds at most FETCH_WINDOW x FETCH_CHUNK in memory
#: (here and in the runner's outbox, per large file being fetched).  With 4 in flight a fetch
#: of 512 MiB over loopback waited on the round trips (neither side busy, 400-450 MB/s); 16
#: made it 1.3x faster (8: 1.1x; 32: no faster, 20 MiB more RSS; docs/performance.md).
FETCH_CHUNK = 1024 * 1024
FETCH_WINDOW = 16
#: Files up to this size are fetched pipelined, each with one request for all of it (answered
#: in at most 4 frames); ``SMALL_WINDOW`` requests and ``SMALL_WINDOW_BYTES`` in flight bound
#: what the builder holds (a file is kept in memory from its answer until its batch is written).
#: 256 in flight (as many as the runner queues before its receive loop waits,
#: ``fetches.QUEUE_SIZE``) instead of 64: 30,000 small files on tmpfs 3.7-4.1 -> 3.1-3.2 s,
#: 100,000: 12.6 -> 11.2 s (both sides were mostly idle, waiting on round trips).
SMALL_FILE = 256 * 1024
SMALL_WINDOW = 256
SMALL_WINDOW_BYTES = 8 * 1024 * 1024
#: A writer's thread hop takes at most this many arrived files (or bytes), and a check or a
#: placement in the cache this many files.
SMALL_BATCH = 512
SMALL_BATCH_BYTES = 4 * 1024 * 1024
CACHE_BATCH = 1000
#: (1.7) A ``FetchFiles`` names at most this many files holding at most this many bytes
#: together (an answer of one ``FetchData`` frame, ``codec.TRANSFER_FRAME``).
FILES_PER_REQUEST = 128
FILES_REQUEST_BYTES = 64 * 1024


@attrs.define(eq=False)
class InputFetcher:
    """Fetches input files over one session into ``cache`` (see the module docstring)."""

    cache: Path
    send: Send
    fetch_timeout: float
    #: several frames in one write; None: one ``send`` each.
    send_all: SendAll | None = None
    #: (1.7) the runner takes ``FetchFiles``: many small files per request.
    many: bool = False
    entries: InputCache = attrs.field(init=False)
    _transfers: dict[int, _Transfer] = attrs.field(factory=dict, init=False)
    _small: dict[int, _SmallFetch] = attrs.field(factory=dict, init=False)
    _next_request: int = attrs.field(default=0, init=False)
    #: (1.3) the listing requests waiting for their one ``ListData``.
    _listings: dict[int, trio.MemorySendChannel[ListData]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.entries = InputCache(self.cache)

    async def __call__(self, assign: Assign, info: FileInfo) -> Path:
        """``fetch``: an ``InputFetcher`` is an ``inputs.Fetch``, and has ``place`` too."""
        return await self.fetch(assign, info)

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
        if transfer is not None:
            return transfer.deliver(message)
        small = self._small.get(message.request_id)
        return small is None or small.deliver(message)

    async def place(self, assign: Assign, files: Sequence[Placement]) -> None:
        """Put each file at its target (whose directory exists, the file not): fetched into the
        cache unless it is there, then linked from it, read-only (see the module docstring).
        Which contents the cache lacks is checked a batch at a time as the small fetches need
        more (the first requests go out after one batch, not after 100,000 checks), and a
        small file fetched is placed as it is written (``InputCache.write``)."""
        contents, targets = await trio.to_thread.run_sync(_by_content, files)
        lacking = _Lacking(self, contents)
        placed = await self._fetch_small(assign, lacking, targets)
        for info in lacking.large:
            await self.fetch(assign, info)
        if placed:
            files = await trio.to_thread.run_sync(_unplaced, files, placed)
        for start in range(0, len(files), CACHE_BATCH):
            placing = files[start : start + CACHE_BATCH]
            again = await trio.to_thread.run_sync(self._link, placing, False)
            if again:  # changed in the cache since it was fetched or checked: fetch it anew
                for info, _ in again:
                    await self.fetch(assign, info)
                await trio.to_thread.run_sync(self._link, again, True)

    def _lacking(self, contents: list[FileInfo]) -> list[FileInfo]:
        return [info for info in contents if not self.entries.has(info.sha256, info.size)]

    def _link(self, files: Sequence[Placement], last: bool) -> list[Placement]:
        """Place each file from the cache (in a thread): a packed one as a copy of its bytes,
        another as a link of its entry; return those whose blob or entry has gone (tampered
        with, so forgotten or removed), unless this is the ``last`` try."""
        gone: list[Placement] = []
        placing = [(info.sha256, info.size, info.executable, target) for info, target in files]
        for index in self.entries.place_packed(placing):
            info, target = files[index]
            try:
                self.entries.place(info.sha256, info.size, info.executable, target)
            except FileNotFoundError:
                if last:
                    raise
                gone.append((info, target))
        return gone

    async def _fetch_small(
        self, assign: Assign, lacking: _Lacking, targets: dict[str, list[Target]]
    ) -> set[str]:
        """Fetch the small files the cache ``lacking``, pipelined, and place each at its
        ``targets`` (module docstring); return their hashes."""
        placed: set[str] = set()
        arrived_send, arrived = trio.open_memory_channel[_SmallFetch](math.inf)  # <= window
        batches, taken = trio.open_memory_channel[list[_SmallFetch]](1)
        # the requests of this call still unanswered, to forget if it ends early (not every
        # request made: that list would keep every fetched file's data until the last one)
        asked: set[int] = set()

        async def receive() -> None:
            async with batches:
                in_flight = in_bytes = 0
                more = True
                pending: list[_SmallFetch] = []
                pending_files = pending_bytes = 0
                requests: list[Message] = []

                async def flush() -> None:
                    """Send the requests made and not yet sent."""
                    if requests:
                        made = requests[:]
                        requests.clear()
                        await self._send_many(made)

                while more or in_flight:
                    while more and in_flight < SMALL_WINDOW and in_bytes < SMALL_WINDOW_BYTES:
                        # what is made goes out before the next batch is checked
                        group = await lacking.next_group(self.many, flush)
                        if not group:
                            more = False
                            break
                        small = _SmallFetch(group, self._next_request, arrived_send, many=self.many)
                        self._next_request += 1
                        self._small[small.request_id] = small
                        asked.add(small.request_id)
                        requests.append(small.request(assign))
                        in_flight += 1
                        in_bytes += small.size
                        placed.update(info.sha256 for info in group)
                    await flush()
                    if not in_flight:
                        break  # nothing (more) was lacking
                    with trio.move_on_after(self.fetch_timeout) as stall:
                        done = [await arrived.receive()]
                    if stall.cancelled_caught:
                        raise FetchError(
                            f"fetching {in_flight} small files: "
                            f"nothing received for {self.fetch_timeout:g} s"
                        )
                    while True:
                        try:
                            done.append(arrived.receive_nowait())
                        except trio.WouldBlock:
                            break
                    for small in done:
                        del self._small[small.request_id]
                        asked.discard(small.request_id)
                        in_flight -= 1
                        in_bytes -= small.size
                        if small.error:
                            raise FetchError(f"fetching {small.what}: {small.error}")
                        pending.append(small)
                        pending_files += len(small.infos)
                        pending_bytes += small.received
                    if pending and (
                        pending_files >= SMALL_BATCH
                        or pending_bytes >= SMALL_BATCH_BYTES
                        or not in_flight
                    ):
                        await batches.send(pending)
                        pending, pending_files, pending_bytes = [], 0, 0
                    elif pending:
                        try:  # the writer is idle: give it what there is
                            batches.send_nowait(pending)
                        except trio.WouldBlock:
                            continue
                        pending, pending_files, pending_bytes = [], 0, 0

        async def write() -> None:
            async for batch in taken:
                await trio.to_thread.run_sync(self._keep_small, batch, targets)

        try:
            await beside(receive, write)
        finally:
            for request_id in asked:
                self._small.pop(request_id, None)
        return placed

    def _keep_small(self, batch: list[_SmallFetch], targets: dict[str, list[Target]]) -> None:
        """Check, keep and place each fetched small file (in a thread)."""
        fetched: list[Fetched] = []
        for small in batch:
            for info, chunks in small.files():
                digest = hashlib.sha256()
                for chunk in chunks:
                    digest.update(chunk)
                sha256 = digest.hexdigest()
                if sha256 != info.sha256:
                    size = sum(len(chunk) for chunk in chunks)
                    raise FetchError(
                        f"fetched {size} bytes with sha256 {sha256} for {info.path}, "
                        f"expected {info.size} bytes with {info.sha256}"
                    )
                fetched.append((sha256, info.size, chunks, targets[sha256]))
        self.entries.keep(fetched)

    async def _send_many(self, messages: list[Message]) -> None:
        if self.send_all is not None:
            await self.send_all(messages)
            return
        for message in messages:
            await self.send(message)

    async def fetch(self, assign: Assign, info: FileInfo) -> Path:
        """Bring one input file into the cache (unless it is there) and return its path.

        Chunks are pulled FETCH_WINDOW at a time; nothing arriving for ``fetch_timeout``
        raises ``FetchError``, as does a size or hash that does not match."""
        target = self.entries.path_of(info.sha256)
        if await trio.to_thread.run_sync(self.entries.has_entry, info.sha256, info.size):
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
                await trio.to_thread.run_sync(self.entries.kept, target)
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
class _Lacking:
    """The contents the cache lacks, checked ``CACHE_BATCH`` at a time (a thread hop each) as
    they are asked for: the small ones are handed out by ``next_group``, the large ones kept
    in ``large`` for ``fetch`` once the small ones are in."""

    fetcher: InputFetcher
    contents: list[FileInfo]
    large: list[FileInfo] = attrs.field(factory=list)
    _small: collections.deque[FileInfo] = attrs.field(factory=collections.deque)
    _checked: int = 0

    async def next_group(
        self, many: bool, before_check: Callable[[], Awaitable[None]]
    ) -> list[FileInfo]:
        """The next small contents the cache lacks, for one request: one, or (``many``) as many
        as ``FILES_PER_REQUEST`` and ``FILES_REQUEST_BYTES`` allow; [] once every content is
        checked.  ``before_check`` runs before each further batch is checked (a thread hop)."""
        group: list[FileInfo] = []
        size = 0
        while len(group) < (FILES_PER_REQUEST if many else 1):
            if not self._small:
                if self._checked >= len(self.contents):
                    break
                await before_check()
                batch = self.contents[self._checked : self._checked + CACHE_BATCH]
                self._checked += len(batch)
                for info in await trio.to_thread.run_sync(self.fetcher._lacking, batch):
                    (self._small if info.size <= SMALL_FILE else self.large).append(info)
                continue
            if group and size + self._small[0].size > FILES_REQUEST_BYTES:
                break
            info = self._small.popleft()
            group.append(info)
            size += info.size
        return group


def _unplaced(files: Sequence[Placement], placed: set[str]) -> list[Placement]:
    """The files whose content is not among those ``placed`` (in a thread)."""
    return [(info, target) for info, target in files if info.sha256 not in placed]


def _by_content(files: Sequence[Placement]) -> tuple[list[FileInfo], dict[str, list[Target]]]:
    """Each content of ``files`` once (the first entry listing it), and where each goes."""
    wanted: dict[str, FileInfo] = {}
    targets: dict[str, list[Target]] = {}
    for info, target in files:
        wanted.setdefault(info.sha256, info)
        targets.setdefault(info.sha256, []).append((info.executable, target))
    return list(wanted.values()), targets


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


@attrs.define(eq=False)
class _SmallFetch:
    """Small files fetched with a single request for all of them: one with a ``FetchRequest``
    for the whole file, or (``many``, 1.7) several with a ``FetchFiles``, answered by their
    bytes one after the other.  The frames received, and where to report that the answer has
    ended (``arrived``)."""

    infos: list[FileInfo]
    request_id: int
    arrived: trio.MemorySendChannel[_SmallFetch]
    many: bool = False
    chunks: list[bytes] = attrs.field(factory=list)
    received: int = 0
    error: str = ""
    ended: bool = False
    #: the bytes of the files together.
    size: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.size = sum(info.size for info in self.infos)

    @property
    def length(self) -> int:
        # a FetchRequest asks for at least 1 (a positive count): an empty file's answer is one
        # empty frame with eof
        return self.size if self.many else max(self.size, 1)

    @property
    def what(self) -> str:
        first = self.infos[0].path
        return first if len(self.infos) == 1 else f"{len(self.infos)} files ({first}, ...)"

    def request(self, assign: Assign) -> FetchRequest | FetchFiles:
        if self.many:
            return FetchFiles(
                request_id=self.request_id,
                build_id=assign.build_id,
                attempt=assign.attempt,
                files=tuple(info.sha256 for info in self.infos),
            )
        return FetchRequest(
            request_id=self.request_id,
            build_id=assign.build_id,
            attempt=assign.attempt,
            sha256=self.infos[0].sha256,
            offset=0,
            length=self.length,
        )

    def deliver(self, message: FetchData) -> bool:
        """Take a frame of the answer; False if it is more than was asked for (or an empty
        frame that neither ends the answer nor reports an error: the runner never sends that)."""
        if self.ended:
            return False
        data = message.data
        if self.received + len(data) > self.length or not (data or message.eof or message.error):
            return False
        if data:
            self.chunks.append(data)
            self.received += len(data)
        self.error = message.error or ""
        # an answer to a FetchFiles always ends with eof (or error); one to a FetchRequest for
        # the whole file may end at its length without it
        full = not self.many and self.received >= self.length
        self.ended = bool(message.eof or message.error or full)
        if self.ended:
            self.arrived.send_nowait(self)
        return True

    def files(self) -> list[tuple[FileInfo, list[bytes]]]:
        """Each file and its bytes (``FetchError`` if the answer is not as long as they are)."""
        if self.received != self.size:
            raise FetchError(f"fetched {self.received} bytes for {self.what}, expected {self.size}")
        if len(self.infos) == 1:
            return [(self.infos[0], self.chunks)]
        joined = b"".join(self.chunks)
        files: list[tuple[FileInfo, list[bytes]]] = []
        at = 0
        for info in self.infos:
            files.append((info, [joined[at : at + info.size]]))
            at += info.size
        return files


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
