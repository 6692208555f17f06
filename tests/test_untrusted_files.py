"""Files from builders, and input names from runners, are untrusted.

The runner never writes outside its state dir and never follows a link a builder reported; a
builder never follows a link in ``$OUT`` nor places an input outside ``$IN``, whatever a
runner names; and a builder can speak only for the builds assigned to it.  Runner tests drive
``serve_builder`` with hand-written builders in virtual time; builder tests run real commands
(real time, every test bounded by ``LIMIT``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio
import trio.testing

from hydra_trio.builder import outputs
from hydra_trio.builder.daemon import BuilderConfig, BuilderState, run_builder
from hydra_trio.builder.outputs import BadOutput, scan_outputs
from hydra_trio.builder.packs import PACKED_MAX
from hydra_trio.builder.state import EventKind
from hydra_trio.protocol import codec
from hydra_trio.protocol.messages import (
    Assign,
    BuildStatus,
    Challenge,
    FetchData,
    FetchFiles,
    FetchRequest,
    FileInfo,
    InputSpec,
    LogChunk,
    Message,
    Phase,
    Pong,
    Progress,
    Result,
    UploadData,
    Welcome,
    to_wire,
)
from hydra_trio.runner.http import create_app
from hydra_trio.runner.model import Build, BuildState, MachineState

from .helpers.common import RUNNER, SYSTEM, spec, state_of
from .helpers.executor import LIMIT, Recorder, run
from .helpers.fake_builder import FakeBuilder, hello
from .helpers.fake_runner import FakeRunner, whole_uploads
from .helpers.sim import Farmlet


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw_frame(message: Message, **fields: Any) -> bytes:
    """``message`` as a frame, with ``fields`` replaced by values its validators refuse."""
    wire = to_wire(message)
    wire.update(fields)
    body = msgpack.packb(wire, use_bin_type=True)
    return codec.HEADER.pack(len(body)) + body  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# The runner: what a builder sends.


def start_runner(nursery: trio.Nursery, tmp_path: Path) -> Farmlet:
    # Real time, no autojump clock: uploads hop to worker threads, and while one runs the
    # autojump clock would jump straight to the silence watchdog.  Nothing here is timed.
    return Farmlet(nursery, RUNNER, tmp_path / "state")


async def connected(runner: Farmlet, machine_id: str) -> FakeBuilder:
    builder = runner.connect()
    assert isinstance(await builder.receive(), Challenge)
    await builder.send(hello(machine_id))
    assert isinstance(await builder.receive(), Welcome)
    return builder


async def sync(builder: FakeBuilder) -> list[Message]:
    """Ping and wait for the Pong: the runner has handled every frame sent before.  Returns
    what else it sent meanwhile (a retried build may be assigned again)."""
    await builder.send(builder.conn.make_ping(trio.current_time()))
    others: list[Message] = []
    while True:
        message = await builder.receive()
        if isinstance(message, Pong):
            if message.settling == 0:
                return others
        else:
            others.append(message)


async def assigned(runner: Farmlet, builder: FakeBuilder) -> tuple[Build, dict[str, Any]]:
    """Submit a build; ``builder`` (the only free one) gets it.  Returns it and its ref."""
    build = runner.farm.submit(spec(), trio.current_time())
    assign = await builder.receive()
    assert isinstance(assign, Assign) and assign.build_id == build.id
    return build, {"build_id": build.id, "attempt": assign.attempt}


async def upload(builder: FakeBuilder, ref: dict[str, Any], path: str, data: bytes) -> FileInfo:
    await builder.send(UploadData(**ref, path=path, offset=0, data=data, eof=True))
    return FileInfo(path=path, size=len(data), sha256=sha(data))


def stored_files(tmp_path: Path) -> list[str]:
    """Every file the runner wrote, relative to ``tmp_path`` (its state dir is ``state``)."""
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not p.is_dir())


def blobs(tmp_path: Path) -> list[str]:
    """What the runner's blob store keeps: each file of its own by its path, each packed blob
    as ``packed <sha256>`` (a published index file names it), and by its path each file of
    ``packs`` holding anything else: a pack holding more than the blobs indexed in it, one no
    index file names, an index file never published."""
    kept = [p for p in stored_files(tmp_path) if p.startswith("state/blobs/")]
    found = [p for p in kept if not p.startswith("state/blobs/packs/")]
    packs = tmp_path / "state" / "blobs" / "packs"
    indexed: dict[str, int] = {}  # pack name -> bytes of the blobs indexed in it
    for index in (p for p in packs.glob("*.idx") if not p.name.startswith(".")):
        for line in index.read_text().splitlines():
            sha256, pack, _, size = line.split()
            found.append(f"packed {sha256}")
            indexed[pack] = indexed.get(pack, 0) + int(size)
    for path in packs.iterdir():  # (a published index file is read above)
        published = path.suffix == ".idx" and not path.name.startswith(".")
        if not published and indexed.get(path.name) != path.stat().st_size:
            found.append(str(path.relative_to(tmp_path)))
    return sorted(found)


@pytest.mark.parametrize("frame", ["upload", "result"])
@pytest.mark.parametrize(
    "path", ["../escape", "a/../../escape", "/tmp/escape", "a//b", "./a", "a/.", "a\0b", ""]
)
async def test_an_output_path_that_is_not_relative_and_normalised_ends_the_connection(
    tmp_path: Path, frame: str, path: str
) -> None:
    """UploadData or a Result naming ``..``, an absolute or unnormalised path: a protocol
    error; the connection ends, the build is requeued, and the runner wrote nothing."""
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            runner = start_runner(nursery, tmp_path)
            builder = await connected(runner, "m1")
            build, ref = await assigned(runner, builder)
            data = b"evil"
            if frame == "upload":
                chunk = UploadData(**ref, path="x", offset=0, data=data, eof=True)
                await builder.stream.send_all(raw_frame(chunk, path=path))
            else:
                info = await upload(builder, ref, "x", data)
                result = Result(**ref, status=BuildStatus.SUCCESS, outputs=(info,))
                outputs = to_wire(result)["outputs"]
                outputs[0]["path"] = path
                await builder.stream.send_all(raw_frame(result, outputs=outputs))
            await builder.closed()
            machine = runner.farm.machines["m1"]
            assert state_of(machine) is MachineState.DISCONNECTED
            assert "protocol error" in machine.disconnect_reason
            assert state_of(build) is BuildState.QUEUED
            assert build.status is BuildStatus.BUILDER_LOST
            assert stored_files(tmp_path) == []  # the partial upload went with the connection
            nursery.cancel_scope.cancel()


def _file(path: str) -> FileInfo:
    return FileInfo(path=path, size=4, sha256=sha(b"evil"))


def _link(path: str, target: str) -> FileInfo:
    return FileInfo(path=path, size=0, sha256=sha(b""), link=target)


@pytest.mark.parametrize(
    "outputs",
    [
        pytest.param((_link("d", "/etc"), _file("d/passwd")), id="file-under-a-link"),
        pytest.param((_link("x", "/etc/passwd"), _file("x")), id="link-and-file-same-path"),
        pytest.param((_file("x"), _file("x")), id="same-path-twice"),
        pytest.param((_file("a"), _file("a/b")), id="file-used-as-directory"),
        pytest.param((_file("a/b"), _file("a")), id="directory-used-as-file"),
        pytest.param((_link("x", "a\0b"),), id="nul-in-link-target"),
    ],
)
async def test_a_result_whose_outputs_cannot_be_one_directory_tree_is_upload_failed(
    tmp_path: Path, outputs: tuple[FileInfo, ...]
) -> None:
    """Outputs no real $OUT can hold (placed as inputs, they would write through a link): the
    success becomes upload-failed and is retried, nothing is kept, the builder stays."""
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            runner = start_runner(nursery, tmp_path)
            builder = await connected(runner, "m1")
            build, ref = await assigned(runner, builder)
            for info in outputs:
                if not info.link:
                    await upload(builder, ref, info.path, b"evil")
            await builder.send(Result(**ref, status=BuildStatus.SUCCESS, outputs=outputs))
            await sync(builder)
            assert build.status is BuildStatus.UPLOAD_FAILED
            assert "list of outputs" in build.error
            assert build.outputs == ()
            assert not state_of(build).finished  # retried
            assert blobs(tmp_path) == []
            assert state_of(runner.farm.machines["m1"]) is MachineState.CONNECTED
            nursery.cancel_scope.cancel()


async def test_a_builder_cannot_speak_for_a_build_assigned_to_another_machine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """B sends Progress, LogChunk, UploadData and Result for A's build with its right attempt:
    each is rejected, counted by kind and logged once as a warning; nothing is applied, B
    stays connected, and A's own result is then committed."""
    caplog.set_level(logging.WARNING, logger="hydra_trio.runner")
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            runner = start_runner(nursery, tmp_path)
            a = await connected(runner, "a")
            build, ref = await assigned(runner, a)
            b = await connected(runner, "b")
            await b.send(Progress(**ref, phase=Phase.UPLOADING))
            await b.send(LogChunk(**ref, data=b"forged log"))
            forged = await upload(b, ref, "out", b"forged")
            await b.send(Result(**ref, status=BuildStatus.SUCCESS, exit_code=0, outputs=(forged,)))
            await sync(b)  # frames are handled in order: all of the above were seen

            assert runner.farm.metrics.frames_rejected == {
                "progress": 1,
                "log": 1,
                "upload": 1,
                "result": 1,
            }
            assert state_of(build) is BuildState.RUNNING
            assert build.machine_id == "a" and build.phase is None
            assert await runner.storage.logs.read(build.id, ref["attempt"]) == b""
            assert stored_files(tmp_path) == []  # no log, no upload, not even a temporary file
            assert state_of(runner.farm.machines["b"]) is MachineState.CONNECTED
            warnings = [r for r in caplog.records if "rejected a frame" in r.getMessage()]
            assert len(warnings) == 4
            assert all(r.levelno == logging.WARNING for r in warnings)
            assert all("not a build of this machine" in r.getMessage() for r in warnings)

            await a.send(Result(**ref, status=BuildStatus.BUILD_FAILED, exit_code=1))
            await sync(a)
            assert state_of(build) is BuildState.FAILED
            assert build.status is BuildStatus.BUILD_FAILED
            assert runner.farm.metrics.stale_rejected == 4
            nursery.cancel_scope.cancel()


