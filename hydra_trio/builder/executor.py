"""Run one build's command in a fresh directory, as a child process in its own process group.

The caller owns the returned ``Result`` and sends it.  Cancelling ``execute`` (an ``Abort``, or
the connection's nursery being cancelled) kills the whole process group and removes the build
directory.  Limits: ``timeout`` (wall clock), ``max_silent`` (no output), ``max_log_bytes`` and
``max_output_bytes``; each kills the whole group and gives its own status.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from hydra_trio.protocol.messages import (
    Assign,
    BuildStatus,
    FileInfo,
    LogChunk,
    Message,
    Phase,
    Progress,
    Result,
    UploadData,
)
from hydra_trio.protocol.validators import encodable

log = logging.getLogger("hydra_trio.builder")

Send = Callable[[Message], Awaitable[None]]
#: Fetch one input file into the local cache; returns its verified path there.
Fetch = Callable[[Assign, FileInfo], Awaitable[Path]]


class FetchError(Exception):
    """An input could not be fetched (an infrastructure failure: the build is retried)."""


#: Log bytes per LogChunk frame at most (a read returns what the pipe has, up to this).
LOG_CHUNK = 64 * 1024
#: Bytes per UploadData frame: large enough that the per-chunk thread hops on both ends do not
#: set the pace, small enough that a Ping never waits long behind one (~2 ms at 500 MB/s).
UPLOAD_CHUNK = 1024 * 1024
_HASH_BLOCK = 1024 * 1024


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _deliver_cancel(process: trio.Process) -> None:
    _kill_group(process.pid)


def _prepare(build_dir: Path) -> None:
    if build_dir.exists():
        shutil.rmtree(build_dir)
    for sub in ("work", "out", "in", "tmp"):
        (build_dir / sub).mkdir(parents=True)


def _remove(build_dir: Path) -> None:
    shutil.rmtree(build_dir, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class OutputTooLarge(Exception):
    """``$OUT`` holds more bytes than the build may upload."""

    def __init__(self, total: int, limit: int) -> None:
        super().__init__(f"outputs are {total} bytes, the limit is {limit}")


class BadOutput(Exception):
    """``$OUT`` holds something that cannot be an output (a file name that is not UTF-8)."""


def scan_outputs(out_dir: Path, max_bytes: int | None = None) -> list[FileInfo]:
    """Every file under ``out_dir`` with size and hash; symlinks are listed as links and
    never followed; other special files are skipped.  Sizes are summed before anything is
    hashed, so an oversized ``$OUT`` is refused (``OutputTooLarge``) without reading it.
    Runs in a worker thread."""
    empty = hashlib.sha256(b"").hexdigest()
    found: list[tuple[Path, str]] = []
    for root, dirs, names in os.walk(out_dir):
        dirs.sort()
        base = Path(root)
        for name in [*sorted(names), *[d for d in dirs if (base / d).is_symlink()]]:
            path = base / name
            found.append((path, path.relative_to(out_dir).as_posix()))
    total = sum(p.lstat().st_size for p, _ in found if p.is_file() and not p.is_symlink())
    if max_bytes is not None and total > max_bytes:
        raise OutputTooLarge(total, max_bytes)
    files: list[FileInfo] = []
    for path, rel in found:
        if not encodable(rel) or (path.is_symlink() and not encodable(os.readlink(path))):
            raise BadOutput(f"output {rel.encode('utf-8', 'replace')!r} is not a UTF-8 name")
        if path.is_symlink():
            files.append(FileInfo(path=rel, size=0, sha256=empty, link=os.readlink(path)))
        elif path.is_file():
            stat = path.stat()
            files.append(
                FileInfo(
                    path=rel,
                    size=stat.st_size,
                    sha256=_sha256(path),
                    executable=bool(stat.st_mode & 0o111),
                )
            )
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
                await _upload(assign, build_dir / "out", outputs, send)
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


def _link_or_copy(source: Path, target: Path, executable: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o555 if executable else 0o444
    if source.stat().st_mode & 0o777 == mode:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another file system: copy
    shutil.copyfile(source, target)
    os.chmod(target, mode)


async def _place_inputs(assign: Assign, in_dir: Path, fetch: Fetch) -> None:
    """Put each dependency's outputs under ``$IN/<name>``; files come through ``fetch``
    (the builder's verified cache), links are recreated as links."""
    for spec in assign.inputs:
        if "/" in spec.name or spec.name in (".", ".."):
            raise FetchError(f"input name {spec.name!r} is not a single path component")
        base = in_dir / spec.name
        await trio.to_thread.run_sync(functools.partial(base.mkdir, parents=True, exist_ok=True))
        for info in spec.files:
            target = base / info.path
            if info.link:
                await trio.to_thread.run_sync(_make_link, target, info.link)
                continue
            cached = await fetch(assign, info)
            await trio.to_thread.run_sync(_link_or_copy, cached, target, info.executable)


def _make_link(target: Path, link: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(link, target)


async def _upload(assign: Assign, out_dir: Path, outputs: list[FileInfo], send: Send) -> None:
    """Stream every regular output file in ``UPLOAD_CHUNK`` frames; memory stays bounded by
    one chunk per file, and the runner checks size and hash on arrival."""
    for info in outputs:
        if info.link:
            continue
        f = await trio.to_thread.run_sync((out_dir / info.path).open, "rb")
        try:
            offset = 0
            while True:
                data = await trio.to_thread.run_sync(f.read, UPLOAD_CHUNK)
                eof = len(data) < UPLOAD_CHUNK or offset + len(data) >= info.size
                await send(
                    UploadData(
                        build_id=assign.build_id,
                        attempt=assign.attempt,
                        path=info.path,
                        offset=offset,
                        data=data,
                        eof=eof,
                    )
                )
                offset += len(data)
                if eof:
                    break
        finally:
            await trio.to_thread.run_sync(f.close)


async def _reap_group(process: trio.Process) -> None:
    """When the command exits, whatever it left behind in its process group dies too, so a
    background child cannot hold the log pipe open (or outlive its build)."""
    await process.wait()
    _kill_group(process.pid)


async def _stream_log(
    process: trio.Process, assign: Assign, send: Send
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
                _kill_group(process.pid)
                return BuildStatus.LOG_LIMIT_EXCEEDED, f"log exceeded {max_log} bytes", log_bytes
        # Closing stdout and stderr does not escape max_silent: a command that does and then
        # hangs is still silent.
        await process.wait()
    if silence.cancelled_caught:
        _kill_group(process.pid)
        return BuildStatus.SILENT_TOO_LONG, f"no output for {max_silent:g} s", log_bytes
    return None, "", log_bytes


async def _run(
    assign: Assign, build_dir: Path, env: dict[str, str], send: Send
) -> tuple[BuildStatus, int | None, str]:
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
                        deliver_cancel=_deliver_cancel,
                    )
                )
            except OSError as exc:  # the command could not be started
                start_error = exc
            else:
                assert process is not None
                nursery.start_soon(_reap_group, process)
                status, error, _ = await _stream_log(process, assign, send)
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
