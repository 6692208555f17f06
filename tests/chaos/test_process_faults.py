"""Processes stop or die: a builder frozen for five minutes, the runner frozen, the runner
killed with builds in every phase.

Same farm as ``test_link_faults.py`` (runner ``--builder-timeout 3``, builders ``--ping-interval
1 --ping-timeout 3``, each behind its own link), the faults are signals sent to the processes'
own handles: SIGSTOP/SIGCONT and SIGKILL.  Each scenario ends with ``check_invariants`` and,
once the runner has stopped, ``check_database``.
"""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from .conftest import ENABLED, SKIP_REASON
from .harness import (
    BIG,
    GOAL_DETECT,
    GOAL_RESCHEDULE,
    PHASE_BYTES,
    RATE,
    ChaosFarm,
    chaos_farm,
    check_database,
    check_invariants,
    get_json,
    marked,
)

if not ENABLED:
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytestmark = [pytest.mark.chaos, pytest.mark.realnet]

#: How long the builder stays frozen (the issue's "a builder frozen for 5 minutes").
FREEZE = 300.0
#: How long the runner stays frozen: longer than the builders' ping timeout, so each of them
#: gives up on it and reconnects into its listen backlog.
RUNNER_FREEZE = 8.0


async def two_builders(chaos: ChaosFarm) -> None:
    await chaos.start_runner()
    async with trio.open_nursery() as nursery:
        for name in ("bA", "bB"):
            nursery.start_soon(chaos.add_builder, name)


async def test_a_builder_frozen_for_five_minutes(
    tmp_path: Path, backend: str, report: Callable[..., None]
) -> None:
    """SIGSTOP for 5 minutes: the runner gives up on it within the goal and its build runs on
    the other builder; the farm keeps building meanwhile; after SIGCONT the builder notices
    its dead session, rejoins under the same machine id, and its stale build (which ended
    while it was frozen) is never committed."""
    with trio.fail_after(FREEZE + 150):
        async with chaos_farm(tmp_path, backend) as chaos:
            await two_builders(chaos)
            ids = await chaos.submit([{"name": "s", "command": marked("sleep 4")}])
            build_id = ids["s"]
            running = await chaos.real.wait_build(
                build_id, "running", lambda b: b["state"] == "running"
            )
            holder = running["machine"]
            other = "bB" if holder == "bA" else "bA"
            frozen = chaos.builders[holder]
            await chaos.wait_phase(build_id, "building")
            await trio.sleep(0.5)

            t0 = time.time()
            frozen.signal(signal.SIGSTOP)
            with trio.fail_after(15):
                runner_saw = await chaos.wait_until(
                    "runner detected", lambda: chaos.runner_detected(holder, t0)
                )
                moved_at, moved_to = await chaos.wait_until(
                    "assigned elsewhere", lambda: chaos.assigned(build_id, 2)
                )
            assert moved_to == other

            # Meanwhile the farm goes on, and the frozen machine stays disconnected.
            during = []
            while time.time() - t0 < FREEZE - 20:
                new = await chaos.submit([{"name": "d", "command": marked("sleep 1")}])
                during.append(new["d"])
                with trio.fail_after(30):
                    done = await chaos.real.wait_build(
                        new["d"], "finished", lambda b: b["finishedAt"] is not None
                    )
                assert (done["status"], done["machine"]) == ("success", other), done
                machine = next(m for m in await chaos.machines() if m["hostname"] == holder)
                assert machine["state"] == "disconnected" and machine["currentJobs"] == 0
                await trio.sleep(10)
            await trio.sleep(max(0.0, FREEZE - (time.time() - t0)))

            thawed_at = time.time()
            frozen.signal(signal.SIGCONT)
            with trio.fail_after(15):
                builder_saw = await chaos.wait_until(
                    "builder noticed", lambda: chaos.builder_detected(holder, thawed_at)
                )
            await chaos.wait_connected(holder)
            back = chaos.reconnected(holder, thawed_at)
            assert back is not None
            status = await chaos.real.status()
            rejected = status["counters"]["framesRejected"]

            tally = await check_invariants(chaos, [build_id, *during])
            expected = {b: await chaos.real.build(b) for b in [build_id, *during]}
        check_database(chaos.state, expected)

    row = {
        "mechanism": "kill -STOP (builder), kill -CONT after 300 s",
        "runner_detected_by": runner_saw.reason,
        "runner_detect_s": runner_saw.time - t0,
        "builder_detected_by": f"after SIGCONT: {builder_saw.reason}",
        "builder_detect_s": None,
        "reschedule_s": moved_at - runner_saw.time,
        "elsewhere_s": moved_at - t0,
        "lost": tally.lost,
        "double_committed": tally.double_committed,
        "notes": (
            f"noticed {builder_saw.time - thawed_at:.2f} s after SIGCONT, rejoined "
            f"{back - thawed_at:.2f} s after; {len(during)} builds ran meanwhile; "
            f"frames rejected as stale: {rejected or 0}"
        ),
    }
    report(**row)
    assert tally.lost == tally.double_committed == 0
    assert runner_saw.time - t0 < GOAL_DETECT, row
    assert moved_at - runner_saw.time < GOAL_RESCHEDULE, row


