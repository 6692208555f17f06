"""Transfers travel in small frames (``codec.TRANSFER_FRAME``) so that liveness, which counts
complete frames, holds on a slow or lossy link; disk I/O still works a megabyte at a time.

- The builder accepts a fetch answered in frames of any size (the runner splits each 1 MiB
  read), writes the file it adds up to, and ends the connection when the runner sends more
  than was asked for.
- The builder uploads in frames of at most ``TRANSFER_FRAME`` bytes; the runner stages them
  and writes a megabyte per thread hop, refusing a chunk at the wrong offset.
"""

from __future__ import annotations

import functools
import hashlib
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from hydra_trio.builder import outputs
from hydra_trio.builder.attempt import Sender
from hydra_trio.builder.daemon import BuilderState, run_builder
from hydra_trio.builder.state import EventKind, SessionEnd
from hydra_trio.protocol.codec import TRANSFER_FRAME
from hydra_trio.protocol.messages import (
    Assign,
    BuildStatus,
    FetchData,
    FetchRequest,
    FileInfo,
    InputSpec,
    Message,
    Result,
    UploadData,
    UploadFiles,
)
from hydra_trio.runner.blobs import WRITE_BATCH, BlobError, BlobStore

from .helpers.common import builder_config, wait_until
from .helpers.fake_runner import FakeRunner

CONTENT = random.Random(7).randbytes(2 * 1024 * 1024 + 12345)
INFO = FileInfo(path="big", size=len(CONTENT), sha256=hashlib.sha256(CONTENT).hexdigest())


class SlowToReturn(trio.abc.Stream):
    """A stream whose ``send_all`` hands the bytes over at once but returns a second later,
    as a send into a busy socket may: the answer can arrive before the sender resumes."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        await trio.sleep(1)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def run_against(
    tmp_path: Path, answer: object, assign: Assign, *, slow_send: bool = False
) -> tuple[list[Message], BuilderState]:
    """Run a builder against a scripted runner that sends ``assign`` and answers each
    FetchRequest with the frames ``answer(request)`` returns; until a Result or a
    disconnect.  ``slow_send``: the builder's sends return a second after the bytes left."""
    config = builder_config(tmp_path, "a", fetch_timeout=60.0)
    state = BuilderState(config=config, machine_id="m")

    def answer_fetches(message: Message) -> list[Message]:
        if not isinstance(message, FetchRequest):
            return []
        return answer(message)  # type: ignore[operator,no-any-return]

    # No virtual deadline around the whole (a fail_after(3600) was): the fetch, the build's
    # process and the upload run in worker threads and child processes, and while they take
    # real time wait_until's polling runs the autojump clock on, a few hundred virtual seconds
    # per real second; on a loaded machine an hour of virtual time went by.  wait_until's own
    # limit (100,000 virtual seconds, minutes of real polling) still ends a hang.
    async with trio.open_nursery() as nursery:
        # One connection is all this runner takes.
        runner = FakeRunner(nursery, assign=assign, answer=answer_fetches, connections=1)

        async def connect() -> trio.abc.Stream:
            stream = await runner.connect()
            return SlowToReturn(stream) if slow_send else stream

        run = functools.partial(run_builder, config, connect=connect, state=state)
        await nursery.start(run)
        await wait_until(
            lambda: (
                any(isinstance(m, Result) for m in runner.received)
                or any(e.kind is EventKind.DISCONNECTED for e in state.events)
            )
        )
        nursery.cancel_scope.cancel()
    seen = runner.received
    return seen, state


def split_answer(sizes: list[int]) -> object:
    """Answer each request with its bytes in pieces of the sizes given, cycling."""

    def answer(request: FetchRequest) -> list[FetchData]:
        data = CONTENT[request.offset : request.offset + request.length]
        eof = request.offset + len(data) >= len(CONTENT)
        frames, start, index = [], 0, 0
        while start < len(data):
            piece = data[start : start + sizes[index % len(sizes)]]
            start, index = start + len(piece), index + 1
            frames.append(FetchData(request_id=request.request_id, data=piece))
        frames[-1] = FetchData(request_id=request.request_id, data=frames[-1].data, eof=eof)
        return frames

    return answer


FETCH_ASSIGN = Assign(
    build_id="b1",
    attempt=1,
    command=("sh", "-c", 'cmp "$IN/dep/big" "$EXPECTED"'),
    inputs=(InputSpec(name="dep", build_id="b0", files=(INFO,)),),
)


