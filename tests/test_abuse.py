"""A runner under a connection flood, with real processes over loopback TCP.

1,000 connections that open and send nothing (slowloris) and 1,000 that send garbage, against
a queue runner with two real builders doing builds: every bad connection is closed within the
handshake timeout, the builds finish, and the runner's memory comes back down.
"""

from __future__ import annotations

import random
from pathlib import Path

import psutil
import pytest
import trio

from .helpers.procs import RealFarm, real_farm

pytestmark = pytest.mark.realnet

HANDSHAKE_TIMEOUT = 2.0
SILENT = 1000
GARBAGE = 1000
BUILDS = 40
#: Connections opened at once (the flood is bounded: the test opens them in waves).
WAVE = 250
#: Slack on "closed within the handshake timeout" for a loaded 2-core machine.
SLACK = 3.0


def rss_kib(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss // 1024)


async def bad_connection(port: int, garbage: bytes | None, lifetimes: list[float]) -> None:
    """Open a connection, send ``garbage`` (or nothing), and wait for the runner to close it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    opened = trio.current_time()
    try:
        if garbage is not None:
            await stream.send_all(garbage)
        while await stream.receive_some():
            pass  # the runner's challenge, then EOF
    except trio.BrokenResourceError:
        pass  # closed with data unread: a reset
    finally:
        lifetimes.append(trio.current_time() - opened)
        await stream.aclose()


def garbage(rng: random.Random) -> bytes:
    """Random bytes; a quarter start with a length prefix larger than any frame allowed."""
    body = rng.randbytes(rng.randrange(1, 512))
    if rng.random() < 0.25:
        return (0xFFFFFFF0).to_bytes(4, "big") + body
    return body


async def wait_builds(farm: RealFarm, ids: list[str]) -> None:
    for build_id in ids:
        await farm.wait_build(build_id, "succeeded", lambda b: b["status"] == "success")


async def test_a_connection_flood_is_shed_while_builds_finish(tmp_path: Path) -> None:
    rng = random.Random(7)
    command = ["sh", "-c", "echo out > $OUT/o; sleep 0.05"]
    with trio.fail_after(240):
        async with real_farm(tmp_path) as farm:
            runner = await farm.start_runner(
                "--handshake-timeout",
                f"{HANDSHAKE_TIMEOUT:g}",
                "--max-unauthenticated",
                str(2 * (SILENT + GARBAGE)),
            )
            await farm.start_builder("b1")
            await farm.start_builder("b2")
            await wait_builds(farm, [await farm.submit(*command) for _ in range(10)])  # warm up
            before = rss_kib(runner.process.pid)

            ids = [await farm.submit(*command) for _ in range(BUILDS)]
            lifetimes: list[float] = []
            kinds = [None] * SILENT + [garbage(rng) for _ in range(GARBAGE)]
            rng.shuffle(kinds)
            for start in range(0, len(kinds), WAVE):
                async with trio.open_nursery() as nursery:
                    for kind in kinds[start : start + WAVE]:
                        nursery.start_soon(bad_connection, farm.builder_port, kind, lifetimes)
            await wait_builds(farm, ids)

            assert len(lifetimes) == SILENT + GARBAGE
            assert max(lifetimes) <= HANDSHAKE_TIMEOUT + SLACK, sorted(lifetimes)[-5:]
            status = await farm.status()
            assert [m["state"] for m in status["machines"]] == ["connected", "connected"]
            assert all(m["lostBuilds"] == 0 for m in status["machines"]), status
            assert status["counters"]["buildersLostIdle"] == 0
            await trio.sleep(HANDSHAKE_TIMEOUT)  # let the last handlers unwind
            after = rss_kib(runner.process.pid)
            print(f"runner RSS: {before} KiB before, {after} KiB after the flood")
            assert after - before <= 20 * 1024
