"""Build logs on disk, one file per attempt, with waiters for ``?follow=1``.

``<root>/<build id>.<attempt>.log``: a new attempt starts a new file, so a retried build's log
is the log of the attempt that is shown, never two attempts interleaved.

A write that fails (the disk is full, or failing) truncates that attempt's log: what was
written stays, ``TRUNCATED_MARKER`` ends it, and nothing more is appended to it; the build
goes on.  The marker is written to the file as soon as the disk takes it, and until then added
by ``read`` to what it returns, so a reader always sees where the log was cut.  The fault is
reported to ``health`` (``/status`` and ``/metrics``); it never reaches the builder's session.

A builder session's chunks reach the store through ``LogBehind``, which writes them behind the
session's receive loop, many per thread hop.
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


def _append_each(writes: list[tuple[Path, bytes]]) -> dict[Path, OSError]:
    """Append each data to its file (in a thread); the error of each write that failed."""
    failed: dict[Path, OSError] = {}
    for path, data in writes:
        try:
            _append(path, data)
        except OSError as exc:
            failed[path] = exc
    return failed


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

    async def append_many(self, chunks: dict[tuple[str, int], list[bytes]]) -> None:
        """Append each attempt's chunks, in order, to its log: every attempt in one thread
        hop.  A failed write truncates that attempt's log (never raises OSError)."""
        keys: list[tuple[str, int]] = []
        writes: list[tuple[Path, bytes]] = []
        marking: list[tuple[str, int]] = []  # cut earlier, the marker not yet on disk
        for key, parts in chunks.items():
            marked = self.truncated.get(key)
            if marked is None:
                keys.append(key)
                writes.append((self.path(*key), parts[0] if len(parts) == 1 else b"".join(parts)))
            elif marked is False:
                marking.append(key)
        failed = await trio.to_thread.run_sync(_append_each, writes) if writes else {}
        for key, (path, _) in zip(keys, writes, strict=True):
            exc = failed.get(path)
            if exc is None:
                self.health.ok("logs")
                continue
            log.warning("log of build %s attempt %d truncated: %s", key[0], key[1], exc)
            self.health.fault("logs", f"build logs cannot be written: {exc}", exc)
            self.truncated[key] = False
            marking.append(key)
        if marking:  # try again to end each file with the marker
            markers = [(self.path(*key), TRUNCATED_MARKER) for key in marking]
            failed = await trio.to_thread.run_sync(_append_each, markers)
            for key, (path, _) in zip(marking, markers, strict=True):
                if path not in failed:
                    self.truncated[key] = True
        for build_id in {key[0] for key in chunks}:
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


#: Log bytes one builder's session may have received and not yet written before its receive
#: loop waits for the disk.
LOG_BEHIND = 4 * 1024 * 1024
#: Seconds a session's log chunks wait for more before they are written together (unless
#: ``LOG_BEHIND`` bytes or a result is waiting for them).
LOG_LINGER = 0.05


class LogBehind:
    """One builder session's log chunks, written behind its receive loop.

    Each ``LogChunk`` used to be appended before the next frame was read: a thread hop and
    an open, write and close per frame, ~250 us of the runner's CPU, so a build printing a
    line at a time (from a builder that sends a frame a line) cost most of a core.  Now
    ``append`` queues the chunk and returns; a task of the session's background nursery
    writes what arrived within ``LOG_LINGER``, every attempt's chunks in one thread hop
    (``LogStore.append_many``), each attempt's in order.  The receive loop waits only while
    more than ``LOG_BEHIND`` bytes are unwritten.  ``flushed`` waits until an attempt's
    chunks received so far are written (a result is committed only once its log is whole).
    What a session received is written even as it ends (shielded)."""

    def __init__(self, store: LogStore, nursery: trio.Nursery) -> None:
        self.store = store
        self.nursery = nursery
        #: chunks received and not yet handed to a write, and those of the write in flight
        self._pending: dict[tuple[str, int], list[bytes]] = {}
        self._in_flight: dict[tuple[str, int], list[bytes]] = {}
        #: bytes received and not yet written (those of the write in flight included)
        self._unwritten = 0
        self._writing = False
        self._wrote = trio.Event()
        #: set when something waits for the writes: no lingering then
        self._hurry = trio.Event()

    async def append(self, build_id: str, attempt: int, data: bytes) -> None:
        self._pending.setdefault((build_id, attempt), []).append(data)
        self._unwritten += len(data)
        if not self._writing:
            self._writing = True
            self.nursery.start_soon(self._write)
        while self._unwritten > LOG_BEHIND:
            self._hurry.set()
            await self._wrote.wait()

    async def flushed(self, build_id: str, attempt: int) -> None:
        """Return once every chunk of the attempt received so far is written."""
        key = (build_id, attempt)
        while key in self._pending or key in self._in_flight:
            self._hurry.set()
            await self._wrote.wait()

    async def _write(self) -> None:
        try:
            while self._pending:
                with trio.move_on_after(LOG_LINGER):
                    await self._hurry.wait()
                await self._write_batch()
        finally:  # also as the session ends: what it received is written (shielded)
            while self._pending:
                await self._write_batch()
            self._writing = False

    async def _write_batch(self) -> None:
        self._in_flight, self._pending = self._pending, {}
        self._hurry = trio.Event()
        with trio.CancelScope(shield=True):
            await self.store.append_many(self._in_flight)
        self._unwritten -= sum(len(data) for parts in self._in_flight.values() for data in parts)
        self._in_flight = {}
        self._wrote.set()
        self._wrote = trio.Event()