async def test_frames_of_a_stale_attempt_are_counted_and_never_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The build's own machine sends log, uploads and a result under attempts 0 and 2 (the
    current one is 1): all counted, none applied; a run of them logs one warning, not one each."""
    caplog.set_level(logging.WARNING, logger="hydra_trio.runner")
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            runner = start_runner(nursery, tmp_path)
            builder = await connected(runner, "m1")
            build, ref = await assigned(runner, builder)
            assert ref["attempt"] == 1
            for attempt in (0, 2):
                stale = {**ref, "attempt": attempt}
                for _ in range(3):
                    await builder.send(LogChunk(**stale, data=b"stale"))
                info = await upload(builder, stale, "out", b"stale")
                await builder.send(Result(**stale, status=BuildStatus.SUCCESS, outputs=(info,)))
            await sync(builder)
            assert runner.farm.metrics.frames_rejected == {"log": 6, "upload": 2, "result": 2}
            assert state_of(build) is BuildState.RUNNING and build.attempts == 1
            assert stored_files(tmp_path) == []
            warnings = [r for r in caplog.records if "rejected a frame" in r.getMessage()]
            assert len(warnings) == 6  # (log, upload, result) x 2 attempts
            assert all("a stale attempt" in r.getMessage() for r in warnings)

            info = await upload(builder, ref, "out", b"good")
            await builder.send(Result(**ref, status=BuildStatus.SUCCESS, outputs=(info,)))
            await sync(builder)
            assert state_of(build) is BuildState.SUCCEEDED
            assert blobs(tmp_path) == [f"packed {info.sha256}"]
            assert runner.storage.blobs.packs.places.keys() == {info.sha256}
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("violation", ["past-max-output-bytes", "second-file-before-eof"])
async def test_an_upload_beyond_what_a_builder_may_send_ends_the_connection(
    tmp_path: Path, violation: str
) -> None:
    """More bytes than max_output_bytes for one attempt, or a second file begun before the
    first ended (no builder does that: it would make the runner hold a descriptor per file):
    a protocol error; the connection ends, the temporary files go."""
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            runner = start_runner(nursery, tmp_path)
            runner.farm.config.max_output_bytes = 10
            builder = await connected(runner, "m1")
            build, ref = await assigned(runner, builder)
            await builder.send(UploadData(**ref, path="a", offset=0, data=b"12345"))
            if violation == "past-max-output-bytes":
                await builder.send(UploadData(**ref, path="a", offset=5, data=b"123456"))
                expected = "max_output_bytes"
            else:
                await builder.send(UploadData(**ref, path="b", offset=0, data=b"1"))
                expected = "before finishing"
            await builder.closed()
            machine = runner.farm.machines["m1"]
            assert "protocol error" in machine.disconnect_reason
            assert expected in machine.disconnect_reason
            assert state_of(build) is BuildState.QUEUED
            assert blobs(tmp_path) == []
            nursery.cancel_scope.cancel()


async def test_the_output_route_serves_stored_files_by_hash_and_never_follows_a_link(
    tmp_path: Path,
) -> None:
    """GET /builds/{id}/outputs/{path}: a file is served from its blob; a link is answered
    409 with its target, never followed; a path that is not an output is 404; /status counts
    rejected frames by kind."""
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            runner = start_runner(nursery, tmp_path)
            builder = await connected(runner, "m1")
            build, ref = await assigned(runner, builder)
            info = await upload(builder, ref, "sub/f", b"content")
            link = _link("passwd", "/etc/passwd")
            await builder.send(Result(**ref, status=BuildStatus.SUCCESS, outputs=(info, link)))
            await builder.send(Progress(**ref, phase=Phase.BUILDING))  # too late: rejected
            await sync(builder)
            assert state_of(build) is BuildState.SUCCEEDED

            app = create_app(runner.farm, runner.storage, default_system=SYSTEM)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://runner") as client:
                response = await client.get(f"/builds/{build.id}/outputs/sub/f")
                assert response.status_code == 200 and response.content == b"content"
                response = await client.get(f"/builds/{build.id}/outputs/passwd")
                assert response.status_code == 409
                assert "/etc/passwd" in response.json()["error"]
                for path in ("sub", "f", "..%2F..%2Fstate%2Fqueue.sqlite", "%2Fetc%2Fpasswd"):
                    response = await client.get(f"/builds/{build.id}/outputs/{path}")
                    assert response.status_code == 404, path
                counters = (await client.get("/status")).json()["counters"]
                assert counters["framesRejected"] == {"progress": 1}
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------
# The builder's executor: what a build leaves in $OUT (real processes, real time).


@pytest.mark.realnet
async def test_symlinks_in_out_are_listed_as_links_and_never_followed(tmp_path: Path) -> None:
    """Links to a file and a directory outside $OUT, and one climbing out: each is listed as
    a link with its target; nothing is read through them or walked below them."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    script = (
        f"echo hi > $OUT/f; ln -s {outside} $OUT/dir; ln -s {outside}/secret $OUT/file;"
        " mkdir $OUT/sub; ln -s ../../../.. $OUT/sub/up"
    )
    result, send, _ = await run(tmp_path, "sh", "-c", script)
    assert result.status is BuildStatus.SUCCESS
    links = {o.path: o.link for o in result.outputs if o.link}
    assert links == {"dir": str(outside), "file": f"{outside}/secret", "sub/up": "../../../.."}
    assert sorted(o.path for o in result.outputs) == ["dir", "f", "file", "sub/up"]
    assert [u.path for u in send.uploads()] == ["f"]
    assert not any(b"secret" in u.data for u in send.uploads())


