"""Receiving files: writing data to disk and hashing it as it arrives, off the event loop.

A transfer's receiving side both writes and hashes every byte (the runner an upload, a builder
a fetched input), then keeps the file under its final name only if its size and hash are the
ones declared.  ``HashingFile`` is that file; ``receiving`` opens one and removes what is left
of it however the transfer ends.

Writing and hashing are both slow next to a loopback socket: sha256 runs at ~1.5 GB/s, and a
write into pages the kernel has to find first (a fresh virtual machine's memory) can be slower
still.  ``write_and_hash`` runs the two in two worker threads at the same time (both release
the GIL), so a batch costs the slower of the two instead of their sum.  Batches too small for
a second thread hop to pay off do both in one.

A large file received to be kept rather than used at once (the runner's uploaded outputs) can
be written around the page cache, ``DirectFile``, and read back the same way, ``read_direct``:
on such a virtual machine a buffered write or read of data not cached needs those pages too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import mmap
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO, Protocol

import trio

#: Batches smaller than this are written and hashed in one thread hop.
PARALLEL_MIN = 256 * 1024
#: Seconds the removal of a partial file may take when its transfer is cancelled.
DISCARD_GRACE = 30.0
#: How ``write_new`` creates a file.
_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: ``O_DIRECT`` where the platform has it (Linux), else 0 (``DirectFile`` then writes through
#: the page cache).
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
#: What direct I/O must be aligned to: the buffer's address (an ``mmap`` is page-aligned), the
#: file offset and the length of each write.  4 KiB suits every logical block size in use.
DIRECT_BLOCK = 4096
#: What a ``DirectFile`` gathers before one write.
DIRECT_BUFFER = 1024 * 1024


async def write_and_hash(
    size: int,
    write: Callable[[], None],
    hash_: Callable[[], None],
    both: Callable[[], None],
) -> None:
    """Call ``write`` and ``hash_`` in two worker threads at the same time (or ``both`` in one,
    for a batch of fewer than ``PARALLEL_MIN`` bytes).  An exception from ``write`` is raised
    as it is (not in an ``ExceptionGroup``), once the hashing is over too."""
    if size < PARALLEL_MIN:
        await trio.to_thread.run_sync(both)
        return
    await beside(lambda: trio.to_thread.run_sync(write), lambda: trio.to_thread.run_sync(hash_))


async def beside(
    main: Callable[[], Awaitable[object]], background: Callable[[], Awaitable[object]]
) -> None:
    """Run ``main`` with ``background`` running beside it (a reader ahead of a sender, a
    writer behind a receiver); return when both are done.  An exception from either cancels
    the other and is raised as it is, not in an ``ExceptionGroup``, so callers catch it as
    they would from one task (two at once stay grouped)."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(background)
            await main()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


class HashMismatch(Exception):
    """A received file's size or sha256 is not the one declared."""

    def __init__(self, size: int, sha256: str, expected_size: int, expected_sha256: str) -> None:
        super().__init__(
            f"received {size} bytes with sha256 {sha256}, "
            f"expected {expected_size} bytes with {expected_sha256}"
        )
        self.size = size
        self.sha256 = sha256
        self.expected_size = expected_size
        self.expected_sha256 = expected_sha256


class Writable(Protocol):
    """What ``HashingFile`` writes into: a binary file object, or a ``DirectFile``."""

    def write(self, data: bytes, /) -> int: ...

    def close(self) -> None: ...


