"""A queue runner and a builder in one trio program: submit a build over HTTP, follow its log,
print its outputs.  Run it with ``.venv/bin/python examples/embedded.py``."""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

import httpx
import trio

import hydra_trio


async def main(work: Path) -> dict[str, object]:
    """Serve a runner and one builder under ``work`` until one build is done; return it."""
    runner_config = hydra_trio.RunnerConfig(
        listen=hydra_trio.HostPort("127.0.0.1", 0),  # port 0: any free port
        http=hydra_trio.HostPort("127.0.0.1", 0),
        state_dir=work / "runner",
    )
    async with trio.open_nursery() as nursery:
        # Both daemons are startable: `start` returns once they listen (or are connecting).
        where = await nursery.start(functools.partial(hydra_trio.serve_runner, runner_config))
        builder_config = hydra_trio.BuilderConfig(
            server=where.builders[0], work_dir=work / "builder", max_jobs=2
        )
        await nursery.start(functools.partial(hydra_trio.run_builder, builder_config))

        async with httpx.AsyncClient(base_url=where.http[0], timeout=30) as client:
            submitted = await client.post(
                "/builds",
                json={"name": "hello", "command": ["sh", "-c", "echo hi | tee $OUT/greeting"]},
            )
            build_id = submitted.raise_for_status().json()["id"]
            # ?follow=1 streams the log until the build ends.
            async with client.stream("GET", f"/builds/{build_id}/log?follow=1") as log:
                async for text in log.aiter_text():
                    print(text, end="")
            build: dict[str, object] = (await client.get(f"/builds/{build_id}")).json()

        nursery.cancel_scope.cancel()  # stops the builder and the runner
    return build


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        done = trio.run(main, Path(tmp))
    print(done["state"], done["outputs"])
    sys.exit(0 if done["state"] == "succeeded" else 1)
