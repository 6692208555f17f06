"""Builds of any shape (issue 18): every fetch answer ends, and what can never run is refused
at submission with a 422 naming the field."""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from hydra_trio.builder import jobs as jobs_module
from hydra_trio.builder import outputs as outputs_module
from hydra_trio.builder.attempt import ROUND_TRIPS
from hydra_trio.builder.daemon import BuilderState, run_builder
from hydra_trio.builder.fetch import FILES_PER_REQUEST
from hydra_trio.builder.session import Session
from hydra_trio.protocol.codec import TRANSFER_FRAME
from hydra_trio.protocol.messages import (
    MAX_UPLOAD_FILES,
    Assign,
    BuildStatus,
    FetchData,
    FetchFiles,
    FetchRequest,
    FileInfo,
    ListRequest,
    OutputList,
    Ping,
    Pong,
    Result,
    UploadData,
    UploadFiles,
)
from hydra_trio.runner import blobs as blobs_module
from hydra_trio.runner import farm as farm_module
from hydra_trio.runner import frames as frames_module
from hydra_trio.runner import session as runner_session
from hydra_trio.runner.blobs import BlobStore, PendingUpload
from hydra_trio.runner.frames import MAX_FETCH_CHUNK
from hydra_trio.runner.model import Build, BuildSpec, BuildState
from hydra_trio.runner.packs import PackedFile
from hydra_trio.runner.uploads import SMALL_BATCH

from .helpers.common import RUNNER, SYSTEM, builder_config, wait_until
from .helpers.executor import Recorder
from .helpers.fake_builder import FakeBuilder
from .helpers.fake_runner import FakeRunner
from .helpers.runner import LIMIT, Runner
from .helpers.sim import Farmlet

#: 2.5 MiB + 3 bytes: whole chunks, a partial chunk and a partial frame.
CONTENT = bytes(range(256)) * (10 * 1024) + b"end"
INFO = FileInfo(path="big", size=len(CONTENT), sha256=hashlib.sha256(CONTENT).hexdigest())


async def assigned(builder: FakeBuilder) -> Assign:
    message = await builder.receive()
    assert isinstance(message, Assign), message
    return message


async def answer(builder: FakeBuilder, request: FetchRequest) -> list[FetchData]:
    """The frames of one answer, read the way docs/protocol.md says an answer ends."""
    await builder.send(request)
    frames: list[FetchData] = []
    carried = 0
    while True:
        frame = await builder.receive()
        assert isinstance(frame, FetchData), frame
        assert frame.request_id == request.request_id
        frames.append(frame)
        carried += len(frame.data)
        assert carried <= request.length
        if frame.eof or frame.error or carried == request.length:
            return frames


async def test_every_fetch_answer_ends(tmp_path: Path) -> None:
    """Any length, at any offset: the answer ends with ``eof``, ``error`` or exactly
    ``length`` bytes, in frames of at most TRANSFER_FRAME bytes; a length above the maximum
    is one ``error`` frame; a Pong after each answer shows nothing more was sent.  (Real
    clock: an answer that never ends fails the test instead of hanging it.)"""
    with trio.fail_after(60):
        await _fetch_answers_end(tmp_path)


