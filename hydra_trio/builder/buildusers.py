"""Build users: each running build under a uid of its own (``builder --build-users SPEC``).

As Nix's build users, a builder given a pool of unprivileged uids runs each build as one of
them, never two builds at once on one uid, so a build cannot read the builder's work dir, its
token or another build's directory, and everything running as that uid after the build ends
is the build's own and is killed.  ``SPEC`` is

- a group name (``nixbld``, as Nix's ``build-users-group``): its members (and the accounts
  whose primary group it is) are the build users, each with its own uid, the group's gid;
- a uid range ``FIRST-LAST`` (``30000-30031``, as Nix's ``auto-allocate-uids``): uids that no
  account uses (checked: one with a passwd entry is refused), each with the gid of the same
  number, or ``FIRST-LAST:GROUP`` for one group (a name or a number).

The rules:

- The builder runs as root (or with ``CAP_SETUID``, ``CAP_SETGID``, ``CAP_CHOWN`` and
  ``CAP_KILL``); ``max_jobs`` is at most the pool's size; the token file is readable by
  neither the build users' group nor others nor owned by a build user (``check_*``: one line
  each, the builder refuses to start).
- A build takes a uid from the ``BuildUserPool`` for its whole attempt (``lease``).  Its
  build directory and ``work``, ``out``, ``tmp`` belong to that uid (mode 0700); ``in`` stays
  the builder's, readable, not writable (``hand_over``, ``open_inputs``).
- Its command starts as root, enters the build's cgroup, then drops to the uid, its gid and
  no supplementary groups (``BuildUser.drop``: in the one ``preexec_fn`` the build already has,
  because moving into a cgroup needs the builder's rights and ``subprocess``'s own
  ``user=``/``group=`` switch before ``preexec_fn`` runs).
- When the command has ended and before its outputs are read (as root, through
  ``outputs.open_beneath``), every process of the uid is killed (``kill_uid``), so nothing
  of the build changes ``$OUT`` meanwhile; again when the lease ends.
- The builder holds a lock on each uid of its pool while it runs (``lock_pool``), so two
  builders cannot share one (each would kill the other's builds); at start it kills what a
  predecessor left running as those uids.

Everything here that walks processes or the file system blocks: call it through a thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import pwd
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import attrs
import psutil

from hydra_trio.builder.builddir import SUBDIRS, BuildDir
from hydra_trio.builder.sandbox import TRIAL_COMMAND, Sandbox, run_trial
from hydra_trio.protocol.errors import HydraTrioError

log = logging.getLogger("hydra_trio.builder")

#: Where the builders of a machine lock the uids they use (one file per uid): under /run, or
#: /var/run where there is no /run (macOS).
LOCK_DIR = Path("/run" if os.path.isdir("/run") else "/var/run") / "hydra-trio" / "build-users"
#: A pool larger than this is refused (a typo such as 30000-300000).
MAX_POOL = 4096
#: Seconds the start-up check of ``--sandbox`` as a build user may take (a loaded machine).
SANDBOX_CHECK_TIMEOUT = 30.0
#: Rounds of "find the uid's processes, kill them" at most (a build forking meanwhile).
KILL_ROUNDS = 50

# Linux capability numbers (``capability.h``).
_CAPABILITIES = {"CAP_CHOWN": 0, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7}


class BuildUsersError(HydraTrioError):
    """The build users cannot be used as given (one line saying why and what to do)."""


@attrs.frozen
class BuildUser:
    """One uid a build runs as, with its gid."""

    uid: int
    gid: int

    def drop(self) -> None:
        """Become this user: no supplementary groups, its gid, its uid (real, effective and
        saved, so it cannot switch back).  In the child, before it executes the command."""
        os.setgroups([])
        os.setregid(self.gid, self.gid)  # setting the real id sets the saved one too
        os.setreuid(self.uid, self.uid)


@attrs.frozen
class BuildUsers:
    """The pool a ``--build-users`` spec names."""

    spec: str
    users: tuple[BuildUser, ...]

    @classmethod
    def parse(cls, spec: str) -> BuildUsers:
        """The build users ``spec`` names (see the module docstring); ``BuildUsersError``."""
        spec = spec.strip()
        users = _range(spec) if spec[:1].isdigit() else _group(spec)
        if not users:
            raise BuildUsersError(f"--build-users {spec}: names no user")
        if len(users) > MAX_POOL:
            raise BuildUsersError(f"--build-users {spec}: more than {MAX_POOL} users")
        if any(user.uid == 0 or user.gid == 0 for user in users):
            raise BuildUsersError(f"--build-users {spec}: root cannot be a build user")
        if any(user.uid == os.geteuid() for user in users):
            raise BuildUsersError(f"--build-users {spec}: the builder's own uid is in it")
        return cls(spec=spec, users=users)

    @property
    def uids(self) -> frozenset[int]:
        return frozenset(user.uid for user in self.users)

    @property
    def gids(self) -> frozenset[int]:
        return frozenset(user.gid for user in self.users)


def _range(spec: str) -> tuple[BuildUser, ...]:
    uids, _, group = spec.partition(":")
    first_text, dash, last_text = uids.partition("-")
    try:
        first, last = int(first_text), int(last_text)
    except ValueError:
        raise BuildUsersError(
            f"--build-users {spec}: give a group name or a uid range FIRST-LAST[:GROUP]"
        ) from None
    if not dash or not 0 < first <= last or last >= 2**31:
        raise BuildUsersError(f"--build-users {spec}: FIRST-LAST must be 0 < FIRST <= LAST")
    if last - first >= MAX_POOL:
        raise BuildUsersError(f"--build-users {spec}: more than {MAX_POOL} users")
    gid: int | None = None
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise BuildUsersError(f"--build-users {spec}: no group {group!r}") from None
    users = []
    for uid in range(first, last + 1):
        with contextlib.suppress(KeyError):
            name = pwd.getpwuid(uid).pw_name
            raise BuildUsersError(
                f"--build-users {spec}: uid {uid} is the account {name!r}; a uid range must "
                "name uids no account uses (or give the group of the build users instead)"
            )
        users.append(BuildUser(uid, uid if gid is None else gid))
    return tuple(users)


def _group(name: str) -> tuple[BuildUser, ...]:
    try:
        group = grp.getgrnam(name)
    except KeyError:
        raise BuildUsersError(
            f"--build-users {name}: no such group (give a group whose members are the build "
            "users, or a uid range FIRST-LAST)"
        ) from None
    uids = {account.pw_uid for account in pwd.getpwall() if account.pw_gid == group.gr_gid}
    for member in group.gr_mem:
        with contextlib.suppress(KeyError):
            uids.add(pwd.getpwnam(member).pw_uid)
    return tuple(BuildUser(uid, group.gr_gid) for uid in sorted(uids))


# ---------------------------------------------------------------------------------------------
# Checks at start: each a one-line ``BuildUsersError``.


def check_privileges() -> None:
    """The builder can switch to the build users, give them files and kill their processes:
    it is root, or (Linux) has the capabilities for that."""
    if os.geteuid() == 0:
        return
    missing = sorted(set(_CAPABILITIES) - _effective_capabilities())
    if missing:
        raise BuildUsersError(
            "--build-users needs the builder to run as root (or with "
            f"{', '.join(sorted(_CAPABILITIES))}); it lacks {', '.join(missing)}"
        )


def _effective_capabilities() -> set[str]:
    if not sys.platform.startswith("linux"):
        return set()
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                bits = int(line.split()[1], 16)
                return {name for name, bit in _CAPABILITIES.items() if bits >> bit & 1}
    except (OSError, ValueError):
        pass
    return set()


def check_max_jobs(users: BuildUsers, max_jobs: int) -> None:
    if max_jobs > len(users.users):
        raise BuildUsersError(
            f"--max-jobs {max_jobs} is more than the {len(users.users)} build users of "
            f"--build-users {users.spec}: each running build needs a user of its own"
        )


def check_token_file(users: BuildUsers, path: Path) -> None:
    """The token file is readable by no build user: not by others, not by its group (the
    build users may be in it), not owned by a build user."""
    try:
        info = path.stat()
    except OSError:
        return  # loading it says what is wrong
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid in users.uids:
        raise BuildUsersError(
            f"token file {path} belongs to the build user {info.st_uid}: a build could read "
            "it; give it to the builder's user (chown) and chmod 600 it"
        )
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        raise BuildUsersError(
            f"token file {path} is readable by its group or others (mode {mode:o}): builds "
            "running as build users could read it; chmod 600 it"
        )


def check_sandbox(sandbox: Sandbox, user: BuildUser) -> None:
    """With ``--sandbox`` too, bubblewrap runs as the build user, unprivileged: check at
    start that it can make a sandbox so (it needs unprivileged user namespaces, which a root
    builder's own ``Sandbox.check`` does not), by running ``sh -c 'exit 0'`` in one in a
    throw-away build directory of that user.  Blocking: call through a thread."""
    with tempfile.TemporaryDirectory(prefix="hydra-trio-build-user-check-") as tmp:
        build_dir = BuildDir(Path(tmp), 0o700)
        for sub in SUBDIRS:
            (build_dir.path / sub).mkdir()
        os.chmod(tmp, 0o711)
        hand_over(build_dir.path, user)
        argv = sandbox.argv(TRIAL_COMMAND, build_dir, build_dir.work)
        try:
            why = run_trial(
                argv,
                SANDBOX_CHECK_TIMEOUT,
                user=user.uid,
                group=user.gid,
                extra_groups=[],
                cwd="/",
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise BuildUsersError(f"--sandbox as build user {user.uid}: {exc}") from None
    if why is not None:
        raise BuildUsersError(
            f"--sandbox with --build-users: bubblewrap cannot make a sandbox as build user "
            f"{user.uid} ({why}); it needs unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1), or drop one of the two options"
        )


def check_reachable(work_dir: Path) -> None:
    """The build users can reach their directories in ``work_dir``: every directory above it
    lets others through (``x``; the work dir itself is made so, ``workdir.secure_work_dir``)."""
    for directory in work_dir.absolute().parents:
        try:
            mode = directory.stat().st_mode
        except OSError:
            continue
        if not mode & stat.S_IXOTH:
            raise BuildUsersError(
                f"{directory} does not let others through (mode {stat.S_IMODE(mode):o}): the "
                "build users cannot reach their build directories under it; give the builder "
                "a --work-dir whose parents are mode 711 or 755"
            )


# ---------------------------------------------------------------------------------------------
# The pool and its lock.


@contextlib.contextmanager
def lock_pool(users: BuildUsers, lock_dir: Path = LOCK_DIR) -> Iterator[list[IO[bytes]]]:
    """Lock every uid of the pool for this builder while the block runs (``BuildUsersError``
    if another builder holds one)."""
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    held: list[IO[bytes]] = []
    try:
        for uid in sorted(users.uids):
            fd = os.open(lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            lock = os.fdopen(fd, "r+b")
            held.append(lock)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise BuildUsersError(
                    f"build user {uid} is in use by another builder on this machine: give "
                    "each builder its own --build-users"
                ) from None
        yield held
    finally:
        for each in held:
            each.close()


@attrs.define(eq=False)
class BuildUserPool:
    """The build users not running a build right now."""

    users: BuildUsers
    _free: list[BuildUser] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._free = list(reversed(self.users.users))

    @contextlib.contextmanager
    def lease(self) -> Iterator[BuildUser]:
        """A build user of its own for the block.  Never waits: ``max_jobs`` is at most the
        pool's size, and a build gives its user back once its directory is gone."""
        if not self._free:
            raise BuildUsersError("every build user is running a build")
        user = self._free.pop()
        try:
            yield user
        finally:
            self._free.append(user)


# ---------------------------------------------------------------------------------------------
# A build's files and processes.


def hand_over(path: Path, user: BuildUser) -> None:
    """Give a prepared build directory to ``user``: the directory, ``work``, ``out`` and
    ``tmp`` are its own (0700), ``in`` the builder's (0755), readable but not writable.  A
    handful of metadata calls on directories the builder just made or emptied."""
    for sub in ("work", "out", "tmp"):
        os.chown(path / sub, user.uid, user.gid, follow_symlinks=False)
        os.chmod(path / sub, 0o700, follow_symlinks=False)
    os.chown(path / "in", os.geteuid(), os.getegid(), follow_symlinks=False)
    os.chmod(path / "in", 0o755, follow_symlinks=False)
    os.chown(path, user.uid, user.gid, follow_symlinks=False)
    os.chmod(path, 0o700, follow_symlinks=False)


def open_inputs(in_dir: Path) -> None:
    """Let the build user read ``$IN``: its directories 0755 (the files are 0444 or 0555
    already, and the builder's).  Blocking (a walk of ``$IN``): call through a thread."""
    for root, dirs, _files in os.walk(in_dir):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755, follow_symlinks=False)


