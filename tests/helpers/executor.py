"""Running the builder's command executor directly, with real child processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from hydra_trio.builder.executor import execute as execute  # replaced by some tests
from hydra_trio.protocol.messages import Assign, Limits, LogChunk, Message, Result, UploadData

#: Every test is bounded: a hung child process must fail the test, not the suite.
LIMIT = 20.0


class Recorder:
    """A ``send`` that keeps every message, in order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    def chunks(self) -> list[LogChunk]:
        return [m for m in self.messages if isinstance(m, LogChunk)]

    def uploads(self) -> list[UploadData]:
        return [m for m in self.messages if isinstance(m, UploadData)]

    def log(self) -> bytes:
        return b"".join(m.data for m in self.chunks())


def assign(*command: str, **limits: Any) -> Assign:
    return Assign(build_id="b1", attempt=1, command=command, limits=Limits(**limits))


async def run(tmp_path: Path, *command: str, **limits: Any) -> tuple[Result, Recorder, Path]:
    """Execute ``command`` as build b1 in ``tmp_path / "build"``, within LIMIT seconds."""
    build_dir = tmp_path / "build"
    send = Recorder()
    with trio.fail_after(LIMIT):
        result = await execute(
            assign(*command, **limits), build_dir, send, {"PATH": os.environ["PATH"]}
        )
    return result, send, build_dir
