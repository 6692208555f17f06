"""The runner answers fetch requests a batch per thread hop, in the order they arrived."""

from __future__ import annotations

import hashlib
from pathlib import Path

import trio

from hydra_trio.protocol.messages import FetchData, FetchRequest, Message
from hydra_trio.runner.blobs import BlobStore
from hydra_trio.runner.fetches import FetchServer
from hydra_trio.runner.metrics import FarmMetrics


def request(request_id: int, sha256: str, length: int) -> FetchRequest:
    return FetchRequest(
        request_id=request_id, build_id="b", attempt=1, sha256=sha256, length=length
    )


async def test_queued_requests_are_answered_in_order_each_answer_ended(tmp_path: Path) -> None:
    """Requests queued together (small files, a refused one, a missing blob, a multi-frame
    read) get their answers in the order asked, each ended by eof, error or its length."""
    blobs = BlobStore(tmp_path / "blobs")
    contents = {b"small\n": None, b"": None, b"x" * 200: None}
    for data in contents:
        path = blobs.path_of(hashlib.sha256(data).hexdigest())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    small, empty, big = (hashlib.sha256(d).hexdigest() for d in contents)
    posted: list[Message] = []
    server = FetchServer(blobs, FarmMetrics(), posted.append, 64)
    async with trio.open_nursery() as nursery:
        await server.queue(request(0, small, 6))
        await server.queue(request(1, small, 6), "refused")
        await server.queue(request(2, "0" * 64, 10))
        await server.queue(request(3, empty, 1))
        await server.queue(request(4, big, 150))
        nursery.start_soon(server.run)
        with trio.fail_after(60):
            while len(posted) < 7:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    frames = [m for m in posted if isinstance(m, FetchData)]
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
