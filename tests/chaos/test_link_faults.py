"""One builder's link fails while it runs a build: in the input fetch, the build, the upload.

A queue runner (``--builder-timeout 3``) and two builders (``--ping-interval 1 --ping-timeout
3``, one slot each), each builder behind its own link (see ``network.py``), each link limited to
4 MB/s so a 16 MB fetch or upload lasts about 4 s and can be hit in the middle.  The fault
falls on the builder holding the build, once the phase is under way (2 MB moved, for a fetch
or upload); then each scenario measures, from the daemons' logs:

- when the runner detected the loss, and how (its watchdog, or the socket);
- when the builder detected it, and how;
- when the build was assigned to the other builder (attempt 2).

Then the link heals, the builder must reconnect by itself, and ``check_invariants`` runs: every
build succeeded once with its last attempt's output, no slot, build directory or partial
upload leaked.  The goals (docs/reliability.md): each side detects a silent fault within 4 s,
and the build is reassigned within 0.5 s of the runner's detection.

Last, a link that is only slow (200 KB/s, no fault) must not be mistaken for a dead one
(docs/reliability.md, finding 2: it was, until transfers moved to 64 KiB frames and the runner
stopped waiting on its own writes and started sending keepalives).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import trio

from .conftest import ENABLED, SKIP_REASON
from .harness import (
    BIG,
    BUILDER_TIMEOUT,
    GOAL_DETECT,
    GOAL_RESCHEDULE,
    PING_INTERVAL,
    RATE,
    ChaosFarm,
    chaos_farm,
    check_database,
    check_invariants,
    marked,
)
from .network import Direction, describe

if not ENABLED:
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytestmark = [pytest.mark.chaos, pytest.mark.realnet]

#: Bound on each scenario (they take 20-40 s).
TEST_TIMEOUT = 150.0
#: A build writing BIG random bytes (every attempt different: only the committed one counts).
RANDOM_BLOB = f"head -c {BIG} /dev/urandom > $OUT/blob"


@attrs.frozen
class Case:
    phase: str  # fetching, building or uploading
    fault: str  # blackhole, link-down or sigkill
    direction: Direction = Direction.BOTH

    @property
    def silent(self) -> bool:
        return self.fault != "sigkill"


CASES = {
    "blackhole_during_fetch": Case("fetching", "blackhole"),
    "blackhole_during_build": Case("building", "blackhole"),
    "blackhole_during_upload": Case("uploading", "blackhole"),
    "partition_runner_to_builder_only": Case("building", "blackhole", Direction.TO_BUILDER),
    "partition_builder_to_runner_only": Case("building", "blackhole", Direction.TO_RUNNER),
    "link_down_during_upload": Case("uploading", "link-down"),
    "builder_killed_during_build": Case("building", "sigkill"),
}


async def start_build(chaos: ChaosFarm, phase: str) -> tuple[str, list[str]]:
    """Submit the scenario's build (after its input, for a fetch); returns its id and every
    id submitted."""
    if phase == "fetching":
        ids = await chaos.submit([{"name": "p", "command": marked(RANDOM_BLOB)}])
        with trio.fail_after(60):
            await chaos.real.wait_build(ids["p"], "succeeded", lambda b: b["state"] == "succeeded")
        script = 'sha256sum < "$IN/p/blob" > "$OUT/seen"'
        ids |= await chaos.submit([{"name": "c", "command": marked(script), "after": [ids["p"]]}])
        target = ids["c"]
    elif phase == "uploading":
        ids = await chaos.submit([{"name": "u", "command": marked(RANDOM_BLOB)}])
        target = ids["u"]
    else:
        ids = await chaos.submit([{"name": "s", "command": marked("sleep 6")}])
        target = ids["s"]
    return target, list(ids.values())


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_link_fault(
    tmp_path: Path, backend: str, report: Callable[..., None], case: Case
) -> None:
    """The build runs on the other builder (attempt 2) within the goals, the faulted builder
    reconnects once healed (or restarted), and every invariant holds."""
    with trio.fail_after(TEST_TIMEOUT):
        async with chaos_farm(tmp_path, backend) as chaos:
            await chaos.start_runner()
            async with trio.open_nursery() as nursery:  # the two builders start together
                for name in ("bA", "bB"):
                    nursery.start_soon(chaos.add_builder, name)
            for link in chaos.links.values():
                await link.rate(RATE)

            build_id, ids = await start_build(chaos, case.phase)
            running = await chaos.real.wait_build(
                build_id, "running", lambda b: b["state"] == "running"
            )
            holder = running["machine"]
            other = "bB" if holder == "bA" else "bA"
            progress = {
                "fetching": lambda: chaos.fetch_bytes(holder),
                "uploading": chaos.upload_bytes,
                "building": None,
            }[case.phase]
            await chaos.wait_phase(build_id, case.phase, progress)
            if case.phase == "building":
                await trio.sleep(0.5)  # well into the build

            link = chaos.links[holder]
            t0 = time.time()
            if case.fault == "blackhole":
                await link.blackhole(case.direction)
            elif case.fault == "link-down":
                await link.link_down()
            else:
                chaos.builders[holder].signal(signal.SIGKILL)
            print(f"{t0:.3f} fault injected on {holder}: {case}")

            with trio.fail_after(15):
                runner_saw = await chaos.wait_until(
                    "runner detected", lambda: chaos.runner_detected(holder, t0)
                )
                builder_saw = None
                if case.silent:
                    builder_saw = await chaos.wait_until(
                        "builder detected", lambda: chaos.builder_detected(holder, t0)
                    )
                moved_at, moved_to = await chaos.wait_until(
                    "assigned elsewhere", lambda: chaos.assigned(build_id, 2)
                )
            assert moved_to == other

            if case.silent:
                healed = time.time()  # (the first of heal's commands lifts the fault)
                await link.heal()
            else:
                with trio.fail_after(10):
                    await chaos.builders[holder].process.wait()
                healed = time.time()
                await chaos.restart_builder(holder)
            await chaos.wait_connected(holder)
            back = chaos.reconnected(holder, healed)

            orphaned = () if case.silent else (holder,)
            tally = await check_invariants(chaos, ids, orphaned=orphaned)
            expected = {b: await chaos.real.build(b) for b in ids}

        check_database(chaos.state, expected)

    mechanism = "kill -9 (builder)" if case.fault == "sigkill" else describe(backend, case.fault)
    if case.direction is not Direction.BOTH:
        mechanism += f" ({case.direction.value} only)"
    row = {
        "mechanism": mechanism,
        "phase": case.phase,
        "runner_detected_by": runner_saw.reason,
        "runner_detect_s": runner_saw.time - t0,
        "builder_detected_by": builder_saw.reason if builder_saw else "(killed)",
        "builder_detect_s": builder_saw.time - t0 if builder_saw else None,
        "reschedule_s": moved_at - runner_saw.time,
        "elsewhere_s": moved_at - t0,
        "lost": tally.lost,
        "double_committed": tally.double_committed,
        "notes": f"reconnected {back - healed:.1f} s after the heal" if back else "",
    }
    report(**row)
    assert tally.lost == 0
    assert tally.double_committed == 0
    if case.silent:
        # With only runner -> builder cut, the first ping after the cut (up to a ping interval
        # later) still reaches the runner; TCP then stops sending (its retransmissions of that
        # ping are never acknowledged), so the runner's bound is ping interval + builder
        # timeout: (3, 4] s, which can exceed the 4 s goal by milliseconds (docs/reliability.md).
        runner_bound = GOAL_DETECT
        if case.direction is Direction.TO_BUILDER:
            runner_bound = PING_INTERVAL + BUILDER_TIMEOUT + 0.25
        assert runner_saw.time - t0 < runner_bound, row
        assert builder_saw is not None and builder_saw.time - t0 < GOAL_DETECT, row
    assert moved_at - runner_saw.time < GOAL_RESCHEDULE, row


#: A slow link: 200 KB/s (1.6 Mbit/s), no loss.
SLOW = 200 * 1024


@pytest.mark.parametrize("phase", ["fetching", "uploading"])
async def test_a_transfer_over_a_slow_link_is_not_mistaken_for_silence(
    tmp_path: Path, backend: str, report: Callable[..., None], phase: str
) -> None:
    """A 3 MB input fetched, or output uploaded, over a healthy 200 KB/s link (about 15 s):
    no side gives up on the other, the build succeeds at its first attempt."""
    with trio.fail_after(TEST_TIMEOUT):
        async with chaos_farm(tmp_path, backend) as chaos:
            await chaos.start_runner()
            await chaos.add_builder("bA")
            blob = "head -c 3000000 /dev/urandom > $OUT/blob"
            ids = await chaos.submit([{"name": "p", "command": marked(blob)}])
            target = ids["p"]
            if phase == "fetching":
                with trio.fail_after(60):
                    await chaos.real.wait_build(target, "succeeded", lambda b: b["finishedAt"])
                consume = 'sha256sum < "$IN/p/blob" > "$OUT/seen"'
                ids |= await chaos.submit(
                    [{"name": "c", "command": marked(consume), "after": [target]}]
                )
                target = ids["c"]
            await chaos.links["bA"].rate(SLOW)
            t0 = time.time()
            with trio.fail_after(120):
                build = await chaos.real.wait_build(target, "finished", lambda b: b["finishedAt"])
            gave_up = chaos.builder_detected("bA", t0) or chaos.runner_detected("bA", t0)
    report(
        mechanism=f"tc tbf {SLOW // 1024} KB/s (no fault)" if backend == "netns" else "proxy rate",
        runner_detected_by=gave_up.reason if gave_up else "(nothing: correct)",
        lost=0 if build["status"] == "success" else 1,
        notes=f"{phase}: {build['status']} after {build['attempts']} attempts, "
        f"{time.time() - t0:.1f} s",
    )
    assert gave_up is None, gave_up
    assert (build["status"], build["attempts"]) == ("success", 1), build
