"""Run one build's command in a fresh directory, as a child process in its own process group.

The caller owns the returned ``Result`` and sends it.  Cancelling ``execute`` (an ``Abort``, or
the connection's nursery being cancelled) kills the whole process group and removes the build
directory.  Limits: ``timeout`` (wall clock), ``max_silent`` (no output), ``max_log_bytes`` and
``max_output_bytes``; each kills the whole group and gives its own status.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import trio

from hydra_trio.diskio import beside
from hydra_trio.protocol.codec import TRANSFER_FRAME
from hydra_trio.protocol.messages import (
    Assign,
    BuildStatus,
    FileInfo,
    InputSpec,
    LogChunk,
    Message,
    Phase,
    Progress,
    Result,
    UploadData,
)
from hydra_trio.protocol.validators import encodable, is_path_component, tree_conflict

log = logging.getLogger("hydra_trio.builder")

Send = Callable[[Message], Awaitable[None]]
#: Fetch one input file into the local cache; returns its verified path there.
Fetch = Callable[[Assign, FileInfo], Awaitable[Path]]


class FetchError(Exception):
    """An input could not be fetched (an infrastructure failure: the build is retried)."""


#: Log bytes per LogChunk frame at most (a read returns what the pipe has, up to this).
LOG_CHUNK = 64 * 1024
#: Bytes read per thread hop while uploading: large enough that the hops do not set the pace;
#: each read goes out in frames of ``codec.TRANSFER_FRAME`` bytes.
UPLOAD_CHUNK = 1024 * 1024
_HASH_BLOCK = 1024 * 1024


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _deliver_cancel(process: trio.Process) -> None:
    _kill_group(process.pid)


# Build directories are recycled.  Making a build directory's five directories and removing
# them afterwards costs about 1 ms of kernel time per build on ext4 (170 us per mkdir on the
# project's machine, far more with several builds doing it at once: the journal), more than
# the rest of a no-op build's own work on the builder.  So a finished build's directory,
# once emptied, is kept as a spare (``<builds>/.spare-<random>``) and renamed into place for
# a later build: two renames instead of ten directory operations.  A directory is recycled
# only if it holds exactly its four subdirectories, each a plain directory with the mode it
# was made with; anything else (a build that replaced or chmod-ed one) is removed as before.
# Every build still starts with empty directories; a process that escaped its build's
# process group could write into a recycled directory, as it could write anywhere the
# builder's user can.  ``claim_work_dir`` removes spares with everything else at start.

_BUILD_SUBDIRS = ("work", "out", "in", "tmp")
#: In every build's environment: its build directory.
BUILD_DIR_VARIABLE = "HYDRA_TRIO_BUILD_DIR"
_SPARE_PREFIX = ".spare-"
#: Spares kept per builds directory at most (beyond that, finished directories are removed).
MAX_SPARES = 32
#: The mode this process's ``mkdir`` gives a build directory (its umask applied); None until
#: one was made.  A directory is recycled only with exactly this mode everywhere.
_dir_mode: int | None = None


def _spares(builds: Path) -> list[str]:
    with os.scandir(builds) as entries:
        return [e.name for e in entries if e.name.startswith(_SPARE_PREFIX)]


def _prepare(build_dir: Path) -> None:
    """Make ``build_dir`` with empty ``work``, ``out``, ``in`` and ``tmp``: a spare renamed
    into place if there is one, else new.  Blocking: call through a thread."""
    global _dir_mode
    if build_dir.exists():
        shutil.rmtree(build_dir)
    builds = build_dir.parent
    with contextlib.suppress(FileNotFoundError):  # no builds dir yet: no spare either
        for name in _spares(builds):
            try:
                os.rename(builds / name, build_dir)
            except FileNotFoundError:
                continue  # another build took it first
            return
    for sub in _BUILD_SUBDIRS:
        (build_dir / sub).mkdir(parents=True)
    _dir_mode = stat.S_IMODE(os.lstat(build_dir).st_mode)


def _empty(directory: Path) -> None:
    """Remove everything in ``directory`` (never following a link)."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def _recycle(build_dir: Path) -> bool:
    """Empty ``build_dir`` and keep it as a spare; False if it is not fit for that."""
    builds = build_dir.parent
    try:
        if _dir_mode is None or len(_spares(builds)) >= MAX_SPARES:
            return False
        with os.scandir(build_dir) as entries:
            if sorted(e.name for e in entries) != sorted(_BUILD_SUBDIRS):
                return False
        for path in (build_dir, *(build_dir / sub for sub in _BUILD_SUBDIRS)):
            mode = os.lstat(path).st_mode
            if not stat.S_ISDIR(mode) or stat.S_IMODE(mode) != _dir_mode:
                return False
        for sub in _BUILD_SUBDIRS:
            _empty(build_dir / sub)
        os.rename(build_dir, builds / f"{_SPARE_PREFIX}{os.urandom(8).hex()}")
    except OSError:
        return False
    return True


