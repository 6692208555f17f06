"""The runner answers fetch requests a batch per thread hop, in the order they arrived."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import trio

from hydra_trio.protocol.messages import FetchData, FetchFiles, FetchRequest, Message
from hydra_trio.runner import fetches
from hydra_trio.runner.blobs import BlobStore
from hydra_trio.runner.fetches import FetchServer
from hydra_trio.runner.metrics import FarmMetrics


def request(request_id: int, sha256: str, length: int) -> FetchRequest:
    return FetchRequest(
        request_id=request_id, build_id="b", attempt=1, sha256=sha256, length=length
    )


def stored(root: Path, *contents: bytes) -> tuple[BlobStore, list[str]]:
    """A blob store at ``root`` holding ``contents``, and their hashes."""
    blobs = BlobStore(root)
    for data in contents:
        path = blobs.path_of(hashlib.sha256(data).hexdigest())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return blobs, [hashlib.sha256(data).hexdigest() for data in contents]


async def answers(
    blobs: BlobStore, requests: list[tuple[FetchRequest | FetchFiles, str]], frames: int
) -> list[FetchData]:
    """The first ``frames`` frames a server posts for ``requests``, queued together (each with
    its error, "" for none) before it runs."""
    posted: list[Message] = []
    server = FetchServer(blobs, FarmMetrics(), posted.append, 64)
    async with trio.open_nursery() as nursery:
        for msg, error in requests:
            await server.queue(msg, error)
        nursery.start_soon(server.run)
        with trio.fail_after(60):
            while len(posted) < frames:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return [m for m in posted if isinstance(m, FetchData)]


async def test_queued_requests_are_answered_in_order_each_answer_ended(tmp_path: Path) -> None:
    """Requests queued together (small files, a refused one, a missing blob, a multi-frame
    read) get their answers in the order asked, each ended by eof, error or its length."""
    blobs, (small, empty, big) = stored(tmp_path / "blobs", b"small\n", b"", b"x" * 200)
    queued = [
        (request(0, small, 6), ""),
        (request(1, small, 6), "refused"),
        (request(2, "0" * 64, 10), ""),
        (request(3, empty, 1), ""),
        (request(4, big, 150), ""),
    ]
    frames = await answers(blobs, list(queued), 7)
    assert [(f.request_id, f.data, f.eof, bool(f.error)) for f in frames] == [
        (0, b"small\n", True, False),
        (1, b"", False, True),
        (2, b"", False, True),
        (3, b"", True, False),
        (4, b"x" * 64, False, False),
        (4, b"x" * 64, False, False),
        (4, b"x" * 22, False, False),
    ]
    assert frames[1].error == "refused"


async def test_a_fetch_files_request_is_answered_by_its_files_one_after_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(1.7) A ``FetchFiles`` is answered by its files' bytes concatenated in request order,
    cut into frames of the piece size, the last with eof (empty files: one empty frame with
    eof); a missing blob, or files holding more than the maximum together, get one error
    frame and no bytes of any file."""
    blobs, (first, empty, second) = stored(tmp_path / "blobs", b"a" * 40, b"", b"b" * 50)
    monkeypatch.setattr(fetches, "MAX_FETCH_FILES_BYTES", 100)

    def files(request_id: int, *hashes: str) -> FetchFiles:
        return FetchFiles(request_id=request_id, build_id="b", attempt=1, files=hashes)

    queued = [
        (files(0, first, empty, second), ""),
        (files(1, empty, empty), ""),
        (files(2, first, "0" * 64), ""),
        (files(3, second, second), ""),  # 100 bytes: at the maximum
        (files(4, second, first, second), ""),  # 140 bytes: over it
        (files(5, first), "not an input"),
    ]
    frames = await answers(blobs, list(queued), 8)
    assert [(f.request_id, f.data, f.eof, bool(f.error)) for f in frames] == [
        (0, b"a" * 40 + b"b" * 24, False, False),
        (0, b"b" * 26, True, False),
        (1, b"", True, False),
        (2, b"", False, True),
        (3, b"b" * 64, False, False),
        (3, b"b" * 36, True, False),
        (4, b"", False, True),
        (5, b"", False, True),
    ]
    assert "more than 100 bytes" in frames[6].error and frames[7].error == "not an input"


async def test_a_batch_read_sooner_than_the_one_before_waits_to_be_posted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches are read at once (``READERS``); the answers still go out in the order the
    requests came, also when the second batch's read ends first."""
    blobs, (first, second) = stored(tmp_path / "blobs", b"1" * 10, b"2" * 10)
    monkeypatch.setattr(fetches, "SERVE_BATCH", 1)  # (one request a batch)
    second_read = threading.Event()
    read = FetchServer._read

    def slow_first(self: FetchServer, batch: list[fetches.Queued]) -> list[list[FetchData]]:
        if batch[0][0].request_id == 0:
            assert second_read.wait(10), "the second batch was not read beside the first"
        answers = read(self, batch)
        if batch[0][0].request_id == 1:
            second_read.set()
        return answers

    monkeypatch.setattr(FetchServer, "_read", slow_first)
    frames = await answers(blobs, [(request(0, first, 10), ""), (request(1, second, 10), "")], 2)
    assert [(f.request_id, f.data) for f in frames] == [(0, b"1" * 10), (1, b"2" * 10)]
