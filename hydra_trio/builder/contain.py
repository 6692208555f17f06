"""Everything a build starts, contained, so every descendant dies with its build.

A build's command runs in its own process group, but a child can leave it (``setsid``, a
double fork) and keep running, or keep the log pipe open.  So each build gets a
``Containment``:

- **cgroup v2** (Linux, where the builder can make cgroups under its own: the builder runs as
  root on a cgroup2 mount, or under systemd with ``Delegate=yes``).  The command is moved
  into ``<the builder's cgroup>/hydra-trio-<build>`` before it executes, so everything it
  starts is in that cgroup whatever it does with sessions or forks; ``cgroup.kill`` kills
  them all at once and ``cgroup.events`` says when they are gone.
- **Otherwise** (macOS, a container without a delegated cgroup, systemd without delegation):
  the builder is a child subreaper (``PR_SET_CHILD_SUBREAPER`` on Linux), so an orphaned
  descendant is re-parented to the builder instead of init, and the kill walks the tree: the
  build's process group, the descendants of its main process, and every descendant of the
  builder whose environment names the build's directory (``HYDRA_TRIO_BUILD_DIR``).  A
  descendant that both left the group and scrubbed its environment is not found here (nor,
  on macOS, one that a double fork re-parented to launchd): docs/security.md says so.

Everything here blocks: ``kill`` and ``populated`` of the fallback walk the builder's
descendants (reading each one's environment), and even ``cgroup.kill`` kills every process of
the cgroup before the write returns, so the event loop calls them through a thread
(``process``), except what is a few system calls on the builder's own cgroups: ``create``
(one ``mkdir`` of a cgroup, about 40 us), ``populated`` of a cgroup (one small file read), and
``kill_quick`` / ``close_quick``, which do the work only once nothing of the build runs any
more (a ``killpg``, a ``cgroup.kill`` with nothing to kill and one ``rmdir``) and give up
otherwise.  Each thread hop they save costs a build more than the work itself (a GIL handoff
there and back, with up to ``max_jobs`` builds at once; issue 22).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil

log = logging.getLogger("hydra_trio.builder")

#: The environment variable every build's processes inherit: its build directory.
MARKER_VARIABLE = "HYDRA_TRIO_BUILD_DIR"
CGROUP_PREFIX = "hydra-trio-"
_PR_SET_CHILD_SUBREAPER = 36


def cgroup_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or
    ``/sys/fs/cgroup/unified`` on a hybrid set-up), or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(" - ", 1)
        if len(fields) == 2 and fields[1].split(" ", 1)[0] == "cgroup2":
            return Path(fields[0].split()[4])
    return None


def own_cgroup() -> Path | None:
    """This process's cgroup v2 directory, or None where there is none."""
    mount = cgroup_mount()
    if mount is None:
        return None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return mount / line[3:].lstrip("/")
    return None


@functools.cache
def cgroup_parent() -> Path | None:
    """The cgroup under which builds get their own, if the builder may make cgroups there
    (checked by making and removing one), else None.  Cached: the answer does not change."""
    parent = own_cgroup()
    if parent is None or not (parent / "cgroup.procs").exists():
        return None
    probe = parent / f"{CGROUP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError as exc:
        log.info("builds run without their own cgroup (%s: %s)", parent, exc.strerror)
        return None
    try:
        writable = os.access(probe / "cgroup.procs", os.W_OK)
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return parent if writable else None


