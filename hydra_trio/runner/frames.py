"""What the runner does with each frame a builder sends after its hello.

``FrameHandler.handle`` looks the frame's type up in a table and awaits its handler; each
handler is short, and hands anything slow to the session's nursery (upload writes, result
checks and commits, fetch reads: ``fetches.FetchServer``) so the receive loop goes on
reading: a loop that stops reading takes the builder for silent.  Frames about a build are
fenced (``Farm.current``): only the session attached to the build's machine, under the
build's current attempt, may speak for it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio
import trio.lowlevel

from hydra_trio.protocol.codec import TRANSFER_FRAME
from hydra_trio.protocol.messages import (
    Drain,
    FetchFiles,
    FetchRequest,
    ListData,
    ListRequest,
    LogChunk,
    Message,
    OutputList,
    Ping,
    Pong,
    Progress,
    Result,
    UploadData,
    UploadFiles,
)
from hydra_trio.runner.blobs import Storage
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.fetches import FetchServer
from hydra_trio.runner.logs import LogBehind
from hydra_trio.runner.model import Machine
from hydra_trio.runner.outbox import Outbox
from hydra_trio.runner.results import ResultCommitter
from hydra_trio.runner.uploads import UploadReceiver

#: The most bytes one FetchRequest may ask for (docs/protocol.md): read in one thread hop, sent
#: in frames of ``TRANSFER_FRAME`` bytes.  A request for more is answered with ``error``, so
#: every answer ends: with ``eof``, ``error``, or after exactly ``length`` bytes.
MAX_FETCH_CHUNK = 1024 * 1024
#: One ``ListData`` carries at most this many files, and stops once they take about this many
#: bytes (a path is at most 64 Ki characters: the frame stays far below the frame limit).
#: Encoding a piece runs on the event loop: ~23 ms for 1 MiB (10,000 short paths) on an idle
#: core, ~6 ms for 256 KiB; the builder decodes it in one go too (~37 ms for 1 MiB).
LIST_PIECE_FILES = 2_500
LIST_PIECE_BYTES = 256 * 1024


class BuilderEnd(Protocol):
    """What a handler needs of the runner's end of the connection (``session.BuilderSession``)."""

    @property
    def session_id(self) -> str: ...

    @property
    def outbox(self) -> Outbox: ...

    def post(self, message: Message) -> None: ...

    async def reply(self, message: Message) -> None: ...

    def close(self, reason: str) -> None: ...