@pytest.mark.parametrize(
    ("sizes", "slow_send"),
    [
        ([TRANSFER_FRAME], False),
        ([1000, 70_000, 3], False),
        ([1024 * 1024], False),
        # The answer to a request arrives before the send of the request has returned.
        ([TRANSFER_FRAME], True),
    ],
)
async def test_a_fetch_answered_in_frames_of_any_size_adds_up_to_the_file(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, sizes: list[int], slow_send: bool
) -> None:
    expected = tmp_path / "expected"
    expected.write_bytes(CONTENT)
    assign = Assign(
        build_id=FETCH_ASSIGN.build_id,
        attempt=1,
        command=FETCH_ASSIGN.command,
        env={"EXPECTED": str(expected)},
        inputs=FETCH_ASSIGN.inputs,
    )
    seen, state = await run_against(tmp_path, split_answer(sizes), assign, slow_send=slow_send)
    assert not any(e.kind is EventKind.DISCONNECTED for e in state.events), state.events
    [result] = [m for m in seen if isinstance(m, Result)]
    assert result.status is BuildStatus.SUCCESS, result
    cached = tmp_path / "a" / "cache" / INFO.sha256[:2] / INFO.sha256
    assert cached.read_bytes() == CONTENT


async def test_a_runner_sending_more_fetch_data_than_asked_for_loses_the_connection(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    def answer(request: FetchRequest) -> list[FetchData]:
        data = CONTENT[request.offset : request.offset + request.length]
        return [FetchData(request_id=request.request_id, data=data)] * 6  # 6 MiB for 4 asked

    seen, state = await run_against(tmp_path, answer, FETCH_ASSIGN)
    assert any(
        e.end is SessionEnd.PROTOCOL_ERROR and "more fetch data than requested" in e.reason
        for e in state.events
    ), state.events
    assert not any(isinstance(m, Result) for m in seen)
    assert not list((tmp_path / "a" / "cache" / "tmp").iterdir())


async def test_an_empty_fetch_frame_that_is_not_the_end_loses_the_connection(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    def answer(request: FetchRequest) -> list[FetchData]:
        return [FetchData(request_id=request.request_id)]

    _, state = await run_against(tmp_path, answer, FETCH_ASSIGN)
    assert any(
        e.end is SessionEnd.PROTOCOL_ERROR and "more fetch data than requested" in e.reason
        for e in state.events
    ), state.events


async def test_uploads_travel_in_frames_no_larger_than_a_transfer_frame(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    size = 3 * 1024 * 1024 + 7
    assign = Assign(
        build_id="b1",
        attempt=1,
        command=("sh", "-c", f'head -c {size} /dev/urandom > "$OUT/blob"; : > "$OUT/empty"'),
    )
    seen, _ = await run_against(tmp_path, split_answer([TRANSFER_FRAME]), assign)
    [result] = [m for m in seen if isinstance(m, Result)]
    assert result.status is BuildStatus.SUCCESS, result
    uploads = [m for m in seen if isinstance(m, UploadData)]
    assert all(len(m.data) <= TRANSFER_FRAME for m in uploads)
    blob = [m for m in uploads if m.path == "blob"]
    assert [m.offset for m in blob] == [i * TRANSFER_FRAME for i in range(len(blob))]
    assert sum(len(m.data) for m in blob) == size
    assert [m.eof for m in blob] == [False] * (len(blob) - 1) + [True]
    outputs = {f.path: f for f in result.outputs}
    data = b"".join(m.data for m in blob)
    assert hashlib.sha256(data).hexdigest() == outputs["blob"].sha256
    # a small file goes whole, in an upload-files frame (1.7: this runner speaks it)
    frames = [m for m in seen if isinstance(m, UploadFiles)]
    whole = [pair for m in frames for pair in zip(m.paths, m.data, strict=True)]
    assert whole == [("empty", b"")] and not [m for m in uploads if m.path == "empty"]


def test_the_runner_stages_upload_frames_and_writes_a_megabyte_at_a_time(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    upload = blobs.begin("out")
    data = random.Random(1).randbytes(WRITE_BATCH + 3 * TRANSFER_FRAME)
    due = []
    for offset in range(0, len(data), TRANSFER_FRAME):
        piece = data[offset : offset + TRANSFER_FRAME]
        eof = offset + TRANSFER_FRAME >= len(data)
        due.append(blobs.stage(upload, offset, piece, eof))
        if due[-1]:
            blobs.write_staged(upload)
    frames_per_batch = WRITE_BATCH // TRANSFER_FRAME
    assert due == [False] * (frames_per_batch - 1) + [True] + [False, False, True]
    with pytest.raises(BlobError, match="after the last one"):
        blobs.stage(upload, len(data), b"x")
    blobs.commit(upload, len(data), hashlib.sha256(data).hexdigest())
    assert blobs.path_of(hashlib.sha256(data).hexdigest()).read_bytes() == data


def test_a_staged_chunk_at_the_wrong_offset_is_refused(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    upload = blobs.begin("out")
    assert not blobs.stage(upload, 0, b"abc")
    with pytest.raises(BlobError, match="chunk at offset 2, expected 3"):
        blobs.stage(upload, 2, b"x")
    blobs.discard(upload)
    assert not upload.staged and not upload.tmp.exists()


async def test_a_frame_crawling_over_a_lossy_link_keeps_the_builder_from_giving_up(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The runner's pong is stuck behind a 64 KiB frame that arrives 2 KiB every 5 s (160 s
    in all, over five ping timeouts): the builder keeps the connection while the bytes keep
    coming, and gives up one ping timeout after they stop."""
    config = builder_config(tmp_path, "a")  # ping interval 10 s, ping timeout 30 s
    builder_end, runner_end = trio.testing.memory_stream_pair()
    state = BuilderState(config=config, machine_id="m")
    crawl_ended = trio.Event()

    async def fake_runner(runner: FakeRunner) -> None:
        conn = await runner.handshake(runner_end)
        assert conn is not None
        data = conn.send(FetchData(request_id=99, data=b"x" * TRANSFER_FRAME))
        for start in range(0, len(data) - 1, 2048):
            await trio.sleep(5)
            await runner_end.send_all(data[start : min(start + 2048, len(data) - 1)])
        crawl_ended.set()
        await trio.sleep_forever()

    async def connect() -> trio.abc.Stream:
        if state.sessions:
            await trio.sleep_forever()
        return builder_end

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_runner, FakeRunner(nursery))
        run = functools.partial(run_builder, config, connect=connect, state=state)
        await nursery.start(run)
        await crawl_ended.wait()
        ended_at = trio.current_time()
        assert not any(e.kind is EventKind.DISCONNECTED for e in state.events)
        await wait_until(
            lambda: any(
                e.end is SessionEnd.RUNNER_SILENT and "no frame from the runner" in e.reason
                for e in state.events
            )
        )
        assert trio.current_time() - ended_at <= 30.0
        nursery.cancel_scope.cancel()


async def _send_over_a_link(rate: float, frames: int) -> list[list[UploadData]]:
    """The writes ``outputs._send_chunks`` makes of a file of ``frames`` full frames (its
    chunks as ``_read_ahead`` cuts them) when each write takes as long as ``rate`` bytes a
    second make it (a link that takes nothing at once: the worst case for a ping)."""
    writes: list[list[UploadData]] = []

    async def one(message: Message) -> None:
        raise AssertionError(f"a frame sent alone: {message.TAG}")

    async def many(messages: list[Message]) -> None:
        write = [m for m in messages if isinstance(m, UploadData)]
        assert len(write) == len(messages), messages
        writes.append(write)
        await trio.sleep(sum(len(m.data) for m in write) / rate)

    per_chunk = outputs.UPLOAD_CHUNK // TRANSFER_FRAME
    pieces = [bytes([i % 251]) * TRANSFER_FRAME for i in range(frames)]
    chunks, arriving = trio.open_memory_channel[tuple[list[bytes], bool]](100)
    for start in range(0, frames, per_chunk):
        chunks.send_nowait((pieces[start : start + per_chunk], start + per_chunk >= frames))
    chunks.close()
    sent: list[int] = []
    assign = Assign(build_id="b1", attempt=1, command=("true",))
    await outputs._send_chunks(assign, "blob", arriving, Sender(one, many), sent)
    frames_sent = [m for write in writes for m in write]
    assert b"".join(m.data for m in frames_sent) == b"".join(pieces)
    assert [m.offset for m in frames_sent] == [i * TRANSFER_FRAME for i in range(frames)]
    assert [m.eof for m in frames_sent] == [False] * (frames - 1) + [True]
    assert sum(sent) == frames * TRANSFER_FRAME
    return writes


async def test_a_large_upload_over_a_fast_link_goes_out_a_chunk_per_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Writes the socket takes at once (a loopback link, 1 GB/s) grow to a chunk each:
    1, 2, 4, 8 frames, then the rest of the first chunk, then 16 frames a write."""
    writes = await _send_over_a_link(1e9, 48)
    assert [len(write) for write in writes] == [1, 2, 4, 8, 1, 16, 16]


async def test_a_large_upload_over_a_slow_link_goes_out_a_frame_per_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Over 200 KB/s a frame takes 0.33 s: every write holds one, so a ping waits behind at
    most one frame (what the chaos suite's slow-link upload needs), as before the grouping."""
    writes = await _send_over_a_link(200 * 1024, 20)
    assert [len(write) for write in writes] == [1] * 20


async def test_a_link_that_slows_down_shrinks_the_writes_to_its_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``WriteGroups``: grown to a chunk on a fast link, a write that took 0.1 s for 16 frames
    (10 MB/s) shrinks the next to what 50 ms hold at that rate (8 frames); a link back to
    taking writes at once grows them again."""
    groups = outputs.WriteGroups()
    for _ in range(5):
        groups.took(groups.size, groups.size * TRANSFER_FRAME, 0.0)
    assert groups.size == outputs.GROUP_MOST == 16
    groups.took(16, 16 * TRANSFER_FRAME, 0.1)
    assert groups.size == 8
    groups.took(8, 8 * TRANSFER_FRAME, 5.0)  # 100 KB/s: a frame takes longer than 50 ms
    assert groups.size == 1
    groups.took(1, TRANSFER_FRAME, 0.001)
    assert groups.size == 2