def _can_mknod(tmp_path: Path) -> bool:
    try:
        os.mknod(tmp_path / "probe", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        return False
    os.unlink(tmp_path / "probe")
    return True


@pytest.mark.realnet
@pytest.mark.parametrize("kind", ["fifo", "socket", "character device"])
async def test_a_fifo_socket_or_device_in_out_fails_the_build_saying_which(
    tmp_path: Path, kind: str
) -> None:
    """A special file in $OUT: build-failed naming the file and what it is, nothing
    uploaded, and the scan never blocks opening it."""
    if kind == "fifo":
        make = "mkfifo $OUT/sub/special"
    elif kind == "socket":
        bind = "import socket; socket.socket(socket.AF_UNIX).bind('special')"
        make = f'cd $OUT/sub && {sys.executable} -c "{bind}"'
    else:
        if not _can_mknod(tmp_path):
            pytest.skip("making a device file needs CAP_MKNOD")
        make = "mknod $OUT/sub/special c 1 3"
    result, send, _ = await run(tmp_path, "sh", "-c", f"echo x > $OUT/a; mkdir $OUT/sub; {make}")
    assert result.status is BuildStatus.BUILD_FAILED
    assert "sub/special" in result.error and f"is a {kind}" in result.error
    assert result.outputs == ()
    assert send.uploads() == []


@pytest.mark.realnet
async def test_out_replaced_by_a_link_to_the_root_fails_the_build(tmp_path: Path) -> None:
    """A build that turns $OUT itself into a link to / fails; the builder does not walk /."""
    result, send, _ = await run(tmp_path, "sh", "-c", 'rm -rf "$OUT" && ln -s / "$OUT"')
    assert result.status is BuildStatus.BUILD_FAILED
    assert "no longer a directory" in result.error
    assert send.uploads() == []


@pytest.mark.realnet
async def test_a_file_swapped_for_a_link_after_the_scan_is_not_uploaded(tmp_path: Path) -> None:
    """A leftover process replaces an output by a link (or a directory on its path by one)
    between scan and upload: the upload refuses it instead of reading the target."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"secret")
    out = tmp_path / "out"
    (out / "d").mkdir(parents=True)
    (out / "d" / "f").write_bytes(b"secret")
    listed = scan_outputs(out)
    (out / "d" / "f").unlink()
    (out / "d" / "f").symlink_to(outside / "f")
    send = Recorder()
    message = Assign(build_id="b1", attempt=1, command=("true",))
    with pytest.raises(BadOutput, match="changed while it was read"):
        await outputs.upload(message, out, listed, send)
    (out / "d" / "f").unlink()
    (out / "d").rmdir()
    (out / "d").symlink_to(outside)
    with pytest.raises(BadOutput, match="changed while it was read"):
        await outputs.upload(message, out, listed, send)
    assert send.messages == []


@pytest.mark.realnet
async def test_more_outputs_than_one_result_can_list_fail_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing too long for one Result frame fails the build, not the builder's connection."""
    monkeypatch.setattr(outputs, "MAX_OUTPUT_LISTING", 2000)
    result, send, _ = await run(tmp_path, "sh", "-c", "cd $OUT && touch $(seq 1 100)")
    assert result.status is BuildStatus.BUILD_FAILED
    assert "too many files" in result.error
    assert send.uploads() == []


# ---------------------------------------------------------------------------------------------
# A real builder against a malicious runner: inputs under $IN.


def serving(blobs: dict[str, bytes]) -> Callable[[Message], list[Message]]:
    """A ``FakeRunner`` answer: each FetchRequest gets the slice of ``blobs`` it asks for,
    each FetchFiles (1.7, which the fake runner speaks) its files one after the other."""

    def answer(message: Message) -> list[Message]:
        if isinstance(message, FetchFiles):
            data = b"".join(blobs[sha256] for sha256 in message.files)
            return [FetchData(request_id=message.request_id, data=data, eof=True)]
        if not isinstance(message, FetchRequest):
            return []
        blob = blobs[message.sha256]
        data = blob[message.offset : message.offset + message.length]
        end = message.offset + len(data) >= len(blob)
        return [FetchData(request_id=message.request_id, data=data, eof=end)]

    return answer


async def build_with(
    tmp_path: Path, assign: Assign | bytes, blobs: dict[str, bytes] | None = None
) -> tuple[FakeRunner, BuilderState]:
    """Run a real builder against a malicious runner that welcomes it, assigns it ``assign``
    (a message, or raw frame bytes that no honest runner could encode), serves fetches of
    ``blobs``, and keeps what comes back; until the builder answers or hangs up."""
    config = BuilderConfig(systems=(SYSTEM,), work_dir=tmp_path / "builder", hostname="b")
    state = BuilderState(config=config, machine_id="m")
    async with trio.open_nursery() as nursery:
        runner = FakeRunner(
            nursery, assign=assign, nonce=os.urandom(32), answer=serving(blobs or {})
        )
        with trio.fail_after(LIMIT):
            await nursery.start(
                functools.partial(run_builder, config, connect=runner.connect, state=state)
            )
            await runner.done.wait()
        nursery.cancel_scope.cancel()
    return runner, state


PWNED = b"pwned"


def climb(target: Path, start: Path) -> str:
    """The relative path from ``start`` to ``target``, ``..`` and all."""
    return os.path.relpath(target, start)


def _in(path: str) -> FileInfo:
    return FileInfo(path=path, size=len(PWNED), sha256=sha(PWNED))


def _hostile_inputs(outside: Path, in_dir: Path) -> dict[str, tuple[InputSpec, ...]]:
    """Inputs a malicious runner might name, each trying to put a file into ``outside``."""
    up = climb(outside, in_dir)
    return {
        "name-climbing-out": (InputSpec(name=up, build_id="d", files=(_in("pwned"),)),),
        "absolute-name": (InputSpec(name=str(outside), build_id="d", files=(_in("pwned"),)),),
        "name-dot-dot": (InputSpec(name="..", build_id="d", files=(_in("pwned"),)),),
        "name-with-nul": (InputSpec(name="a\0b", build_id="d", files=(_in("pwned"),)),),
        "file-under-a-link": (
            InputSpec(
                name="dep", build_id="d", files=(_link("evil", str(outside)), _in("evil/pwned"))
            ),
        ),
        "file-on-a-link": (
            InputSpec(
                name="dep",
                build_id="d",
                files=(_link("x", str(outside / "pwned")), _in("x")),
            ),
        ),
        "same-name-twice": (
            InputSpec(name="dep", build_id="d1", files=(_link("evil", str(outside)),)),
            InputSpec(name="dep", build_id="d2", files=(_in("evil/pwned"),)),
        ),
        "same-path-twice": (InputSpec(name="dep", build_id="d", files=(_in("x"), _in("x"))),),
        "file-used-as-directory": (
            InputSpec(name="dep", build_id="d", files=(_in("a"), _in("a/b"))),
        ),
    }


HOSTILE = [
    "name-climbing-out",
    "absolute-name",
    "name-dot-dot",
    "name-with-nul",
    "file-under-a-link",
    "file-on-a-link",
    "same-name-twice",
    "same-path-twice",
    "file-used-as-directory",
]


@pytest.mark.realnet
@pytest.mark.parametrize("case", HOSTILE)
async def test_hostile_input_names_and_paths_are_refused_before_anything_is_placed(
    tmp_path: Path, case: str
) -> None:
    """A runner naming inputs that would land outside $IN, or go through a link, or collide:
    the attempt is fetch-failed saying why, the command never runs, and nothing is created
    outside $IN."""
    outside = tmp_path / "outside"
    outside.mkdir()
    in_dir = tmp_path / "builder" / "builds" / "b1-1" / "in"
    inputs = _hostile_inputs(outside, in_dir)[case]
    command = ("sh", "-c", f"touch {outside}/ran")
    assign = Assign(build_id="b1", attempt=1, command=command, inputs=inputs)
    runner, _ = await build_with(tmp_path, assign, {sha(PWNED): PWNED})
    assert runner.result is not None
    assert runner.result.status is BuildStatus.FETCH_FAILED
    assert "input" in runner.result.error
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "builder" / "builds" / "b1-1").exists()


