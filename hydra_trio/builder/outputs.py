"""A build's outputs: what it left in ``$OUT``, listed, hashed and uploaded.

``scan_outputs`` lists ``$OUT`` without ever following a link (files with size and sha256,
links as links), refuses what cannot be an output (``BadOutput``) and an oversized ``$OUT``
before reading it (``OutputTooLarge``).  ``upload`` streams the listed files to the runner,
reading each through ``open_beneath`` so a file swapped for a link or fifo after the scan is
refused, not read through.  ``scan_and_upload``, what a command build uses, does both and
reads every file once: the small files are sent from what the scan read to hash them, the
larger ones hashed as they are read for their upload, so the listing is what was sent.  A
build's leftover processes may still be changing ``$OUT`` meanwhile: nothing here trusts
what the scan saw.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import attrs
import trio

from hydra_trio.builder.attempt import MANY_FILES, ROUND_TRIPS, Send, send_many
from hydra_trio.diskio import beside
from hydra_trio.protocol.codec import TRANSFER_FRAME
from hydra_trio.protocol.messages import (
    MAX_UPLOAD_FILES,
    Assign,
    FileInfo,
    Message,
    UploadData,
    UploadFiles,
)
from hydra_trio.protocol.validators import encodable

#: Bytes read per thread hop while uploading: large enough that the hops do not set the pace;
#: each read goes out in frames of ``codec.TRANSFER_FRAME`` bytes.
UPLOAD_CHUNK = 1024 * 1024
_HASH_BLOCK = 1024 * 1024
#: Files of at most ``TRANSFER_FRAME`` bytes (one frame each) are read this many per thread
#: hop, and about this many bytes: three hops a file (open, read, close) made 100,000 small
#: outputs cost more than everything else their upload does.
SMALL_BATCH = 256
SMALL_BATCH_BYTES = 1024 * 1024
#: Batches of small files sent beyond the last the runner has answered (``_send_small``):
#: about 1,000 frames, 30 ms of the runner's reading.
UPLOAD_WINDOW = 4
#: A large file's frames go out several per write (``WriteGroups``): as many as the link
#: took in about this long, at most ``GROUP_MOST`` (a chunk).
GROUP_TIME = 0.05
GROUP_MOST = UPLOAD_CHUNK // TRANSFER_FRAME


@attrs.define
class WriteGroups:
    """How many frames of a large upload to hand to the socket in one write.  A frame a
    write cost the builder's event loop a ``sendmsg``, a wait for the socket and a scheduler
    pass per 64 KiB (about 1.5 s of CPU per GiB); a chunk a write is faster, but a ping sent
    meanwhile waits for the whole write, and over a slow link (200 KB/s: 5 s a MiB) the runner's
    Pong came too late.  So a write holds the frames the link took in ``GROUP_TIME`` before:
    one at first, twice as many after a write the socket took at once (its buffers had room),
    and after one it had to drain for, as many as went out in ``GROUP_TIME`` at that write's
    rate.  A ping then waits at most about ``GROUP_TIME`` (or, while the size grows, for a write
    of twice what the link last took at once) beyond what the kernel holds."""

    size: int = 1

    def took(self, frames: int, nbytes: int, seconds: float) -> None:
        """A write of ``frames`` frames holding ``nbytes`` took ``seconds``."""
        if seconds <= GROUP_TIME / 4:
            self.size = min(max(self.size, frames) * 2, GROUP_MOST)
            return
        per_frame = nbytes / frames
        self.size = max(1, min(GROUP_MOST, int(nbytes / seconds * GROUP_TIME / per_frame)))


class OutputTooLarge(Exception):
    """``$OUT`` holds more bytes than the build may upload."""

    def __init__(self, total: int, limit: int) -> None:
        super().__init__(f"outputs are {total} bytes, the limit is {limit}")


class BadOutput(Exception):
    """``$OUT`` holds something that cannot be an output: a device file, fifo or socket, a
    name that is not UTF-8, more files than one result can list, or a file that changed into
    something else while it was read."""


#: The most bytes the listing of a build's outputs may take (paths and link targets, plus
#: ~100 bytes of hash and framing per file): a bound on the builder's memory, as the listing
#: travels in pieces (``OutputList``, 1.3) of about 256 KiB.  (A runner older than 1.3 takes
#: it in the ``Result`` alone: one that does not fit a frame fails the build, ``jobs``.)
#: A bigger ``$OUT`` fails its build instead of the connection.
MAX_OUTPUT_LISTING = 64 * 1024 * 1024

_KIND = {
    stat.S_IFIFO: "a fifo",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def open_beneath(root: Path, rel: str) -> BinaryIO:
    """Open the regular file ``rel`` under ``root`` without following a symbolic link at any
    step, and without blocking on a fifo: a build's leftover process may swap a file for a
    link or fifo after the scan, and the builder must then refuse it, not read through it."""
    return _open_sized(root, rel)[0]


def _open_sized(root: Path, rel: str) -> tuple[BinaryIO, int]:
    """``open_beneath``, and the file's size when it was opened."""
    with Beneath(root) as beneath:
        fd, size = beneath.open(rel)
    return os.fdopen(fd, "rb"), size


