"""A build's directory: made with empty ``work``, ``out``, ``in`` and ``tmp``, recycled after.

Build directories are recycled.  Making a build directory's five directories and removing
them afterwards costs about 1 ms of kernel time per build on ext4 (170 us per mkdir on the
project's machine, far more with several builds doing it at once: the journal), more than
the rest of a no-op build's own work on the builder.  So a finished build's directory, once
emptied, is kept as a spare (``<builds>/.spare-<random>``) and renamed into place for a later
build: two renames instead of ten directory operations.  A directory is recycled only if it
holds exactly its four subdirectories, each a plain directory with the mode it had when its
build started (``BuildDir.mode``: what ``mkdir`` gave it under this process's umask, or the
spare's, which was checked the same way); anything else (a build that replaced or chmod-ed
one) is removed as before.  Every build still starts with empty directories; a process that
escaped its build's process group could write into a recycled directory, as it could write
anywhere the builder's user can.  ``claim_work_dir`` removes spares with everything else at
start.

A directory holding many files (at least ``RECYCLE_ENTRIES``: 100,000 outputs) is not
emptied before its attempt ends: it is renamed aside (``<builds>/.trash-<random>``) and
removed by a background thread (``_janitor``), so the build's ``Result`` does not wait for
the deletion (28 s of a 100,000-file build's 45 s "commit" on this project's VM).  Should the
builder stop first, ``claim_work_dir`` removes what is left at the next start.

Every function here blocks: call it through a thread, except the ``*_quick`` ones, which do
only a handful of metadata system calls on the builder's own directories (no deleting of
files, no ``mkdir``) and give up (None or False) whenever there is more to do: the event loop
calls them first, and a thread only if they gave up, which saves a no-op build two of its
thread hops (each a GIL handoff, with up to ``max_jobs`` builds at once).
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import stat
import threading
from pathlib import Path

import attrs

SUBDIRS = ("work", "out", "in", "tmp")
#: In every build's environment: its build directory.
BUILD_DIR_VARIABLE = "HYDRA_TRIO_BUILD_DIR"
SPARE_PREFIX = ".spare-"
TRASH_PREFIX = ".trash-"
#: A finished build directory with at least this many entries is removed in the background.
RECYCLE_ENTRIES = 1000
#: Spares kept per builds directory at most (beyond that, finished directories are removed).
MAX_SPARES = 32


@attrs.frozen
class BuildDir:
    """A prepared build directory and the mode it (and each subdirectory) had then."""

    path: Path
    mode: int

    @property
    def work(self) -> Path:
        return self.path / "work"

    @property
    def out(self) -> Path:
        return self.path / "out"

    @property
    def inputs(self) -> Path:
        return self.path / "in"

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"


def prepare(path: Path) -> BuildDir:
    """Make ``path`` with empty ``work``, ``out``, ``in`` and ``tmp``: a spare renamed into
    place if there is one, else new (whatever was at ``path`` is removed first)."""
    if path.exists():
        shutil.rmtree(path)
    builds = path.parent
    with contextlib.suppress(FileNotFoundError):  # no builds dir yet: no spare either
        for name in _spares(builds):
            try:
                os.rename(builds / name, path)
            except FileNotFoundError:
                continue  # another build took it first
            return BuildDir(path, _mode(path))
    for sub in SUBDIRS:
        (path / sub).mkdir(parents=True)
    return BuildDir(path, _mode(path))


def prepare_quick(path: Path) -> BuildDir | None:
    """``prepare`` when a spare can be renamed into place and nothing is at ``path``; None:
    call ``prepare`` (in a thread)."""
    builds = path.parent
    try:
        os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError:
        return None
    else:
        return None  # something to remove first
    try:
        spares = _spares(builds)
    except OSError:
        return None
    for name in spares:
        try:
            os.rename(builds / name, path)
        except FileNotFoundError:
            continue  # another build took it first
        except OSError:
            return None
        try:
            return BuildDir(path, _mode(path))
        except OSError:
            return None  # gone again: prepare (in a thread) removes and makes it afresh
    return None


def remove_quick(build_dir: BuildDir) -> bool:
    """``remove`` when ``build_dir`` can be recycled as it is: its four subdirectories are
    empty; False: call ``remove`` (in a thread)."""
    return _recycle(build_dir, quick=True)


def remove(build_dir: BuildDir | Path) -> None:
    """Recycle ``build_dir`` as a spare (see above) or remove it: in the background if it
    holds many files.  A bare path (its preparation failed) is removed."""
    if isinstance(build_dir, BuildDir):
        if _fewer_entries(build_dir.path, RECYCLE_ENTRIES):
            if _recycle(build_dir):
                return
        elif _throw_away(build_dir.path):
            return
        build_dir = build_dir.path
    shutil.rmtree(build_dir, ignore_errors=True)


def _fewer_entries(path: Path, limit: int) -> bool:
    """Whether the tree at ``path`` holds fewer than ``limit`` entries (links not followed;
    stops counting at ``limit``; True if it cannot be read)."""
    count = 0
    pending = [path]
    try:
        while pending:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    count += 1
                    if count >= limit:
                        return False
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
    except OSError:
        return True
    return True


_trash: queue.SimpleQueue[Path] = queue.SimpleQueue()
_janitor_started = threading.Lock()
_janitor: threading.Thread | None = None


def _throw_away(path: Path) -> bool:
    """Rename ``path`` aside and have the janitor thread remove it; False if it cannot be
    renamed."""
    global _janitor
    trash = path.parent / f"{TRASH_PREFIX}{os.urandom(8).hex()}"
    try:
        os.rename(path, trash)
    except OSError:
        return False
    _trash.put(trash)
    with _janitor_started:
        if _janitor is None or not _janitor.is_alive():
            _janitor = threading.Thread(
                target=_remove_trash, name="hydra-trio build directory janitor", daemon=True
            )
            _janitor.start()
    return True


def _remove_trash() -> None:
    while True:
        shutil.rmtree(_trash.get(), ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _spares(builds: Path) -> list[str]:
    with os.scandir(builds) as entries:
        return [e.name for e in entries if e.name.startswith(SPARE_PREFIX)]


def _recycle(build_dir: BuildDir, *, quick: bool = False) -> bool:
    """Empty ``build_dir`` and keep it as a spare; False if it is not fit for that (or, with
    ``quick``, if a subdirectory is not empty: emptying it is work for a thread)."""
    path = build_dir.path
    builds = path.parent
    try:
        if len(_spares(builds)) >= MAX_SPARES:
            return False
        with os.scandir(path) as entries:
            if sorted(e.name for e in entries) != sorted(SUBDIRS):
                return False
        for each in (path, *(path / sub for sub in SUBDIRS)):
            mode = os.lstat(each).st_mode
            if not stat.S_ISDIR(mode) or stat.S_IMODE(mode) != build_dir.mode:
                return False
        for sub in SUBDIRS:
            if quick:
                with os.scandir(path / sub) as entries:
                    if next(entries, None) is not None:
                        return False
            else:
                _empty(path / sub)
        os.rename(path, builds / f"{SPARE_PREFIX}{os.urandom(8).hex()}")
    except OSError:
        return False
    return True


def _empty(directory: Path) -> None:
    """Remove everything in ``directory`` (never following a link)."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
