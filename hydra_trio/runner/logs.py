"""Build logs on disk, one file per attempt, with waiters for ``?follow=1``.

``<root>/<build id>.<attempt>.log``: a new attempt starts a new file, so a retried build's log
is the log of the attempt that is shown, never two attempts interleaved.

A write that fails (the disk is full, or failing) truncates that attempt's log: what was
written stays, ``TRUNCATED_MARKER`` ends it, and nothing more is appended to it; the build
goes on.  The marker is written to the file as soon as the disk takes it, and until then added
by ``read`` to what it returns, so a reader always sees where the log was cut.  The fault is
reported to ``health`` (``/status`` and ``/metrics``); it never reaches the builder's session.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from hydra_trio.runner.health import Health

log = logging.getLogger("hydra_trio.runner")

#: Ends a log that could not be written in full.
TRUNCATED_MARKER = (
    b"\n[hydra-trio: log truncated here: the runner could not write it (disk full?)]\n"
)


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


class Followers:
    """Waiters on builds (``?follow=1``), woken when a build changes: new log bytes, a new
    attempt, or the build ended.  The farm holds one from its construction and notifies it
    on every assignment and end; the log store notifies it on every append."""

    def __init__(self) -> None:
        self._changed: dict[str, trio.Event] = {}

    def notify(self, build_id: str) -> None:
        """Wake followers of a build."""
        event = self._changed.pop(build_id, None)
        if event is not None:
            event.set()

    async def wait(self, build_id: str) -> None:
        """Return at the next ``notify`` of ``build_id``."""
        event = self._changed.get(build_id)
        if event is None:
            event = self._changed[build_id] = trio.Event()
        await event.wait()


class LogStore:
    def __init__(
        self, root: Path, health: Health | None = None, followers: Followers | None = None
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.followers = followers if followers is not None else Followers()
        self.health = health if health is not None else Health()
        #: attempts whose log was cut by a failed write -> whether the marker is on disk.
        self.truncated: dict[tuple[str, int], bool] = {}

    def path(self, build_id: str, attempt: int) -> Path:
        return self.root / f"{build_id}.{attempt}.log"

    async def append(self, build_id: str, attempt: int, data: bytes) -> None:
        """Append to one attempt's log; a failed write truncates it (never raises OSError)."""
        key = (build_id, attempt)
        path = self.path(build_id, attempt)
        marked = self.truncated.get(key)
        if marked is None:
            try:
                await trio.to_thread.run_sync(_append, path, data)
            except OSError as exc:
                log.warning("log of build %s attempt %d truncated: %s", build_id, attempt, exc)
                self.health.fault("logs", f"build logs cannot be written: {exc}", exc)
                self.truncated[key] = marked = False
            else:
                self.health.ok("logs")
        if marked is False:  # try again to end the file with the marker
            try:
                await trio.to_thread.run_sync(_append, path, TRUNCATED_MARKER)
            except OSError:
                pass
            else:
                self.truncated[key] = True
        self.notify(build_id)

    async def read(
        self, build_id: str, attempt: int, offset: int = 0, length: int = 1 << 30
    ) -> bytes:
        """Bytes of one attempt's log; a negative ``offset`` counts from its end."""
        if attempt <= 0:
            return b""
        data = await trio.to_thread.run_sync(_read, self.path(build_id, attempt), offset, length)
        if self.truncated.get((build_id, attempt)) is False and len(data) < length:
            data += TRUNCATED_MARKER  # the end of the file: say it was cut there
        return data

    def notify(self, build_id: str) -> None:
        """Wake followers of a build: new bytes, a new attempt, or the build ended."""
        self.followers.notify(build_id)

    async def wait(self, build_id: str) -> None:
        await self.followers.wait(build_id)
