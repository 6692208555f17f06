"""The builder's session pieces on their own: Jobs picks the executor an Assign asks for, the
hello names executors as plain strings, and BuilderState keeps a bounded typed event record."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from hydra_trio.builder.config import BuilderConfig
from hydra_trio.builder.jobs import Jobs
from hydra_trio.builder.session import Rejected, _connection, handshake
from hydra_trio.builder.state import (
    MAX_EVENTS,
    BuilderState,
    Ended,
    EventKind,
    SessionEnd,
)
from hydra_trio.net import FramedChannel
from hydra_trio.protocol import codec
from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.messages import (
    PROTOCOL_VERSION,
    Assign,
    BuildStatus,
    Challenge,
    ExecutorKind,
    FileInfo,
    Hello,
    Message,
    Reject,
    Result,
    Role,
    Welcome,
)

WELCOME = Welcome(protocol_version=PROTOCOL_VERSION, session_id="s1", builder_timeout=30.0)


async def run_jobs(config: BuilderConfig, state: BuilderState, assign: Assign) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def fetch(assign: Assign, info: FileInfo) -> Path:
        raise AssertionError("nothing to fetch")

    async with trio.open_nursery() as nursery:
        jobs = Jobs(config, state, send, fetch, nursery)
        jobs.start(assign)
        assert [ref.build_id for ref in jobs.refs()] == [assign.build_id]
        await jobs.wait_idle()
        assert jobs.refs() == ()
    return sent


async def test_an_assign_for_an_executor_the_builder_lacks_is_an_internal_error(
    tmp_path: Path,
) -> None:
    """A command-only builder answers a derivation's Assign with internal-error, naming the
    executor it lacks, without running anything."""
    config = BuilderConfig(work_dir=tmp_path, executors=("command",))
    state = BuilderState(config=config, machine_id="m")
    drv = Assign(build_id="b", attempt=2, command=("nix",), drv="/nix/store/x.drv")
    [result] = await run_jobs(config, state, drv)
    assert isinstance(result, Result)
    assert (result.build_id, result.attempt, result.status) == ("b", 2, BuildStatus.INTERNAL_ERROR)
    assert result.error == "this builder has no nix executor (--executor)"


async def test_an_executor_that_raises_gives_an_internal_error_result(tmp_path: Path) -> None:
    """An executor's unexpected exception becomes the build's internal-error Result."""
    config = BuilderConfig(work_dir=tmp_path)

    async def broken(*args: object) -> Result:
        raise RuntimeError("boom")

    state = BuilderState(config=config, machine_id="m", execute=broken)
    [result] = await run_jobs(config, state, Assign(build_id="b", attempt=1, command=("x",)))
    assert isinstance(result, Result)
    assert result.status is BuildStatus.INTERNAL_ERROR
    assert result.error == "builder internal error: RuntimeError: boom"


async def handshake_against(
    config: BuilderConfig, reply: Message
) -> tuple[Welcome | BaseException, Hello]:
    """Run the builder's handshake against a scripted runner answering ``reply``; what it
    returned (or raised), and the Hello it sent."""
    state = BuilderState(config=config, machine_id="m")
    builder_end, runner_end = trio.testing.memory_stream_pair()
    conn = Connection(Role.BUILDER, now=trio.current_time(), peer_timeout=30, ping_interval=10)
    hellos: list[Message] = []

    async def runner() -> None:
        challenge = Challenge(protocol_version=PROTOCOL_VERSION, nonce=b"n" * 32)
        await runner_end.send_all(codec.encode(challenge))
        decoder = codec.FrameDecoder()
        while not hellos:
            hellos.extend(decoder.feed(await runner_end.receive_some()))
        await runner_end.send_all(codec.encode(reply))

    outcome: Welcome | BaseException
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner)
            try:
                outcome = await handshake(config, state, FramedChannel(builder_end, conn))
            except Rejected as exc:
                outcome = exc
    [hello] = hellos
    assert isinstance(hello, Hello)
    return outcome, hello


async def test_executor_names_become_executor_kinds_and_travel_as_plain_strings(
    tmp_path: Path,
) -> None:
    """BuilderConfig takes executor names and holds ExecutorKinds; the Hello it sends names
    them as plain strings, encoded exactly as the names given."""
    config = BuilderConfig(work_dir=tmp_path, executors=("command", "nix"))
    assert config.executors == (ExecutorKind.COMMAND, ExecutorKind.NIX)
    welcome, hello = await handshake_against(config, WELCOME)
    assert welcome == WELCOME
    assert [type(name) for name in hello.executors] == [str, str]
    plain = attrs.evolve(hello, executors=("command", "nix"))
    assert codec.encode(hello) == codec.encode(plain)
    with pytest.raises(ValueError, match="'docker'"):
        BuilderConfig(executors=("docker",))


async def test_a_reject_of_the_hello_raises_rejected_with_its_code(tmp_path: Path) -> None:
    """The handshake raises Rejected carrying the runner's code and reason."""
    reject = Reject(code="standby", reason="not the leader")
    rejected, _ = await handshake_against(BuilderConfig(work_dir=tmp_path), reject)
    assert isinstance(rejected, Rejected)
    assert (rejected.code, rejected.reason) == ("standby", "not the leader")
    assert str(rejected) == "rejected by the queue runner (standby): not the leader"


async def test_the_event_record_is_typed_and_bounded(tmp_path: Path) -> None:
    """Events carry their kind and, for a disconnection, how the session ended; only the
    last MAX_EVENTS are kept."""
    state = BuilderState(config=BuilderConfig(work_dir=tmp_path), machine_id="m")
    state.record(EventKind.CONNECTED)
    state.record(EventKind.DISCONNECTED, Ended(SessionEnd.GOODBYE, "the runner said goodbye"))
    connected, disconnected = state.events
    assert (connected.kind, connected.end, connected.reason) == (EventKind.CONNECTED, None, "")
    assert disconnected.end is SessionEnd.GOODBYE
    assert disconnected.reason == "the runner said goodbye"
    for _ in range(MAX_EVENTS):
        state.record(EventKind.WATCHDOG)
    assert len(state.events) == MAX_EVENTS
    assert all(event.kind is EventKind.WATCHDOG for event in state.events)


async def test_a_server_that_closes_before_any_challenge_is_named_as_maybe_the_http_port(
    tmp_path: Path,
) -> None:
    """A builder pointed at the runner's HTTP port (or anything that is not its builder port)
    hears no challenge; the reason says which address and that it may be the wrong port."""
    config = BuilderConfig(systems=("x86_64-linux",), work_dir=tmp_path / "w")
    state = BuilderState(config=config, machine_id="m1")

    async def connect() -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        await theirs.aclose()  # an HTTP server waiting for a request, then giving up
        return ours

    ended = await _connection(config, state, connect)
    assert ended.end is SessionEnd.HANDSHAKE_FAILED
    assert "connection closed by peer before any challenge came" in ended.reason
    assert f"is {config.server} the runner's builder port" in ended.reason