@pytest.mark.realnet
async def test_an_input_path_with_dot_dot_ends_the_connection_before_anything_runs(
    tmp_path: Path,
) -> None:
    """An Assign whose input file is named ``../../x``, which no honest runner can encode:
    the builder drops the connection as a protocol error and creates nothing."""
    outside = tmp_path / "outside"
    outside.mkdir()
    assign = Assign(
        build_id="b1",
        attempt=1,
        command=("sh", "-c", f"touch {outside}/ran"),
        inputs=(InputSpec(name="dep", build_id="d", files=(_in("x"),)),),
    )
    inputs = to_wire(assign)["inputs"]
    inputs[0]["files"][0]["path"] = climb(outside / "pwned", tmp_path / "in" / "dep")
    runner, state = await build_with(tmp_path, raw_frame(assign, inputs=inputs))
    assert runner.result is None
    assert any(
        e.kind is EventKind.DISCONNECTED and "not a normalised relative path" in e.reason
        for e in state.events
    )
    assert list(outside.iterdir()) == []


@pytest.mark.realnet
async def test_a_build_id_naming_a_path_cannot_move_the_build_directory(tmp_path: Path) -> None:
    """A build id like ``../../outside/victim``: the build runs in a directory under the work
    dir named by the id's hash; the directory the id names is neither created nor removed."""
    outside = tmp_path / "outside"
    victim = outside / "victim-1"
    victim.mkdir(parents=True)
    (victim / "keep").write_bytes(b"keep")
    build_id = climb(outside / "victim", tmp_path / "builder" / "builds")
    assign = Assign(build_id=build_id, attempt=1, command=("sh", "-c", "pwd > $OUT/where"))
    runner, _ = await build_with(tmp_path, assign)
    assert runner.result is not None and runner.result.status is BuildStatus.SUCCESS
    [where] = whole_uploads(runner.received)
    assert Path(where.decode().strip()).parent.parent == (tmp_path / "builder" / "builds")
    assert sorted(p.name for p in outside.rglob("*")) == ["keep", "victim-1"]


