"""Content-addressed files in the runner's state dir: build outputs, served again as inputs.

A file lives at ``<root>/<first two hex digits>/<sha256>``, or (an output that arrived whole
in one frame) in a pack with others (``runner.packs``).  An upload is written to a temporary
file in ``<root>/tmp``, hashed as it arrives, and renamed into place only after its size and
hash match what the builder declared; a packed one is indexed only then; so a crash or a
lying builder never leaves a half-written or wrong file visible.  Every name in the store
comes from a hash, from ``mkstemp`` or from ``BlobStore._temp_name``, never from a builder:
an output's path is only ever a label, so no path a builder sends can make the runner write
outside ``root``.  Methods block unless they say otherwise: call them through
``trio.to_thread.run_sync``, many files per call where they take many.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import io
import itertools
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs

from hydra_trio.diskio import DirectFile, HashingFile, HashMismatch, fsync_dir, read_direct
from hydra_trio.nixstore import NixStore
from hydra_trio.protocol.messages import FileInfo
from hydra_trio.runner.health import Health
from hydra_trio.runner.logs import Followers, LogStore
from hydra_trio.runner.packs import PackedFile, PackIndex


class BlobError(Exception):
    """An upload did not match what was declared, or a blob is missing."""


#: Upload bytes staged in memory before one thread hop writes and hashes them.
WRITE_BATCH = 1024 * 1024
#: Reads of at least this many bytes go around the page cache (``diskio.read_direct``): an
#: uploaded file was written so (``DirectFile``), and a buffered read would need as many
#: fresh pages of memory as the write avoided.
DIRECT_READ_MIN = 256 * 1024
_READ_ONLY = 0o444


@attrs.define(eq=False)
class PendingUpload:
    """One output file arriving in chunks."""

    #: the builder's name for it: for messages only, never part of a file name.
    path: str
    #: the temporary file it is written and hashed into; None for a small upload until
    #: ``write_small`` has written it (``BlobStore.small``), then its ``PackedFile``.
    file: HashingFile | PackedFile | None
    #: its last chunk arrived: ``file`` is closed (so a finished upload holds no descriptor
    #: while it waits for the build's result) and nothing more may be appended.
    complete: bool = False
    #: committed or discarded: nothing more may happen to it.
    done: bool = False
    #: chunks staged (``BlobStore.stage``) and not yet written, and their total size.
    staged: list[bytes] = attrs.field(factory=list)
    staged_size: int = 0
    #: bytes taken by ``stage`` so far (``file.size`` counts those written, which lag behind).
    received: int = 0

    @property
    def tmp(self) -> Path:
        return self.written().tmp

    def written(self) -> HashingFile | PackedFile:
        """Its file (raises ``BlobError`` if it was never written: a refused upload)."""
        if self.file is None:
            raise BlobError(f"{self.path}: its upload was refused")
        return self.file

    def streamed(self) -> HashingFile:
        """Its file, being written a batch at a time (``BlobStore.begin``)."""
        file = self.written()
        if not isinstance(file, HashingFile):  # (``stage`` refuses chunks after the last)
            raise BlobError(f"{self.path}: more data after the whole file")
        return file


@attrs.define(eq=False)
class BlobStore:
    root: Path
    #: where a failed write (disk full) is reported.
    health: Health = attrs.field(factory=Health)

    #: the packs of small blobs, and where each is.
    packs: PackIndex = attrs.field(init=False)
    #: ``root`` as a string, and the start of ``_temp_name``'s names.
    _root: str = attrs.field(init=False)
    _prefix: str = attrs.field(init=False)
    _serial: itertools.count[int] = attrs.field(factory=itertools.count, init=False)

    def __attrs_post_init__(self) -> None:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        self.packs = PackIndex(self.root / "packs")
        self._root = os.fspath(self.root)
        self._prefix = f"upload-s{secrets.token_hex(8)}-"

    def _temp_name(self) -> str:
        """A name for a new file (unique for this store: ``packs`` refuses a name taken
        anyway)."""
        return f"{self._prefix}{next(self._serial):x}"

    def _pack_name(self) -> str:
        """A name for a new pack or index file (``s<random>-<serial>``)."""
        return self._temp_name().removeprefix("upload-")

    def remove_partial_uploads(self) -> int:
        """Delete uploads a killed runner left half-written: ``upload-*`` in ``tmp``, packs no
        committed result names (and read the packs' index: ``PackIndex.load``), and the
        ``.upload-*`` an earlier version wrote beside the blobs (one listing of each of the
        256 blob directories).  Only call it while no other runner can be writing them (the
        leader, as it starts leading).  Returns how many."""
        removed = self.packs.load()
        for leftover in (self.root / "tmp").glob("upload-*"):
            leftover.unlink(missing_ok=True)
            removed += 1
        for shard in self.root.iterdir():
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for leftover in shard.glob(".upload-*"):
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed

    def path_of(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def _path_of(self, sha256: str) -> str:
        """``path_of`` as a string (without a ``Path`` object per file)."""
        return f"{self._root}/{sha256[:2]}/{sha256}"

    def has(self, sha256: str) -> bool:
        return sha256 in self.packs.places or self.path_of(sha256).is_file()

    def packed(self, sha256: str) -> bytes | None:
        """The content of a packed blob (None if it has a file of its own, or is not here;
        ``BlobError`` if its pack is gone)."""
        if sha256 not in self.packs.places:
            return None
        fd, offset, size = self._locate(sha256)
        try:
            return self._read_at(fd, offset, size, sha256)
        finally:
            os.close(fd)

    def begin(self, path: str) -> PendingUpload:
        """A new upload.  If its file cannot be created (the disk is full), the upload is
        refused from the start: its chunks are dropped and its result is ``upload-failed``."""
        try:
            fd, name = tempfile.mkstemp(dir=self.root / "tmp", prefix="upload-")
        except OSError as exc:
            self.failed(exc)
            # Nothing on disk: ``tmp`` names no file (discarding it unlinks nothing).
            refused = HashingFile(self.root / "tmp" / "refused", io.BytesIO())
            return PendingUpload(path=path, file=refused, done=True)
        return PendingUpload(path=path, file=HashingFile(Path(name), DirectFile(fd)))

    def small(self, path: str, data: bytes) -> PendingUpload:
        """A complete upload of one frame (``data``), staged in memory without I/O (call it
        on the event loop); ``write_small`` writes it, with many others in one thread hop."""
        upload = PendingUpload(path=path, file=None)
        self.stage(upload, 0, data, eof=True)
        return upload

    def write_small(self, uploads: list[PendingUpload]) -> None:
        """Hash each upload of ``uploads`` (from ``small``) and write them all into one new
        pack (``PackIndex.write``): per file, one hash of its data and no system call; a
        file of its own each took a create, a rename and a page of the page cache, most of
        the commit of 100,000 outputs.  If the pack cannot be written (the disk is full),
        the batch is refused: each of its results will be ``upload-failed``.  Blocking."""
        writing: list[PendingUpload] = []
        pieces: list[bytes] = []
        for upload in uploads:
            chunks = upload.staged
            upload.staged = []
            upload.staged_size = 0
            if not upload.done:  # (else discarded meanwhile)
                writing.append(upload)
                pieces.append(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if not writing:
            return
        shas = [hashlib.sha256(data).hexdigest() for data in pieces]
        try:
            while True:
                try:
                    files = self.packs.write(self._pack_name(), pieces, shas)
                    break
                except FileExistsError:
                    continue  # (left by another store on the same directory: another name)
        except OSError as exc:
            self.failed(exc)
            for upload in writing:
                upload.done = True
            return
        for upload, file in zip(writing, files, strict=True):
            upload.file = file

    def failed(self, exc: OSError) -> None:
        """An upload could not be written or kept (reported, the upload fails alone)."""
        self.health.fault("outputs", f"build outputs cannot be written: {exc}", exc)

    def stage(self, upload: PendingUpload, offset: int, data: bytes, eof: bool = False) -> bool:
        """Take the chunk at ``offset`` (it must follow what arrived; ``eof``: the last one)
        into memory, without I/O (call it on the event loop).  Returns whether ``write_staged``
        is due: at the last chunk, or once ``WRITE_BATCH`` bytes are staged, so that the
        small frames of a transfer cost one thread hop per megabyte."""
        if upload.done or upload.complete:
            raise BlobError(f"{upload.path}: chunk at offset {offset} after the last one")
        if offset != upload.received:
            raise BlobError(f"{upload.path}: chunk at offset {offset}, expected {upload.received}")
        upload.staged.append(data)
        upload.staged_size += len(data)
        upload.received += len(data)
        if eof:
            upload.complete = True
        return eof or upload.staged_size >= WRITE_BATCH

    def take_staged(self, upload: PendingUpload) -> tuple[list[bytes], bool]:
        """Hand over what is staged for ``write_chunks``, and whether it ends the file.  No
        I/O: call it on the event loop, so that the next chunks are staged while these are
        written in a thread."""
        chunks = upload.staged
        upload.staged = []
        upload.staged_size = 0
        return chunks, upload.complete

    def write_chunks(self, upload: PendingUpload, chunks: list[bytes], last: bool) -> None:
        """Write and hash ``chunks`` from ``take_staged`` (one call at a time per upload, in
        the order taken), without joining them; close the file after the ``last`` ones."""
        self.write_unhashed(upload, chunks, last)
        self.hash_chunks(upload, chunks)

    def write_unhashed(self, upload: PendingUpload, chunks: list[bytes], last: bool) -> None:
        """``write_chunks`` less the hashing, which ``hash_chunks`` does (in another thread at
        the same time: one write and one hash of an upload at a time, each in order)."""
        file = upload.streamed()
        file.write_unhashed(chunks)
        if last:
            file.close()

    def hash_chunks(self, upload: PendingUpload, chunks: list[bytes]) -> None:
        upload.streamed().hash_chunks(chunks)

    def write_staged(self, upload: PendingUpload) -> None:
        """Write and hash what is staged; close the file after the last chunk."""
        self.write_chunks(upload, *self.take_staged(upload))

    def append(self, upload: PendingUpload, offset: int, data: bytes, eof: bool = False) -> None:
        """Add the chunk at ``offset`` and write it at once (blocking: call through a thread)."""
        self.stage(upload, offset, data, eof)
        self.write_staged(upload)

    def commit(self, upload: PendingUpload, size: int, sha256: str) -> None:
        """Check the finished upload against the declared size and hash; keep it if they
        match, else discard it and raise ``BlobError`` (``commit_many`` of one)."""
        problem = self.commit_many([(upload, size, sha256)])[0]
        if problem:
            raise BlobError(problem)

    def commit_many(self, batch: list[tuple[PendingUpload, int, str]]) -> list[str]:
        """Check each finished upload of ``batch`` against its declared size and hash; keep
        those that match (the problem with each: "" if kept): ``verify_many``,
        ``stage_index``, ``sync_data``, ``place``, ``publish_index``, ``sync_entries`` in
        one call (a result of many files calls them a batch per thread hop,
        ``UploadReceiver.check``)."""
        problems, keeping = self.verify_many(batch)
        if not keeping:
            return problems
        staged = None
        published = False
        try:
            staged = self.stage_index(keeping)
            self.sync_data(keeping)
            dirs = self.place(keeping)
            if staged is not None:
                dirs |= self.publish_index(staged, keeping)
                published = True
            self.sync_entries(dirs)
        except OSError as exc:
            if staged is not None:
                self.unpublish(staged, keeping, published)
            problem = self.abandon(keeping, exc)
            for index, _ in keeping:
                problems[index] = problem
        return problems

    # A blob becomes visible only complete and verified: the index file of the packed ones
    # is written (``stage_index``), every kept file's data and that index file are made
    # durable (``sync_data``), then each file is renamed into place (``place``) and the
    # index file too (``publish_index``), then the renames are made durable
    # (``sync_entries``), so the database may say the build succeeded as soon as that is
    # done and a power loss loses nothing.  On Linux (5.8 and
    # later, where ``syncfs`` reports write-back errors) each sync is one ``syncfs`` of the
    # store's file system for every file of a result together (``whole_fs_sync``); elsewhere,
    # an fsync per file and per directory.

    def verify_many(
        self, batch: list[tuple[PendingUpload, int, str]]
    ) -> tuple[list[str], list[tuple[int, PendingUpload]]]:
        """Check each finished upload of ``batch`` against its declared size and hash: the
        problem with each ("" if none), and (index, upload) of those to keep, now read-only
        and not yet durable nor visible.  Those that do not match, or whose blob the store
        has already, are removed."""
        problems = [""] * len(batch)
        keeping: list[tuple[int, PendingUpload]] = []
        for index, (upload, size, sha256) in enumerate(batch):
            try:
                new = self._verified(upload, size, sha256)
            except BlobError as exc:
                problems[index] = str(exc)
                self._drop(upload)
                continue
            except OSError as exc:  # the disk is full, or failing: this output cannot be kept
                problems[index] = self._cannot_keep(upload.path, exc)
                self._drop(upload)
                continue
            if new:
                keeping.append((index, upload))
            else:
                self._drop(upload)  # the store has it already
        return problems, keeping

    @property
    def whole_fs_sync(self) -> bool:
        """Whether ``sync_data`` syncs every file at once (one call covers all)."""
        return _syncfs_works()

    def sync_data(self, keeping: list[tuple[int, PendingUpload]]) -> None:
        """Make the data of ``keeping``'s files durable (``OSError`` if it could not)."""
        if self.whole_fs_sync:
            self._syncfs()
            return
        for path in dict.fromkeys(upload.written().tmp for _, upload in keeping):
            with path.open("rb") as f:  # (a pack once for all its blobs)
                os.fsync(f.fileno())

    def stage_index(self, keeping: list[tuple[int, PendingUpload]]) -> str | None:
        """Write the index file of the packed blobs of ``keeping`` (``PackIndex.stage``),
        before ``sync_data`` makes it durable with the packs (elsewhere than on Linux it is
        fsynced here); its temporary name, or None if none of them is packed."""
        packed = [u.file for _, u in keeping if isinstance(u.file, PackedFile)]
        if not packed:
            return None
        tmp = self.packs.stage(self._pack_name(), packed)
        if not self.whole_fs_sync:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return tmp

    def unpublish(
        self, tmp: str, keeping: list[tuple[int, PendingUpload]], published: bool
    ) -> None:
        """Keeping failed after ``stage_index``: remove the index file staged, or (once
        ``publish_index`` ran) forget its blobs (``PackIndex.forget``)."""
        if published:
            self.packs.forget([u.file for _, u in keeping if isinstance(u.file, PackedFile)])
        else:
            self.packs.drop_staged(tmp)

    def publish_index(self, tmp: str, keeping: list[tuple[int, PendingUpload]]) -> set[Path]:
        """Make the index file ``stage_index`` wrote (made durable since) count: the packed
        blobs of ``keeping`` are in the store; the directory changed."""
        packed = [u.file for _, u in keeping if isinstance(u.file, PackedFile)]
        self.packs.publish(tmp, packed)
        for _, upload in keeping:
            if isinstance(upload.file, PackedFile):
                upload.done = True
        return {self.packs.dir}

    def place(self, keeping: list[tuple[int, PendingUpload]]) -> set[Path]:
        """Rename each of ``keeping`` (made durable) into place; the directories changed."""
        dirs: set[Path] = set()
        parents: set[str] = set()
        root = self._root
        for _, upload in keeping:
            file = upload.written()
            if isinstance(file, PackedFile):
                continue  # (kept by ``publish_index``)
            sha256 = file.hexdigest()
            parent = f"{root}/{sha256[:2]}"
            source = os.fspath(file.tmp)
            target = f"{parent}/{sha256}"
            try:
                os.replace(source, target)
            except FileNotFoundError:  # its directory is not there yet (one stat less a file)
                if not os.path.exists(source):
                    raise
                with contextlib.suppress(FileExistsError):  # (made by another thread)
                    os.mkdir(parent)
                dirs.add(self.root)
                os.replace(source, target)
            parents.add(parent)
            file.kept = True
            upload.done = True
        dirs.update(Path(parent) for parent in parents)
        return dirs

    def sync_entries(self, dirs: set[Path]) -> None:
        """Make the renames ``place`` made in ``dirs`` durable."""
        if self.whole_fs_sync:
            self._syncfs()
        else:
            for path in sorted(dirs):
                fsync_dir(path)
        self.health.ok("outputs")

    def abandon(self, keeping: list[tuple[int, PendingUpload]], exc: OSError) -> str:
        """``keeping`` cannot all be kept (a sync or a rename failed): report it, remove what
        was not placed, and say why."""
        for _, upload in keeping:
            self._drop(upload)
        return self._cannot_keep("outputs", exc)

    def _syncfs(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _syncfs(fd)
        finally:
            os.close(fd)

    def _verified(self, upload: PendingUpload, size: int, sha256: str) -> bool:
        """Close ``upload`` and check it (``BlobError`` if it does not match); make it
        read-only.  False if the store has that blob already."""
        if upload.done:
            raise BlobError(f"{upload.path}: its upload was refused")
        file = upload.written()
        file.close()
        try:
            file.verify(size, sha256)
        except HashMismatch as exc:
            raise BlobError(
                f"{upload.path}: received {exc.size} bytes with sha256 {exc.sha256}, "
                f"declared {size} bytes with {sha256}"
            ) from None
        if sha256 in self.packs.places or os.path.exists(self._path_of(sha256)):
            return False
        if not isinstance(file, PackedFile):  # (a pack is created read-only)
            os.chmod(file.tmp, _READ_ONLY)
        return True

    def _cannot_keep(self, what: str, exc: OSError) -> str:
        self.failed(exc)
        return f"{what}: the runner cannot keep it: {exc}"

    def _drop(self, upload: PendingUpload) -> None:
        """Done with ``upload``: remove its temporary file, unless it was kept."""
        upload.done = True
        if upload.file is not None:
            upload.file.discard()  # (closes it, and removes it unless it was kept)

    def as_file(self, sha256: str, copies: list[Path]) -> Path:
        """A file holding the blob, for a program to read: its own, or (a packed one) a copy
        among the partial uploads, added to ``copies`` for the caller to remove."""
        data = self.packed(sha256)
        if data is None:
            return self.path_of(sha256)
        copy = self.new_temp("packed")
        copies.append(copy)
        copy.write_bytes(data)
        return copy

    def new_temp(self, prefix: str) -> Path:
        """A fresh empty file among the partial uploads (removed with them after a crash)."""
        fd, name = tempfile.mkstemp(dir=self.root / "tmp", prefix=f"upload-{prefix}-")
        os.close(fd)
        return Path(name)

    def add_file(self, tmp: Path) -> tuple[int, str]:
        """Move a finished file the runner wrote itself (a Nix export) into the store under
        its hash; returns (size, sha256)."""
        digest = hashlib.sha256()
        size = 0
        try:
            with tmp.open("rb") as f:
                while block := f.read(WRITE_BATCH):
                    digest.update(block)
                    size += len(block)
                os.fsync(f.fileno())
            sha256 = digest.hexdigest()
            target = self.path_of(sha256)
            if not target.exists():
                target.parent.mkdir(exist_ok=True)
                os.chmod(tmp, 0o444)
                os.replace(tmp, target)
                fsync_dir(target.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return size, sha256

    def discard_many(self, uploads: list[PendingUpload]) -> None:
        for upload in uploads:
            self.discard(upload)

    def discard(self, upload: PendingUpload) -> None:
        upload.staged.clear()
        upload.done = True
        if upload.file is not None:
            upload.file.discard()

    def read(self, sha256: str, offset: int, length: int) -> tuple[bytes, bool]:
        """``length`` bytes at ``offset``, and whether they reach the end of the blob."""
        pieces, eof = self.read_pieces(sha256, offset, length, length)
        return pieces[0], eof

    def _locate(self, sha256: str) -> tuple[int, int, int]:
        """A descriptor to read the blob from, where it starts and its size (``BlobError`` if
        the store has none)."""
        place = self.packs.find(sha256)
        path = self._path_of(sha256) if place is None else place[0]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobError(f"no file with sha256 {sha256}") from None
        if place is not None:
            return fd, place[1], place[2]
        try:
            return fd, 0, os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise

    def read_whole(self, sha256: str, limit: int) -> bytes | None:
        """The whole blob, or None if it holds more than ``limit`` bytes."""
        fd, offset, size = self._locate(sha256)
        try:
            if size > limit:
                return None
            return self._read_at(fd, offset, size, sha256)
        finally:
            os.close(fd)

    def read_many(self, shas: Sequence[str], limit: int) -> list[bytes] | None:
        """The blobs of ``shas``, one after the other, as pieces to join (not one a blob), or
        None if they hold more than ``limit`` bytes together.  Packed blobs that lie one
        after the other in a pack (the outputs of one upload, fetched in the same order) are
        one ``pread`` and one piece, and each pack is opened once."""
        places = self.packs.places
        datas: list[bytes] = []
        packs: dict[str, int] = {}  # pack path -> descriptor, for this call
        run: list[tuple[str, int, int]] = []  # adjacent places in one pack, not read yet
        total = 0

        def read_run() -> None:
            path, start = run[0][0], run[0][1]
            fd = packs.get(path)
            if fd is None:
                fd = packs[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            end = run[-1][1] + run[-1][2]
            data = os.pread(fd, end - start, start)
            if len(data) != end - start:
                raise BlobError(f"{path}: read {len(data)} bytes of {end - start}")
            datas.append(data)
            run.clear()

        try:
            for sha256 in shas:
                place = places.get(sha256)
                if place is not None:
                    total += place[2]
                    if total > limit:
                        return None
                    if run and (place[0] != run[-1][0] or place[1] != run[-1][1] + run[-1][2]):
                        read_run()
                    run.append(place)
                    continue
                if run:
                    read_run()
                data = self.read_whole(sha256, limit - total)
                if data is None:
                    return None
                total += len(data)
                datas.append(data)
            if run:
                read_run()
        finally:
            for fd in packs.values():
                os.close(fd)
        return datas

    @staticmethod
    def _read_at(fd: int, offset: int, size: int, sha256: str) -> bytes:
        data = os.pread(fd, size, offset) if size else b""
        if len(data) != size:  # shorter than its place says: not a blob this store wrote
            raise BlobError(f"{sha256}: read {len(data)} bytes of a {size}-byte file")
        return data

    def read_pieces(
        self, sha256: str, offset: int, length: int, piece: int
    ) -> tuple[list[bytes], bool]:
        """``length`` bytes at ``offset`` as pieces of ``piece`` bytes (each read straight
        into its own object: nothing is copied to cut them), and whether they reach the end
        of the blob.  At least one piece, maybe empty."""
        fd, base, size = self._locate(sha256)
        try:
            end = min(offset + length, size)
            pieces = None
            if end - offset >= DIRECT_READ_MIN:  # (written by a ``DirectFile``: not cached)
                pieces = read_direct(fd, base + offset, base + end, piece)
            if pieces is None:
                pieces = [
                    os.pread(fd, min(piece, end - start), base + start)
                    for start in range(offset, end, piece)
                ]
            pieces = pieces or [b""]
        finally:
            os.close(fd)
        got = sum(len(p) for p in pieces)
        return pieces, offset + got >= size


@functools.cache
def _syncfs_works() -> bool:
    """Whether ``syncfs`` exists and reports write-back errors (Linux 5.8 and later: before,
    it returned 0 whatever happened, and only an fsync of each file would say)."""
    if sys.platform != "linux":
        return False
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8) and _libc() is not None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syncfs.argtypes = [ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def _syncfs(fd: int) -> None:
    """``syncfs(2)`` of the file system holding ``fd``; ``OSError`` if it failed."""
    libc = _libc()
    assert libc is not None
    if libc.syncfs(fd) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@attrs.define(eq=False)
class Storage:
    """The runner's files: content-addressed outputs and per-attempt logs."""

    blobs: BlobStore
    logs: LogStore
    #: the runner's Nix store, which ``drv`` submissions are read from and Nix builds'
    #: outputs are imported into (the machine's own store unless ``--nix-store`` says).
    nix: NixStore = attrs.field(factory=NixStore)
    #: the export file made of each store path of ``nix`` so far (``runner.nix.plan``).
    nix_exports: dict[str, FileInfo] = attrs.field(factory=dict)

    @classmethod
    def in_dir(
        cls,
        state_dir: Path,
        nix_store: Path | None = None,
        health: Health | None = None,
        followers: Followers | None = None,
    ) -> Storage:
        """``followers``: the farm's (``Farm.followers``), so that log appends and build
        changes wake the same waiters."""
        health = health if health is not None else Health()
        return cls(
            blobs=BlobStore(state_dir / "blobs", health),
            logs=LogStore(state_dir / "logs", health, followers),
            nix=NixStore(nix_store),
        )

    @property
    def health(self) -> Health:
        return self.blobs.health