async def test_the_runner_frozen(tmp_path: Path, backend: str, report: Callable[..., None]) -> None:
    """SIGSTOP the runner for 8 s: both builders give up on it within the goal (their
    builds are killed with their sessions); after SIGCONT the runner finds their old sessions
    dead, requeues the builds, and both run again on the reconnected builders."""
    with trio.fail_after(120):
        async with chaos_farm(tmp_path, backend) as chaos:
            await two_builders(chaos)
            ids = await chaos.submit(
                [{"name": f"s{i}", "command": marked("sleep 5")} for i in range(2)]
            )
            for build_id in ids.values():
                await chaos.wait_phase(build_id, "building")
            await trio.sleep(0.5)

            t0 = time.time()
            chaos.runner.signal(signal.SIGSTOP)
            with trio.fail_after(15):
                noticed = {
                    name: await chaos.wait_until(
                        f"{name} detected", functools.partial(chaos.builder_detected, name, t0)
                    )
                    for name in ("bA", "bB")
                }
            await trio.sleep(max(0.0, RUNNER_FREEZE - (time.time() - t0)))
            thawed_at = time.time()
            chaos.runner.signal(signal.SIGCONT)
            with trio.fail_after(30):
                lost = {
                    name: await chaos.wait_until(
                        f"runner dropped {name}",
                        functools.partial(chaos.runner_detected, name, t0),
                    )
                    for name in ("bA", "bB")
                }
                again = [
                    await chaos.wait_until(f"{b} again", functools.partial(chaos.assigned, b, 2))
                    for b in ids.values()
                ]
            tally = await check_invariants(chaos, list(ids.values()))
            expected = {b: await chaos.real.build(b) for b in ids.values()}
        check_database(chaos.state, expected)

    worst = max(d.time - t0 for d in noticed.values())
    row = {
        "mechanism": f"kill -STOP (runner), kill -CONT after {RUNNER_FREEZE:g} s",
        "runner_detected_by": "after SIGCONT: "
        + "; ".join(sorted({d.reason for d in lost.values()})),
        "runner_detect_s": None,
        "builder_detected_by": "; ".join(sorted({d.reason for d in noticed.values()})),
        "builder_detect_s": worst,
        "reschedule_s": max(t for t, _ in again) - max(d.time for d in lost.values()),
        "elsewhere_s": max(t for t, _ in again) - t0,
        "lost": tally.lost,
        "double_committed": tally.double_committed,
        "notes": f"builds ran again {max(t for t, _ in again) - thawed_at:.2f} s after SIGCONT",
    }
    report(**row)
    assert tally.lost == tally.double_committed == 0
    assert worst < GOAL_DETECT, row