class DirectFile:
    """A new file written around the page cache (``O_DIRECT``) where the file system allows
    it, else through it: for large files this process writes once and rarely reads again (the
    runner's uploaded outputs, which dependents fetch from disk).

    Why: a buffered write first needs a free page of memory per 4 KiB of file, and on a
    virtual machine whose free memory is handed back to the host (virtio-balloon free page
    reporting) finding it costs far more than the copy: on the project's VM a plain 1 GiB
    write loop took 2.5 s of kernel CPU through the page cache (~420 MB/s) and 0.09 s with
    ``O_DIRECT`` (~2 GB/s), the data going straight from this buffer to the disk.  On any
    machine it keeps gigabytes of outputs from pushing more useful pages out of memory.

    ``write`` gathers data into a page-aligned buffer of ``DIRECT_BUFFER`` bytes and writes
    it whole; ``close`` writes what is left of the last block through the page cache.  A file
    system that refuses direct I/O (tmpfs, some network file systems) gets buffered writes
    from the first refusal on.  One writer at a time; blocking: call it from a thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        #: writes go around the page cache (through ``_buffer``, ``_filled`` bytes of it used).
        self.direct = bool(_O_DIRECT) and _set_direct(fd, on=True)
        self._buffer = mmap.mmap(-1, DIRECT_BUFFER) if self.direct else None
        self._filled = 0
        self._closed = False

    def fileno(self) -> int:
        return self._fd

    def write(self, data: bytes, /) -> int:
        buffer = self._buffer
        with memoryview(data) as view:
            taken = 0
            while taken < len(view):
                if not self.direct or buffer is None:
                    write_all(self._fd, view[taken:])
                    break
                room = min(DIRECT_BUFFER - self._filled, len(view) - taken)
                buffer[self._filled : self._filled + room] = view[taken : taken + room]
                self._filled += room
                taken += room
                if self._filled == DIRECT_BUFFER:
                    self._write_gathered(DIRECT_BUFFER)
        return len(data)

    def _write_gathered(self, length: int) -> None:
        """Write the first ``length`` bytes gathered (whole blocks), then move the rest to the
        buffer's start.  A refusal (``EINVAL``: the file system takes the flag but not the
        alignment) or a short write (a nearly full disk) turns direct I/O off and writes all
        that is gathered through the page cache."""
        buffer = self._buffer
        assert buffer is not None
        with memoryview(buffer) as whole:
            done = 0
            while done < length:
                try:
                    written = os.write(self._fd, whole[done:length])
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    written = 0
                done += written
                if done < length:
                    self._through_cache(done)
                    return
            rest = self._filled - length
            if rest:
                whole[:rest] = whole[length : self._filled]
        self._filled = rest

    def _through_cache(self, start: int) -> None:
        """Turn direct I/O off and write what is gathered from ``start`` on through the page
        cache."""
        assert self._buffer is not None
        _set_direct(self._fd, on=False)
        self.direct = False
        with memoryview(self._buffer) as gathered:
            write_all(self._fd, gathered[start : self._filled])
        self._filled = 0

    def close(self) -> None:
        """Write what is gathered (its last partial block through the page cache) and close
        the descriptor, also if that write fails; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._filled:
                whole = self._filled - self._filled % DIRECT_BLOCK
                if whole:
                    self._write_gathered(whole)
                if self._filled:
                    self._through_cache(0)
        finally:
            os.close(self._fd)
            self._buffer = None  # (freed with the last view of it: an error's may be about)


#: Each worker thread's buffer for ``read_direct`` (one block more than ``DIRECT_BUFFER``: a
#: read not starting on a block boundary begins that much earlier).  Allocated once per
#: thread: fresh pages would cost what reading around the page cache saves.
_read_buffers = threading.local()


