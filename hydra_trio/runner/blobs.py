"""Content-addressed files in the runner's state dir: build outputs, served again as inputs.

A file lives at ``<root>/<first two hex digits>/<sha256>``.  An upload is written to a
temporary file (in ``<root>/tmp``, or a small one as ``.upload-*`` in the directory its blob
will be in), hashed as it arrives, and renamed into place only after its
size and hash match what the builder declared, so a crash or a lying builder never leaves a
half-written or wrong file visible.  Every name in the store comes from a hash, from
``mkstemp`` or from ``BlobStore._temp_name``, never from a builder: an output's path is only
ever a label, so no path a builder sends can make the runner write outside ``root``.
Methods block unless they say otherwise: call them through ``trio.to_thread.run_sync``, many
files per call where they take many.
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
from pathlib import Path

import attrs

from hydra_trio.diskio import HashingFile, HashMismatch, fsync_dir
from hydra_trio.nixstore import NixStore
from hydra_trio.protocol.messages import FileInfo
from hydra_trio.runner.health import Health
from hydra_trio.runner.logs import Followers, LogStore


class BlobError(Exception):
    """An upload did not match what was declared, or a blob is missing."""


#: Upload bytes staged in memory before one thread hop writes and hashes them.
WRITE_BATCH = 1024 * 1024
#: How ``write_small`` creates a temporary file: a new one, read-only from the start (its
#: descriptor may still write it), so that keeping it takes no ``chmod``.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_ONLY = 0o444


class SmallFile:
    """The temporary file of a small upload ``write_small`` wrote whole: its name in the
    store's ``tmp``, size and sha256 (hashed from the data it was written from: nothing is
    read back), and no descriptor.  What ``HashingFile`` is to a streamed upload, with one
    object per file instead of five (file, buffer, hasher, path, ``HashingFile``)."""

    __slots__ = ("dir", "kept", "name", "sha256", "size")

    def __init__(self, dir: str, name: str, size: int, sha256: str) -> None:
        self.dir = dir
        self.name = name
        self.size = size
        self.sha256 = sha256
        #: ``place`` renamed it: its name is no longer ours to remove.
        self.kept = False

    @property
    def tmp(self) -> Path:
        return Path(self.dir, self.name)

    def hexdigest(self) -> str:
        return self.sha256

    def close(self) -> None:
        """Nothing to close (``write_small`` closed it)."""

    def verify(self, size: int, sha256: str) -> None:
        if self.size != size or self.sha256 != sha256:
            raise HashMismatch(self.size, self.sha256, size, sha256)

    def discard(self) -> None:
        """Remove the file, unless it was kept."""
        if not self.kept:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.dir}/{self.name}")


@attrs.define(eq=False)
class PendingUpload:
    """One output file arriving in chunks."""

    #: the builder's name for it: for messages only, never part of a file name.
    path: str
    #: the temporary file it is written and hashed into; None for a small upload until
    #: ``write_small`` has written it (``BlobStore.small``), then a ``SmallFile``.
    file: HashingFile | SmallFile | None
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

    def written(self) -> HashingFile | SmallFile:
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

    #: ``root`` as a string, and the start of ``_temp_name``'s names.
    _root: str = attrs.field(init=False)
    _prefix: str = attrs.field(init=False)
    _serial: itertools.count[int] = attrs.field(factory=itertools.count, init=False)

    def __attrs_post_init__(self) -> None:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        self._root = os.fspath(self.root)
        self._prefix = f"upload-s{secrets.token_hex(4)}-"

    def _temp_name(self) -> str:
        """A name for a new temporary file (unique for this store: ``_CREATE`` refuses a name
        taken anyway).  Cheaper than ``mkstemp``'s random ones, and as ``upload-*`` (or
        ``.upload-*`` beside the blobs) removed by ``remove_partial_uploads`` after a crash."""
        return f"{self._prefix}{next(self._serial):x}"

    def remove_partial_uploads(self) -> int:
        """Delete uploads a killed runner left half-written: ``upload-*`` in ``tmp``, and the
        small ones' ``.upload-*`` beside the blobs (one listing of each of the 256 blob
        directories).  Only call it while holding the state dir's lock (no other runner can
        be writing them).  Returns how many."""
        removed = 0
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
        return self.path_of(sha256).is_file()

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
        return PendingUpload(path=path, file=HashingFile(Path(name), os.fdopen(fd, "wb")))

    def small(self, path: str, data: bytes) -> PendingUpload:
        """A complete upload of one frame (``data``), staged in memory without I/O (call it
        on the event loop); ``write_small`` writes it, with many others in one thread hop."""
        upload = PendingUpload(path=path, file=None)
        self.stage(upload, 0, data, eof=True)
        return upload

    def write_small(self, uploads: list[PendingUpload]) -> None:
        """Write, hash and close each upload of ``uploads`` (from ``small``) into a temporary
        file of its own (a ``SmallFile``, read-only already): many small uploads per thread
        hop instead of three hops each, and per file one hash of its data, one ``open``, one
        ``write`` and one ``close``.  The file is made in the directory its blob will be in
        (``.upload-*``), so that ``place`` renames it within one directory: renames from a
        shared ``tmp`` into 256 others took a lock each that the kernel holds for every
        cross-directory rename of the file system (100,000 took 1.6-1.7 s, in one thread or
        two; within their directories, 1.0-1.1 s in two).  An upload whose file cannot be
        created or written (the disk is full) is refused, alone: its result will be
        ``upload-failed``.  Blocking."""
        for upload in uploads:
            chunks = upload.staged
            upload.staged = []
            upload.staged_size = 0
            if not upload.done:  # (else discarded meanwhile)
                self._write_one(upload, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _write_one(self, upload: PendingUpload, data: bytes) -> None:
        sha256 = hashlib.sha256(data).hexdigest()
        shard = f"{self._root}/{sha256[:2]}"
        made = False
        while True:
            name = f".{self._temp_name()}"
            try:
                try:
                    fd = os.open(f"{shard}/{name}", _CREATE, _READ_ONLY)
                    break
                except FileNotFoundError:  # the blob's directory is not there yet
                    if made:
                        raise
                    with contextlib.suppress(FileExistsError):  # (made by another thread)
                        os.mkdir(shard)
                    made = True
            except FileExistsError:
                continue  # (left by another store on the same directory: another name)
            except OSError as exc:
                self.failed(exc)
                upload.done = True
                return
        upload.file = SmallFile(shard, name, len(data), sha256)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as exc:
            self.failed(exc)
            self.discard(upload)

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
        ``sync_data``, ``place``, ``sync_entries`` in one call (a result of many files
        calls them a batch per thread hop, ``UploadReceiver.check``)."""
        problems, keeping = self.verify_many(batch)
        if not keeping:
            return problems
        try:
            self.sync_data(keeping)
            self.sync_entries(self.place(keeping))
        except OSError as exc:
            problem = self.abandon(keeping, exc)
            for index, _ in keeping:
                problems[index] = problem
        return problems

    # A blob becomes visible only complete and verified: every kept file's data is made
    # durable first (``sync_data``), then each is renamed into place (``place``), then the
    # renames are made durable (``sync_entries``), so the database may say the build
    # succeeded as soon as that is done and a power loss loses nothing.  On Linux (5.8 and
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
        for _, upload in keeping:
            with upload.written().tmp.open("rb") as f:
                os.fsync(f.fileno())

    def place(self, keeping: list[tuple[int, PendingUpload]]) -> set[Path]:
        """Rename each of ``keeping`` (made durable) into place; the directories changed."""
        dirs: set[Path] = set()
        parents: set[str] = set()
        root = self._root
        for _, upload in keeping:
            file = upload.written()
            sha256 = file.hexdigest()
            parent = f"{root}/{sha256[:2]}"
            source = (
                f"{file.dir}/{file.name}" if isinstance(file, SmallFile) else os.fspath(file.tmp)
            )
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
        if parents:  # (``write_small`` may have made a directory: its entry is in root)
            dirs.add(self.root)
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
        if os.path.exists(self._path_of(sha256)):
            return False
        if not isinstance(file, SmallFile):  # (a SmallFile is created read-only)
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

    def _open(self, sha256: str) -> int:
        """A descriptor of the blob, to read (``BlobError`` if the store has none)."""
        try:
            return os.open(self._path_of(sha256), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobError(f"no file with sha256 {sha256}") from None

    def read_whole(self, sha256: str, limit: int) -> bytes | None:
        """The whole blob, or None if it holds more than ``limit`` bytes."""
        fd = self._open(sha256)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                return None
            data = os.read(fd, size + 1) if size else b""
        finally:
            os.close(fd)
        if len(data) != size:  # changed while read: not a blob this store wrote
            raise BlobError(f"{sha256}: read {len(data)} bytes of a {size}-byte file")
        return data

    def read_pieces(
        self, sha256: str, offset: int, length: int, piece: int
    ) -> tuple[list[bytes], bool]:
        """``length`` bytes at ``offset`` as pieces of ``piece`` bytes (each read straight
        into its own object: nothing is copied to cut them), and whether they reach the end
        of the blob.  At least one piece, maybe empty."""
        fd = self._open(sha256)
        try:
            size = os.fstat(fd).st_size
            end = min(offset + length, size)
            pieces = [
                os.pread(fd, min(piece, end - start), start) for start in range(offset, end, piece)
            ] or [b""]
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
