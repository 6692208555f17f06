"""A build's inputs: the outputs of the builds it depends on, placed under ``$IN``.

``place_inputs`` checks the list the runner sent (``check_inputs``: nothing in it is trusted,
it relays what other builders reported), then puts each file in place as a copy of the
builder's verified cache entry (``Fetch``: see ``fetch.InputFetcher``) and recreates links as
links.  Any failure is a ``FetchError``: an infrastructure failure, so the build is retried.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import trio

from hydra_trio.protocol.messages import Assign, FileInfo, InputSpec
from hydra_trio.protocol.validators import is_path_component, tree_conflict

#: Fetch one input file into the local cache; returns its verified path there.
Fetch = Callable[[Assign, FileInfo], Awaitable[Path]]


class FetchError(Exception):
    """An input could not be fetched (an infrastructure failure: the build is retried)."""


_COPY_BLOCK = 1024 * 1024


#: ``ioctl(FICLONE)``: share the source's blocks copy-on-write (btrfs, XFS, bcachefs).
_FICLONE = 0x40049409


def _copy_from_cache(source: Path, target: Path, executable: bool) -> None:
    """Place the cached ``source`` at ``target``, which must not exist yet, as a copy of its
    own (never a hard link: builds run as the builder's user and could make a shared inode
    writable and change it, poisoning the cache for every later build, and under a build
    running at the same time).  A copy-on-write clone where the file system has them, else
    an in-kernel copy.  Never follows a link at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with source.open("rb") as src, os.fdopen(os.open(target, flags, 0o600), "wb") as dst:
        try:
            if sys.platform != "linux":  # the number means FICLONE on Linux only
                raise OSError("no FICLONE")
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
        except OSError:
            _copy_contents(src, dst)
        os.fchmod(dst.fileno(), 0o555 if executable else 0o444)


def _copy_contents(src: BinaryIO, dst: BinaryIO) -> None:
    """An in-kernel copy where there is one (Linux's ``copy_file_range``), else through user
    space (macOS and other Unixes, or files between which the kernel cannot copy)."""
    if sys.platform == "linux":
        try:
            while os.copy_file_range(src.fileno(), dst.fileno(), _COPY_BLOCK * 16):
                pass
            return
        except OSError:  # no copy_file_range between these files
            src.seek(0)
            dst.seek(0)
            dst.truncate()
    shutil.copyfileobj(src, dst, _COPY_BLOCK)


#: Input lists longer than this are checked in a worker thread (~5 us a file).
_CHECK_INLINE = 1000


def check_inputs(inputs: Sequence[InputSpec]) -> None:
    """Refuse (``FetchError``) inputs that could not all be placed inside ``$IN``: a name
    that is not a single file name, a path that is not relative and normalised, a path given
    twice or used both as a file and as a directory, or a link target with a NUL.  The runner
    relays what other builders reported, so none of this is trusted; once it passes, every
    file lands inside ``$IN`` and nothing is ever placed through a link."""
    for spec in inputs:
        if not is_path_component(spec.name):
            raise FetchError(f"input name {spec.name[:200]!r} is not a single file name")
        for info in spec.files:
            if "\0" in info.link:
                raise FetchError(f"input {spec.name}/{info.path[:200]}: link target has a NUL")
    problem = tree_conflict(f"{spec.name}/{info.path}" for spec in inputs for info in spec.files)
    if problem is not None:
        raise FetchError(f"the inputs cannot be placed under $IN: {problem}")


async def place_inputs(assign: Assign, in_dir: Path, fetch: Fetch) -> None:
    """Put each dependency's outputs under ``$IN/<name>``; files come through ``fetch``
    (the builder's verified cache), links are recreated as links (never followed)."""
    if sum(len(spec.files) for spec in assign.inputs) > _CHECK_INLINE:
        await trio.to_thread.run_sync(check_inputs, assign.inputs)
    else:
        check_inputs(assign.inputs)
    for spec in assign.inputs:
        base = in_dir / spec.name
        await trio.to_thread.run_sync(functools.partial(base.mkdir, parents=True, exist_ok=True))
        for info in spec.files:
            target = base / info.path
            try:
                if info.link:
                    await trio.to_thread.run_sync(_make_link, target, info.link)
                    continue
                cached = await fetch(assign, info)
                await trio.to_thread.run_sync(_copy_from_cache, cached, target, info.executable)
            except OSError as exc:
                where = f"$IN/{spec.name}/{info.path}"
                raise FetchError(f"cannot place {where}: {exc.strerror or exc}") from None


def _make_link(target: Path, link: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(link, target)