def read_direct(fd: int, offset: int, end: int, piece: int) -> list[bytes] | None:
    """The bytes of ``fd`` from ``offset`` to ``end`` (fewer if the file ends first) as
    pieces of ``piece`` bytes, read around the page cache (``O_DIRECT``, left set on ``fd``)
    into this thread's buffer: the other side of ``DirectFile``, whose files are not in the
    page cache, so that a buffered read would need a fresh page per 4 KiB as much as the
    write did.  None where it cannot be done (no ``O_DIRECT`` here, a file system refusing
    it, a piece larger than the buffer): the caller reads through the page cache."""
    if not _O_DIRECT or piece > DIRECT_BUFFER or not _set_direct(fd, on=True):
        return None
    buffer: mmap.mmap | None = getattr(_read_buffers, "buffer", None)
    if buffer is None:
        buffer = _read_buffers.buffer = mmap.mmap(-1, DIRECT_BUFFER + DIRECT_BLOCK)
    step = DIRECT_BUFFER // piece * piece  # (a read's pieces are whole but for the last)
    pieces: list[bytes] = []
    with memoryview(buffer) as view:
        at = offset
        while at < end:
            start = at - at % DIRECT_BLOCK
            want = min(step, end - at)
            span = -(-(at + want - start) // DIRECT_BLOCK) * DIRECT_BLOCK
            try:
                got = os.preadv(fd, [view[:span]], start)
            except OSError as exc:
                if exc.errno == errno.EINVAL and not pieces:
                    return None  # (the file system takes the flag, not the alignment)
                raise
            have = min(got - (at - start), want)
            if have <= 0:
                break
            first = at - start
            pieces += [
                bytes(view[cut : min(cut + piece, first + have)])
                for cut in range(first, first + have, piece)
            ]
            at += have
            if have < want:
                break
    return pieces


def _set_direct(fd: int, *, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; whether the file system let it."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)
    except OSError:
        return False
    return True


class HashingFile:
    """A file being received into ``tmp``: written and hashed as its data arrives, moved to
    its final name (read-only) only once its size and hash match, else removed.

    Writes happen one batch at a time, in order; ``write`` overlaps a batch's write and hash
    in two threads.  Every other method blocks: call it through a thread."""

    def __init__(self, tmp: Path, file: BinaryIO | Writable) -> None:
        self.tmp = tmp
        self.file = file
        self.size = 0
        self.hasher = hashlib.sha256()
        #: ``move_to`` renamed it: ``tmp`` is no longer ours to remove.
        self.kept = False

    @classmethod
    def create(cls, tmp: Path) -> HashingFile:
        """A new file at ``tmp`` (its directory made if missing; an existing file replaced)."""
        tmp.parent.mkdir(parents=True, exist_ok=True)
        return cls(tmp, tmp.open("wb"))

    async def write(self, chunks: list[bytes]) -> None:
        """Write and hash ``chunks`` in worker threads (see ``write_and_hash``)."""
        await write_and_hash(
            sum(map(len, chunks)),
            functools.partial(self.write_unhashed, chunks),
            functools.partial(self.hash_chunks, chunks),
            functools.partial(self.write_chunks, chunks),
        )

    def write_chunks(self, chunks: list[bytes]) -> None:
        """Write and hash ``chunks`` in order, without joining them."""
        self.write_unhashed(chunks)
        self.hash_chunks(chunks)

    def write_unhashed(self, chunks: list[bytes]) -> None:
        """``write_chunks`` less the hashing, which ``hash_chunks`` does (in another thread at
        the same time: one write and one hash at a time, each in order)."""
        write = self.file.write
        for data in chunks:
            write(data)
            self.size += len(data)

    def hash_chunks(self, chunks: list[bytes]) -> None:
        update = self.hasher.update
        for data in chunks:
            update(data)

    def hexdigest(self) -> str:
        """The sha256 of what was written so far."""
        return self.hasher.hexdigest()

    def close(self) -> None:
        """Close the file (its data is all written); ``verify`` and ``move_to`` still work."""
        self.file.close()

    def verify(self, size: int, sha256: str) -> None:
        """Raise ``HashMismatch`` unless what was written has this size and sha256."""
        if self.size != size or self.hasher.hexdigest() != sha256:
            raise HashMismatch(self.size, self.hasher.hexdigest(), size, sha256)

    def move_to(self, target: Path, *, durable: bool = False) -> None:
        """Close the file and rename it (read-only) to ``target``, replacing what is there.
        ``durable``: fsync the file before and its directory after, so the rename survives a
        power loss."""
        self.close()
        new_dir = not target.parent.exists()
        target.parent.mkdir(parents=True, exist_ok=True)
        if durable:
            with self.tmp.open("rb") as f:
                os.fsync(f.fileno())
        os.chmod(self.tmp, 0o444)
        os.replace(self.tmp, target)
        self.kept = True
        if durable:
            fsync_dir(target.parent)
            if new_dir:
                fsync_dir(target.parent.parent)

    def commit(self, target: Path, size: int, sha256: str, *, durable: bool = False) -> None:
        """``verify``, then ``move_to``; what does not match stays for ``discard``."""
        self.close()
        self.verify(size, sha256)
        self.move_to(target, durable=durable)

    def discard(self) -> None:
        """Close and remove the file, unless ``move_to`` moved it (then nothing happens).
        The removal does not depend on the close: closing flushes what is buffered, which
        fails on a full disk (ENOSPC), and a partial file left behind would keep it full."""
        try:
            self.file.close()
        except OSError:
            if self.kept:
                raise
            with contextlib.suppress(OSError):  # closed now, whatever the flush said
                self.file.close()
        finally:
            if not self.kept:
                self.tmp.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def receiving(tmp: Path) -> AsyncIterator[HashingFile]:
    """A ``HashingFile`` at ``tmp`` for the block, removed after it unless committed.

    The removal is shielded: a transfer is usually cut short by its connection being
    cancelled, and an unshielded await there would raise ``Cancelled`` at once and leave the
    partial file for good.  It is bounded by ``DISCARD_GRACE``, in case the disk hangs."""
    file = await trio.to_thread.run_sync(HashingFile.create, tmp)
    try:
        yield file
    finally:
        with trio.move_on_after(DISCARD_GRACE, shield=True):
            await trio.to_thread.run_sync(file.discard)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_new(path: Path | str, data: bytes, mode: int = 0o444) -> None:
    """Create ``path`` (never over another file, never through a link) holding ``data``, of
    ``mode`` whatever the umask; if it cannot be written whole (a full disk), nothing is left
    of it, whatever ``close`` says."""
    fd = os.open(path, _CREATE_NEW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # (the umask may have taken bits away: a build user reads it)
            write_all(fd, data)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


def fsync_dir(path: Path) -> None:
    """fsync the directory ``path`` (what makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
