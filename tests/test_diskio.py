"""diskio: write and hash a received batch in two worker threads; HashingFile; beside."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import os
import stat
import threading
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from hydra_trio import diskio
from hydra_trio.diskio import (
    DIRECT_BUFFER,
    PARALLEL_MIN,
    DirectFile,
    HashingFile,
    HashMismatch,
    beside,
    read_direct,
    receiving,
    write_and_hash,
)


async def test_a_large_batch_is_written_and_hashed_in_two_threads_at_once() -> None:
    both_running = threading.Barrier(2, timeout=5)
    done: list[str] = []

    def write() -> None:
        both_running.wait()  # would time out if the hashing waited for the write
        done.append("write")

    def hash_() -> None:
        both_running.wait()
        done.append("hash")

    def both() -> None:
        raise AssertionError("not for a large batch")

    await write_and_hash(PARALLEL_MIN, write, hash_, both)
    assert sorted(done) == ["hash", "write"]


async def test_a_small_batch_takes_one_thread_hop() -> None:
    done: list[str] = []
    await write_and_hash(PARALLEL_MIN - 1, done.clear, done.clear, lambda: done.append("both"))
    assert done == ["both"]


async def test_the_write_error_is_raised_as_it_is_once_the_hashing_is_over() -> None:
    hashed = threading.Event()

    def write() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        await write_and_hash(PARALLEL_MIN, write, hashed.set, write)
    assert hashed.is_set()


async def test_a_received_file_that_matches_is_moved_into_place_read_only(tmp_path: Path) -> None:
    """A file whose size and hash match is renamed to its target, read-only; no tmp is left."""
    data = [b"x" * PARALLEL_MIN, b"y" * 10]
    target = tmp_path / "store" / "ab" / "file"
    async with receiving(tmp_path / "tmp" / "partial") as file:
        await file.write(data[:1])
        await file.write(data[1:])
        digest = hashlib.sha256(b"".join(data)).hexdigest()
        await trio.to_thread.run_sync(file.commit, target, PARALLEL_MIN + 10, digest)
    assert target.read_bytes() == b"".join(data)
    assert stat.S_IMODE(target.stat().st_mode) == 0o444
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_a_received_file_that_does_not_match_is_refused_and_removed(tmp_path: Path) -> None:
    """A size or hash other than the declared one raises HashMismatch; the file is removed."""
    target = tmp_path / "file"
    with pytest.raises(HashMismatch, match="received 3 bytes") as caught:
        async with receiving(tmp_path / "tmp" / "partial") as file:
            await file.write([b"abc"])
            await trio.to_thread.run_sync(file.commit, target, 3, "0" * 64)
    assert caught.value.size == 3 and caught.value.expected_sha256 == "0" * 64
    assert not target.exists() and list((tmp_path / "tmp").iterdir()) == []


async def test_a_cancelled_transfer_removes_its_partial_file(tmp_path: Path) -> None:
    """Cancelling the block (its connection died) still removes the partial file."""
    with trio.move_on_after(0):
        async with receiving(tmp_path / "partial") as file:
            file.write_chunks([b"abc"])
            await trio.sleep_forever()
    assert not (tmp_path / "partial").exists()


def test_a_durable_move_replaces_the_target(tmp_path: Path) -> None:
    """move_to(durable=True) replaces an existing target (fsyncs are not observable here)."""
    (tmp_path / "target").write_bytes(b"old")
    file = HashingFile.create(tmp_path / "tmp")
    file.write_chunks([b"new"])
    file.move_to(tmp_path / "target", durable=True)
    (tmp_path / "tmp").write_bytes(b"someone else's")  # the name is free again after the move
    file.discard()  # after a move: nothing of ours to remove
    assert (tmp_path / "target").read_bytes() == b"new"
    assert (tmp_path / "tmp").read_bytes() == b"someone else's"


async def test_beside_raises_a_background_failure_as_it_is() -> None:
    """A failure of the background task cancels the main one and is raised ungrouped."""
    main_cancelled = False

    async def main() -> None:
        nonlocal main_cancelled
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            main_cancelled = True
            raise

    async def background() -> None:
        await trio.lowlevel.checkpoint()
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        await beside(main, background)
    assert main_cancelled


async def test_beside_raises_a_main_failure_as_it_is() -> None:
    """A failure of the main task cancels the background one and is raised ungrouped."""

    async def main() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await beside(main, trio.sleep_forever)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_still_removes_the_partial_file(tmp_path: Path) -> None:
    """Closing flushes the buffered data, which fails with ENOSPC on a full disk
    (``/dev/full``); the partial file is removed all the same and the error does not
    escape ``discard``, so a transfer's own error is the one reported."""
    partial = tmp_path / "partial"
    partial.write_bytes(b"what was written before the disk filled")
    full = Path("/dev/full").open("wb")  # noqa: SIM115 (discard closes it)
    file = HashingFile(partial, full)
    file.write_chunks([b"x" * 100])  # buffered: the flush at close fails
    file.discard()
    assert not partial.exists()
    assert full.closed


