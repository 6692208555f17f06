"""Faults on many links at once: a lossy, slow network at the default timeouts, and ten
builders cut off and healed together.

- Loss: 30 % of the packets dropped and the rest delayed 200 ms on every builder's link (on
  the builder's egress, as netem on its interface would; or in each direction), for three
  minutes of steady work, with the runner and builders at their default timeouts
  (``--builder-timeout 30``, ``--ping-interval 10``, ``--ping-timeout 30``).  The goal: TCP
  retransmits and nothing flaps (no side gives up on a connection).  Not met yet: a run with
  flaps ends XFAIL with their count and causes (docs/reliability.md, "Findings"); the
  invariants (no build lost, none committed twice) are asserted either way.
- Ten builders (two slots each) running twenty builds are blackholed at the same moment, kept
  cut off, then healed together: every side detects within the goal, the builders come back
  spread out by their jittered backoff, every build runs again and succeeds, and all twenty
  slots can be filled again (none leaked).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from .conftest import ENABLED, SKIP_REASON
from .harness import (
    GOAL_DETECT,
    ChaosFarm,
    Detection,
    chaos_farm,
    check_database,
    check_invariants,
    marked,
)
from .network import Direction, describe

if not ENABLED:
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytestmark = [pytest.mark.chaos, pytest.mark.realnet]

LOSS, DELAY = 0.3, 0.2
#: How long the lossy network carries work.
LOSSY_FOR = 180.0
#: Each lossy build: a small random output, and a dependent that fetches it.
LOSSY_OUTPUT = 32 * 1024
TEN = [f"b{i}" for i in range(10)]
#: How long the ten builders stay cut off (long enough for failed reconnects and backoff).
CUT_FOR = 15.0


async def watch_machines(chaos: ChaosFarm, names: list[str], seen: dict[str, Any]) -> None:
    """Poll /status until cancelled: counts every observation of a machine in ``names`` not
    connected, and the largest ``sinceLastPing``."""
    while True:
        for machine in await chaos.machines():
            if machine["hostname"] in names:
                if machine["state"] != "connected":
                    seen["not_connected"] += 1
                seen["max_since_ping"] = max(seen["max_since_ping"], machine["sinceLastPing"])
        await trio.sleep(0.25)


@pytest.mark.parametrize(
    "direction",
    [Direction.TO_RUNNER, Direction.BOTH],
    ids=["builder_egress", "both_ways"],
)
async def test_30_percent_loss_and_200_ms_delay_at_default_timeouts(
    tmp_path: Path, backend: str, report: Callable[..., None], direction: Direction
) -> None:
    """Three minutes of builds over links losing 30 % of their packets and delaying the rest
    200 ms: every build succeeds once; no connection flaps (neither side gives up on one), or
    the test ends XFAIL saying how many did and why (a known gap)."""
    names = ["bA", "bB", "bC"]
    with trio.fail_after(LOSSY_FOR + 200):
        async with chaos_farm(tmp_path, backend) as chaos:
            await chaos.start_runner(builder_timeout=None)  # the default, 30 s
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(
                        functools.partial(
                            chaos.add_builder,
                            name,
                            max_jobs=2,
                            aggressive=False,
                            reconnect_max=None,
                        )
                    )
            t0 = time.time()
            for link in chaos.links.values():
                await link.lossy(LOSS, DELAY, direction)

            seen = {"not_connected": 0, "max_since_ping": 0.0}
            ids: list[str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_machines, chaos, names, seen)
                script = f"head -c {LOSSY_OUTPUT} /dev/urandom > $OUT/blob"
                consume = 'sha256sum < "$IN/p/blob" > "$OUT/seen"'
                while time.time() - t0 < LOSSY_FOR:
                    # A round: an output, a build that fetches it, and one quick build per
                    # remaining slot.
                    new = await chaos.submit([{"name": "p", "command": marked(script)}])
                    new |= await chaos.submit(
                        [{"name": "c", "command": marked(consume), "after": [new["p"]]}]
                        + [{"name": f"q{i}", "command": marked("")} for i in range(4)]
                    )
                    ids += new.values()
                    with trio.fail_after(120):
                        for build_id in new.values():
                            await chaos.real.wait_build(
                                build_id, "finished", lambda b: b["finishedAt"] is not None
                            )
                nursery.cancel_scope.cancel()
            lossy_until = time.time()
            # A flap: a session lost on either side (a failed reconnect attempt is not one).
            by_runner = {n: chaos.runner_detections(n, t0) for n in names}
            by_builder = {
                n: [d for d in chaos.builder_detections(n, t0) if not d.reason.startswith(RETRY)]
                for n in names
            }
            flaps = sum(max(len(by_runner[n]), len(by_builder[n])) for n in names)
            for link in chaos.links.values():
                await link.heal()
            tally = await check_invariants(chaos, ids)
            expected = {b: await chaos.real.build(b) for b in ids}
        check_database(chaos.state, expected)

    row = {
        "mechanism": describe(backend, "lossy") + f" ({direction.value})",
        "runner_detected_by": why(by_runner) or "(nothing to detect: no flap)",
        "builder_detected_by": why(by_builder) or "(no flap)",
        "lost": tally.lost,
        "double_committed": tally.double_committed,
        "flaps": flaps,
        "notes": (
            f"{len(ids)} builds in {lossy_until - t0:.0f} s over {len(names)} lossy links; "
            f"flaps: {flaps}; largest sinceLastPing {seen['max_since_ping']:.1f} s; "
            f"most attempts {max(tally.attempts.values())}"
        ),
    }
    report(**row)
    assert tally.lost == tally.double_committed == 0
    if flaps:
        # The goal is not met yet: measured, explained and not fixed here (docs/reliability.md,
        # "Findings": TCP_USER_TIMEOUT equal to the ping timeout, TCP's retransmission backoff,
        # liveness counted in whole frames).  Reported as XFAIL, with the count, so it stays
        # visible; a run without a flap passes.
        pytest.xfail(f"known gap: {flaps} flaps; runner: {row['runner_detected_by']}")
    assert seen["not_connected"] == 0, row


#: How a builder's failed reconnect attempt starts (not a flap of a live session).
RETRY = ("cannot connect", "handshake failed")


def why(detections: dict[str, list[Detection]]) -> str:
    """``reason x count`` over every builder."""
    counts = Counter(d.reason for found in detections.values() for d in found)
    return "; ".join(f"{reason} x{count}" for reason, count in counts.most_common())


async def test_ten_builders_cut_off_and_healed_at_once(
    tmp_path: Path, backend: str, report: Callable[..., None]
) -> None:
    """Ten builders, twenty running builds, every link blackholed at once and healed at once:
    detection within the goal on both sides for all ten, reconnects spread by backoff, every
    build succeeds, no slot leaked."""
    with trio.fail_after(240):
        async with chaos_farm(tmp_path, backend) as chaos:
            await chaos.start_runner()
            async with trio.open_nursery() as nursery:
                for name in TEN:
                    nursery.start_soon(
                        functools.partial(
                            chaos.add_builder, name, max_jobs=2, reconnect_max=None, wait=False
                        )
                    )
            await chaos.wait_connected(*TEN)
            ids = await chaos.submit(
                [{"name": f"s{i}", "command": marked("sleep 6")} for i in range(2 * len(TEN))]
            )
            with trio.fail_after(30):
                for build_id in ids.values():
                    await chaos.wait_phase(build_id, "building")

            t0 = time.time()
            async with trio.open_nursery() as nursery:
                for link in chaos.links.values():
                    nursery.start_soon(link.blackhole, Direction.BOTH)
            cut_done = time.time()
            with trio.fail_after(15):
                runner_saw = {
                    n: await chaos.wait_until(
                        f"runner detected {n}", functools.partial(chaos.runner_detected, n, t0)
                    )
                    for n in TEN
                }
                builder_saw = {
                    n: await chaos.wait_until(
                        f"{n} detected", functools.partial(chaos.builder_detected, n, t0)
                    )
                    for n in TEN
                }
            # Nothing can run while every builder is cut off: all twenty wait in the queue.
            status = await chaos.real.status()
            assert status["queue"]["running"] == 0, status["queue"]
            assert all(m["currentJobs"] == 0 for m in status["machines"]), status["machines"]
            await trio.sleep(max(0.0, CUT_FOR - (time.time() - t0)))

            healed = time.time()
            async with trio.open_nursery() as nursery:
                for link in chaos.links.values():
                    nursery.start_soon(link.heal)
            await chaos.wait_connected(*TEN)
            with trio.fail_after(60):
                back = {
                    n: await chaos.wait_until(
                        f"{n} reconnected", functools.partial(chaos.reconnected, n, healed)
                    )
                    for n in TEN
                }
                again = {
                    b: await chaos.wait_until(f"{b} again", functools.partial(chaos.assigned, b, 2))
                    for b in ids.values()
                }
            tally = await check_invariants(chaos, list(ids.values()))
            expected = {b: await chaos.real.build(b) for b in ids.values()}
        check_database(chaos.state, expected)

    delays = sorted(t - healed for t in back.values())
    drawn = [d for n in TEN for d in chaos.backoff_delays(n, t0, healed)]
    attempts = len(drawn) / len(TEN)
    worst_runner = max(d.time - t0 for d in runner_saw.values())
    worst_builder = max(d.time - t0 for d in builder_saw.values())
    row = {
        "mechanism": describe(backend, "blackhole") + ", on all 10 links at once",
        "runner_detected_by": "; ".join(sorted({d.reason for d in runner_saw.values()})),
        "runner_detect_s": worst_runner,
        "builder_detected_by": "; ".join(sorted({d.reason for d in builder_saw.values()})),
        "builder_detect_s": worst_builder,
        "reschedule_s": None,
        "elsewhere_s": max(t for t, _ in again.values()) - t0,
        "lost": tally.lost,
        "double_committed": tally.double_committed,
        "notes": (
            f"cut for {healed - t0:.0f} s (all 10 cut within {cut_done - t0:.2f} s); "
            f"while cut, {attempts:.1f} failures per builder, backoff delays drawn "
            f"{min(drawn):.1f}-{max(drawn):.1f} s; "
            f"reconnected {delays[0]:.1f}-{delays[-1]:.1f} s after the heal "
            f"(median {statistics.median(delays):.1f} s); all 20 builds running again "
            f"{max(t for t, _ in again.values()) - healed:.1f} s after the heal; "
            f"20 slots all filled again"
        ),
    }
    report(**row)
    assert tally.lost == tally.double_committed == 0
    assert worst_runner < GOAL_DETECT and worst_builder < GOAL_DETECT, row
    # Spread: jittered backoff, not one synchronized burst.
    assert delays[-1] - delays[0] > 0.2, delays