class Beneath:
    """``open_beneath`` for many files of one tree in a row, keeping the descriptor of the
    last directory opened (files listed by ``scan_outputs`` come a directory at a time): each
    directory is still opened one step at a time with ``O_NOFOLLOW`` from ``root``, so a
    link swapped in anywhere is refused.  Use it as a context manager (closes that
    descriptor); blocking."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dir = ""
        self._fd = -1

    def __enter__(self) -> Beneath:
        return self

    def __exit__(self, *exc: object) -> None:
        self._drop()

    def _drop(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._dir = -1, ""

    def _dir_fd(self, parts: list[str]) -> int:
        parent = "/".join(parts)
        if self._fd >= 0 and parent == self._dir:
            return self._fd
        self._drop()
        step = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts:
                parent_fd, fd = fd, os.open(part, step, dir_fd=fd)
                os.close(parent_fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._dir = fd, parent
        return fd

    def open(self, rel: str) -> tuple[int, int]:
        """A descriptor of the regular file ``rel`` (``BadOutput`` if it is not one any more,
        or a link is on its path), and its size then; the caller closes it."""
        parts = rel.split("/")
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(parts[-1], flags, dir_fd=self._dir_fd(parts[:-1]))
        except OSError as exc:  # ELOOP, ENOTDIR, ENOENT: not what the scan found
            self._drop()
            raise BadOutput(f"output {rel} changed while it was read: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BadOutput(f"output {rel} changed while it was read: not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return fd, info.st_size

    def hash(self, rel: str, keep: int = 0) -> tuple[int, str, bytes | None]:
        """Size and sha256 of what the regular file ``rel`` holds now, and its contents if
        they are at most ``keep`` bytes (else None)."""
        digest = hashlib.sha256()
        size = 0
        blocks: list[bytes] = []
        fd, expected = self.open(rel)
        try:
            while True:
                asked = _read_size(expected - size, _HASH_BLOCK)
                block = os.read(fd, asked)
                digest.update(block)
                size += len(block)
                if size <= keep:
                    blocks.append(block)
                if len(block) < asked:  # (a regular file reads short only at its end)
                    break
        finally:
            os.close(fd)
        data = None
        if size <= keep:
            data = blocks[0] if len(blocks) == 1 else b"".join(blocks)
        return size, digest.hexdigest(), data

    def read(self, rel: str, limit: int) -> bytes:
        """At most ``limit`` bytes of the regular file ``rel`` (``BadOutput`` if it is not
        one any more, or a link is on its path)."""
        fd, expected = self.open(rel)
        try:
            pieces: list[bytes] = []
            left = limit
            while left > 0:
                asked = _read_size(expected - (limit - left), left)
                piece = os.read(fd, asked)
                if piece:
                    pieces.append(piece)
                    left -= len(piece)
                if len(piece) < asked:  # (a regular file reads short only at its end)
                    break
        finally:
            os.close(fd)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _read_size(expected: int, most: int) -> int:
    """Bytes to ask a read for when ``expected`` are left by fstat's count: one more, so a
    small file takes one short read (its end) and no read that finds nothing, nor a buffer of
    ``most`` bytes; ``most`` once the file has grown past that count."""
    return min(most, expected + 1) if expected >= 0 else most


def hash_beneath(root: Path, rel: str) -> tuple[int, str]:
    """Size and sha256 of what ``rel`` under ``root`` holds now (see ``open_beneath``)."""
    with Beneath(root) as beneath:
        size, sha256, _ = beneath.hash(rel)
    return size, sha256


def _walk_error(exc: OSError) -> None:
    raise BadOutput(f"cannot read {exc.filename}: {exc.strerror}")


def _entries(out_dir: Path) -> list[tuple[str, os.stat_result, str]]:
    """(path relative to ``out_dir``, lstat, link target) of everything in it but directories,
    in a stable order.  ``os.fwalk`` never follows a link, not even one a leftover process
    swaps in while it walks, and neither does anything here."""
    try:
        top = out_dir.lstat()
    except FileNotFoundError:
        raise BadOutput("$OUT was removed by the build") from None
    if not stat.S_ISDIR(top.st_mode):
        raise BadOutput("$OUT is no longer a directory: the build replaced it")
    found: list[tuple[str, os.stat_result, str]] = []
    listing = 0
    where = os.fspath(out_dir)
    walk = os.fwalk(where, onerror=_walk_error, follow_symlinks=False)
    for root, dirs, names, root_fd in walk:
        dirs.sort()
        # (strings, not a Path per file: 7 us each, 0.7 s of 100,000 files)
        base = root[len(where) :].lstrip("/")
        prefix = base + "/" if base else ""
        for name in [*sorted(names), *dirs]:
            info = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                continue
            rel = prefix + name
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
                kind = _KIND.get(stat.S_IFMT(info.st_mode), "not a regular file")
                raise BadOutput(
                    f"output {rel.encode('utf-8', 'replace')!r} is {kind}: $OUT may hold only "
                    "files, directories and symbolic links"
                )
            link = os.readlink(name, dir_fd=root_fd) if stat.S_ISLNK(info.st_mode) else ""
            found.append((rel, info, link))
            listing += len(rel) + len(link) + 100
            if listing > MAX_OUTPUT_LISTING:
                raise BadOutput(
                    f"$OUT holds too many files (at least {len(found)}) to list in one result"
                )
    return found


def nothing_in(out_dir: Path) -> bool:
    """True if ``out_dir`` is a directory (not a link to one) holding nothing: then
    ``scan_outputs`` would find nothing.  Three system calls, for the event loop; False also
    when it cannot tell (``scan_outputs``, in a thread, says why)."""
    try:
        fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        with os.scandir(fd) as entries:
            return next(entries, None) is None
    except OSError:
        return False
    finally:
        os.close(fd)


#: What ``scan_outputs`` hands ``on_small``: files of at most a frame, with their contents.
SmallBatch = list[tuple[FileInfo, bytes]]


@attrs.frozen
class Unhashed:
    """A file of ``$OUT`` larger than a frame that ``_scan`` left to be hashed as it is
    uploaded (``scan_and_upload``)."""

    path: str
    executable: bool


def scan_outputs(out_dir: Path, max_bytes: int | None = None) -> list[FileInfo]:
    """Every file under ``out_dir`` with size and hash.  Symbolic links are listed as links
    (their target as text) and never followed; devices, fifos and sockets are refused
    (``BadOutput``).  Sizes are summed before anything is hashed, so an oversized ``$OUT`` is
    refused (``OutputTooLarge``) without reading it.  Runs in a worker thread."""
    return [info for info in _scan(out_dir, max_bytes) if isinstance(info, FileInfo)]


def _scan(
    out_dir: Path,
    max_bytes: int | None = None,
    on_small: Callable[[SmallBatch], None] | None = None,
) -> list[FileInfo | Unhashed]:
    """``scan_outputs``; with ``on_small``, the files of at most ``TRANSFER_FRAME`` bytes
    are handed to it as they are hashed, with the contents read for the hash
    (``SMALL_BATCH`` files, or ``SMALL_BATCH_BYTES``, per call), and the larger ones are
    not read: they are listed ``Unhashed``.  Runs in a worker thread."""
    empty = hashlib.sha256(b"").hexdigest()
    try:
        found = _entries(out_dir)
    except RecursionError:
        raise BadOutput("$OUT is nested too deeply") from None
    except OSError as exc:  # a directory was swapped or vanished under us, or out of fds
        raise BadOutput(f"cannot read $OUT: {exc.strerror or exc}") from None
    total = sum(info.st_size for _, info, _ in found if stat.S_ISREG(info.st_mode))
    if max_bytes is not None and total > max_bytes:
        raise OutputTooLarge(total, max_bytes)
    files: list[FileInfo | Unhashed] = []
    hashed = 0
    keep = 0 if on_small is None else TRANSFER_FRAME
    small: SmallBatch = []
    small_bytes = 0
    with Beneath(out_dir) as beneath:  # (files come a directory at a time: one open each)
        for rel, info, link in found:
            if not (rel.isascii() or encodable(rel)) or not (link.isascii() or encodable(link)):
                name = rel.encode("utf-8", "replace")
                raise BadOutput(f"output {name!r} (or its link target) is not a UTF-8 name")
            if link:
                files.append(FileInfo(path=rel, size=0, sha256=empty, link=link))
                continue
            executable = bool(info.st_mode & 0o111)
            if keep and info.st_size > keep:
                files.append(Unhashed(rel, executable))
                continue
            size, sha256, data = beneath.hash(rel, keep)
            if keep and data is None:  # grown past a frame since it was listed
                files.append(Unhashed(rel, executable))
                continue
            hashed += size
            if max_bytes is not None and hashed > max_bytes:  # it grew while being read
                raise OutputTooLarge(hashed, max_bytes)
            file = FileInfo.found(rel, size, sha256, executable)
            files.append(file)
            if on_small is not None and data is not None:
                small.append((file, data))
                small_bytes += size
                if len(small) >= SMALL_BATCH or small_bytes >= SMALL_BATCH_BYTES:
                    on_small(small)
                    small, small_bytes = [], 0
    if on_small is not None and small:
        on_small(small)
    return files


async def scan_and_upload(
    assign: Assign, out_dir: Path, max_bytes: int | None, send: Send
) -> list[FileInfo]:
    """``scan_outputs`` and ``upload`` at once, every file read once: the small ones go out
    as the scan hashes them (from what it read for the hash), the larger ones once the scan
    is over, each hashed as it is read for its upload (so ``$OUT`` is not read twice, and
    what is listed is what was sent).  The outputs, as ``scan_outputs`` lists them."""
    batches, arriving = trio.open_memory_channel[SmallBatch](1)
    scanned: list[FileInfo | Unhashed] = []

    async def scan() -> None:
        async with batches:
            scanned.extend(
                await trio.to_thread.run_sync(
                    functools.partial(
                        _scan,
                        out_dir,
                        max_bytes,
                        on_small=lambda batch: trio.from_thread.run(batches.send, batch),
                    )
                )
            )

    await beside(functools.partial(_send_small, assign, arriving, send), scan)
    total = sum(info.size for info in scanned if isinstance(info, FileInfo))
    outputs: list[FileInfo] = []
    for entry in scanned:
        if isinstance(entry, Unhashed):
            left = None if max_bytes is None else max_bytes - total
            size, sha256 = await _upload_file(assign, out_dir, entry.path, send, left)
            total += size
            entry = FileInfo(path=entry.path, size=size, sha256=sha256, executable=entry.executable)
        outputs.append(entry)
    return outputs


async def upload(assign: Assign, out_dir: Path, outputs: list[FileInfo], send: Send) -> None:
    """Send every regular output file in frames of ``TRANSFER_FRAME`` bytes; the runner
    checks size and hash on arrival.  Files the scan found no larger than a frame go first,
    ``SMALL_BATCH`` of them read per thread hop while the frames of the batch before are sent
    (``_read_small``); each larger file is streamed, a worker thread reading ahead
    ``UPLOAD_CHUNK`` bytes per hop while the frames of the chunk before are sent
    (``_read_ahead``).  Memory stays bounded by three batches or chunks."""
    files = [info for info in outputs if not info.link]
    small = [info for info in files if info.size <= TRANSFER_FRAME]
    if small:
        batches, arriving = trio.open_memory_channel[list[tuple[FileInfo, bytes]]](1)
        await beside(
            functools.partial(_send_small, assign, arriving, send),
            functools.partial(_read_small, out_dir, small, batches),
        )
    await _upload_large(assign, out_dir, files, send)


async def _upload_large(assign: Assign, out_dir: Path, outputs: list[FileInfo], send: Send) -> None:
    """The upload of each regular file of ``outputs`` larger than a frame (``upload``)."""
    for info in outputs:
        if not info.link and info.size > TRANSFER_FRAME:
            await _upload_file(assign, out_dir, info.path, send)


async def _upload_file(
    assign: Assign, out_dir: Path, path: str, send: Send, max_bytes: int | None = None
) -> tuple[int, str]:
    """Stream one file, a worker thread reading (and hashing) ahead ``UPLOAD_CHUNK`` bytes
    per hop while the frames of the chunk before are sent (``_read_ahead``), up to the size
    it had when opened; the size and sha256 of what was sent.  More than ``max_bytes``
    raises ``OutputTooLarge``."""
    f, size = await trio.to_thread.run_sync(_open_sized, out_dir, path)
    digest = hashlib.sha256()
    try:
        if max_bytes is not None and size > max_bytes:
            raise OutputTooLarge(size, max_bytes)
        chunks, arriving_chunks = trio.open_memory_channel[tuple[list[bytes], bool]](1)
        sent: list[int] = []
        await beside(
            functools.partial(_send_chunks, assign, path, arriving_chunks, send, sent),
            functools.partial(_read_ahead, f, size, chunks, digest),
        )
    finally:
        await trio.to_thread.run_sync(f.close)
    return sum(sent), digest.hexdigest()


async def _read_small(
    out_dir: Path,
    small: list[FileInfo],
    batches: trio.MemorySendChannel[list[tuple[FileInfo, bytes]]],
) -> None:
    """Read the files of ``small`` (each at most a frame when scanned) into ``batches``, up
    to ``SMALL_BATCH`` files and about ``SMALL_BATCH_BYTES`` per thread hop.  A file that
    grew past a frame since is cut at a frame: its hash will not match, and the runner fails
    the upload, as for any file changed after the scan."""
    async with batches:
        start = 0
        while start < len(small):
            end, size = start, 0
            while end < len(small) and end - start < SMALL_BATCH and size < SMALL_BATCH_BYTES:
                size += small[end].size
                end += 1
            batch = await trio.to_thread.run_sync(_read_batch, out_dir, small[start:end])
            await batches.send(batch)
            start = end


def _read_batch(out_dir: Path, infos: list[FileInfo]) -> list[tuple[FileInfo, bytes]]:
    with Beneath(out_dir) as beneath:
        return [(info, beneath.read(info.path, TRANSFER_FRAME)) for info in infos]


async def _send_small(
    assign: Assign,
    arriving: trio.MemoryReceiveChannel[list[tuple[FileInfo, bytes]]],
    send: Send,
) -> None:
    """Send each small file as one ``UploadData``, a batch at a time; in a session, a ping
    follows each batch, and no more than ``UPLOAD_WINDOW`` batches go out beyond the last
    the runner has answered (``attempt.ROUND_TRIPS``).  The kernel's buffers hold megabytes:
    10,000s of frames of a few bytes, which the runner reads at ~30 us each, and every ping
    behind them waited that long (``sinceLastPing`` 1.5-2.0 s for 3 x 30,000 outputs)."""
    build_id, attempt = assign.build_id, assign.attempt
    round_trips = ROUND_TRIPS.get()
    many = MANY_FILES.get()
    marks: collections.deque[int] = collections.deque()
    async with arriving:
        async for batch in arriving:
            if many:  # (1.7) as many whole files per frame as TRANSFER_FRAME bytes hold
                for group in _frames_of(batch):
                    paths = tuple(info.path for info, _ in group)
                    contents = tuple(data for _, data in group)
                    await send(
                        UploadFiles(build_id=build_id, attempt=attempt, paths=paths, data=contents)
                    )
            else:
                for info, data in batch:
                    await send(
                        UploadData(
                            build_id=build_id,
                            attempt=attempt,
                            path=info.path,
                            offset=0,
                            data=data,
                            eof=True,
                        )
                    )
            if round_trips is not None:
                marks.append(await round_trips.mark())
                if len(marks) > UPLOAD_WINDOW:
                    await round_trips.answered(marks.popleft())


def _frames_of(batch: SmallBatch) -> list[SmallBatch]:
    """``batch`` cut into groups of at most ``MAX_UPLOAD_FILES`` files holding at most
    ``TRANSFER_FRAME`` bytes, paths and data counted (a file alone when it is that large)."""
    groups: list[SmallBatch] = []
    group: SmallBatch = []
    size = 0
    for info, data in batch:
        weight = len(data) + len(info.path.encode("utf-8", "surrogateescape")) + 8
        if group and (size + weight > TRANSFER_FRAME or len(group) >= MAX_UPLOAD_FILES):
            groups.append(group)
            group, size = [], 0
        group.append((info, data))
        size += weight
    if group:
        groups.append(group)
    return groups


async def _send_chunks(
    assign: Assign,
    path: str,
    arriving: trio.MemoryReceiveChannel[tuple[list[bytes], bool]],
    send: Send,
    sent: list[int],
) -> None:
    """Send the chunks of ``path`` as they arrive, several frames per write as the link
    allows (``WriteGroups``); the bytes sent go on ``sent``."""
    offset = 0
    groups = WriteGroups()
    async with arriving:
        async for pieces, eof in arriving:
            last = len(pieces) - 1
            frames: list[Message] = []
            for index, piece in enumerate(pieces):
                frames.append(
                    UploadData(
                        build_id=assign.build_id,
                        attempt=assign.attempt,
                        path=path,
                        offset=offset,
                        data=piece,
                        eof=eof and index == last,
                    )
                )
                offset += len(piece)
            start = 0
            while start < len(frames):
                group = frames[start : start + groups.size]
                began = trio.current_time()
                await send_many(send, group)
                size = sum(len(piece) for piece in pieces[start : start + len(group)])
                groups.took(len(group), size, trio.current_time() - began)
                sent.append(size)
                start += len(group)


async def _read_ahead(
    f: BinaryIO,
    size: int,
    chunks: trio.MemorySendChannel[tuple[list[bytes], bool]],
    digest: hashlib._Hash,
) -> None:
    """Read ``f`` in a worker thread, a chunk per hop, into ``chunks`` (pieces of a frame
    each, and whether the chunk ends the upload: it is short, or reaches ``size``, what the
    file held when it was opened: one that grows is cut there), and hash each chunk into
    ``digest`` in another worker thread while the next is read.  An error ends the channel
    and propagates (``beside`` raises it)."""
    to_hash, hashing = trio.open_memory_channel[list[bytes]](1)

    async def read() -> None:
        async with chunks, to_hash:
            offset = 0
            while True:
                pieces = await trio.to_thread.run_sync(_read_pieces, f, size - offset)
                await to_hash.send(pieces)
                length = sum(map(len, pieces))
                offset += length
                eof = length < UPLOAD_CHUNK or offset >= size
                await chunks.send((pieces, eof))
                if eof:
                    return

    async def hash_behind() -> None:
        async for pieces in hashing:
            await trio.to_thread.run_sync(_hash_pieces, digest, pieces)

    await beside(read, hash_behind)


def _hash_pieces(digest: hashlib._Hash, pieces: list[bytes]) -> None:
    for piece in pieces:
        digest.update(piece)


def _read_pieces(f: BinaryIO, most: int) -> list[bytes]:
    """Up to ``UPLOAD_CHUNK`` bytes of ``f`` (and at most ``most``) as pieces of
    ``TRANSFER_FRAME`` bytes, each read into its own object (nothing is copied to cut a
    chunk into frames); at least one piece."""
    pieces: list[bytes] = []
    left = max(0, min(UPLOAD_CHUNK, most))
    while left > 0:
        piece = f.read(min(left, TRANSFER_FRAME))
        if piece:
            pieces.append(piece)
        if len(piece) < min(left, TRANSFER_FRAME):
            break
        left -= len(piece)
    return pieces or [b""]
