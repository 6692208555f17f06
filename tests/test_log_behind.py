"""A session's log chunks, written behind its receive loop (``runner.logs.LogBehind``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from hydra_trio.runner import logs
from hydra_trio.runner.logs import LogBehind, LogStore


class RecordingStore(LogStore):
    """A log store that keeps each batch it is given (no thread, no disk), and whose
    writes can be held back (``gate``) to play a slow disk."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.batches: list[dict[tuple[str, int], list[bytes]]] = []
        self.gate: trio.Event | None = None

    async def append_many(self, chunks: dict[tuple[str, int], list[bytes]]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.batches.append({key: list(parts) for key, parts in chunks.items()})

    def written(self, key: tuple[str, int]) -> bytes:
        return b"".join(b"".join(batch.get(key, [])) for batch in self.batches)


async def test_chunks_arriving_together_are_written_in_one_batch_in_order(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Chunks of two attempts received within LOG_LINGER go to the disk in one write, each
    attempt's in the order received; nothing is written before the linger is over."""
    store = RecordingStore(tmp_path)
    async with trio.open_nursery() as nursery:
        behind = LogBehind(store, nursery)
        for i in range(50):
            await behind.append("b1", 1, b"line %d\n" % i)
            await behind.append("b2", 3, b"other %d\n" % i)
        assert store.batches == []
        await trio.sleep(logs.LOG_LINGER * 2)
    assert len(store.batches) == 1
    assert store.written(("b1", 1)) == b"".join(b"line %d\n" % i for i in range(50))
    assert store.written(("b2", 3)) == b"".join(b"other %d\n" % i for i in range(50))


async def test_flushed_returns_once_the_attempts_chunks_are_written(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """``flushed`` (what a result waits for) writes at once, without lingering, and returns
    only when every chunk of that attempt received before it is written."""
    store = RecordingStore(tmp_path)
    async with trio.open_nursery() as nursery:
        behind = LogBehind(store, nursery)
        await behind.append("b1", 1, b"first\n")
        await behind.append("b1", 1, b"last\n")
        start = trio.current_time()
        await behind.flushed("b1", 1)
        assert trio.current_time() - start < logs.LOG_LINGER
        assert store.written(("b1", 1)) == b"first\nlast\n"
        await behind.flushed("b9", 1)  # nothing received for it: at once
        nursery.cancel_scope.cancel()


async def test_what_a_session_received_is_written_as_it_ends(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The session's nursery cancelled while chunks wait: they are written all the same."""
    store = RecordingStore(tmp_path)
    async with trio.open_nursery() as nursery:
        behind = LogBehind(store, nursery)
        await behind.append("b1", 1, b"the end of the log\n")
        nursery.cancel_scope.cancel()
    assert store.written(("b1", 1)) == b"the end of the log\n"


async def test_the_receive_loop_waits_only_past_log_behind_unwritten_bytes(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the disk is stuck, ``append`` returns until more than LOG_BEHIND bytes are
    unwritten; then it waits, and goes on once they are written."""
    monkeypatch.setattr(logs, "LOG_BEHIND", 1000)
    store = RecordingStore(tmp_path)
    store.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        behind = LogBehind(store, nursery)
        for _ in range(10):
            with trio.move_on_after(60) as stuck:
                await behind.append("b1", 1, b"x" * 100)  # up to 1,000 bytes: never waits
            assert not stuck.cancelled_caught
        with trio.move_on_after(60) as stuck:
            await behind.append("b1", 1, b"x" * 100)
        assert stuck.cancelled_caught  # 1,100 unwritten: it waited for the disk
        store.gate.set()
        with trio.fail_after(60):
            await behind.append("b1", 1, b"y")
            await behind.flushed("b1", 1)
        nursery.cancel_scope.cancel()
    assert store.written(("b1", 1)) == b"x" * 1100 + b"y"


async def test_a_failed_write_truncates_that_attempts_log_only(tmp_path: Path) -> None:
    """``append_many`` writes every attempt in one go; one whose file cannot be written is
    cut (marked so: a read ends with the marker, and nothing more is appended), the
    others are whole."""
    store = LogStore(tmp_path / "logs")
    store.path("b2", 1).mkdir()  # a directory where its log file would be: the open fails
    await store.append_many({("b1", 1): [b"a\n", b"b\n"], ("b2", 1): [b"lost\n"]})
    assert await store.read("b1", 1) == b"a\nb\n"
    assert store.truncated[("b2", 1)] is False  # (the marker could not be written either)
    assert store.health.faults["logs"] == 1
    assert [w.kind for w in store.health.warnings()] == ["logs"]