@pytest.mark.realnet
async def test_valid_inputs_with_links_are_placed_under_in(tmp_path: Path) -> None:
    """The control: files, nested files, an executable and a relative link are all placed
    under $IN/<name> as listed, and the command can use them."""
    hello_blob, tool = b"hello\n", b"#!/bin/sh\necho tool\n"
    files = (
        FileInfo(path="sub/f", size=len(hello_blob), sha256=sha(hello_blob)),
        FileInfo(path="bin/tool", size=len(tool), sha256=sha(tool), executable=True),
        _link("l", "sub/f"),
    )
    script = (
        "test -L $IN/dep/l && test -x $IN/dep/bin/tool"
        " && cat $IN/dep/l $IN/dep/sub/f $IN/dep/bin/tool > $OUT/got"
    )
    assign = Assign(
        build_id="b1",
        attempt=1,
        command=("sh", "-c", script),
        inputs=(InputSpec(name="dep", build_id="d", files=files),),
    )
    runner, _ = await build_with(tmp_path, assign, {sha(hello_blob): hello_blob, sha(tool): tool})
    assert runner.result is not None, runner.received
    assert runner.result.status is BuildStatus.SUCCESS, runner.result.error
    [got] = whole_uploads(runner.received)
    assert got == b"hello\nhello\n" + tool


