"""A fetch cut short by its connection dying leaves nothing behind in the builder's cache.

Found by the chaos suite (``tests/chaos``, blackhole during the input fetch): the partial file
in ``cache/tmp`` outlived the session, because its removal was awaited in the fetch's
``finally`` without a shield, inside the cancelled session.
"""

from __future__ import annotations

import functools
from pathlib import Path

import trio
import trio.testing

from hydra_trio.builder.daemon import BuilderState, run_builder
from hydra_trio.builder.state import EventKind
from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.messages import (
    PROTOCOL_VERSION,
    Assign,
    Challenge,
    FetchData,
    FetchRequest,
    FileInfo,
    Hello,
    InputSpec,
    Ping,
    Pong,
    Role,
    Welcome,
)

from .test_liveness import builder_config, wait_until


async def test_a_fetch_cut_short_by_a_silent_runner_removes_its_partial_file(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The runner sends one chunk of a 4 MiB input, then goes silent: the builder's watchdog
    ends the session, and cache/tmp is empty again (the input never reaches the cache)."""
    config = builder_config(tmp_path, "a", ping_interval=1.0, ping_timeout=3.0)
    info = FileInfo(path="big", size=4 * 1024 * 1024, sha256="ab" * 32)
    assign = Assign(
        build_id="b1",
        attempt=1,
        command=("true",),
        inputs=(InputSpec(name="dep", build_id="b0", files=(info,)),),
    )
    builder_end, runner_end = trio.testing.memory_stream_pair()
    partial = config.work_dir / "cache" / "tmp"
    silent = trio.Event()

    async def fake_runner() -> None:
        conn = Connection(Role.RUNNER, now=trio.current_time(), peer_timeout=1e9)
        challenge = Challenge(protocol_version=PROTOCOL_VERSION, nonce=bytes(32))
        await runner_end.send_all(conn.send(challenge))
        while data := await runner_end.receive_some():
            for message in conn.receive_data(data, trio.current_time()):
                if isinstance(message, Hello):
                    welcome = Welcome(
                        protocol_version=PROTOCOL_VERSION, session_id="s", builder_timeout=3.0
                    )
                    await runner_end.send_all(conn.send(welcome) + conn.send(assign))
                elif isinstance(message, Ping) and not silent.is_set():
                    # Until the fetch has begun, a live runner: the builder's thread hops take
                    # real time, which the autojump clock turns into virtual seconds.
                    await runner_end.send_all(conn.send(Pong(seq=message.seq)))
                elif isinstance(message, FetchRequest) and not silent.is_set():
                    chunk = FetchData(request_id=message.request_id, data=b"x" * 1024 * 1024)
                    await runner_end.send_all(conn.send(chunk))
                    silent.set()  # from now on: reads everything, answers nothing

    async def connect() -> trio.abc.Stream:
        return builder_end

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_runner)
        state = BuilderState(config=config, machine_id="m")
        await nursery.start(functools.partial(run_builder, config, connect=connect, state=state))
        await wait_until(silent.is_set, limit=600)  # the partial file exists from now on
        await wait_until(
            lambda: any(e.kind is EventKind.DISCONNECTED for e in state.events), limit=600
        )
        await wait_until(lambda: not list(partial.iterdir()), limit=60)
        nursery.cancel_scope.cancel()
    assert not (config.work_dir / "cache" / "ab").exists()
