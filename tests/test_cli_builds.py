"""The client commands added for operators (issue 20) against a real runner and builder:
``builds``, ``show`` of a waiting build, ``log --tail``, graph ``--wait`` lines with names,
``undrain`` and the drain shown by ``status``."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner, Result

from hydra_trio import cli

from .helpers.runner import Runner

pytestmark = pytest.mark.realnet


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(cli.main, args, prog_name="hydra-trio", terminal_width=200)


async def hydra_trio(runner: Runner, *args: str) -> Result:
    """``hydra-trio ARGS --url <the runner>`` in a worker thread (the client is sync)."""
    call = functools.partial(_invoke, [*args, "--url", runner.addresses.http[0]])
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(call)


async def finished(runner: Runner, build_id: str) -> None:
    with trio.fail_after(30):
        while runner.farm.builds[build_id].finished_at is None:
            await trio.sleep(0.05)


async def test_builds_lists_and_filters(runner: Runner) -> None:
    """``builds`` is a table, newest first; --state, --name and --machine filter; --json is
    the API's page."""
    await runner.start_builder("b1")
    ok = await runner.submit(name="docs", command=["sh", "-c", "echo hi"])
    bad = await runner.submit(name="tests", command=["false"])
    for build_id in (ok, bad):
        await finished(runner, build_id)
    stuck = await runner.submit(name="stuck", command=["true"], system="pdp11-unix")

    table = await hydra_trio(runner, "builds")
    assert table.exit_code == 0, table.output
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "NAME", "MACHINE", "AGE", "COMMAND"]
    assert [row.split()[:3] for row in rows] == [
        [stuck, "queued", "stuck"],
        [bad, "build-failed", "tests"],
        [ok, "success", "docs"],
    ]
    assert rows[2].split()[3] == "b1" and rows[2].endswith("sh -c 'echo hi'")

    failed = await hydra_trio(runner, "builds", "--state", "failed")
    assert [row.split()[0] for row in failed.stdout.splitlines()[1:]] == [bad]
    named = await hydra_trio(runner, "builds", "--name", "docs", "--machine", "b1")
    assert [row.split()[0] for row in named.stdout.splitlines()[1:]] == [ok]
    page = json.loads((await hydra_trio(runner, "builds", "--limit", "1", "--json")).stdout)
    assert [b["id"] for b in page["builds"]] == [stuck]
    assert page["total"] == 3 and page["next"] is not None
    limited = await hydra_trio(runner, "builds", "--limit", "1")
    assert "(1 of 3: --limit, --state or --name to see others)" in limited.stderr


async def test_show_says_why_a_build_waits_and_what_it_runs(runner: Runner) -> None:
    """``show`` of a queued build: its waiting reason, command, dependencies and times."""
    first = await runner.submit(name="first", command=["true"], system="pdp11-unix")
    second = await runner.submit(
        name="second", command=["sh", "-c", "echo a b"], after=[first], timeout=60
    )
    result = await hydra_trio(runner, "show", second)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "state: queued" in lines
    assert "waiting: waiting for 1 dependencies" in lines
    assert "command: sh -c 'echo a b'" in lines
    assert f"after: {first}" in lines and f"waiting for: {first}" in lines
    assert "timeout: 60s" in lines
    assert any(line.startswith("submitted: 20") for line in lines)


async def test_log_tail_prints_the_last_lines(runner: Runner) -> None:
    """``log --tail 3``: the last three lines, with or without --follow."""
    await runner.start_builder("b1")
    build_id = await runner.submit(command=["seq", "1", "20000"])
    await finished(runner, build_id)
    tail = await hydra_trio(runner, "log", build_id, "--tail", "3")
    assert tail.stdout == "19998\n19999\n20000\n"
    followed = await hydra_trio(runner, "log", build_id, "--tail", "2", "--follow")
    assert followed.stdout == "19999\n20000\n"
    everything = await hydra_trio(runner, "log", build_id, "--tail", "30000")
    assert everything.stdout.splitlines() == [str(i) for i in range(1, 20001)]


async def test_graph_wait_lines_carry_the_build_names(
    runner: Runner,
    tmp_path: Path,
) -> None:
    """``submit --file G --wait``: each progress line names its build; a build that never ran
    reads as dependency-failed, not as a failed attempt 0."""
    await runner.start_builder("b1")
    graph = tmp_path / "g.toml"
    graph.write_text(
        '[build.compile]\ncommand = ["false"]\n\n'
        '[build.test]\ncommand = ["true"]\nafter = ["compile"]\n'
    )
    result = await hydra_trio(runner, "submit", "--file", str(graph), "--wait")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert any("] compile: failed on b1 attempt 1" in line for line in lines), lines
    assert any(line.endswith("] test: failed: dependency-failed") for line in lines), lines
    assert not any("attempt 0" in line for line in lines if "test:" in line)


async def test_undrain_and_status_show_the_drain(runner: Runner) -> None:
    """``drain`` shows in ``status`` until ``undrain``."""
    await runner.start_builder("b1")
    assert (await hydra_trio(runner, "drain", "b1")).exit_code == 0
    status = await hydra_trio(runner, "status")
    assert "(drained)" in status.stdout.splitlines()[1]
    undrained = await hydra_trio(runner, "undrain", "b1")
    assert undrained.exit_code == 0 and undrained.stdout.startswith("b1: ")
    status = await hydra_trio(runner, "status")
    assert "(drained)" not in status.stdout
    missing = await hydra_trio(runner, "undrain", "nope")
    assert missing.exit_code == 1 and "nope" in missing.stderr