async def _fetch_answers_end(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        farm = runner.farm
        dep = farm.submit(BuildSpec(command=("true",), system=SYSTEM), trio.current_time())
        builder = runner.connect()
        await builder.handshake("m1")
        await assigned(builder)
        for offset in range(0, INFO.size, TRANSFER_FRAME):
            data = CONTENT[offset : offset + TRANSFER_FRAME]
            eof = offset + TRANSFER_FRAME >= INFO.size
            await builder.send(
                UploadData(
                    build_id=dep.id, attempt=1, path="big", offset=offset, data=data, eof=eof
                )
            )
        await builder.send(
            Result(build_id=dep.id, attempt=1, status=BuildStatus.SUCCESS, outputs=(INFO,))
        )
        await builder.ping()
        consumer = farm.submit(
            BuildSpec(command=("true",), system=SYSTEM, after=(dep.id,)), trio.current_time()
        )
        assign = await assigned(builder)
        assert assign.build_id == consumer.id
        request_id = 0
        lengths = [1, 1000, TRANSFER_FRAME, 256 * 1024, MAX_FETCH_CHUNK]
        offsets = [
            0,
            1,
            TRANSFER_FRAME - 1,
            MAX_FETCH_CHUNK,
            INFO.size - 5,
            INFO.size,
            INFO.size + 7,
        ]
        for offset in offsets:
            for length in lengths:
                request_id += 1
                request = FetchRequest(
                    request_id=request_id,
                    build_id=consumer.id,
                    attempt=1,
                    sha256=INFO.sha256,
                    offset=offset,
                    length=length,
                )
                frames = await answer(builder, request)
                data = b"".join(f.data for f in frames)
                assert data == CONTENT[offset : offset + length]
                assert all(len(f.data) <= TRANSFER_FRAME for f in frames)
                assert len(frames) == max(1, math.ceil(len(data) / TRANSFER_FRAME))
                assert frames[-1].eof == (offset + length >= INFO.size)
                assert not any(f.error for f in frames)
                await builder.ping()  # nothing else of this answer is left behind the pong
        for length in (MAX_FETCH_CHUNK + 1, 4 * MAX_FETCH_CHUNK):
            request_id += 1
            request = FetchRequest(
                request_id=request_id,
                build_id=consumer.id,
                attempt=1,
                sha256=INFO.sha256,
                length=length,
            )
            (frame,) = await answer(builder, request)
            assert not frame.data
            assert f"above the maximum of {MAX_FETCH_CHUNK} bytes" in frame.error
            await builder.ping()
        # (1.7) fetch-files: one error frame for a hash that is not an input, a stale
        # attempt, or files over the maximum together (this input alone is)
        for files, attempt, error in (
            (("0" * 64,), 1, "is not an input"),
            ((INFO.sha256, "0" * 64), 1, "is not an input"),
            ((INFO.sha256,), 2, "not an input of a build you run"),
            ((INFO.sha256,), 1, "the files hold more than"),
        ):
            request_id += 1
            await builder.send(
                FetchFiles(
                    request_id=request_id, build_id=consumer.id, attempt=attempt, files=files
                )
            )
            reply = await builder.receive()
            assert isinstance(reply, FetchData) and reply.request_id == request_id
            assert not reply.data and error in reply.error, reply
            await builder.ping()  # nothing else of this answer is left behind the pong
        nursery.cancel_scope.cancel()


@pytest.mark.realnet
@pytest.mark.parametrize("name", ["a/b", "..", ".", "nul\0byte", "x" * 256, "é" * 128, "/leading"])
async def test_a_name_that_cannot_be_a_file_name_is_a_422(runner: Runner, name: str) -> None:
    """A build's name becomes $IN/<name> on its dependents' builders: a name no file system
    takes (a '/', NUL, . or .., over 255 bytes of UTF-8) is refused at submission."""
    with trio.fail_after(LIMIT):
        response = await runner.client.post("/builds", json={"command": ["true"], "name": name})
        assert response.status_code == 422, response.text
        assert response.json()["error"].startswith("name: ")
        graph = {"builds": [{"name": name, "command": ["true"]}]}
        response = await runner.client.post("/builds", json=graph)
        assert response.status_code == 422, response.text
        assert "name: " in response.json()["error"]
        assert runner.farm.builds == {}


@pytest.mark.realnet
async def test_a_name_of_255_bytes_is_accepted(runner: Runner) -> None:
    """The longest name accepted is placed as it is: 255 bytes of UTF-8 (127 two-byte letters
    and one byte more)."""
    name = "é" * 127 + "x"
    with trio.fail_after(LIMIT):
        response = await runner.client.post(
            "/builds",
            json={
                "builds": [
                    {"name": name, "command": ["sh", "-c", "echo hi > $OUT/f"]},
                    {
                        "name": "use",
                        "command": ["sh", "-c", f'cat "$IN/{name}/f"'],
                        "after": [name],
                    },
                ]
            },
        )
        assert response.status_code == 201, response.text
        assert len(response.json()["ids"]) == 2


@pytest.mark.realnet
async def test_colliding_inputs_are_a_422_naming_after(runner: Runner) -> None:
    """Two inputs at one $IN/<name> are refused at submission, nothing queued: a build named
    twice in ``after`` (by id, or by name in a graph), and two dependencies of one name."""
    client = runner.client
    with trio.fail_after(LIMIT):
        lib1 = (await client.post("/builds", json={"command": ["true"], "name": "lib"})).json()[
            "id"
        ]
        lib2 = (await client.post("/builds", json={"command": ["true"], "name": "lib"})).json()[
            "id"
        ]
        anon = (await client.post("/builds", json={"command": ["true"]})).json()["id"]
        before = set(runner.farm.builds)
        bodies = [
            {"command": ["true"], "after": [anon, anon]},
            {"command": ["true"], "after": [lib1, lib2]},
            {"command": ["true"], "after": [lib1, anon, lib1]},
            {
                "builds": [
                    {"name": "p", "command": ["true"]},
                    {"name": "c", "command": ["true"], "after": ["p", "p"]},
                ]
            },
            {
                "builds": [
                    {"name": "lib", "command": ["true"]},
                    {"name": "c", "command": ["true"], "after": ["lib", lib1]},
                ]
            },
        ]
        for body in bodies:
            response = await client.post("/builds", json=body)
            assert response.status_code == 422, (body, response.text)
            error = response.json()["error"]
            assert "after: " in error and "$IN/" in error, error
        assert set(runner.farm.builds) == before
        # Distinct names (or an unnamed build by its id beside a named one) are fine.
        response = await client.post("/builds", json={"command": ["true"], "after": [lib1, anon]})
        assert response.status_code == 201, response.text


async def _wait_done(runner: Runner, build_id: str) -> dict[str, Any]:
    while True:
        data: dict[str, Any] = (await runner.client.get(f"/builds/{build_id}")).json()
        if data["state"] not in ("queued", "running"):
            return data
        await trio.sleep(0.05)


@pytest.mark.realnet
async def test_listings_travel_in_pieces_both_ways(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the pieces made small (the real ones hold thousands of files), an output
    listing goes to the runner in several ``OutputList`` frames before its Result, and a
    dependent's Assign lists no files: the builder asks for each input's listing in several
    ``ListRequest``s.  The consumer sees every file of both inputs, links included."""
    monkeypatch.setattr(farm_module, "INLINE_LISTING", 1000)
    monkeypatch.setattr(frames_module, "LIST_PIECE_FILES", 7)
    monkeypatch.setattr(jobs_module, "OUTPUT_PIECE_BYTES", 2000)
    sent: list[type[Any]] = []
    real_send = Session.send

    async def spy(self: Session, message: Any) -> None:
        sent.append(type(message))
        await real_send(self, message)

    monkeypatch.setattr(Session, "send", spy)
    make = (
        "mkdir -p $OUT/d; for i in $(seq 1 60); do echo $i > $OUT/d/f$i; done; ln -s d/f1 $OUT/link"
    )
    with trio.fail_after(LIMIT):
        await runner.start_builder("b1")
        graph = {
            "builds": [
                {"name": "one", "command": ["sh", "-c", make]},
                {"name": "two", "command": ["sh", "-c", make]},
                {
                    "name": "use",
                    "command": [
                        "sh",
                        "-c",
                        'find "$IN" | sort > $OUT/seen; cat "$IN/two/link" > $OUT/via-link',
                    ],
                    "after": ["one", "two"],
                },
            ]
        }
        response = await runner.client.post("/builds", json=graph)
        assert response.status_code == 201, response.text
        ids = response.json()["ids"]
        for name in ("one", "two", "use"):
            data = await _wait_done(runner, ids[name])
            assert data["status"] == "success", data
        one = (await runner.client.get(f"/builds/{ids['one']}")).json()
        assert len(one["outputs"]) == 61
        seen = (await runner.client.get(f"/builds/{ids['use']}/outputs/seen")).text.split()
        assert len([p for p in seen if "/d/f" in p]) == 120
        via = await runner.client.get(f"/builds/{ids['use']}/outputs/via-link")
        assert via.text == "1\n"
    assert sent.count(OutputList) >= 3 * 2  # 61 listings of ~125 bytes, 2000 a piece
    assert sent.count(ListRequest) >= 2 * 9  # 61 files, 7 a piece, per input


@pytest.mark.parametrize("runner_version", ["1.7", "1.6"])
async def test_small_files_travel_many_per_frame_where_the_runner_takes_it(
    runner: Runner, monkeypatch: pytest.MonkeyPatch, runner_version: str
) -> None:
    """(1.7) A builder uploads small outputs many per ``UploadFiles`` and fetches small inputs
    a group per ``FetchFiles`` from a runner that speaks 1.7, and one per ``UploadData`` and
    ``FetchRequest`` from a runner that says 1.6 (which would not know the messages); either
    way the consumer sees every file as it was made."""
    monkeypatch.setattr(runner_session, "PROTOCOL_VERSION", runner_version)
    sent: list[Any] = []
    real_send_all = Session.send_all

    async def spy(self: Session, messages: list[Any]) -> None:
        sent.extend(type(message) for message in messages)
        await real_send_all(self, messages)

    monkeypatch.setattr(Session, "send_all", spy)
    real_send = Session.send

    async def spy_one(self: Session, message: Any) -> None:
        sent.append(type(message))
        await real_send(self, message)

    monkeypatch.setattr(Session, "send", spy_one)
    make = "mkdir -p $OUT/d; for i in $(seq 1 300); do echo $i > $OUT/d/f$i; done"
    with trio.fail_after(LIMIT):
        await runner.start_builder("b1")
        graph = {
            "builds": [
                {"name": "make", "command": ["sh", "-c", make]},
                {
                    "name": "use",
                    "command": ["sh", "-c", 'cat "$IN"/make/d/f* | sort -n | uniq > $OUT/all'],
                    "after": ["make"],
                },
            ]
        }
        response = await runner.client.post("/builds", json=graph)
        assert response.status_code == 201, response.text
        ids = response.json()["ids"]
        for name in ("make", "use"):
            data = await _wait_done(runner, ids[name])
            assert data["status"] == "success", data
        seen = (await runner.client.get(f"/builds/{ids['use']}/outputs/all")).text.split()
        assert seen == [str(i) for i in range(1, 301)]
    if runner_version == "1.7":
        assert FetchRequest not in sent and 300 // FILES_PER_REQUEST <= sent.count(FetchFiles) < 10
        assert UploadData not in sent and 2 <= sent.count(UploadFiles) < 10  # 300 + 1 outputs
    else:
        assert FetchFiles not in sent and sent.count(FetchRequest) == 300
        assert UploadFiles not in sent and sent.count(UploadData) == 301


async def test_a_builder_low_on_disk_gets_no_new_build_until_it_has_room(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A ping with ``low_disk`` keeps new builds away from its builder (the queued build
    waits, /status says ``lowDisk``); the next ping without it brings the build."""
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        farm = runner.farm
        builder = runner.connect()
        await builder.handshake("m1")
        await builder.send(builder.conn.make_ping(trio.current_time(), low_disk=True))
        assert isinstance(await builder.receive(), Pong)
        build = farm.submit(BuildSpec(command=("true",), system=SYSTEM), trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
        machine = farm.machines["m1"]
        assert machine.low_disk and machine.free_slots == 0
        assert machine.to_json(trio.current_time())["lowDisk"] is True
        assert build.state is BuildState.QUEUED
        await builder.send(builder.conn.make_ping(trio.current_time(), low_disk=False))
        assert isinstance(await builder.receive(), Pong)
        assign = await assigned(builder)
        assert assign.build_id == build.id
        nursery.cancel_scope.cancel()


async def test_the_builder_says_low_disk_in_its_pings(tmp_path: Path) -> None:
    """A builder whose work dir has less free space than ``min_free_disk`` says so in its
    pings (a real builder against a scripted runner; the disk is measured every ping)."""
    config = builder_config(tmp_path, "b", min_free_disk=2**62, ping_interval=0.05)
    config.work_dir.mkdir()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            runner = FakeRunner(nursery, builder_timeout=3.0, connections=1)
            state = BuilderState(config=config, machine_id="m")
            nursery.start_soon(
                functools.partial(run_builder, config, connect=runner.connect, state=state)
            )
            while not any(isinstance(m, Ping) and m.low_disk for m in runner.received):
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()


async def test_a_ping_is_answered_at_once_while_a_result_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ping sent behind a Result whose outputs are still being committed is answered at
    once with ``settling`` 1 (the builder's evidence that the runner lives does not wait for
    a commit), and again with ``settling`` 0 once the result is committed: by then the build
    has succeeded.  (Real clock: the commit is held in its worker thread until the first
    Pong has arrived; a Pong that waited for it would fail the test by its time limit.)"""
    release = threading.Event()
    verify_many = BlobStore.verify_many

    def held_commit(self: BlobStore, batch: list[tuple[PendingUpload, int, str]]) -> Any:
        release.wait(LIMIT)
        return verify_many(self, batch)

    monkeypatch.setattr(BlobStore, "verify_many", held_commit)
    data = b"an output\n"
    info = FileInfo(path="out", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    try:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                runner = Farmlet(nursery, RUNNER, tmp_path)
                builder = runner.connect()
                await builder.handshake("m1")
                spec = BuildSpec(command=("true",), system=SYSTEM)
                build = runner.farm.submit(spec, trio.current_time())
                assign = await assigned(builder)
                ref: dict[str, Any] = {"build_id": assign.build_id, "attempt": assign.attempt}
                await builder.send(UploadData(**ref, path="out", offset=0, data=data, eof=True))
                await builder.send(Result(**ref, status=BuildStatus.SUCCESS, outputs=(info,)))
                ping = builder.conn.make_ping(trio.current_time())
                await builder.send(ping)
                assert await builder.receive() == Pong(seq=ping.seq, settling=1)
                assert build.state is BuildState.RUNNING
                release.set()
                assert await builder.receive() == Pong(seq=ping.seq, settling=0)
                assert build.state is BuildState.SUCCEEDED
                nursery.cancel_scope.cancel()
    finally:
        release.set()


async def test_the_runner_keeps_the_files_of_an_upload_files_frame(tmp_path: Path) -> None:
    """(1.7) Each file of an ``UploadFiles`` is kept as the ``UploadData`` carrying it whole
    would be: a result listing them succeeds and serves them; one whose bytes do not match the
    listing fails as an upload failure."""
    files = {"a": b"one\n", "d/b": b"two\n", "empty": b""}
    infos = tuple(
        FileInfo(path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        for path, data in files.items()
    )
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            runner = Farmlet(nursery, RUNNER, tmp_path)
            builder = runner.connect()
            await builder.handshake("m1")
            good = runner.farm.submit(BuildSpec(command=("true",), system=SYSTEM), 0.0)
            assign = await assigned(builder)
            ref: dict[str, Any] = {"build_id": assign.build_id, "attempt": assign.attempt}
            paths, data = tuple(files), tuple(files.values())
            await builder.send(UploadFiles(**ref, paths=paths, data=data))
            await builder.send(Result(**ref, status=BuildStatus.SUCCESS, outputs=infos))
            await wait_until(lambda: good.state is BuildState.SUCCEEDED)
            for info in infos:
                assert runner.storage.blobs.packed(info.sha256) == files[info.path]
            bad = runner.farm.submit(BuildSpec(command=("true",), system=SYSTEM), 0.0)
            assign = await assigned(builder)
            ref = {"build_id": assign.build_id, "attempt": assign.attempt}
            await builder.send(UploadFiles(**ref, paths=("a", "d/b"), data=(b"two\n", b"one\n")))
            await builder.send(Result(**ref, status=BuildStatus.SUCCESS, outputs=infos[:2]))
            await wait_until(lambda: bad.infra_failures == 1)
            assert bad.state is not BuildState.SUCCEEDED and "sha256" in bad.error
            nursery.cancel_scope.cancel()


def test_small_outputs_are_cut_into_frames_of_a_transfer_frame_at_most() -> None:
    """(1.7) The groups of an ``UploadFiles`` hold at most TRANSFER_FRAME bytes, paths and
    data counted, and at most MAX_UPLOAD_FILES files; a file as large as a frame goes alone,
    empty files are carried too, and every file is in one group, in order."""

    def files(*sizes: int, name: str = "f") -> list[tuple[FileInfo, bytes]]:
        return [
            (FileInfo(path=f"{name}{i}", size=size, sha256="0" * 64), b"x" * size)
            for i, size in enumerate(sizes)
        ]

    def weight(group: list[tuple[FileInfo, bytes]]) -> int:
        return sum(len(data) + len(info.path) + 8 for info, data in group)

    frames_of = outputs_module._frames_of
    batch = files(TRANSFER_FRAME, 0, 10, TRANSFER_FRAME - 100, 0, 5)
    groups = frames_of(batch)
    assert [pair for group in groups for pair in group] == batch
    assert all(weight(group) <= TRANSFER_FRAME or len(group) == 1 for group in groups)
    assert groups[0] == batch[:1]  # a whole frame's worth alone
    many = files(*[0] * (3 * MAX_UPLOAD_FILES + 1))
    assert [len(group) for group in frames_of(many)] == [MAX_UPLOAD_FILES] * 3 + [1]
    long_paths = files(*[0] * 100, name="p" * 2000)
    assert all(weight(group) <= TRANSFER_FRAME for group in frames_of(long_paths))
    assert frames_of([]) == []


def _small_files(count: int) -> dict[str, bytes]:
    return {f"d{i // 100}/f{i}": f"small {i}\n".encode() for i in range(count)}


def _unindexed(blobs: Path) -> list[Path]:
    """The files of the blob store ``blobs``'s packs no committed result names: packs no
    published index file names, and index files never published (``.*.idx``)."""
    packs = blobs / "packs"
    indexes = [p for p in packs.glob("*.idx") if not p.name.startswith(".")]
    named = {line.split()[1] for index in indexes for line in index.read_text().splitlines()}
    return [
        p
        for p in packs.iterdir()
        if p.name.startswith(".") or (p.suffix == ".pack" and p.name not in named)
    ]


def _write_outputs(out: Path) -> dict[str, bytes]:
    """600 small files and a larger one, ``big`` (``CONTENT``), in ``out``; the small ones."""
    small = _small_files(600)
    for path, data in small.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
    (out / "big").write_bytes(CONTENT)
    return small


async def test_small_uploads_are_written_and_committed_many_per_thread_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 outputs of one frame each and one of several frames: every one is kept under its
    hash and nothing is left among the temporary files; the small ones were written a batch
    per thread hop (no hop of their own) into packs, and all were checked a batch per hop;
    the large one was placed, the small ones all kept by one index file; a small upload that
    does not match its listing fails its result (upload-failed) and is not kept.  (Real
    clock: the writes hop to worker threads.)"""
    calls: dict[str, list[int]] = {
        "write_small": [],
        "verify_many": [],
        "place": [],
        "publish_index": [],
    }
    write_small, verify_many, place = BlobStore.write_small, BlobStore.verify_many, BlobStore.place
    publish_index = BlobStore.publish_index

    def counted_write(self: BlobStore, uploads: list[PendingUpload]) -> None:
        calls["write_small"].append(len(uploads))
        write_small(self, uploads)

    def counted_verify(self: BlobStore, batch: list[tuple[PendingUpload, int, str]]) -> Any:
        calls["verify_many"].append(len(batch))
        return verify_many(self, batch)

    def counted_place(self: BlobStore, keeping: list[tuple[int, PendingUpload]]) -> Any:
        calls["place"].append(len(keeping))
        return place(self, keeping)

    def counted_publish(self: BlobStore, tmp: str, keeping: list[tuple[int, PendingUpload]]) -> Any:
        calls["publish_index"].append(sum(isinstance(u.file, PackedFile) for _, u in keeping))
        return publish_index(self, tmp, keeping)

    monkeypatch.setattr(BlobStore, "write_small", counted_write)
    monkeypatch.setattr(BlobStore, "verify_many", counted_verify)
    monkeypatch.setattr(BlobStore, "place", counted_place)
    monkeypatch.setattr(BlobStore, "publish_index", counted_publish)
    syncs: list[int] = []
    syncfs = blobs_module._syncfs

    def counted_syncfs(fd: int) -> None:
        syncs.append(fd)
        syncfs(fd)

    monkeypatch.setattr(blobs_module, "_syncfs", counted_syncfs)
    small = _small_files(600)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            runner, builder, build, ref, listed = await _uploading(nursery, tmp_path, small)
            for offset in range(0, len(CONTENT), TRANSFER_FRAME):
                piece = CONTENT[offset : offset + TRANSFER_FRAME]
                end = offset + TRANSFER_FRAME >= len(CONTENT)
                frame = UploadData(**ref, path="big", offset=offset, data=piece, eof=end)
                await builder.send(frame)
            listed.append(INFO)
            await builder.send(Result(**ref, status=BuildStatus.SUCCESS, outputs=tuple(listed)))
            await _settled(builder)
            assert build.state is BuildState.SUCCEEDED
            for data in small.values():
                assert runner.storage.blobs.packed(_sha(data)) == data
            assert runner.storage.blobs.path_of(_sha(CONTENT)).read_bytes() == CONTENT
            blobs = tmp_path / "blobs"
            assert [*(blobs / "tmp").iterdir(), *_unindexed(blobs)] == []
            assert sum(calls["write_small"]) == 600
            assert len(calls["write_small"]) <= math.ceil(600 / SMALL_BATCH) + 1
            assert sum(calls["verify_many"]) == 601
            assert len(calls["verify_many"]) <= math.ceil(601 / 256) + 1
            assert calls["place"] == [1]  # the large one; the small ones: one index file
            assert calls["publish_index"] == [600]
            assert len([*(blobs / "packs").glob("*.idx")]) == 1
            packs = [*(blobs / "packs").glob("*.pack")]
            assert len(packs) == len(calls["write_small"])
            if runner.storage.blobs.whole_fs_sync:  # Linux: one syncfs for all data, one after
                assert len(syncs) == 2

            # A small upload whose content is not what its result lists is not kept.
            build = runner.farm.submit(BuildSpec(command=("true",), system=SYSTEM), 0.0)
            assign = await assigned(builder)
            ref = {"build_id": assign.build_id, "attempt": assign.attempt}
            await builder.send(UploadData(**ref, path="f", offset=0, data=b"sent", eof=True))
            lie = FileInfo(path="f", size=4, sha256=_sha(b"said"))
            await builder.send(Result(**ref, status=BuildStatus.SUCCESS, outputs=(lie,)))
            await _settled(builder)
            assert build.state is not BuildState.SUCCEEDED
            assert not runner.storage.blobs.has(_sha(b"sent"))
            blobs = tmp_path / "blobs"
            assert [*(blobs / "tmp").iterdir(), *_unindexed(blobs)] == []
            nursery.cancel_scope.cancel()


async def test_small_outputs_are_read_many_per_thread_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The builder reads outputs of at most a frame a batch per thread hop and sends each as
    one UploadData ending it; a larger one is still streamed in frames; a link swapped in
    for a directory after the scan is refused, not read through."""
    hops: list[int] = []
    read_batch = outputs_module._read_batch

    def counted(out_dir: Path, infos: list[FileInfo]) -> list[tuple[FileInfo, bytes]]:
        hops.append(len(infos))
        return read_batch(out_dir, infos)

    monkeypatch.setattr(outputs_module, "_read_batch", counted)
    out = tmp_path / "out"
    small = _write_outputs(out)
    listed = outputs_module.scan_outputs(out)
    send = Recorder()
    assign = Assign(build_id="b1", attempt=1, command=("true",))
    with trio.fail_after(LIMIT):
        await outputs_module.upload(assign, out, listed, send)
    sent = send.uploads()
    assert {m.path: m.data for m in sent if m.path != "big"} == small
    assert all(m.offset == 0 and m.eof for m in sent if m.path != "big")
    big = [m for m in sent if m.path == "big"]
    assert b"".join(m.data for m in big) == CONTENT and big[-1].eof
    assert sum(hops) == 600 and len(hops) <= math.ceil(600 / outputs_module.SMALL_BATCH) + 1

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f599").write_bytes(b"secret")
    (out / "d5").rename(tmp_path / "moved")
    (out / "d5").symlink_to(outside)
    with pytest.raises(outputs_module.BadOutput, match="changed while it was read"):
        await outputs_module.upload(assign, out, listed, Recorder())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _settled(builder: FakeBuilder) -> None:
    """Ping until a Pong says every frame sent before it is handled (settling 0)."""
    ping = builder.conn.make_ping(trio.current_time())
    await builder.send(ping)
    while True:
        message = await builder.receive()
        if isinstance(message, Pong) and message.seq == ping.seq and message.settling == 0:
            return


async def _uploading(
    nursery: trio.Nursery, tmp_path: Path, small: dict[str, bytes]
) -> tuple[Farmlet, FakeBuilder, Build, dict[str, Any], list[FileInfo]]:
    """A runner, a builder assigned one build, and ``small`` sent as one-frame uploads of it:
    the runner, the builder, the build, its attempt's frame fields and the files' listing."""
    runner = Farmlet(nursery, RUNNER, tmp_path)
    builder = runner.connect()
    await builder.handshake("m1")
    build = runner.farm.submit(BuildSpec(command=("true",), system=SYSTEM), 0.0)
    assign = await assigned(builder)
    ref: dict[str, Any] = {"build_id": assign.build_id, "attempt": assign.attempt}
    listed: list[FileInfo] = []
    for path, data in small.items():
        await builder.send(UploadData(**ref, path=path, offset=0, data=data, eof=True))
        listed.append(FileInfo(path=path, size=len(data), sha256=_sha(data)))
    return runner, builder, build, ref, listed


async def test_outputs_are_read_once_and_listed_as_they_were_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scan_and_upload: the small outputs go out from what the scan read to hash them (no
    second read), the larger ones are hashed as they are read for their upload; the listing
    says what was sent, even of a file changed after the scan; a link swapped in after the
    scan is refused, not read through; a file grown past the limit fails the build."""
    opened: list[str] = []
    open_sized = outputs_module._open_sized
    original_scan = outputs_module._scan

    def recording_open(root: Path, rel: str) -> Any:
        opened.append(rel)
        return open_sized(root, rel)

    def no_second_read(out_dir: Path, infos: list[FileInfo]) -> Any:
        raise AssertionError("a small output was read a second time")

    monkeypatch.setattr(outputs_module, "_open_sized", recording_open)
    monkeypatch.setattr(outputs_module, "_read_batch", no_second_read)
    out = tmp_path / "out"
    small = _write_outputs(out)
    (out / "link").symlink_to("big")
    assign = Assign(build_id="b1", attempt=1, command=("true",))
    send = Recorder()
    with trio.fail_after(LIMIT):
        listed = await outputs_module.scan_and_upload(assign, out, None, send)
    assert opened == ["big"]  # the large one opened once, for its upload
    sent: dict[str, bytes] = {}
    for message in send.uploads():
        assert message.offset == len(sent.get(message.path, b""))
        sent[message.path] = sent.get(message.path, b"") + message.data
    assert sent == {**small, "big": CONTENT}
    by_path = {info.path: info for info in listed}
    assert by_path["link"].link == "big"
    for path, data in sent.items():
        assert (by_path[path].size, by_path[path].sha256) == (len(data), _sha(data))
    assert listed == outputs_module.scan_outputs(out)  # the same listing as a scan alone

    def then(change: Any) -> Any:
        def scanned(*args: Any, **kwargs: Any) -> Any:
            found = original_scan(*args, **kwargs)
            change()
            return found

        return scanned

    # Cut short after the scan: listed as sent (what the runner checks), not as scanned.
    def cut() -> None:
        (out / "big").write_bytes(b"x" * 70_000)

    monkeypatch.setattr(outputs_module, "_scan", then(cut))
    send = Recorder()
    with trio.fail_after(LIMIT):
        listed = await outputs_module.scan_and_upload(assign, out, None, send)
    [big] = [info for info in listed if info.path == "big"]
    assert (big.size, big.sha256) == (70_000, _sha(b"x" * 70_000))
    assert b"".join(m.data for m in send.uploads() if m.path == "big") == b"x" * 70_000

    # A small file grown past a frame between the listing and its hash: uploaded as a large
    # one, not listed without its upload.
    entries = outputs_module._entries

    def growing(out_dir: Path) -> Any:
        found = entries(out_dir)
        (out / "d0" / "f0").write_bytes(CONTENT)
        return found

    monkeypatch.setattr(outputs_module, "_scan", original_scan)
    monkeypatch.setattr(outputs_module, "_entries", growing)
    send = Recorder()
    with trio.fail_after(LIMIT):
        listed = await outputs_module.scan_and_upload(assign, out, None, send)
    monkeypatch.setattr(outputs_module, "_entries", entries)
    [grown] = [info for info in listed if info.path == "d0/f0"]
    assert (grown.size, grown.sha256) == (len(CONTENT), _sha(CONTENT))
    assert b"".join(m.data for m in send.uploads() if m.path == "d0/f0") == CONTENT

    # Grown past the limit after the scan: the build's outputs are too large.
    def grow() -> None:
        (out / "big").write_bytes(CONTENT * 2)

    monkeypatch.setattr(outputs_module, "_scan", then(grow))
    (out / "big").write_bytes(CONTENT)
    with trio.fail_after(LIMIT), pytest.raises(outputs_module.OutputTooLarge):
        await outputs_module.scan_and_upload(assign, out, len(CONTENT) + 10_000, Recorder())

    # Swapped for a link after the scan: refused, the target never read.
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret" * 20_000)

    def swap() -> None:
        (out / "big").unlink()
        (out / "big").symlink_to(outside)

    monkeypatch.setattr(outputs_module, "_scan", then(swap))
    (out / "big").write_bytes(CONTENT)
    send = Recorder()
    with trio.fail_after(LIMIT), pytest.raises(outputs_module.BadOutput, match="changed"):
        await outputs_module.scan_and_upload(assign, out, None, send)
    assert not any(b"secret" in m.data for m in send.uploads())


async def test_small_uploads_run_at_most_a_window_of_batches_ahead_of_the_pongs() -> None:
    """A ping follows each batch of small files, and the sender waits once UPLOAD_WINDOW
    batches are unanswered: a ping is never behind more than ~a window of frames."""
    marks: list[int] = []
    answered = trio.Event()

    class RoundTrips:
        async def mark(self) -> int:
            marks.append(len(marks))
            return marks[-1]

        async def answered(self, seq: int) -> None:
            await answered.wait()

    send = Recorder()
    batches, arriving = trio.open_memory_channel[outputs_module.SmallBatch](math.inf)
    for b in range(10):
        info = FileInfo(path=f"f{b}", size=1, sha256=_sha(b"x"))
        batches.send_nowait([(info, b"x"), (info, b"x")])
    batches.close()
    assign = Assign(build_id="b1", attempt=1, command=("true",))
    token = ROUND_TRIPS.set(RoundTrips())
    try:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outputs_module._send_small, assign, arriving, send)
                await trio.testing.wait_all_tasks_blocked()
                window = outputs_module.UPLOAD_WINDOW
                assert len(marks) == window + 1  # the last one waits for an answer
                assert len(send.uploads()) == 2 * (window + 1)
                answered.set()
    finally:
        ROUND_TRIPS.reset(token)
    assert len(marks) == 10 and len(send.uploads()) == 20


@pytest.mark.realnet
async def test_a_builder_pings_between_batches_of_small_uploads(tmp_path: Path) -> None:
    """A real builder uploading 2,000 small outputs sends a ping after each batch of them
    (its periodic ping is 10 s away), so none waits behind more than a batch and a window."""
    config = builder_config(tmp_path, "b")
    config.work_dir.mkdir()
    script = 'for i in $(seq 1 2000); do echo "$i" > "$OUT/f$i"; done'
    assign = Assign(build_id="b1", attempt=1, command=("sh", "-c", script))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            runner = FakeRunner(nursery, assign=assign, builder_timeout=30.0, connections=1)
            state = BuilderState(config=config, machine_id="m")
            nursery.start_soon(
                functools.partial(run_builder, config, connect=runner.connect, state=state)
            )
            await runner.done.wait()
            nursery.cancel_scope.cancel()
    assert runner.result is not None and runner.result.status is BuildStatus.SUCCESS
    uploads_between: list[int] = [0]
    for message in runner.received:
        if isinstance(message, Ping):
            uploads_between.append(0)
        elif isinstance(message, UploadData):
            uploads_between[-1] += 1
        elif isinstance(message, UploadFiles):  # (1.7: the fake runner speaks it)
            uploads_between[-1] += len(message.paths)
    assert sum(uploads_between) == 2000
    assert max(uploads_between) <= outputs_module.SMALL_BATCH


async def test_a_ping_behind_small_uploads_waiting_for_the_disk_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk holds every write of small uploads (it is far slower than the network): a
    Ping sent behind 2,000 of them is still answered, as the receive loop does not wait for
    their writes; once the disk goes on, the result commits them all.  (Real clock: the
    writes are held in their worker threads until the Pong has arrived.)"""
    release = threading.Event()
    write_small = BlobStore.write_small

    def held_write(self: BlobStore, uploads: list[PendingUpload]) -> None:
        release.wait(LIMIT)
        write_small(self, uploads)

    monkeypatch.setattr(BlobStore, "write_small", held_write)
    small = _small_files(2000)
    try:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                runner, builder, build, ref, listed = await _uploading(nursery, tmp_path, small)
                await _settled(builder)
                release.set()
                await builder.send(Result(**ref, status=BuildStatus.SUCCESS, outputs=tuple(listed)))
                await _settled(builder)
                assert build.state is BuildState.SUCCEEDED
                assert all(runner.storage.blobs.has(info.sha256) for info in listed)
                nursery.cancel_scope.cancel()
    finally:
        release.set()


async def test_small_uploads_of_a_connection_that_ends_leave_no_file(tmp_path: Path) -> None:
    """A builder uploads 300 small files (a batch written, the rest still staged) and its
    connection ends before any result: nothing is left among the runner's temporary files,
    and nothing entered the store.  (Real clock: the writes hop to worker threads.)"""
    small = _small_files(300)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            runner = Farmlet(nursery, RUNNER, tmp_path)
            builder = runner.connect()
            await builder.handshake("m1")
            runner.farm.submit(BuildSpec(command=("true",), system=SYSTEM), 0.0)
            assign = await assigned(builder)
            ref: dict[str, Any] = {"build_id": assign.build_id, "attempt": assign.attempt}
            for path, data in small.items():
                await builder.send(UploadData(**ref, path=path, offset=0, data=data, eof=True))
            await _settled(builder)
            await builder.stream.aclose()
            while 0 not in runner.ended:
                await trio.sleep(0.01)
            blobs = tmp_path / "blobs"
            assert [*(blobs / "tmp").iterdir(), *(blobs / "packs").iterdir()] == []
            assert not any(runner.storage.blobs.has(_sha(data)) for data in small.values())
            nursery.cancel_scope.cancel()