@pytest.mark.parametrize("size", [6, PACKED_MAX + 6])
async def test_a_build_that_rewrites_its_inputs_cannot_poison_the_cache(
    tmp_path: Path, size: int
) -> None:
    """Builds run as the builder's user, so a build can chmod and rewrite what it finds in
    $IN.  A file above ``PACKED_MAX`` is a hard link of the verified cache entry: the next
    build on the same builder finds the entry changed, discards it, fetches it again and gets
    the bytes the runner listed; the build after that gets the entry from the cache.  A small
    one is a file of its own: the pack keeps the bytes, no fetch is needed."""
    blob = (b"hello\n" * size)[:size]
    files = (FileInfo(path="f", size=len(blob), sha256=sha(blob)),)
    inputs = (InputSpec(name="dep", build_id="d", files=files),)
    tamper = Assign(
        build_id="b1",
        attempt=1,
        command=("sh", "-c", "chmod u+w $IN/dep/f && printf 'evil!\\n' > $IN/dep/f"),
        inputs=inputs,
    )
    runner, _ = await build_with(tmp_path, tamper, {sha(blob): blob})
    assert runner.result is not None and runner.result.status is BuildStatus.SUCCESS
    use = Assign(
        build_id="b2",
        attempt=1,
        command=("sh", "-c", "cat $IN/dep/f > $OUT/got"),
        inputs=inputs,
    )
    for fetches in (1, 0) if size > PACKED_MAX else (0, 0):  # fetched again, then a hit
        runner, _ = await build_with(tmp_path, use, {sha(blob): blob})
        assert runner.result is not None and runner.result.status is BuildStatus.SUCCESS
        asked = [m for m in runner.received if isinstance(m, FetchRequest | FetchFiles)]
        assert len(asked) == fetches
        [got] = whole_uploads(runner.received)
        assert got == blob
