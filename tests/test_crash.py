"""Crash recovery with real processes: the queue runner is killed with SIGKILL again and again.

A queue runner (``--builder-timeout 3``) and two builders (``--ping-interval 1 --ping-timeout 3
--max-jobs 2 --reconnect-max 2``) run as child processes (``tests/helpers/procs.py``). One graph of
200 named builds is submitted in one ``POST /builds``: quick builds, builds with 2-3 MB random
outputs (so uploads are in flight when the runner dies), a chain of slow builds, and dependents that
copy (or hash) their dependencies' outputs into their own. Then the runner is killed with ``kill
-9`` at random moments (during dispatch, during uploads, while builders reconnect) and restarted on
the same state dir and ports; the builders find it again by themselves.

At the end every build must have succeeded exactly once as far as anyone can see: through the
HTTP API (states, outputs, hashes, dependents' contents), the blob store (every blob's content
matches its name) and the SQLite database (read after the runner is stopped).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .helpers.procs import POLL, Daemon, RealFarm, real_farm

pytestmark = pytest.mark.realnet

#: The runner's --builder-timeout.
BUILDER_TIMEOUT = 3.0
#: A bound on the whole test (it takes about 15-20 s on a 2-core machine).
TEST_TIMEOUT = 90.0
#: Times the runner is killed and restarted, and when (see ``moment_to_kill``).
KILLS = 8
KILL_KINDS = ("progress", "upload", "early")
#: Attempts at restarting the runner when its port is still held.
RESTART_ATTEMPTS = 5

QUICK, BIG, SLOW, DEPENDENTS = 156, 12, 4, 28
TOTAL = QUICK + BIG + SLOW + DEPENDENTS


def big_size(index: int) -> int:
    return 2_000_000 + index * 137_000


def make_graph(rng: random.Random) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """The 200 builds (in a shuffled order) and, for each, the builds it names in ``after``.

    - ``qNNN``: writes its name.
    - ``bN``: 2-3 MB from /dev/urandom (every attempt different: only the committed one counts);
      b4..b7 wait for a slow build and b8..b11 for a quick one, so big uploads happen
      throughout the run.
    - ``sN``: a chain; each sleeps 1 s, then writes its name and its predecessor's output.
    - ``dNN``: 2-3 dependencies among all the above and earlier dependents; writes its name,
      then for each dependency ``<dep>:`` and its output, or ``<dep> <sha256>`` for a big one.
    """
    builds: list[dict[str, Any]] = []
    after: dict[str, list[str]] = {}

    def add(name: str, script: str, deps: list[str]) -> None:
        after[name] = deps
        builds.append({"name": name, "command": ["sh", "-c", script], "after": deps})

    for i in range(QUICK):
        add(f"q{i:03d}", f"echo q{i:03d} > $OUT/out", [])
    for i in range(SLOW):
        prev = [f"s{i - 1}"] if i else []
        copy = f"cat $IN/s{i - 1}/out >> $OUT/out; " if i else ""
        add(f"s{i}", f"sleep 1; echo s{i} > $OUT/out; {copy}true", prev)
    for i in range(BIG):
        deps = [] if i < 4 else [f"s{i - 4}"] if i < 8 else [f"q{rng.randrange(QUICK):03d}"]
        add(f"b{i}", f"head -c {big_size(i)} /dev/urandom > $OUT/out", deps)
    pool = [b["name"] for b in builds]
    for i in range(DEPENDENTS):
        name = f"d{i:02d}"
        deps = rng.sample(pool, rng.randint(2, 3))
        parts = [f"echo {name}"]
        for dep in deps:
            if dep.startswith("b"):
                parts.append(f'echo "{dep} $(sha256sum < $IN/{dep}/out | cut -c1-64)"')
            else:
                parts.append(f"echo {dep}:; cat $IN/{dep}/out")
        add(name, "{ " + "; ".join(parts) + "; } > $OUT/out", deps)
        pool.append(name)
    rng.shuffle(builds)
    return builds, after


def expected_output(name: str, deps: list[str], outputs: dict[str, bytes]) -> bytes | None:
    """What build ``name`` must have written, given its dependencies' outputs (None: random)."""
    if name.startswith("q"):
        return f"{name}\n".encode()
    if name.startswith("b"):
        return None
    if name.startswith("s"):
        return f"{name}\n".encode() + b"".join(outputs[d] for d in deps)
    text = f"{name}\n".encode()
    for dep in deps:
        if dep.startswith("b"):
            text += f"{dep} {hashlib.sha256(outputs[dep]).hexdigest()}\n".encode()
        else:
            text += f"{dep}:\n".encode() + outputs[dep]
    return text


