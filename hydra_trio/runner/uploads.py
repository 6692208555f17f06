"""The output files one builder connection uploads, and their check against its result.

``UploadReceiver.receive`` takes one chunk of an output of a build the builder runs under the
current attempt (the caller has checked that, ``Farm.current``).  ``msg.path`` is a label for
the result to match, never a file name: the data goes to a temporary file in the blob store,
written and hashed a batch at a time in a worker thread in the background (``_write_behind``),
so the receive loop goes on reading while the disk works.  A file that arrives whole in one
frame (most outputs are small) is staged and written with up to ``SMALL_BATCH`` others in
one thread hop (``_write_small``): no thread hop of its own, not even to create its file.
An attempt that uploads more than ``max_output_bytes``, more files than a result can list,
or starts a file before finishing the last, is a protocol violation: the connection ends.

``take`` hands a result its attempt's uploads (on the receive loop, as the result arrives, so
that later frames cannot change what it settles); ``check`` then keeps each one whose size and
hash match the result's list, off the receive loop.  ``drop_stale`` discards uploads no result
can commit any more.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs
import trio
import trio.lowlevel

from hydra_trio.diskio import write_and_hash
from hydra_trio.net import BACKLOG_RUN
from hydra_trio.protocol.errors import RemoteProtocolError
from hydra_trio.protocol.messages import (
    BuildStatus,
    FileInfo,
    OutputList,
    Result,
    UploadData,
)
from hydra_trio.protocol.validators import MAX_LIST, tree_conflict
from hydra_trio.runner.blobs import BlobError, BlobStore, PendingUpload
from hydra_trio.runner.metrics import FarmMetrics
from hydra_trio.runner.model import Machine
from hydra_trio.runner.packs import PackedFile

log = logging.getLogger("hydra_trio.runner")

#: The most output files one attempt may upload: no ``Result`` can list more, so a builder
#: sending more is not a builder (each costs a temporary file and an entry here).
MAX_UPLOADS = MAX_LIST
#: Results listing more outputs than this are checked in a worker thread (~5 us an output).
_CHECK_INLINE = 1000
#: Output files checked, and placed, per thread hop (``UploadReceiver._check``), and about
#: this many bytes.
_COMMIT_BATCH = 256
_COMMIT_BATCH_BYTES = 8 * 1024 * 1024
#: Batches of checked outputs renamed into place at once (``UploadReceiver._place``).
_PLACERS = 2
#: Small uploads (whole in one frame) written per thread hop, and about this many bytes.
SMALL_BATCH = 256
SMALL_BATCH_BYTES = 1024 * 1024
#: Batches of small uploads written at once (each in its worker thread).
SMALL_WRITERS = 2
#: The most memory small uploads received and not yet written may hold, per connection
#: (their data, and ``SMALL_OVERHEAD`` bytes each for their bookkeeping), before the receive
#: loop waits for a batch to be written.  Deep on purpose: creating files can be far slower
#: than the network brings them (1-4 ms a file on a busy VM's disk), and a receive loop
#: waiting for the disk reads no ping: the builder's pings went unanswered for seconds when
#: only two batches could wait.  100,000 outputs of a few bytes fit in it.
SMALL_HELD = 64 * 1024 * 1024
SMALL_OVERHEAD = 512

#: (build id, attempt) of an upload, and with the builder's path of one file.
_Attempt = tuple[str, int]
_FileKey = tuple[str, int, str]


@attrs.define(eq=False)
class UploadTotals:
    """The uploads of one attempt on one connection, bounded against a lying builder."""

    files: int = 0
    bytes: int = 0
    #: the file being received.  A builder sends its files one after another, so this is the
    #: only one with an open descriptor: a builder cannot make the runner hold more.
    current: PendingUpload | None = None


@attrs.define(eq=False)
class UploadReceiver:
    blobs: BlobStore
    metrics: FarmMetrics
    #: per attempt, the most bytes it may upload (``FarmConfig.max_output_bytes``).
    max_output_bytes: int
    #: the session's: the background writes run there.
    nursery: trio.Nursery
    #: output files arriving, by (build id, attempt), then path: a result takes its
    #: attempt's without a pass over every file arriving on the connection (100,000 of them
    #: held the event loop ~30-60 ms per result).
    uploads: dict[_Attempt, dict[str, PendingUpload]] = attrs.field(factory=dict, init=False)
    #: what each attempt uploading on this connection has sent so far.
    totals: dict[_Attempt, UploadTotals] = attrs.field(factory=dict, init=False)
    #: the uploads with a write in a worker thread, and the event set when it is over.
    writes: dict[PendingUpload, trio.Event] = attrs.field(factory=dict, init=False)
    #: what ``take`` handed to results not settled yet (``check``, ``discard``).
    _settling: list[dict[str, PendingUpload]] = attrs.field(factory=list, init=False)
    #: (1.3) the output files each attempt listed in ``OutputList`` frames so far.
    listings: dict[_Attempt, list[FileInfo]] = attrs.field(factory=dict, init=False)
    #: small uploads staged and not yet handed to ``_write_small``, and their size.
    _small: list[PendingUpload] = attrs.field(factory=list, init=False)
    _small_bytes: int = attrs.field(default=0, init=False)
    #: what the small uploads not yet written hold (``SMALL_HELD``), and the event set when
    #: a batch of them has been written.
    _small_held: int = attrs.field(default=0, init=False)
    _small_written: trio.Event = attrs.field(factory=trio.Event, init=False)
    _small_slots: trio.Semaphore = attrs.field(
        factory=lambda: trio.Semaphore(SMALL_WRITERS), init=False
    )

    def listed(self, msg: OutputList) -> None:
        """The next files of a current attempt's output listing (``OutputList``); more than a
        result can list is a protocol violation."""
        listing = self.listings.setdefault((msg.build_id, msg.attempt), [])
        if len(listing) + len(msg.files) > MAX_LIST:
            raise RemoteProtocolError(
                f"build {msg.build_id} attempt {msg.attempt}: listed more than {MAX_LIST} outputs"
            )
        listing.extend(msg.files)

    def full_listing(self, result: Result) -> Result:
        """``result`` with the files its attempt listed in ``OutputList`` frames before its
        own ``outputs`` (taken: a later listing starts afresh).  A count that does not match
        ``listed_outputs`` is a success that cannot be kept: ``upload-failed``."""
        listing = self.listings.pop((result.build_id, result.attempt), [])
        if not listing and not result.listed_outputs:
            return result
        if len(listing) != result.listed_outputs:
            error = (
                f"the result says {result.listed_outputs} outputs were listed before it, "
                f"{len(listing)} were"
            )
            status = (
                BuildStatus.UPLOAD_FAILED if result.status is BuildStatus.SUCCESS else result.status
            )
            return attrs.evolve(
                result, status=status, error=result.error or error, outputs=(), listed_outputs=0
            )
        if len(listing) + len(result.outputs) > MAX_LIST:
            error = f"more than {MAX_LIST} outputs"
            status = (
                BuildStatus.UPLOAD_FAILED if result.status is BuildStatus.SUCCESS else result.status
            )
            return attrs.evolve(
                result, status=status, error=result.error or error, outputs=(), listed_outputs=0
            )
        listing.extend(result.outputs)
        return attrs.evolve(result, outputs=tuple(listing), listed_outputs=0)

    async def receive(self, msg: UploadData) -> None:
        """Append one chunk of a current attempt's output file (see the module)."""
        await self._chunk(msg.build_id, msg.attempt, msg.path, msg.offset, msg.data, msg.eof)

    async def _chunk(
        self, build_id: str, attempt: int, path: str, offset: int, data: bytes, eof: bool
    ) -> None:
        ref = f"build {build_id} attempt {attempt}"
        totals = self.totals.setdefault((build_id, attempt), UploadTotals())
        self._count(totals, data, ref)
        key = (build_id, attempt, path)
        arriving = self.uploads.get(key[:2])
        upload = None if arriving is None else arriving.get(path)
        if upload is None:
            if offset != 0:
                return  # its start was refused; the result will say the upload failed
            if eof:  # a whole file in one frame
                await self._begin_small(key, totals, ref, data)
                return
            upload = await self._begin(key, totals, ref)
        if upload.done:
            return  # refused already; the result will say the upload failed
        try:
            due = self.blobs.stage(upload, offset, data, eof)
        except BlobError as exc:
            log.warning("upload of %s: %s", ref, exc)
            await self._discard(upload)
            return
        self.metrics.uploaded_bytes.inc(len(data))
        if due:
            await self._write_behind(upload, ref)

    def _count(self, totals: UploadTotals, data: bytes, ref: str) -> None:
        """Count ``data`` into its attempt's bytes (a protocol error past the limit)."""
        totals.bytes += len(data)
        limit = self.max_output_bytes
        if totals.bytes > limit:
            raise RemoteProtocolError(f"{ref}: uploaded more than max_output_bytes ({limit})")

    def _starting(self, key: _FileKey, totals: UploadTotals, ref: str) -> None:
        previous = totals.current
        if previous is not None and not (previous.complete or previous.done):
            raise RemoteProtocolError(
                f"{ref}: started {key[2]!r} before finishing {previous.path!r}"
            )
        if totals.files >= MAX_UPLOADS:
            raise RemoteProtocolError(f"{ref}: uploaded more than {MAX_UPLOADS} files")
        totals.files += 1

    async def _begin(self, key: _FileKey, totals: UploadTotals, ref: str) -> PendingUpload:
        self._starting(key, totals, ref)
        upload = await trio.to_thread.run_sync(self.blobs.begin, key[2])
        self.uploads.setdefault(key[:2], {})[key[2]] = totals.current = upload
        return upload

    async def _begin_small(
        self, key: _FileKey, totals: UploadTotals, ref: str, data: bytes
    ) -> None:
        """A whole file in one frame: staged, and written with others (``_flush_small``)."""
        self._take_small(key, totals, ref, data)
        self.metrics.uploaded_bytes.inc(len(data))
        await self._small_room()

    def _take_small(self, key: _FileKey, totals: UploadTotals, ref: str, data: bytes) -> None:
        """``_begin_small`` but for the metric and the wait for room."""
        self._starting(key, totals, ref)
        upload = self.blobs.small(key[2], data)
        self.uploads.setdefault(key[:2], {})[key[2]] = totals.current = upload
        self._small.append(upload)
        self._small_bytes += len(data)
        self._small_held += len(data) + SMALL_OVERHEAD
        if len(self._small) >= SMALL_BATCH or self._small_bytes >= SMALL_BATCH_BYTES:
            self._flush_small()

    async def _small_room(self) -> bool:
        """Wait while the small uploads held are over ``SMALL_HELD`` (the disk is far
        behind); whether it waited."""
        waited = False
        while self._small_held > SMALL_HELD:
            await self._small_written.wait()
            waited = True
        return waited

    async def receive_files(
        self,
        build_id: str,
        attempt: int,
        files: Iterable[tuple[str, bytes]],
        current: Callable[[], bool],
    ) -> None:
        """(1.7) The whole files of an ``UploadFiles`` (its attempt current as it starts), as
        their ``UploadData`` frames would be taken (``receive``), with what is the same
        for all of them done once (100,000 outputs: ~5 us a file less on the receive loop):
        the attempt is checked again (``current``) only after other tasks ran (every
        ``BACKLOG_RUN`` files, and whenever it waited for the disk), the metric counted once."""
        ref = f"build {build_id} attempt {attempt}"
        totals = self.totals.setdefault((build_id, attempt), UploadTotals())
        arriving = self.uploads.setdefault((build_id, attempt), {})
        taken = 0
        try:
            for index, (path, data) in enumerate(files):
                if index and not index % BACKLOG_RUN:
                    await trio.lowlevel.checkpoint()
                    if not current():
                        return
                if path in arriving:  # a second upload of it: what _chunk makes of that
                    await self._chunk(build_id, attempt, path, 0, data, True)
                    if not current():
                        return
                    continue
                self._count(totals, data, ref)
                self._take_small((build_id, attempt, path), totals, ref, data)
                taken += len(data)
                if await self._small_room() and not current():
                    return
        finally:
            self.metrics.uploaded_bytes.inc(taken)

    def _flush_small(self) -> None:
        """Hand the staged small uploads to ``_write_small`` in the background (the batches
        wait their turn there, ``SMALL_WRITERS`` written at once)."""
        batch, self._small, self._small_bytes = self._small, [], 0
        if not batch:
            return
        over = trio.Event()
        for upload in batch:
            self.writes[upload] = over
        self.nursery.start_soon(self._write_small, batch, over)

    async def _write_small(self, batch: list[PendingUpload], over: trio.Event) -> None:
        try:
            async with self._small_slots:
                await trio.to_thread.run_sync(self.blobs.write_small, batch)
        finally:
            for upload in batch:
                del self.writes[upload]
            self._small_held -= sum(SMALL_OVERHEAD + u.received for u in batch)
            self._small_written.set()
            self._small_written = trio.Event()
            over.set()

    async def _write_behind(self, upload: PendingUpload, ref: str) -> None:
        """Write (and hash) what is staged of ``upload`` in a worker thread, without waiting
        for it: the receive loop goes on reading the next frames meanwhile, so the network and
        the disk work at the same time.  It waits for the upload's previous write first
        (writes are in order, and at most two batches of an upload are held: one written, one
        staged)."""
        await self._settled(upload)
        if upload.done:
            return  # the previous write failed: discarded
        chunks, last = self.blobs.take_staged(upload)
        self.writes[upload] = over = trio.Event()
        self.nursery.start_soon(self._write, upload, chunks, last, over, ref)

    async def _write(
        self, upload: PendingUpload, chunks: list[bytes], last: bool, over: trio.Event, ref: str
    ) -> None:
        blobs = self.blobs
        try:
            await write_and_hash(
                sum(map(len, chunks)),
                functools.partial(blobs.write_unhashed, upload, chunks, last),
                functools.partial(blobs.hash_chunks, upload, chunks),
                functools.partial(blobs.write_chunks, upload, chunks, last),
            )
        except OSError as exc:  # the disk is full, or failing: this upload cannot be kept
            log.warning("upload of %s: %s", ref, exc)
            blobs.failed(exc)
            await trio.to_thread.run_sync(blobs.discard, upload)
        finally:
            del self.writes[upload]
            over.set()

    async def _settled(self, upload: PendingUpload) -> None:
        """Wait until no write of ``upload`` is in flight (before committing or discarding)."""
        over = self.writes.get(upload)
        if over is not None:
            await over.wait()

    async def _discard(self, upload: PendingUpload) -> None:
        await self._discard_many([upload])

    async def _discard_many(self, uploads: list[PendingUpload]) -> None:
        """Throw ``uploads`` away once no write of theirs is in flight: those never written
        (small ones still staged) at once, without I/O (so a batch handed to
        ``_write_small`` later skips them), the others ``_COMMIT_BATCH`` per thread hop."""
        written: list[PendingUpload] = []
        for upload in uploads:
            await self._settled(upload)
            if upload.file is None:
                self.blobs.discard(upload)  # (no I/O: nothing was written)
            else:
                written.append(upload)
        for start in range(0, len(written), _COMMIT_BATCH):
            chunk = written[start : start + _COMMIT_BATCH]
            await trio.to_thread.run_sync(self.blobs.discard_many, chunk)

    def take(self, build_id: str, attempt: int) -> dict[str, PendingUpload]:
        """The uploads of one attempt, by path, for its result to settle (``check``); from
        now on they are the result's, and further chunks of the attempt start afresh.  Small
        uploads still staged are handed to ``_write_small`` now (``check`` waits for them)."""
        self._flush_small()
        self.totals.pop((build_id, attempt), None)
        uploads = self.uploads.pop((build_id, attempt), {})
        self._settling.append(uploads)
        return uploads

    async def check(self, result: Result, uploads: dict[str, PendingUpload]) -> Result:
        """Keep each of ``uploads`` whose size and hash match the result's list.  A success
        whose outputs did not all arrive intact becomes ``upload-failed`` (retried
        elsewhere), as does one whose list could not be a directory tree (a path twice, or a
        file also used as a directory: placing those under a dependent's ``$IN`` would go
        through a link)."""
        result = await self._check(result, uploads)
        # (not if cancelled: the session is ending, and ``discard_all`` discards them)
        self._settled_by_result(uploads)
        return result

    async def _check(self, result: Result, uploads: dict[str, PendingUpload]) -> Result:
        if len(result.outputs) > _CHECK_INLINE:
            problem = await trio.to_thread.run_sync(_listing_problem, result)
        else:
            problem = _listing_problem(result)
        # Checked _COMMIT_BATCH files a thread hop (one hop a file made 100,000 small
        # outputs take longer than the commits themselves), then made durable together (one
        # syncfs for all their data on Linux) and placed a batch per hop, then made durable
        # again: two syncs a result instead of two per file (or per batch: at 100,000
        # files, 800 syncfs of a file system shared with other work took 30 s).
        batch: list[tuple[PendingUpload, int, str]] = []
        keeping: list[tuple[int, PendingUpload]] = []
        missing: list[FileInfo] = []
        size = 0
        for info in () if problem else result.outputs:
            if info.link:
                continue
            upload = uploads.get(info.path)
            if upload is None:
                missing.append(info)
                continue
            await self._settled(upload)
            size += info.size
            batch.append((upload, info.size, info.sha256))
            if len(batch) >= _COMMIT_BATCH or size >= _COMMIT_BATCH_BYTES:
                problems, kept = await trio.to_thread.run_sync(self.blobs.verify_many, batch)
                problem = problem or next((p for p in problems if p), "")
                keeping += kept
                batch, size = [], 0
        if batch:
            problems, kept = await trio.to_thread.run_sync(self.blobs.verify_many, batch)
            problem = problem or next((p for p in problems if p), "")
            keeping += kept
        if keeping:
            problem = await self._keep(keeping) or problem
        if missing:  # listed, not uploaded: the store must have it (now that all is placed)
            problem = problem or await trio.to_thread.run_sync(self._not_stored, missing)
        # uploaded but not listed: not an output
        await self._discard_many([u for u in uploads.values() if not u.done])
        if not problem:
            return result
        if result.status is BuildStatus.SUCCESS:
            log.warning("build %s attempt %d: %s", result.build_id, result.attempt, problem)
            return attrs.evolve(result, status=BuildStatus.UPLOAD_FAILED, error=problem, outputs=())
        return attrs.evolve(result, outputs=())

    async def _keep(self, keeping: list[tuple[int, PendingUpload]]) -> str:
        """Make verified uploads durable and visible (``BlobStore.stage_index``,
        ``sync_data``, ``place``, ``publish_index``, ``sync_entries``): the packed ones with
        one index file, the others a batch per thread hop; the problem, or ""."""
        blobs = self.blobs
        files = [(i, u) for i, u in keeping if not isinstance(u.file, PackedFile)]
        index = None
        published = False
        try:
            if len(files) < len(keeping):
                index = await trio.to_thread.run_sync(blobs.stage_index, keeping)
            if blobs.whole_fs_sync:
                await trio.to_thread.run_sync(blobs.sync_data, keeping)
            else:
                for start in range(0, len(keeping), _COMMIT_BATCH):
                    chunk = keeping[start : start + _COMMIT_BATCH]
                    await trio.to_thread.run_sync(blobs.sync_data, chunk)
            dirs = await self._place(files)
            if index is not None:
                dirs |= await trio.to_thread.run_sync(blobs.publish_index, index, keeping)
                published = True
            await trio.to_thread.run_sync(blobs.sync_entries, dirs)
        except OSError as exc:
            if index is not None:
                await trio.to_thread.run_sync(blobs.unpublish, index, keeping, published)
            return await trio.to_thread.run_sync(blobs.abandon, keeping, exc)
        return ""

    async def _place(self, keeping: list[tuple[int, PendingUpload]]) -> set[Path]:
        """``BlobStore.place`` for all of ``keeping``, a batch per thread hop, ``_PLACERS``
        hops at a time (each rename is within one directory: two threads placed 100,000
        small files in 1.0-1.1 s, one in 1.7-1.8 s); the directories changed.  The first
        ``OSError`` is raised once no batch is being placed any more."""
        dirs: set[Path] = set()
        starts = iter(range(0, len(keeping), _COMMIT_BATCH))  # (shared: each takes the next)
        failures: list[OSError] = []

        async def placer() -> None:
            for start in starts:
                chunk = keeping[start : start + _COMMIT_BATCH]
                try:
                    dirs.update(await trio.to_thread.run_sync(self.blobs.place, chunk))
                except OSError as exc:
                    failures.append(exc)
                    return

        async with trio.open_nursery() as nursery:
            for _ in range(_PLACERS):
                nursery.start_soon(placer)
        if failures:
            raise failures[0]
        return dirs

    def _not_stored(self, missing: list[FileInfo]) -> str:
        """The first of ``missing`` (listed, not uploaded) the store lacks, said; or ""."""
        for info in missing:
            if not self.blobs.has(info.sha256):
                return f"output {info.path} was not uploaded"
        return ""

    async def discard(self, uploads: dict[str, PendingUpload]) -> None:
        """Throw away uploads ``take`` gave a result that will not be checked."""
        try:
            await self._discard_many(list(uploads.values()))
        finally:
            self._settled_by_result(uploads)

    def _settled_by_result(self, uploads: dict[str, PendingUpload]) -> None:
        self._settling = [taken for taken in self._settling if taken is not uploads]

    async def drop_stale(self, machine: Machine) -> None:
        """Discard uploads of attempts that are no longer current here (aborted, cancelled or
        requeued): no result can commit them, and they would hold disk until the session
        ends."""
        stale: list[PendingUpload] = []
        for ref in list(self.uploads):
            build = machine.running.get(ref[0])
            if build is None or build.attempts != ref[1]:
                stale += self.uploads.pop(ref).values()
        await self._discard_many(stale)
        for ref in list(self.totals):
            build = machine.running.get(ref[0])
            if build is None or build.attempts != ref[1]:
                del self.totals[ref]
        for ref in list(self.listings):
            build = machine.running.get(ref[0])
            if build is None or build.attempts != ref[1]:
                del self.listings[ref]

    async def discard_all(self) -> None:
        """At the end of the session: remove every file still arriving or waiting for its
        result's check (no write is in flight any more: the session's nursery is over)."""
        await self._discard_many(
            [u for t in (*self.uploads.values(), *self._settling) for u in t.values()]
        )


def _listing_problem(result: Result) -> str:
    """Why the outputs a result lists could not all exist in one ``$OUT`` (so could not all
    be placed in a dependent's ``$IN``), or "".  A builder scanning a real directory never
    lists such a thing."""
    problem = tree_conflict(info.path for info in result.outputs)
    if problem is not None:
        return f"the builder's list of outputs is impossible: {problem}"
    if any("\0" in info.link for info in result.outputs):
        return "the builder's list of outputs has a link target with a NUL"
    return ""