async def test_the_runner_killed_with_builds_in_every_phase(
    tmp_path: Path, backend: str, report: Callable[..., None]
) -> None:
    """kill -9 the runner while one build fetches its input, one builds, one uploads, one
    more runs and the rest wait in the queue; restart it on the same state dir and ports.  The
    builders see the connection die at once, reconnect by themselves, and every build
    succeeds, each committed once, with its last attempt's output."""
    names = ("bA", "bB", "bC", "bD")
    with trio.fail_after(180):
        async with chaos_farm(tmp_path, backend) as chaos:
            await chaos.start_runner()
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(functools.partial(chaos.add_builder, name, reconnect_max=2))
            for link in chaos.links.values():
                await link.rate(RATE)
            blob = f"head -c {BIG} /dev/urandom > $OUT/blob"
            ids = await chaos.submit([{"name": "p", "command": marked(blob)}])
            with trio.fail_after(60):
                await chaos.real.wait_build(
                    ids["p"], "succeeded", lambda b: b["state"] == "succeeded"
                )
            fetch = 'sha256sum < "$IN/p/blob" > "$OUT/seen"'
            ids |= await chaos.submit(
                [
                    {"name": "c", "command": marked(fetch), "after": [ids["p"]]},
                    {"name": "u", "command": marked(blob)},
                    {"name": "s", "command": marked("sleep 8")},
                ]
            )
            # After those (a graph's independent builds are dispatched in reverse order).
            ids |= await chaos.submit(
                [{"name": f"q{i}", "command": marked("sleep 2")} for i in range(6)]
            )
            with trio.fail_after(60):
                c = await chaos.wait_phase(ids["c"], "fetching")
                await chaos.wait_phase(ids["s"], "building")
                await chaos.wait_phase(ids["u"], "uploading")
                while (
                    chaos.fetch_bytes(c["machine"]) < PHASE_BYTES
                    or chaos.upload_bytes() < PHASE_BYTES
                ):
                    await trio.sleep(0.005)
            queue = (await get_json(chaos, "/status"))["queue"]
            phases = {n: (await chaos.real.build(ids[n]))["phase"] for n in ("c", "s", "u")}
            assert phases == {"c": "fetching", "s": "building", "u": "uploading"}, phases
            assert queue["queued"] >= 3, queue

            t0 = time.time()
            await chaos.kill_runner()
            await chaos.start_runner()
            restarted = time.time()
            with trio.fail_after(15):
                noticed = {
                    name: await chaos.wait_until(
                        f"{name} detected", functools.partial(chaos.builder_detected, name, t0)
                    )
                    for name in names
                }
            await chaos.wait_connected(*names)
            with trio.fail_after(30):
                again = {
                    n: await chaos.wait_until(
                        f"{n} again", functools.partial(chaos.assigned, ids[n], 2)
                    )
                    for n in ("c", "s", "u")
                }
            every = [i for n, i in ids.items() if n != "p"]
            tally = await check_invariants(chaos, every)
            expected = {b: await chaos.real.build(b) for b in every}
        check_database(chaos.state, expected)

    worst = max(d.time - t0 for d in noticed.values())
    row = {
        "mechanism": "kill -9 (runner), restarted at once",
        "runner_detected_by": "(killed; restarted, requeued what was running)",
        "runner_detect_s": None,
        "builder_detected_by": "; ".join(sorted({d.reason for d in noticed.values()})),
        "builder_detect_s": worst,
        "reschedule_s": None,
        "elsewhere_s": max(t for t, _ in again.values()) - t0,
        "lost": tally.lost,
        "double_committed": tally.double_committed,
        "notes": (
            f"restart took {restarted - t0:.2f} s; running again after the kill: "
            + ", ".join(f"{phase} {again[n][0] - t0:.2f} s" for n, phase in phases.items())
            + f"; {queue['queued']} queued builds also succeeded; "
            f"re-committed after the restart: {tally.recommitted_after_restart}"
        ),
    }
    report(**row)
    assert tally.lost == tally.double_committed == 0
    assert worst < GOAL_DETECT, row