def take_back(path: Path, mode: int) -> None:
    """Give a build directory back to the builder once the build user's processes are gone
    (so it can be recycled as a spare with ``mode``).  Metadata calls on five entries."""
    uid, gid = os.geteuid(), os.getegid()
    for each in (path, *(path / sub for sub in ("work", "out", "in", "tmp"))):
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(each).st_mode):
                os.chown(each, uid, gid, follow_symlinks=False)
                os.chmod(each, mode, follow_symlinks=False)


def processes_of(uids: frozenset[int]) -> list[int]:
    """The pids of the processes running as (real or effective uid) one of ``uids``."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            ids = process.uids()
            ours = ids.real in uids or ids.effective in uids
            # a zombie is dead already, only not reaped yet
            if ours and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
    own = os.getpid()
    return [pid for pid in found if pid != own]


def kill_uids(uids: frozenset[int]) -> int:
    """SIGKILL every process running as one of ``uids``, again until none is left (a build
    user runs nothing but builds); at most ``KILL_ROUNDS`` rounds.  Returns how many were
    killed.  Blocking (a walk of the process table): call through a thread."""
    killed = 0
    for _ in range(KILL_ROUNDS):
        pids = processes_of(uids)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.01)  # let the kills land
    else:
        log.warning("processes of build users %s still run after %d kills", sorted(uids), killed)
    return killed


def kill_uid(user: BuildUser) -> int:
    return kill_uids(frozenset({user.uid}))
