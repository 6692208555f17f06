"""diskio.write_and_hash: write and hash a received batch in two worker threads."""

from __future__ import annotations

import threading

import pytest

from hydra_trio.diskio import PARALLEL_MIN, write_and_hash


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