async def get_json(farm: RealFarm, path: str) -> Any:
    response = await farm.client.get(f"{farm.url}{path}")
    response.raise_for_status()
    return response.json()


async def counts(farm: RealFarm) -> dict[str, int] | None:
    """The queue counts, or None while the runner does not answer."""
    try:
        queue: dict[str, int] = (await get_json(farm, "/status"))["queue"]
    except httpx.TransportError:
        return None
    return queue


async def restart_runner(farm: RealFarm, generation: int) -> Daemon:
    """Start the runner again on the same ports and state dir; retry while the port is held."""
    for _ in range(RESTART_ATTEMPTS):
        runner = await farm.start(
            f"runner-{generation}",
            "queue-runner",
            "--listen",
            f"127.0.0.1:{farm.builder_port}",
            "--http",
            farm.url.removeprefix("http://"),
            "--builder-timeout",
            f"{BUILDER_TIMEOUT:g}",
            "--state-dir",
            str(farm.tmp_path / "state"),
        )
        with trio.fail_after(20):
            while runner.process.returncode is None:
                if await counts(farm) is not None:
                    return runner
                await trio.sleep(POLL)
        if "cannot listen" not in runner.log():
            raise AssertionError(f"the restarted queue runner exited:\n{runner.log()}")
        print(f"runner-{generation}: port still held, retrying")
        await trio.sleep(0.5)
    raise AssertionError(f"the runner's ports stayed held over {RESTART_ATTEMPTS} attempts")


def upload_files(state: Path) -> dict[str, int]:
    """The runner's unfinished uploads (and leftovers of killed runners) by name: size."""
    found = {}
    for path in (state / "blobs" / "tmp").glob("upload-*"):
        with contextlib.suppress(FileNotFoundError):
            found[path.name] = path.stat().st_size
    return found


async def moment_to_kill(farm: RealFarm, state: Path, kind: str, rng: random.Random) -> str:
    """Wait for a moment of the ``kind`` asked for; returns what it found.

    - ``progress``: once a builder is connected, after 5-30 more builds succeeded (during
      dispatch, with builds running);
    - ``upload``: as soon as a new upload has 256 KiB or more in blobs/tmp (in the middle of a
      big output's upload; no more than 5 s, then like ``progress``);
    - ``early``: 0.05-1 s after the runner answers (builders are still reconnecting).
    """
    if kind == "early":
        delay = rng.uniform(0.05, 1.0)
        await trio.sleep(delay)
        return f"early, {delay:.2f} s after the restart"
    with trio.fail_after(15):
        while not any(m["connected"] for m in (await get_json(farm, "/status"))["machines"]):
            await trio.sleep(POLL)
    if kind == "upload":
        before = set(upload_files(state))
        with trio.move_on_after(5):
            while True:
                for name, size in upload_files(state).items():
                    if name not in before and size >= 256 * 1024:
                        return f"upload in flight ({size} bytes received)"
                await trio.sleep(0.002)
    queue = await counts(farm)
    assert queue is not None
    target = queue["succeeded"] + rng.randint(5, 30)
    with trio.move_on_after(4):
        while (queue := await counts(farm)) is not None and queue["succeeded"] < target:
            await trio.sleep(0.005)
    return f"progress, {queue and queue['succeeded']} succeeded"


async def kill(runner: Daemon) -> None:
    runner.signal(signal.SIGKILL)
    with trio.fail_after(5):
        await runner.process.wait()
    assert runner.process.returncode == -signal.SIGKILL


