"""A build's inputs: the outputs of the builds it depends on, placed under ``$IN``.

``place_inputs`` checks the list the runner sent (``check_inputs``: nothing in it is trusted,
it relays what other builders reported), then puts each file in place from the builder's
verified cache: a reflink or hard link of the cache entry, read-only, a copy only as a
fallback (``Fetch``: see ``fetch.InputFetcher`` and ``cache``), and recreates links as links.
Any failure is a ``FetchError``: an infrastructure failure, so the build is retried.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import trio

from hydra_trio.builder import cache
from hydra_trio.protocol.messages import Assign, FileInfo, InputSpec
from hydra_trio.protocol.validators import is_path_component, tree_conflict

#: Fetch one input file into the local cache; returns its verified path there.
Fetch = Callable[[Assign, FileInfo], Awaitable[Path]]
#: One file to put under ``$IN``: its listing entry and where it goes (a path as a string:
#: 100,000 of them are cheaper made by joining strings than as ``Path`` objects).
Placement = tuple[FileInfo, str]


class FetchError(Exception):
    """An input could not be fetched (an infrastructure failure: the build is retried)."""


@runtime_checkable
class Placer(Protocol):
    """A ``Fetch`` that also places many files at once (``fetch.InputFetcher``)."""

    async def place(self, assign: Assign, files: Sequence[Placement]) -> None: ...


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
    """Put each dependency's outputs under ``$IN/<name>``: directories and links (recreated as
    links, never followed) a batch per thread hop, then the files through ``fetch``: an
    ``InputFetcher`` links them from its verified cache, read-only, many at a time; any
    other ``Fetch`` (tests) has each file copied from where it returns it."""
    if sum(len(spec.files) for spec in assign.inputs) > _CHECK_INLINE:
        await trio.to_thread.run_sync(check_inputs, assign.inputs)
    else:
        check_inputs(assign.inputs)
    entries = [(spec.name, info) for spec in assign.inputs for info in spec.files]
    names = [spec.name for spec in assign.inputs]
    files: list[Placement] = []
    for start in range(0, max(len(entries), 1), _PLACE_BATCH):
        batch = entries[start : start + _PLACE_BATCH]
        first = names if start == 0 else []
        files += await trio.to_thread.run_sync(_make_tree, str(in_dir), first, batch)
    try:
        if isinstance(fetch, Placer):
            await fetch.place(assign, files)
            return
        for info, target in files:
            cached = await fetch(assign, info)
            mode = 0o555 if info.executable else 0o444
            await trio.to_thread.run_sync(cache.copy, cached, target, mode)
    except OSError as exc:
        where = f"{exc.filename}" if exc.filename else "$IN"
        raise FetchError(f"cannot place {where}: {exc.strerror or exc}") from None


#: Directories and links made per thread hop.
_PLACE_BATCH = 2000


def _make_tree(
    in_dir: str, names: list[str], entries: list[tuple[str, FileInfo]]
) -> list[Placement]:
    """Make ``$IN/<name>`` for each of ``names``, and for each entry its directory and, for a
    link, the link (in a thread); return where each file of ``entries`` goes.  A failure is a
    ``FetchError`` naming the entry.  (``check_inputs`` passed: each path is relative and
    normalised, so joining strings is joining paths.)"""
    made: set[str] = set()
    for name in names:
        os.makedirs(os.path.join(in_dir, name), exist_ok=True)
    files: list[Placement] = []
    for name, info in entries:
        target = f"{in_dir}/{name}/{info.path}"
        try:
            parent = target.rpartition("/")[0]
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            if info.link:
                os.symlink(info.link, target)
            else:
                files.append((info, target))
        except OSError as exc:
            where = f"$IN/{name}/{info.path}"
            raise FetchError(f"cannot place {where}: {exc.strerror or exc}") from None
    return files