# ---------------------------------------------------------------------------------------------
# DirectFile and read_direct: large files written and read around the page cache.


def _direct_file(path: Path) -> DirectFile:
    return DirectFile(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


@pytest.mark.parametrize(
    "size", [0, 1, 4095, 4096, 4097, DIRECT_BUFFER - 1, DIRECT_BUFFER, 3 * DIRECT_BUFFER + 4097]
)
def test_a_direct_file_holds_what_was_written_whatever_its_length(
    tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    target = tmp_path / "out"
    file = _direct_file(target)
    # (chunks that do not fall on block boundaries: a frame's 64 KiB, then odd ones)
    steps = itertools.cycle([65_536, 1_000, 464, 1_100_000])
    start = 0
    while start < size:
        step = next(steps)
        file.write(data[start : start + step])
        start += step
    file.close()
    file.close()  # (a second close does nothing)
    assert target.read_bytes() == data


def test_a_direct_file_writes_around_the_page_cache_where_the_file_system_allows(
    tmp_path: Path,
) -> None:
    file = _direct_file(tmp_path / "out")
    if not file.direct:
        file.close()
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    assert fcntl.fcntl(file.fileno(), fcntl.F_GETFL) & os.O_DIRECT
    file.write(b"x" * (DIRECT_BUFFER + 10))
    assert file.direct
    file.close()
    assert (tmp_path / "out").read_bytes() == b"x" * (DIRECT_BUFFER + 10)


def test_a_refused_direct_write_goes_on_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that takes the flag but not the alignment says EINVAL at the first
    write: that write and every later one go through the page cache, nothing lost."""
    real_write = os.write
    refused: list[int] = []

    def write(fd: int, data: bytes | memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    file = _direct_file(tmp_path / "out")
    if not file.direct:
        file.close()
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    monkeypatch.setattr(os, "write", write)
    data = os.urandom(2 * DIRECT_BUFFER + 3)
    file.write(data[: DIRECT_BUFFER + 1])
    file.write(data[DIRECT_BUFFER + 1 :])
    file.close()
    monkeypatch.undo()
    assert refused == [DIRECT_BUFFER]
    assert not file.direct
    assert (tmp_path / "out").read_bytes() == data


def test_a_direct_file_on_a_full_disk_fails_the_write_and_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC is the write's error (the upload fails, the runner goes on), and
    ``HashingFile.discard`` still closes the descriptor and removes the partial file."""
    partial = tmp_path / "partial"
    file = HashingFile(partial, _direct_file(partial))

    def full(fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        file.write_chunks([b"y" * (DIRECT_BUFFER + 5)])
    file.discard()
    monkeypatch.undo()
    assert not partial.exists()


def _pieces(data: bytes, offset: int, end: int, piece: int) -> list[bytes]:
    end = min(end, len(data))
    return [data[at : min(at + piece, end)] for at in range(offset, end, piece)]


@pytest.mark.parametrize("piece", [65_536, 1_000])
@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 1 << 20), (1, 1 << 20), (4095, 3 << 20), (1 << 20, 1 << 20), (3 << 20, 1 << 20)],
)
def test_read_direct_cuts_any_range_into_the_pieces_asked_for(
    tmp_path: Path, piece: int, offset: int, length: int
) -> None:
    data = os.urandom((3 << 20) + 777)
    path = tmp_path / "blob"
    file = _direct_file(path)
    file.write(data)
    file.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        pieces = read_direct(fd, offset, offset + length, piece)
    finally:
        os.close(fd)
    if pieces is None:
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    assert pieces == _pieces(data, offset, offset + length, piece)


def test_read_direct_leaves_to_the_caller_what_it_cannot_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"z" * 10_000)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_direct(fd, 0, 10_000, DIRECT_BUFFER + 1) is None  # (a piece too large)
        monkeypatch.setattr(diskio, "_set_direct", lambda fd, on: False)
        assert read_direct(fd, 0, 10_000, 4096) is None  # (a file system refusing it)
    finally:
        os.close(fd)