@functools.cache
def become_subreaper() -> bool:
    """Make this process the child subreaper of its descendants (Linux), so a build's orphans
    are re-parented to it and found by ``kill``.  True if it is one."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


#: ``Containment.wrap``'s shell script: $0 is the cgroup's ``cgroup.procs``, "$@" the command.
_ENTER_AND_EXEC = 'echo 0 > "$0" && exec "$@"'


class Containment:
    """One build's processes: a cgroup of its own, or the fallback's tree.  ``enter`` runs in
    the child before it executes the command; ``kill`` kills everything that is still there;
    ``close`` kills, waits briefly for them to be gone and removes the cgroup."""

    def __init__(self, marker: str, cgroup: Path | None) -> None:
        self.marker = marker
        self.cgroup = cgroup
        self.pid: int | None = None
        self.main_gone = False

    @classmethod
    def create(cls, marker: str, name: str) -> Containment:
        """A containment for a build whose processes carry ``MARKER_VARIABLE=marker`` (its
        build directory); ``name`` names its cgroup (a plain file name), after the tag of the
        directory holding the build directories (``owner_tag``), so a builder restarted on the
        same work dir finds its predecessor's cgroups (``remove_leftover_cgroups``)."""
        parent = cgroup_parent()
        cgroup: Path | None = None
        if parent is not None:
            owner = owner_tag(Path(marker).parent)
            cgroup = parent / f"{CGROUP_PREFIX}{owner}-{name}-{uuid.uuid4().hex[:8]}"
            try:
                cgroup.mkdir()
            except OSError as exc:
                log.warning("cannot make the cgroup %s: %s", cgroup, exc.strerror)
                cgroup = None
        if cgroup is None:
            become_subreaper()
        return cls(marker, cgroup)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` started so that it enters the cgroup before it executes: through a shell
        that moves itself in (``cgroup.procs``) and then ``exec``s it, keeping its pid.
        (``enter`` as a ``preexec_fn`` does the same, but any ``preexec_fn`` makes
        ``subprocess`` fork the whole builder and run Python in the child instead of a
        ``vfork``: about 11 ms a build with the GIL held, against 0.3 ms, issue 22.)  A
        failed move is the shell's message in the log and exit status 2, and the command
        does not run."""
        if self.cgroup is None:
            return list(argv)
        return ["/bin/sh", "-c", _ENTER_AND_EXEC, str(self.cgroup / "cgroup.procs"), *argv]

    def enter(self) -> None:
        """Move the calling process into the cgroup (as ``preexec_fn``, in the child)."""
        if self.cgroup is not None:
            with open(self.cgroup / "cgroup.procs", "w") as procs:
                procs.write("0")

    def started(self, pid: int) -> None:
        self.pid = pid

    def main_exited(self) -> None:
        """The main process was reaped: its pid may be reused, so only its process group
        (which keeps the pid while it has members) and the markers find the rest."""
        self.main_gone = True

    def populated(self) -> bool:
        """Whether any of the build's processes (other than its reaped main process) runs."""
        if self.cgroup is not None:
            return _populated(self.cgroup)
        return bool(self._tree())

    def kill(self) -> None:
        """SIGKILL every process of the build that can be found."""
        self._kill_group()
        if self.cgroup is not None:  # holds every descendant: no need to walk the tree
            _kill_cgroup(self.cgroup)
            return
        self._kill_pids(self._tree())
        _reap_adopted()

    def kill_quick(self) -> bool:
        """``kill`` when there is nothing to kill but the main process's group (a ``killpg``):
        the build has its cgroup and nothing runs in it or under it.  False: call ``kill`` (in
        a thread)."""
        if self.cgroup is None or _populated(self.cgroup):
            return False
        self._kill_group()
        return True

    def close_quick(self) -> bool:
        """``close`` when nothing of the build runs any more: the main process's group killed
        and the cgroup removed with one ``rmdir``, which the kernel refuses while anything is
        in it or under it (a cgroup a build made).  False: call ``close`` (in a thread),
        which does what is left."""
        if self.cgroup is None:
            return False
        self._kill_group()
        try:
            os.rmdir(self.cgroup)
        except OSError:
            return False
        return True

    def _kill_group(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def close(self, wait: float = 1.0) -> None:
        """Kill what is left, wait up to ``wait`` seconds for it to be gone (blocking: call
        from a thread), and remove the cgroup."""
        self.kill()
        if self.cgroup is None:
            return
        _empty_and_remove(self.cgroup, wait)

    def _tree(self) -> list[int]:
        """The build's processes the fallback can find: the main process's descendants and
        the builder's descendants carrying the build's marker."""
        found: set[int] = set()
        if self.pid is not None and not self.main_gone:
            with contextlib.suppress(psutil.Error):
                main = psutil.Process(self.pid)
                if main.status() != psutil.STATUS_ZOMBIE:
                    found.add(main.pid)
                found.update(child.pid for child in main.children(recursive=True))
        try:
            descendants = psutil.Process().children(recursive=True)
        except psutil.Error:
            descendants = []
        for process in descendants:
            if process.pid in found:
                continue
            with contextlib.suppress(psutil.Error, OSError):
                if process.environ().get(MARKER_VARIABLE) == self.marker:
                    found.add(process.pid)
        found.discard(os.getpid())
        return sorted(found)

    @staticmethod
    def _kill_pids(pids: list[int]) -> None:
        _kill_pids(pids)


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _kill_cgroup(cgroup: Path) -> None:
    """SIGKILL everything in ``cgroup`` and the cgroups under it."""
    try:
        (cgroup / "cgroup.kill").write_text("1")
    except OSError:  # before Linux 5.14: one by one
        for directory, _dirs, _files in os.walk(cgroup):
            with contextlib.suppress(OSError, ValueError):
                procs = (Path(directory) / "cgroup.procs").read_text().split()
                _kill_pids([int(pid) for pid in procs])


def _populated(cgroup: Path) -> bool:
    """Whether anything runs in ``cgroup`` or under it (its ``cgroup.events``: a few dozen
    bytes, read with plain system calls; a build calls this a few times on the event loop)."""
    try:
        fd = os.open(f"{cgroup}/cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return b"populated 1" in os.read(fd, 4096)
    except OSError:
        return False
    finally:
        os.close(fd)


def _empty_and_remove(cgroup: Path, wait: float) -> None:
    """Kill what runs in ``cgroup``, wait up to ``wait`` seconds for it to be gone (blocking),
    and remove it with any cgroup made under it (a build running as root can make some)."""
    _kill_cgroup(cgroup)
    for _ in range(max(1, int(wait / 0.01))):
        if not _populated(cgroup):
            break
        time.sleep(0.01)
        _kill_cgroup(cgroup)
    for directory, _dirs, _files in os.walk(cgroup, topdown=False):
        try:
            os.rmdir(directory)
        except OSError as exc:
            log.warning("cannot remove the cgroup %s: %s", directory, exc.strerror)
            return


def owner_tag(builds: Path) -> str:
    """A short tag of the directory a builder keeps its build directories in: what names
    its builds' cgroups, so those of a killed predecessor on the same work dir are told from
    other builders' sharing the cgroup."""
    return _tag(str(builds.absolute()))


@functools.lru_cache(maxsize=16)
def _tag(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:12]


def remove_leftover_cgroups(builds: Path, wait: float = 5.0) -> int:
    """Kill and remove the build cgroups a killed builder on ``builds`` left under this
    builder's cgroup (a builder killed with -9 cannot remove them; their processes run on).
    Returns how many there were.  Blocking: call through a thread."""
    parent = cgroup_parent()
    if parent is None:
        return 0
    prefix = f"{CGROUP_PREFIX}{owner_tag(builds)}-"
    try:
        leftovers = [entry for entry in parent.iterdir() if entry.name.startswith(prefix)]
    except OSError:
        return 0
    for cgroup in leftovers:
        if cgroup.is_dir():
            _empty_and_remove(cgroup, wait)
    return len(leftovers)


#: Main processes of running builds: trio reaps those itself.
_main_pids: set[int] = set()
#: Main processes being started (not yet in ``_main_pids``), and how many starts began: a
#: reaper in a worker thread checks both under the lock before each ``waitpid``, so it never
#: reaps a main process that was forked after it looked and exited before it was tracked.
_spawning = 0
_spawns = 0
_spawn_lock = threading.Lock()


def _reap_adopted() -> None:
    """Reap the zombies of build descendants re-parented to this (subreaper) process.  A
    zombie child is a build's adopted descendant when it is in another process group than
    the builder (a build's group, or one it made with ``setsid``) and is not a build's main
    process, which trio reaps; the builder's other children (``nix-store``) share its group."""
    with _spawn_lock:
        if _spawning:  # a main process may be a zombie before it is tracked
            return
        spawns = _spawns
    own_group = os.getpgid(0)
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return
    for child in children:
        with contextlib.suppress(psutil.Error, OSError):
            if child.pid in _main_pids or child.status() != psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(child.pid) == own_group:
                continue
            with _spawn_lock:
                if _spawning or _spawns != spawns:  # a start began since we looked
                    return
                if child.pid in _main_pids:
                    continue
                os.waitpid(child.pid, os.WNOHANG)


@contextlib.contextmanager
def spawning() -> Iterator[None]:
    """Around starting a build's main process: no zombie is reaped meanwhile."""
    global _spawning, _spawns
    with _spawn_lock:  # held by a reaper only around one waitpid
        _spawning += 1
        _spawns += 1
    try:
        yield
    finally:
        with _spawn_lock:
            _spawning -= 1


def track_main(pid: int) -> None:
    _main_pids.add(pid)


def untrack_main(pid: int) -> None:
    _main_pids.discard(pid)