async def test_200_builds_all_succeed_once_across_repeated_runner_kills(tmp_path: Path) -> None:
    """kill -9 the runner 8 times while a 200-build graph runs: every build ends succeeded,
    once, with intact outputs that its dependents saw, in the API, the blobs and the database."""
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    print(f"seed {seed}")
    graph, after = make_graph(rng)
    state = tmp_path / "state"
    with trio.fail_after(TEST_TIMEOUT):
        async with real_farm(tmp_path) as farm:
            runner = await farm.start_runner(builder_timeout=BUILDER_TIMEOUT)
            for name in ("bA", "bB"):
                await farm.start_builder(name, "--max-jobs", "2", "--reconnect-max", "2")

            response = await farm.client.post(f"{farm.url}/builds", json={"builds": graph})
            assert response.status_code == 201, response.text
            ids: dict[str, str] = response.json()["ids"]
            assert sorted(ids) == sorted(after)
            assert len(set(ids.values())) == TOTAL

            started = time.monotonic()
            kinds = [KILL_KINDS[g % len(KILL_KINDS)] for g in range(KILLS)]
            hits: list[str] = []
            for generation, kind in enumerate(kinds, start=1):
                hit = await moment_to_kill(farm, state, kind, rng)
                queue = await counts(farm)
                await kill(runner)
                hits.append(hit)
                print(
                    f"{time.monotonic() - started:6.2f} s: killed runner-{generation - 1} "
                    f"({kind}): {hit}; queue {queue}"
                )
                runner = await restart_runner(farm, generation)
            # What the kills are for: at least one fell into an upload of a big output.
            assert any(hit.startswith("upload") for hit in hits), hits

            with trio.fail_after(60):
                queue = await farm.wait_for(
                    f"all {TOTAL} builds finished",
                    lambda q: q is not None and q["queued"] + q["running"] == 0,
                    lambda: counts(farm),
                )
            print(f"{time.monotonic() - started:6.2f} s: all finished, {queue}")
            assert queue == {
                "queued": 0,
                "running": 0,
                "succeeded": TOTAL,
                "failed": 0,
                "cancelled": 0,
            }

            # The API: 200 builds, the ones submitted, each succeeded with its outputs intact.
            listing = await get_json(farm, "/builds?limit=500")
            assert listing["total"] == TOTAL
            listed = [b["id"] for b in listing["builds"]]
            assert len(listed) == len(set(listed)) == TOTAL
            assert set(listed) == set(ids.values())
            names = {ids[name]: name for name in ids}
            outputs: dict[str, bytes] = {}
            infos: dict[str, dict[str, Any]] = {}
            for build_id, name in names.items():
                build = await get_json(farm, f"/builds/{build_id}")
                infos[name] = build
                assert (build["name"], build["state"], build["status"]) == (
                    name,
                    "succeeded",
                    "success",
                ), build
                assert build["attempts"] >= 1
                assert sorted(build["after"]) == sorted(ids[d] for d in after[name])
                assert [o["path"] for o in build["outputs"]] == ["out"], build
                (listed_output,) = build["outputs"]
                response = await farm.client.get(f"{farm.url}/builds/{build_id}/outputs/out")
                assert response.status_code == 200, response.text
                data = response.content
                assert len(data) == listed_output["size"]
                assert hashlib.sha256(data).hexdigest() == listed_output["sha256"], name
                outputs[name] = data
            for name, deps in after.items():
                expected = expected_output(name, deps, outputs)
                if expected is None:
                    assert len(outputs[name]) == big_size(int(name[1:])), name
                else:
                    assert outputs[name] == expected, name
            retried = {n: b["attempts"] for n, b in infos.items() if b["attempts"] > 1}
            print(f"builds dispatched more than once: {len(retried)}")

            # Stop the runner cleanly, then read what it left on disk.
            runner.signal(signal.SIGINT)
            with trio.fail_after(15):
                await runner.process.wait()
            assert runner.process.returncode == 0, runner.log()

    # The blob store: every blob's content matches its name; every listed output is there.
    blobs = state / "blobs"
    seen = set()
    for directory in blobs.iterdir():
        if directory.name in ("tmp", "packs"):
            continue  # leftovers of killed uploads are allowed in tmp; packs: below
        assert directory.is_dir() and len(directory.name) == 2, directory
        for blob in directory.iterdir():
            assert blob.name.startswith(directory.name), blob
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, blob
            seen.add(blob.name)
    for index in (blobs / "packs").glob("*.idx"):  # packed blobs, where the index says
        if index.name.startswith("."):
            continue  # never published: names nothing
        for line in index.read_text().splitlines():
            sha256, pack, offset, size = line.split()
            with (blobs / "packs" / pack).open("rb") as f:
                f.seek(int(offset))
                assert hashlib.sha256(f.read(int(size))).hexdigest() == sha256, line
            seen.add(sha256)
    for name, build in infos.items():
        assert build["outputs"][0]["sha256"] in seen, name

    # The database, read-only: exactly the 200 builds, all succeeded, and their edges.
    with contextlib.closing(
        sqlite3.connect(f"file:{state / 'queue.sqlite'}?mode=ro", uri=True)
    ) as db:
        rows = db.execute("SELECT id, state, status, outputs FROM builds").fetchall()
        edges = db.execute("SELECT build_id, dep_id FROM build_deps").fetchall()
    assert len(rows) == TOTAL
    assert {row[0] for row in rows} == set(ids.values())
    assert {(row[1], row[2]) for row in rows} == {("succeeded", "success")}
    for build_id, _, _, stored in rows:
        assert f'"{infos[names[build_id]]["outputs"][0]["sha256"]}"' in stored
    assert sorted(edges) == sorted((ids[n], ids[d]) for n, deps in after.items() for d in deps)
