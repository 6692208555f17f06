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
from hydra_trio.protocol.messages import (
    Assign,
    FetchData,
    FetchRequest,
    FileInfo,
    InputSpec,
    Message,
)

from .helpers.common import builder_config, wait_until
from .helpers.fake_runner import FakeRunner


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
    partial = config.work_dir / "cache" / "tmp"
    silent = trio.Event()

    def answer(message: Message) -> list[Message]:
        if isinstance(message, FetchRequest) and not silent.is_set():
            # Until the fetch has begun, a live runner (it answers pings): the builder's
            # thread hops take real time, which the autojump clock turns into virtual seconds.
            runner.pongs = False  # from now on: reads everything, answers nothing
            silent.set()
            return [FetchData(request_id=message.request_id, data=b"x" * 1024 * 1024)]
        return []

    async with trio.open_nursery() as nursery:
        runner = FakeRunner(
            nursery, assign=assign, builder_timeout=3.0, answer=answer, connections=1
        )
        state = BuilderState(config=config, machine_id="m")
        run = functools.partial(run_builder, config, connect=runner.connect, state=state)
        await nursery.start(run)
        # No tight limits on these waits: while the builder's thread hops (creating, writing
        # and removing the partial file) take real time, wait_until's polling runs the
        # autojump clock on, a few hundred virtual seconds per real second of a busy thread.
        await wait_until(silent.is_set)  # the partial file exists from now on
        await wait_until(lambda: any(e.kind is EventKind.DISCONNECTED for e in state.events))
        await wait_until(lambda: not list(partial.iterdir()))
        nursery.cancel_scope.cancel()
    assert not (config.work_dir / "cache" / "ab").exists()
