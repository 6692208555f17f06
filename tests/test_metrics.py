"""``GET /metrics``: the values after a scripted run of a small farm, promtool's verdict on
them, and the protocol error kinds.

The farm runs with hand-written builders over in-memory streams (``test_runner_session``) on a
mock clock that moves only when the test jumps it, so every duration is exact; the builders
answer in order, so a Ping's Pong says that everything sent before it was handled.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import msgpack
import pytest
import trio
import trio.testing
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hydra_trio.protocol import codec
from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.errors import ProtocolError, RemoteProtocolError
from hydra_trio.protocol.messages import (
    PROTOCOL_VERSION,
    Assign,
    BuildStatus,
    Challenge,
    FetchData,
    FetchRequest,
    FileInfo,
    Goodbye,
    Hello,
    Ping,
    Result,
    Role,
    UploadData,
    Welcome,
)
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.http import create_app
from hydra_trio.runner.metrics import PROTOCOL_ERROR_KINDS, protocol_error_kind, render_metrics
from hydra_trio.runner.model import BuildSpec, MachineState

from .helpers.common import RUNNER, SYSTEM
from .helpers.fake_builder import FakeBuilder
from .helpers.sim import Farmlet

OUTPUT = b"hello"
OUTPUT_INFO = FileInfo(path="f", size=len(OUTPUT), sha256=hashlib.sha256(OUTPUT).hexdigest())


def spec(*after: str) -> BuildSpec:
    return BuildSpec(command=("true",), system=SYSTEM, after=after)


async def assigned(builder: FakeBuilder) -> Assign:
    message = await builder.receive()
    assert isinstance(message, Assign), message
    return message


async def settle(done: Callable[[], bool]) -> None:
    """Let the runner's tasks run until ``done()`` (the clock does not move meanwhile)."""
    while not done():
        await trio.testing.wait_all_tasks_blocked()


async def run_busy_farm(runner: Farmlet, clock: trio.testing.MockClock) -> None:
    """From t=0 to t=15: 4 results (3 successes, 1 failure), 1 builder lost while building and
    its build requeued, 1 stale result, a 5-byte upload and its 5-byte fetch, 3 connections
    ended by protocol errors (2 of them builders lost idle), and at the end a draining builder
    running 1 build, last pinged 1.5 s before."""
    farm = runner.farm
    t0 = trio.current_time()
    a = farm.submit(spec(), t0)
    b = farm.submit(spec(), t0)

    clock.jump(2)  # t=2: the first builder connects and gets a (waited 2 s); b waits for it
    m1 = runner.connect()
    await m1.handshake("m1")
    assert (await assigned(m1)).build_id == a.id
    clock.jump(3)  # t=5: a succeeds after 3 s; b (waited 5 s) is assigned
    await m1.send(Result(build_id=a.id, attempt=1, status=BuildStatus.SUCCESS))
    assert (await assigned(m1)).build_id == b.id
    clock.jump(1)  # t=6: b fails after 1 s; c is assigned at once
    await m1.send(Result(build_id=b.id, attempt=1, status=BuildStatus.BUILD_FAILED, exit_code=1))
    await m1.ping()
    c = farm.submit(spec(), trio.current_time())
    assert (await assigned(m1)).build_id == c.id

    clock.jump(4)  # t=10: m1 is lost while building c, which is requeued (no retry delay)
    await m1.stream.aclose()
    await settle(lambda: farm.machines["m1"].state is MachineState.DISCONNECTED)
    clock.jump(1)  # t=11: m2 connects and gets c (runnable again for 1 s)
    m2 = runner.connect()
    await m2.handshake("m2")
    assert (await assigned(m2)).attempt == 2
    await m2.send(Result(build_id=c.id, attempt=1, status=BuildStatus.SUCCESS))  # stale
    await m2.send(UploadData(build_id=c.id, attempt=2, path="f", offset=0, data=OUTPUT, eof=True))
    await m2.ping()
    clock.jump(2)  # t=13: c succeeds after 2 s with its upload; d, after c, is assigned
    outputs = (OUTPUT_INFO,)
    await m2.send(Result(build_id=c.id, attempt=2, status=BuildStatus.SUCCESS, outputs=outputs))
    d = farm.submit(spec(c.id), trio.current_time())
    assert (await assigned(m2)).build_id == d.id
    await m2.send(FetchRequest(request_id=1, build_id=d.id, attempt=1, sha256=OUTPUT_INFO.sha256))
    fetched = await m2.receive()
    assert isinstance(fetched, FetchData)
    assert fetched.data == OUTPUT
    clock.jump(0.5)  # t=13.5: d succeeds after 0.5 s; e is assigned and keeps running
    await m2.send(Result(build_id=d.id, attempt=1, status=BuildStatus.SUCCESS))
    e = farm.submit(spec(), trio.current_time())
    assert (await assigned(m2)).build_id == e.id
    await m2.ping()
    farm.drain("m2")
    clock.jump(1.5)  # t=15

    # Protocol errors: a ping instead of the hello, a frame that is not msgpack, a frame
    # announced larger than the limit.
    m3 = runner.connect()
    await m3.challenge()
    await m3.stream.send_all(codec.encode(Ping(seq=0)))
    m4 = runner.connect()
    await m4.handshake("m4")
    await m4.stream.send_all(codec.HEADER.pack(1) + b"\xc1")
    m5 = runner.connect()
    await m5.handshake("m5")
    await m5.stream.send_all(codec.HEADER.pack(runner.runner_config.max_frame_size + 1))
    for builder in (m3, m4, m5):
        await builder.closed()
    assert trio.current_time() == t0 + 15