@attrs.define(eq=False)
class FrameHandler:
    farm: Farm
    session: BuilderEnd
    machine: Machine
    storage: Storage
    uploads: UploadReceiver
    results: ResultCommitter
    #: the session's log chunks, written behind the receive loop.
    logs: LogBehind
    _table: dict[type[Message], Callable[[Any], Awaitable[None]]] = attrs.field(init=False)
    #: reads and answers fetch requests (``run`` in the session's background nursery).
    fetches: FetchServer = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.fetches = FetchServer(
            self.storage.blobs, self.farm.metrics, self.session.post, TRANSFER_FRAME
        )
        self._table = {
            Ping: self.ping,
            UploadData: self.upload,
            UploadFiles: self.upload,
            FetchRequest: self.fetch,
            FetchFiles: self.fetch,
            LogChunk: self.log,
            Result: self.result,
            Progress: self.progress,
            Drain: self.drain,
            ListRequest: self.list_files,
            OutputList: self.outputs,
        }

    async def handle(self, message: Message) -> None:
        """Apply one frame (``Goodbye`` is the receive loop's: it ends it)."""
        handler = self._table.get(type(message))
        if handler is not None:
            await handler(message)

    async def ping(self, msg: Ping) -> None:
        """Answer at once, saying how many results received before it are still settling;
        if any are, a second Pong follows once they are settled (``reply_after``).  The
        first keeps the builder's evidence that we live flowing while 100,000 outputs are
        committed (a Pong that waited for the commit left it silent past its ping timeout);
        the second keeps "a Pong with ``settling`` 0 means everything before it was
        handled"."""
        now = trio.current_time()
        settling = self.results.settling
        self.session.outbox.last_ping_seq = msg.seq
        await self.session.reply(Pong(seq=msg.seq, settling=settling))
        # (the results may have settled while the first was written: then at once)
        if settling and not await self.results.reply_after(Pong(seq=msg.seq)):
            await self.session.reply(Pong(seq=msg.seq))
        self.farm.on_ping(self.session, self.machine, msg, now)

    async def upload(self, msg: UploadData | UploadFiles) -> None:
        await self.results.settled(msg.build_id, msg.attempt)
        if isinstance(msg, UploadFiles):
            await self._upload_files(msg)
        elif self._uploading(msg.build_id, msg.attempt):
            await self.uploads.receive(msg)

    async def _upload_files(self, msg: UploadFiles) -> None:
        """(1.7) Each file of ``msg`` as its own ``upload`` frame would be taken: the attempt
        checked first and again whenever other tasks ran (every ``BACKLOG_RUN`` files, as
        between frames, or a wait for the disk: the attempt may end meanwhile)."""
        if self._uploading(msg.build_id, msg.attempt):
            await self.uploads.receive_files(
                msg.build_id,
                msg.attempt,
                zip(msg.paths, msg.data, strict=True),
                functools.partial(self._uploading, msg.build_id, msg.attempt),
            )

    def _uploading(self, build_id: str, attempt: int) -> bool:
        """Whether uploads of this attempt are taken (it is current, on this builder)."""
        current = self.farm.current(self.session, self.machine, build_id, attempt, kind="upload")
        return current is not None

    async def log(self, msg: LogChunk) -> None:
        await self.results.settled(msg.build_id, msg.attempt)
        data = self.farm.on_log(self.session, self.machine, msg)
        if data:
            await self.logs.append(msg.build_id, msg.attempt, data)

    async def result(self, msg: Result) -> None:
        await self.results.settled(msg.build_id, msg.attempt)
        await self.logs.flushed(msg.build_id, msg.attempt)  # a finished build's log is whole
        await self.results.submit(msg)

    async def progress(self, msg: Progress) -> None:
        await self.results.settled(msg.build_id, msg.attempt)
        self.farm.on_progress(self.session, self.machine, msg)

    async def outputs(self, msg: OutputList) -> None:
        await self.results.settled(msg.build_id, msg.attempt)
        current = self.farm.current(
            self.session, self.machine, msg.build_id, msg.attempt, kind="outputs"
        )
        if current is not None:
            self.uploads.listed(msg)

    async def list_files(self, msg: ListRequest) -> None:
        """Answer with the next piece of an input's listing: files from ``start`` on, at most
        ``LIST_PIECE_FILES`` of them and about ``LIST_PIECE_BYTES`` (at least one, while there
        are any)."""
        await self.results.settled(msg.build_id, msg.attempt)
        build = self.farm.current(
            self.session, self.machine, msg.build_id, msg.attempt, kind="list"
        )
        listing = None if build is None else self.farm.listing(build, msg.of)
        if listing is None:
            error = f"{msg.of} is not an input of a build you run under this attempt"
            self.session.post(ListData(request_id=msg.request_id, error=error))
            return
        end = min(len(listing), msg.start + LIST_PIECE_FILES)
        budget = LIST_PIECE_BYTES
        stop = msg.start
        while stop < end and (budget > 0 or stop == msg.start):
            info = listing[stop]
            budget -= len(info.path) + len(info.link) + 120
            stop += 1
        files = listing[msg.start : stop]
        self.session.post(
            ListData(request_id=msg.request_id, files=files, end=stop >= len(listing))
        )

    async def drain(self, msg: Drain) -> None:
        self.farm.on_builder_drain(self.session, self.machine)

    async def fetch(self, msg: FetchRequest | FetchFiles) -> None:
        """Check a request for a chunk of an input (or, 1.7, for many whole inputs) of a build
        this builder runs under the current attempt, and queue it for ``fetches`` (which reads
        many per thread hop)."""
        await self.results.settled(msg.build_id, msg.attempt)
        build = self.farm.current(
            self.session, self.machine, msg.build_id, msg.attempt, kind="fetch"
        )
        error = ""
        if build is None:
            error = "not an input of a build you run under this attempt"
        elif isinstance(msg, FetchRequest) and msg.length > MAX_FETCH_CHUNK:
            error = f"length {msg.length} is above the maximum of {MAX_FETCH_CHUNK} bytes"
        else:
            hashes = (msg.sha256,) if isinstance(msg, FetchRequest) else msg.files
            for sha256 in hashes:
                if not self.farm.is_input(build, sha256):
                    error = f"{sha256} is not an input of build {msg.build_id}"
                    break
        await self.fetches.queue(msg, error)