def _remove(build_dir: Path) -> None:
    """Recycle ``build_dir`` (see above) or remove it.  Blocking: call through a thread."""
    if not _recycle(build_dir):
        shutil.rmtree(build_dir, ignore_errors=True)


class OutputTooLarge(Exception):
    """``$OUT`` holds more bytes than the build may upload."""

    def __init__(self, total: int, limit: int) -> None:
        super().__init__(f"outputs are {total} bytes, the limit is {limit}")


class BadOutput(Exception):
    """``$OUT`` holds something that cannot be an output: a device file, fifo or socket, a
    name that is not UTF-8, more files than one result can list, or a file that changed into
    something else while it was read."""


#: The most bytes the listing of a build's outputs may take (paths and link targets, plus
#: ~100 bytes of hash and framing per file), so its ``Result`` fits in a frame under the
#: default 8 MiB limit.  A bigger ``$OUT`` fails its build instead of the connection.
MAX_OUTPUT_LISTING = 4 * 1024 * 1024

_KIND = {
    stat.S_IFIFO: "a fifo",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _open_beneath(root: Path, rel: str) -> BinaryIO:
    """Open the regular file ``rel`` under ``root`` without following a symbolic link at any
    step, and without blocking on a fifo: a build's leftover process may swap a file for a
    link or fifo after the scan, and the builder must then refuse it, not read through it."""
    parts = rel.split("/")
    step = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                parent, fd = fd, os.open(part, step, dir_fd=fd)
                os.close(parent)
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            file_fd = os.open(parts[-1], flags, dir_fd=fd)
        finally:
            os.close(fd)
    except OSError as exc:  # ELOOP, ENOTDIR, ENOENT: not what the scan found
        raise BadOutput(f"output {rel} changed while it was read: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise BadOutput(f"output {rel} changed while it was read: not a regular file")
    return os.fdopen(file_fd, "rb")


def _hash_beneath(root: Path, rel: str) -> tuple[int, str]:
    """Size and sha256 of what ``rel`` under ``root`` holds now (see ``_open_beneath``)."""
    digest = hashlib.sha256()
    size = 0
    with _open_beneath(root, rel) as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


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
    walk = os.fwalk(out_dir, onerror=_walk_error, follow_symlinks=False)
    for root, dirs, names, root_fd in walk:
        dirs.sort()
        base = Path(root).relative_to(out_dir)
        for name in [*sorted(names), *dirs]:
            info = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                continue
            rel = (base / name).as_posix()
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


def scan_outputs(out_dir: Path, max_bytes: int | None = None) -> list[FileInfo]:
    """Every file under ``out_dir`` with size and hash.  Symbolic links are listed as links
    (their target as text) and never followed; devices, fifos and sockets are refused
    (``BadOutput``).  Sizes are summed before anything is hashed, so an oversized ``$OUT`` is
    refused (``OutputTooLarge``) without reading it.  Runs in a worker thread."""
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
    files: list[FileInfo] = []
    hashed = 0
    for rel, info, link in found:
        if not encodable(rel) or not encodable(link):
            name = rel.encode("utf-8", "replace")
            raise BadOutput(f"output {name!r} (or its link target) is not a UTF-8 name")
        if link:
            files.append(FileInfo(path=rel, size=0, sha256=empty, link=link))
            continue
        size, sha256 = _hash_beneath(out_dir, rel)
        hashed += size
        if max_bytes is not None and hashed > max_bytes:  # it grew while being read
            raise OutputTooLarge(hashed, max_bytes)
        executable = bool(info.st_mode & 0o111)
        files.append(FileInfo(path=rel, size=size, sha256=sha256, executable=executable))
    return files


async def execute(
    assign: Assign,
    build_dir: Path,
    send: Send,
    base_env: dict[str, str],
    fetch: Fetch | None = None,
) -> Result:
    """Run ``assign`` in ``build_dir`` (created fresh, removed afterwards): fetch its inputs
    into ``$IN``, run the command, upload what it left in ``$OUT``."""
    ref: dict[str, Any] = {"build_id": assign.build_id, "attempt": assign.attempt}
    timings: dict[str, float] = {}
    try:
        await trio.to_thread.run_sync(_prepare, build_dir)
        if assign.inputs:
            await send(Progress(**ref, phase=Phase.FETCHING))
            started = time.monotonic()
            try:
                if fetch is None:
                    raise FetchError("this builder cannot fetch inputs")
                await _place_inputs(assign, build_dir / "in", fetch)
            except FetchError as exc:
                return Result(**ref, status=BuildStatus.FETCH_FAILED, error=str(exc))
            timings["fetch"] = round(time.monotonic() - started, 6)
        env = {
            **base_env,
            "HOME": str(build_dir / "work"),
            "TMPDIR": str(build_dir / "tmp"),
            "OUT": str(build_dir / "out"),
            "IN": str(build_dir / "in"),
            "HYDRA_TRIO_BUILD_ID": assign.build_id,
            "HYDRA_TRIO_ATTEMPT": str(assign.attempt),
            # also how a builder started after this one was killed finds what it left running
            BUILD_DIR_VARIABLE: str(build_dir),
            **assign.env,
        }
        await send(Progress(**ref, phase=Phase.BUILDING))
        started = time.monotonic()
        status, exit_code, error = await _run(assign, build_dir, env, send)
        timings["build"] = round(time.monotonic() - started, 6)
        outputs: list[FileInfo] = []
        if status is BuildStatus.SUCCESS:
            try:
                outputs = await trio.to_thread.run_sync(
                    scan_outputs, build_dir / "out", assign.limits.max_output_bytes
                )
            except OutputTooLarge as exc:
                status, error = BuildStatus.OUTPUT_LIMIT_EXCEEDED, str(exc)
            except BadOutput as exc:
                status, error = BuildStatus.BUILD_FAILED, str(exc)
            else:
                await send(Progress(**ref, phase=Phase.UPLOADING))
                started = time.monotonic()
                try:
                    await _upload(assign, build_dir / "out", outputs, send)
                except BadOutput as exc:  # the runner discards what it got: not listed
                    status, error, outputs = BuildStatus.BUILD_FAILED, str(exc), []
                timings["upload"] = round(time.monotonic() - started, 6)
        return Result(
            **ref,
            status=status,
            exit_code=exit_code,
            timings=timings,
            outputs=tuple(outputs),
            error=error,
        )
    finally:
        with trio.move_on_after(30, shield=True):
            await trio.to_thread.run_sync(_remove, build_dir)


#: ``ioctl(FICLONE)``: share the source's blocks copy-on-write (btrfs, XFS, bcachefs).
_FICLONE = 0x40049409


def _copy_from_cache(source: Path, target: Path, executable: bool) -> None:
    """Place the cached ``source`` at ``target``, which must not exist yet, as a copy of its
    own (never a hard link: builds run as the builder's user and could make a shared inode
    writable and change it, poisoning the cache for every later build, and under a build
    running at the same time).  A copy-on-write clone where the file system has them, else
    an in-kernel copy.  Never follows a link at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with source.open("rb") as src, os.fdopen(os.open(target, flags, 0o600), "wb") as dst:
        try:
            if sys.platform != "linux":  # the number means FICLONE on Linux only
                raise OSError("no FICLONE")
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
        except OSError:
            _copy_contents(src, dst)
        os.fchmod(dst.fileno(), 0o555 if executable else 0o444)


def _copy_contents(src: BinaryIO, dst: BinaryIO) -> None:
    """An in-kernel copy where there is one (Linux's ``copy_file_range``), else through user
    space (macOS and other Unixes, or files between which the kernel cannot copy)."""
    if sys.platform == "linux":
        try:
            while os.copy_file_range(src.fileno(), dst.fileno(), _HASH_BLOCK * 16):
                pass
            return
        except OSError:  # no copy_file_range between these files
            src.seek(0)
            dst.seek(0)
            dst.truncate()
    shutil.copyfileobj(src, dst, _HASH_BLOCK)


#: Input lists longer than this are checked in a worker thread (~5 us a file).
_CHECK_INLINE = 1000


def check_inputs(inputs: Sequence[InputSpec]) -> None:
    """Refuse (``FetchError``) inputs that could not all be placed inside ``$IN``: a name
    that is not a single file name, a path that is not relative and normalised, a path given
    twice or used both as a file and as a directory, or a link target with a NUL.  The runner
    relays what other builders reported, so none of this is trusted; once it passes, every
    file lands inside ``$IN`` and nothing is ever placed through a link."""
    for spec in inputs:
        if not is_path_component(spec.name):
            raise FetchError(f"input name {spec.name[:200]!r} is not a single file name")
        for info in spec.files:
            if "\0" in info.link:
                raise FetchError(f"input {spec.name}/{info.path[:200]}: link target has a NUL")
    problem = tree_conflict(f"{spec.name}/{info.path}" for spec in inputs for info in spec.files)
    if problem is not None:
        raise FetchError(f"the inputs cannot be placed under $IN: {problem}")


async def _place_inputs(assign: Assign, in_dir: Path, fetch: Fetch) -> None:
    """Put each dependency's outputs under ``$IN/<name>``; files come through ``fetch``
    (the builder's verified cache), links are recreated as links (never followed)."""
    if sum(len(spec.files) for spec in assign.inputs) > _CHECK_INLINE:
        await trio.to_thread.run_sync(check_inputs, assign.inputs)
    else:
        check_inputs(assign.inputs)
    for spec in assign.inputs:
        base = in_dir / spec.name
        await trio.to_thread.run_sync(functools.partial(base.mkdir, parents=True, exist_ok=True))
        for info in spec.files:
            target = base / info.path
            try:
                if info.link:
                    await trio.to_thread.run_sync(_make_link, target, info.link)
                    continue
                cached = await fetch(assign, info)
                await trio.to_thread.run_sync(_copy_from_cache, cached, target, info.executable)
            except OSError as exc:
                where = f"$IN/{spec.name}/{info.path}"
                raise FetchError(f"cannot place {where}: {exc.strerror or exc}") from None


def _make_link(target: Path, link: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(link, target)


async def _upload(assign: Assign, out_dir: Path, outputs: list[FileInfo], send: Send) -> None:
    """Stream every regular output file in frames of ``TRANSFER_FRAME`` bytes; the runner
    checks size and hash on arrival.  A worker thread reads ahead, ``UPLOAD_CHUNK`` bytes per
    hop, while the frames of the chunk before are sent (``_read_ahead``): memory stays bounded
    by three chunks."""
    for info in outputs:
        if info.link:
            continue
        f = await trio.to_thread.run_sync(_open_beneath, out_dir, info.path)
        try:
            chunks, arriving = trio.open_memory_channel[tuple[list[bytes], bool]](1)
            await beside(
                functools.partial(_send_chunks, assign, info, arriving, send),
                functools.partial(_read_ahead, f, info.size, chunks),
            )
        finally:
            await trio.to_thread.run_sync(f.close)


async def _send_chunks(
    assign: Assign,
    info: FileInfo,
    arriving: trio.MemoryReceiveChannel[tuple[list[bytes], bool]],
    send: Send,
) -> None:
    offset = 0
    async with arriving:
        async for pieces, eof in arriving:
            last = len(pieces) - 1
            for index, piece in enumerate(pieces):
                await send(
                    UploadData(
                        build_id=assign.build_id,
                        attempt=assign.attempt,
                        path=info.path,
                        offset=offset,
                        data=piece,
                        eof=eof and index == last,
                    )
                )
                offset += len(piece)


async def _read_ahead(
    f: BinaryIO,
    size: int,
    chunks: trio.MemorySendChannel[tuple[list[bytes], bool]],
) -> None:
    """Read ``f`` in a worker thread, a chunk per hop, into ``chunks`` (pieces of a frame
    each, and whether the chunk ends the upload: it is short, or reaches the size scanned).
    An error ends the channel and propagates (``beside`` raises it)."""
    async with chunks:
        offset = 0
        while True:
            pieces = await trio.to_thread.run_sync(_read_pieces, f)
            length = sum(map(len, pieces))
            offset += length
            eof = length < UPLOAD_CHUNK or offset >= size
            await chunks.send((pieces, eof))
            if eof:
                return


def _read_pieces(f: BinaryIO) -> list[bytes]:
    """Up to ``UPLOAD_CHUNK`` bytes of ``f`` as pieces of ``TRANSFER_FRAME`` bytes, each read
    into its own object (nothing is copied to cut a chunk into frames); at least one piece."""
    pieces: list[bytes] = []
    left = UPLOAD_CHUNK
    while left > 0:
        piece = f.read(min(left, TRANSFER_FRAME))
        if piece or not pieces:
            pieces.append(piece)
        if len(piece) < min(left, TRANSFER_FRAME):
            break
        left -= len(piece)
    return pieces


async def _reap_group(process: trio.Process) -> None:
    """When the command exits, whatever it left behind in its process group dies too, so a
    background child cannot hold the log pipe open (or outlive its build)."""
    await process.wait()
    _kill_group(process.pid)


async def _stream_log(
    process: trio.Process, assign: Assign, send: Send, stop: Callable[[int], None] = _kill_group
) -> tuple[BuildStatus | None, str, int]:
    """Forward the merged stdout/stderr as LogChunks until EOF, enforcing ``max_silent`` and
    ``max_log_bytes``.  Returns (status if a limit hit, error, bytes logged)."""
    assert process.stdout is not None
    limits = assign.limits
    max_silent = limits.max_silent if limits.max_silent is not None else math.inf
    max_log = limits.max_log_bytes
    log_bytes = 0
    with trio.CancelScope(deadline=trio.current_time() + max_silent) as silence:
        while data := await process.stdout.receive_some(LOG_CHUNK):
            silence.deadline = trio.current_time() + max_silent
            over = max_log is not None and log_bytes + len(data) > max_log
            if over:
                assert max_log is not None
                data = data[: max_log - log_bytes]
            log_bytes += len(data)
            if data:
                chunk = LogChunk(build_id=assign.build_id, attempt=assign.attempt, data=bytes(data))
                await send(chunk)
            if over:
                stop(process.pid)
                return BuildStatus.LOG_LIMIT_EXCEEDED, f"log exceeded {max_log} bytes", log_bytes
        # Closing stdout and stderr does not escape max_silent: a command that does and then
        # hangs is still silent.
        await process.wait()
    if silence.cancelled_caught:
        stop(process.pid)
        return BuildStatus.SILENT_TOO_LONG, f"no output for {max_silent:g} s", log_bytes
    return None, "", log_bytes


async def _run(
    assign: Assign,
    build_dir: Path,
    env: dict[str, str],
    send: Send,
    deliver_cancel: Callable[[trio.Process], Awaitable[object]] = _deliver_cancel,
    stop: Callable[[int], None] = _kill_group,
) -> tuple[BuildStatus, int | None, str]:
    """Run ``assign.command`` under its limits.  ``deliver_cancel`` stops it when the build is
    cancelled or the wall-clock limit passes, ``stop(pid)`` when the log or silence limit
    does (by default both SIGKILL its process group)."""
    limits = assign.limits
    ref: dict[str, Any] = {"build_id": assign.build_id, "attempt": assign.attempt}
    status: BuildStatus | None = None
    error = ""
    process: trio.Process | None = None
    timeout = limits.timeout if limits.timeout is not None else math.inf
    start_error: OSError | None = None
    with trio.move_on_after(timeout) as wall:
        async with trio.open_nursery() as nursery:
            try:
                process = await nursery.start(
                    functools.partial(
                        trio.run_process,
                        list(assign.command),
                        cwd=str(build_dir / "work"),
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        check=False,
                        deliver_cancel=deliver_cancel,
                    )
                )
            except OSError as exc:  # the command could not be started
                start_error = exc
            else:
                assert process is not None
                nursery.start_soon(_reap_group, process)
                status, error, _ = await _stream_log(process, assign, send, stop)
    if start_error is not None:
        message = f"cannot run {assign.command[0]!r}: {start_error.strerror or start_error}\n"
        await send(LogChunk(**ref, data=message.encode()))
        return BuildStatus.BUILD_FAILED, 127, message.strip()
    if wall.cancelled_caught:
        return BuildStatus.TIMED_OUT, None, f"timed out after {timeout:g} s"
    assert process is not None
    code = process.returncode
    if status is not None:
        return status, code, error
    if code == 0:
        return BuildStatus.SUCCESS, 0, ""
    return BuildStatus.BUILD_FAILED, code, f"exit status {code}"
