"""A build cannot find the builder's token through the builder's argv or environment (issue
19): a real ``hydra-trio builder --token-file`` process re-executes itself with the token on a
pipe it reads once, and a build reads its parent's ``/proc`` entries (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from hydra_trio.runner.daemon import RunnerAddresses, make_farm, serve_runner
from hydra_trio.runner.model import BuildSpec, BuildState

from .helpers.runner import loopback_config

pytestmark = [
    pytest.mark.realnet,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

SYSTEM = "x86_64-linux"
TOKEN = b"s3cret-farm-token-19"


async def test_a_build_cannot_find_the_token_in_the_builders_argv_or_environment(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN + b"\n")
    token_file.chmod(0o600)
    seen = tmp_path / "seen"
    config = loopback_config(tmp_path, TOKEN)
    farm, dispatcher = make_farm(config)
    # The build's parent is the builder: what its argv and environment show, and the file
    # they would name.
    script = (
        f'tr "\\0" " " < /proc/$PPID/cmdline > {seen}; echo >> {seen}; '
        f'tr "\\0" "\\n" < /proc/$PPID/environ >> {seen}'
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            addresses: RunnerAddresses = await nursery.start(
                lambda task_status: serve_runner(
                    config, farm=farm, dispatcher=dispatcher, task_status=task_status
                )
            )
            env = {**os.environ, "HYDRA_TRIO_TOKEN_FILE": str(token_file)}
            builder = await trio.lowlevel.open_process(
                [
                    sys.executable, "-m", "hydra_trio", "builder",
                    "--server", str(addresses.builders[0]),
                    "--systems", SYSTEM,
                    "--work-dir", str(tmp_path / "work"),
                    "--token-file", str(token_file),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                build = farm.submit(BuildSpec(command=("sh", "-c", script), system=SYSTEM), 0.0)
                while build.state is not BuildState.SUCCEEDED:
                    assert builder.poll() is None, "the builder exited"
                    assert build.state in (BuildState.QUEUED, BuildState.RUNNING), build.status
                    await trio.sleep(0.05)
            finally:
                builder.terminate()
                await builder.wait()
            nursery.cancel_scope.cancel()
    text = seen.read_text()
    assert "builder --server" in text and "--token-fd" in text  # the builder's own argv
    assert str(token_file) not in text
    assert "token-file" not in text.lower()
    assert TOKEN.decode() not in text