async def scrape(runner: Farmlet) -> httpx.Response:
    app = create_app(runner.farm, runner.storage, default_system=SYSTEM)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://runner") as client:
        return await client.get("/metrics")


def parse(text: str) -> dict[str, float]:
    """Every sample, keyed ``name{label="value",...}`` with the labels sorted."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_metrics_count_what_happened_in_a_scripted_run(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """After ``run_busy_farm``, /metrics gives each family's exact values (latencies and
    durations to the second on the mock clock), as the text format Prometheus asks for."""
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        await run_busy_farm(runner, mock_clock)
        response = await scrape(runner)
        nursery.cancel_scope.cancel()
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    got = parse(response.text)
    expected = {
        'hydra_trio_builders{state="connected"}': 0,
        'hydra_trio_builders{state="draining"}': 1,
        'hydra_trio_builders{state="disconnected"}': 3,
        'hydra_trio_builder_seconds_since_last_ping{machine="m2",machine_id="m2"}': 1.5,
        'hydra_trio_builder_jobs{machine="m2",machine_id="m2"}': 1,
        'hydra_trio_builds{state="queued"}': 0,
        'hydra_trio_builds{state="running"}': 1,
        'hydra_trio_builds{state="succeeded"}': 3,
        'hydra_trio_builds{state="failed"}': 1,
        'hydra_trio_builds{state="cancelled"}': 0,
        'hydra_trio_builds_finished_total{status="success"}': 3,
        'hydra_trio_builds_finished_total{status="build-failed"}': 1,
        'hydra_trio_builds_finished_total{status="builder-lost"}': 0,
        'hydra_trio_builds_requeued_total{reason="builder-lost"}': 1,
        'hydra_trio_builds_requeued_total{reason="upload-failed"}': 0,
        'hydra_trio_builders_lost_total{while="building"}': 1,
        'hydra_trio_builders_lost_total{while="idle"}': 2,
        "hydra_trio_stale_results_rejected_total": 1,
        'hydra_trio_frames_rejected_total{kind="result"}': 1,
        'hydra_trio_frames_rejected_total{kind="upload"}': 0,
        'hydra_trio_handshakes_rejected_total{reason="auth-failed"}': 0,
        # Waits of a 2, b 5, c 0 then 1 (after its retry), d 0, e 0.
        "hydra_trio_dispatch_latency_seconds_count": 6,
        "hydra_trio_dispatch_latency_seconds_sum": 8,
        'hydra_trio_dispatch_latency_seconds_bucket{le="0.001"}': 3,
        'hydra_trio_dispatch_latency_seconds_bucket{le="1.0"}': 4,
        'hydra_trio_dispatch_latency_seconds_bucket{le="5.0"}': 6,
        # Runs of a 3, b 1, c 2, d 0.5; e still runs and m1's attempt of c ended with no result.
        "hydra_trio_build_duration_seconds_count": 4,
        "hydra_trio_build_duration_seconds_sum": 6.5,
        'hydra_trio_build_duration_seconds_bucket{le="1.0"}': 2,
        'hydra_trio_build_duration_seconds_bucket{le="5.0"}': 4,
        "hydra_trio_uploaded_bytes_total": len(OUTPUT),
        "hydra_trio_fetched_bytes_total": len(OUTPUT),
        'hydra_trio_protocol_errors_total{kind="wrong-order"}': 1,
        'hydra_trio_protocol_errors_total{kind="bad-frame"}': 1,
        'hydra_trio_protocol_errors_total{kind="frame-too-large"}': 1,
        'hydra_trio_protocol_errors_total{kind="bad-message"}': 0,
        'hydra_trio_protocol_errors_total{kind="other"}': 0,
    }
    assert {key: got.get(key) for key in expected} == expected
    # Disconnected machines have no per-machine series; every name has the project's prefix.
    assert not any('machine_id="m1"' in key for key in got)
    assert all(key.startswith("hydra_trio_") for key in got)


async def test_promtool_finds_nothing_to_complain_about(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """``promtool check metrics`` accepts the output of a busy farm without a lint warning."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    async with trio.open_nursery() as nursery:
        runner = Farmlet(nursery, RUNNER, tmp_path)
        await run_busy_farm(runner, mock_clock)
        response = await scrape(runner)
        nursery.cancel_scope.cancel()
    checked = await trio.run_process(
        [promtool, "check", "metrics"],
        stdin=response.content,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    complaints = (checked.stdout + checked.stderr).decode()
    assert (checked.returncode, complaints) == (0, "")


def test_each_farm_exposes_only_its_own_metrics() -> None:
    """Farms in one process keep separate registries, and nothing goes to the global one."""
    busy, idle = Farm(), Farm()
    busy.metrics.uploaded_bytes.inc(7)
    busy.metrics.dispatch_latency.observe(1.0)
    assert parse(render_metrics(busy, 0.0).decode())["hydra_trio_uploaded_bytes_total"] == 7
    quiet = parse(render_metrics(idle, 0.0).decode())
    assert quiet["hydra_trio_uploaded_bytes_total"] == 0
    assert quiet["hydra_trio_dispatch_latency_seconds_count"] == 0
    assert b"hydra_trio_" not in generate_latest(REGISTRY)


def _decode(body: bytes) -> object:
    """Decode one frame with ``body``."""
    return codec.FrameDecoder().feed(codec.HEADER.pack(len(body)) + body)


def _decode_map(**fields: object) -> object:
    return _decode(msgpack.packb(fields))


def _decode_result(**fields: object) -> object:
    base = {"type": "result", "build_id": "b", "attempt": 1, "status": "success"}
    return _decode_map(**(base | fields))


def _runner_after_challenge() -> Connection:
    conn = Connection(Role.RUNNER, now=0.0, peer_timeout=10.0)
    conn.send(Challenge(protocol_version=PROTOCOL_VERSION, nonce=bytes(32)))
    return conn


_HELLO = codec.encode(
    Hello(protocol_version=PROTOCOL_VERSION, machine_id="m", hostname="m", systems=("x",))
)
_WELCOME = Welcome(protocol_version=PROTOCOL_VERSION, session_id="s", builder_timeout=30.0)
_PING = codec.encode(Ping(seq=0))


def _established_runner() -> Connection:
    conn = _runner_after_challenge()
    conn.receive_data(_HELLO, 0.0)
    conn.send(_WELCOME)
    return conn


def _closed_runner() -> Connection:
    conn = _established_runner()
    conn.receive_data(codec.encode(Goodbye()), 0.0)
    return conn


def _cut_frame() -> None:
    decoder = codec.FrameDecoder()
    decoder.feed(codec.HEADER.pack(10) + b"abc")
    decoder.check_eof()


def _raise(message: str) -> None:
    raise RemoteProtocolError(message)


#: Errors raised by the real protocol code (so a changed message fails here), and their kind.
KIND_CASES: list[tuple[str, Callable[[], object], str]] = [
    (
        "announced too large",
        lambda: codec.FrameDecoder(10).feed(codec.HEADER.pack(11)),
        "frame-too-large",
    ),
    (
        "sending too large",
        lambda: codec.encode(Assign(build_id="b", attempt=1, command=("x" * 99,)), 10),
        "frame-too-large",
    ),
    ("not msgpack", lambda: _decode(b"\xc1"), "bad-frame"),
    ("not a map", lambda: _decode(msgpack.packb([1])), "bad-frame"),
    ("cut short", _cut_frame, "bad-frame"),
    ("unknown type", lambda: _decode_map(type="x"), "bad-message"),
    ("missing field", lambda: _decode_map(type="ping"), "bad-message"),
    ("invalid field", lambda: _decode_result(attempt=-1), "bad-message"),
    ("invalid enum", lambda: _decode_result(status="meh"), "bad-message"),
    ("invalid record", lambda: _decode_result(outputs=[{"path": "a"}]), "bad-message"),
    (
        "ping before hello",
        lambda: _runner_after_challenge().receive_data(_PING, 0.0),
        "wrong-order",
    ),
    ("hello after welcome", lambda: _established_runner().receive_data(_HELLO, 0.0), "wrong-order"),
    (
        "a runner's frame",
        lambda: _established_runner().receive_data(codec.encode(_WELCOME), 0.0),
        "wrong-order",
    ),
    ("after goodbye", lambda: _closed_runner().receive_data(_PING, 0.0), "wrong-order"),
    ("sending after goodbye", lambda: _closed_runner().send(Ping(seq=0)), "wrong-order"),
    # runner.session's own limits on an attempt's uploads (the messages it raises).
    (
        "too many bytes",
        lambda: _raise("build b attempt 1: uploaded more than max_output_bytes (5)"),
        "upload-limit",
    ),
    (
        "interleaved",
        lambda: _raise("build b attempt 1: started 'g' before finishing 'f'"),
        "upload-limit",
    ),
    ("a new message", lambda: _raise("the peer did something new"), "other"),
]


@pytest.mark.parametrize(("what", "cause", "kind"), KIND_CASES, ids=[c[0] for c in KIND_CASES])
def test_protocol_errors_are_counted_under_a_fixed_set_of_kinds(
    what: str, cause: Callable[[], object], kind: str
) -> None:
    """Each protocol error the code raises maps to the kind an operator would expect."""
    with pytest.raises(ProtocolError) as caught:
        cause()
    assert kind in PROTOCOL_ERROR_KINDS
    assert protocol_error_kind(caught.value) == kind, str(caught.value)
