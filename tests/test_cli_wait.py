"""``submit --wait`` against a real runner and builder: plain lines when stderr is not a
terminal, one live line (with the log's last line) when it is; and ``log?tail=N``."""

from __future__ import annotations

import functools
import io
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from hydra_trio import cli
from hydra_trio.cli.render import last_line

from .helpers.runner import Runner

pytestmark = pytest.mark.realnet

SCRIPT = "echo first; sleep 1; echo 'second line'; sleep 1; echo last >&2"


class _Terminal(io.StringIO):
    """A terminal that creates ``shown`` once it has been shown ``| second line``: the build
    waits for that file, so the live line is seen however slowly the machine polls."""

    def __init__(self, shown: Path | None = None) -> None:
        super().__init__()
        self.shown = shown

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.shown is not None and "| second line" in text:
            self.shown.touch()
        return super().write(text)


def waits_until_shown(shown: Path) -> str:
    """SCRIPT, but between its second line and its last it waits (at most 30 s) until the
    terminal has shown the second line as the log's tail."""
    wait = f"i=0; while [ ! -e {shown} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done"
    return f"echo first; echo 'second line'; {wait}; echo last >&2"


def _submit_and_wait(
    url: str, tty: bool, *command: str, shown: Path | None = None
) -> tuple[int, str]:
    """Run ``submit --wait`` in this worker thread; returns (exit status, stderr)."""
    stderr = _Terminal(shown) if tty else io.StringIO()
    saved = sys.stderr
    sys.stderr = stderr
    try:
        cli.main(["submit", "--url", url, "--wait", "--", *command], standalone_mode=False)
        status = 0
    except SystemExit as exc:
        status = int(exc.code or 0)
    finally:
        sys.stderr = saved
    return status, stderr.getvalue()


async def run(url: str, tty: bool, *command: str, shown: Path | None = None) -> tuple[int, str]:
    call = functools.partial(_submit_and_wait, url, tty, *command, shown=shown)
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(call)


async def test_plain_lines_without_a_terminal(runner: Runner) -> None:
    await runner.start_builder("b1")
    status, err = await run(runner.addresses.http[0], False, "sh", "-c", SCRIPT)
    assert status == 0
    lines = err.splitlines()
    assert "\r" not in err and "\x1b" not in err
    assert lines[-1].endswith("succeeded on b1 attempt 1")
    assert any("running (building) on b1 attempt 1" in line for line in lines)


async def test_one_live_line_with_the_log_tail_on_a_terminal(
    runner: Runner, tmp_path: Path
) -> None:
    await runner.start_builder("b1")
    shown = tmp_path / "shown"
    script = waits_until_shown(shown) + "; exit 3"
    status, err = await run(runner.addresses.http[0], True, "sh", "-c", script, shown=shown)
    assert status == 1
    frames = [frame for frame in err.split("\r\x1b[K") if frame]
    assert any("running (building) on b1" in f and "| second line" in f for f in frames), frames
    final, failure = frames[-1].splitlines()
    assert "failed" in final and final.endswith("| last")
    assert failure.startswith("build ") and "build-failed" in failure


async def test_log_tail_returns_the_end_of_the_log(runner: Runner) -> None:
    await runner.start_builder("b1")
    build_id = await runner.submit(command=["sh", "-c", "seq 1 1000"])
    with trio.fail_after(30):
        while runner.farm.builds[build_id].finished_at is None:
            await trio.sleep(0.05)
    full = (await runner.client.get(f"/builds/{build_id}/log")).text
    tail = await runner.client.get(f"/builds/{build_id}/log", params={"tail": 10})
    assert tail.status_code == 200 and tail.text == full[-10:] == "\n999\n1000\n"[-10:]
    everything = await runner.client.get(f"/builds/{build_id}/log", params={"tail": 65536})
    assert everything.text == full
    for bad in ("0", "-5", "x", str(64 * 1024 + 1)):
        answer = await runner.client.get(f"/builds/{build_id}/log", params={"tail": bad})
        assert answer.status_code == 400 and "tail" in answer.json()["error"]


def test_last_line_drops_control_characters() -> None:
    log: Any = "one\n\x1b[31mred\x1b[0m\n\n"
    assert last_line(log) == "red"
    assert last_line("") == ""
