"""A builder's work dir: claimed by one builder at a time, cleared of what a killed one left.

``<work dir>/builds`` holds build directories (and spares, see ``builddir``), ``cache``
fetched inputs under their hash (``cache/tmp`` partial fetches), ``machine-id`` the id the
builder keeps across restarts.  ``claim_work_dir`` takes the single-instance lock, kills the
processes a killed predecessor's builds left running (found by their environment, by the
build users they ran as, and by the cgroups it left), and removes its build directories and
partial fetches.  Everything here blocks: call it through a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import stat
import uuid
from pathlib import Path
from typing import IO

import psutil

from hydra_trio.builder import buildusers, contain
from hydra_trio.builder.builddir import BUILD_DIR_VARIABLE
from hydra_trio.builder.buildusers import BuildUsers
from hydra_trio.protocol.errors import HydraTrioError
from hydra_trio.protocol.messages import Assign
from hydra_trio.protocol.validators import is_path_component
from hydra_trio.system import lock_dir

log = logging.getLogger("hydra_trio.builder")


class WorkDirError(HydraTrioError):
    """The work dir is in use by another builder."""


def claim_work_dir(work_dir: Path, build_users: BuildUsers | None = None) -> IO[bytes]:
    """Take the work dir's single-instance lock (held until the returned file is closed), then
    remove what a previous builder on it left: its builds' processes (by their environment,
    their cgroups, and with ``build_users`` every process of those users: the caller holds
    their lock, ``buildusers.lock_pool``), build directories and partial fetches (a builder
    killed with -9 cannot clean up after itself).  With ``build_users``, the work dir is made
    passable but not readable by them (``secure_work_dir``).  Blocking: call
    through a thread."""
    if build_users is not None:
        buildusers.check_reachable(work_dir)
    lock = lock_dir(work_dir)
    if lock is None:
        raise WorkDirError(
            f"another builder is using {work_dir}: stop it, or give this one another --work-dir"
        )
    builds = work_dir.absolute() / "builds"
    killed = kill_leftover_builds(builds)
    if build_users is not None:
        killed += buildusers.kill_uids(build_users.uids)
    if killed:
        log.warning(
            "killed %d processes of builds a previous builder on %s left running", killed, work_dir
        )
    cgroups = contain.remove_leftover_cgroups(builds)
    if cgroups:
        log.warning("removed %d cgroups of builds a previous builder left", cgroups)
    removed = 0
    for leftovers in (work_dir / "builds", work_dir / "cache" / "tmp"):
        for entry in leftovers.iterdir() if leftovers.is_dir() else ():
            _remove_tree(entry)
            removed += 1
    if removed:
        log.info("removed %d build directories and partial fetches left in %s", removed, work_dir)
    if build_users is not None:
        secure_work_dir(work_dir)
    return lock


def secure_work_dir(work_dir: Path) -> None:
    """Make the work dir passable but not listable by others (0711; its builds need to reach
    ``builds``), ``builds`` the same, and everything else in it (the cache, the lock, the
    machine id: made first if need be) the builder's alone.  Blocking: call through a
    thread."""
    load_machine_id(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # made now, so what is made later in them inherits nothing readable
    for name in ("builds", "cache"):
        (work_dir / name).mkdir(exist_ok=True)
    work_dir.chmod(0o711)
    for entry in work_dir.iterdir():
        if entry.is_symlink():
            continue
        if entry.name == "builds":
            entry.chmod(0o711)
        elif entry.is_dir():
            entry.chmod(0o700)
        else:
            entry.chmod(stat.S_IMODE(entry.stat().st_mode) & 0o700)


def kill_leftover_builds(builds: Path) -> int:
    """SIGKILL every process (and its process group) whose environment places it in a build
    directory under ``builds``: what the builds of a builder that was itself killed (-9, OOM)
    left running.  Returns how many processes matched.  A build's processes inherit
    ``HYDRA_TRIO_BUILD_DIR`` (see ``executor.build_env``); one that scrubbed its environment
    is not found, as one that left its process group escapes the kill of a running build.

    The processes are listed with ``psutil`` (``/proc`` on Linux, ``sysctl`` on macOS and the
    BSDs).  Where the listing itself fails (no ``/proc`` mounted, a platform psutil cannot
    list), this logs a warning and kills nothing: the leftovers keep running but the builder
    starts, and a new build never shares a directory with them.  Blocking: call through a
    thread."""
    prefix = f"{builds}/"
    own_pid, own_group = os.getpid(), os.getpgid(0)
    matched = 0
    try:
        processes = list(psutil.process_iter())
    except (OSError, psutil.Error) as exc:
        log.warning("cannot list processes to find builds a previous builder left: %s", exc)
        return 0
    for process in processes:
        if process.pid == own_pid:
            continue
        try:
            environ = process.environ()
        except (psutil.Error, OSError):  # gone, a zombie, or not ours to read
            continue
        if not environ.get(BUILD_DIR_VARIABLE, "").startswith(prefix):
            continue
        matched += 1
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(process.pid)
            if group not in (own_group, 0, 1):
                os.killpg(group, signal.SIGKILL)
            os.kill(process.pid, signal.SIGKILL)
    return matched


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # as builddir.remove does
    else:
        path.unlink(missing_ok=True)


def load_machine_id(work_dir: Path) -> str:
    """The machine id stored in ``work_dir``; created on first use, the same ever after."""
    path = work_dir / "machine-id"
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    work_dir.mkdir(parents=True, exist_ok=True)
    machine_id = str(uuid.uuid4())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(machine_id + "\n")
    tmp.replace(path)
    return machine_id


def build_dir_name(assign: Assign) -> str:
    """The directory a build runs in, under ``<work dir>/builds``.  The build id is the
    runner's word: it names the directory only when it is a plain, short file name, else its
    hash does, so an id like ``../../x`` cannot make the builder create (or remove) a
    directory anywhere else."""
    build_id = assign.build_id
    if not (is_path_component(build_id) and len(build_id) <= 100):
        build_id = hashlib.sha256(build_id.encode()).hexdigest()[:32]
    return f"{build_id}-{assign.attempt}"
