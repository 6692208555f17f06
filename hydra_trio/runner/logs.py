"""Build logs on disk, one file per attempt, with waiters for ``?follow=1``.

``<root>/<build id>.<attempt>.log``: a new attempt starts a new file, so a retried build's log
is the log of the attempt that is shown, never two attempts interleaved.
"""

from __future__ import annotations

from pathlib import Path

import trio


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def _read(path: Path, offset: int, length: int) -> bytes:
    """``length`` bytes from ``offset``; a negative offset counts from the end."""
    try:
        with path.open("rb") as f:
            if offset < 0:
                f.seek(max(0, f.seek(0, 2) + offset))
            else:
                f.seek(offset)
            return f.read(length)
    except FileNotFoundError:
        return b""


class LogStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._changed: dict[str, trio.Event] = {}

    def path(self, build_id: str, attempt: int) -> Path:
        return self.root / f"{build_id}.{attempt}.log"

    async def append(self, build_id: str, attempt: int, data: bytes) -> None:
        await trio.to_thread.run_sync(_append, self.path(build_id, attempt), data)
        self.notify(build_id)

    async def read(
        self, build_id: str, attempt: int, offset: int = 0, length: int = 1 << 30
    ) -> bytes:
        """Bytes of one attempt's log; a negative ``offset`` counts from its end."""
        if attempt <= 0:
            return b""
        return await trio.to_thread.run_sync(_read, self.path(build_id, attempt), offset, length)

    def notify(self, build_id: str) -> None:
        """Wake followers of a build: new bytes, a new attempt, or the build ended."""
        event = self._changed.pop(build_id, None)
        if event is not None:
            event.set()

    async def wait(self, build_id: str) -> None:
        event = self._changed.get(build_id)
        if event is None:
            event = self._changed[build_id] = trio.Event()
        await event.wait()
