"""Shells started ahead of the next builds, each already in a cgroup of its own.

Moving a process into a cgroup (a write to its ``cgroup.procs``) takes the kernel's
``cgroup_threadgroup_rwsem`` for writing, and unless the cgroup2 file system is mounted with
``favordynmods`` the first such write after a quiet spell waits for an RCU grace period
first: 10-13 ms on this project's VMs (Linux 6.18, HZ=250), against 0.02 ms for the next
writes in a burst.  ``Containment.wrap``'s shell makes that write between the builder's
``vfork`` and the command: a ``POST /builds`` to an idle farm took 19.6 ms to the child
running (p50), 13 ms of them there, and an exec of the wrapper shell on top (0.6 ms).  (A
process can be started straight into a cgroup, ``clone3`` with ``CLONE_INTO_CGROUP``, which
takes the lock only for reading; Python 3.11's ``subprocess`` cannot.)

So a builder whose builds get cgroups keeps a few shells standing by (``Standby``).  Each is
started with a new cgroup and its own output pipe, moves itself into the cgroup at once (when
no build waits for it), and then waits for its script on its stdin.  A build takes one and
writes the script: ``cd`` to the build's directory, ``export`` of its environment, ``exec`` of
its command with stdin from ``/dev/null``.  The command starts contained, as the shell's pid
(the leader of its own session, as ever), with the environment the wrapper shell would have
given it (the build's, and the ``PWD`` the shell sets), about as fast as a bare ``vfork`` and
exec.  The builder starts a replacement once the command runs.

A shell standing by is the next build's, so no build may reach it.  Its stdin is a socket,
which cannot be opened through ``/proc/<pid>/fd`` (a pipe can, by any process of the same
user); its output pipe can, so a shell with anything in it when taken is not used; and a
process that may trace it could do anything to it, so shells stand by only where builds
cannot trace them beyond what they can trace already (``out_of_reach``: a sandbox, a root
builder whose builds are root anyway, or Yama's ``ptrace_scope`` >= 1).  A single-user
builder of another user on a kernel letting any process trace its user's others, and a
builder with build users (whose commands start through a ``preexec_fn``), start every build
the usual way.

A build whose environment the shell cannot ``export`` exactly (a name that is not a shell
variable's, or one the shell treats as its own, such as ``PWD`` or ``IFS``), whose command
starts with ``-`` (``exec`` would take it for an option), or whose script would not fit in the
socket at once, is started the usual way (``Containment.wrap``); so is one that finds no shell
ready.  A shell that died while standing by (its move into the cgroup failed, someone killed
it) is found when taken and replaced.  Closing the standby ends the shells; a shell whose
stdin reaches its end exits by itself, also when the builder is killed, and the empty cgroups
a killed builder leaves are removed by the next one (``remove_leftover_cgroups``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from hydra_trio.builder import contain
from hydra_trio.builder.contain import CGROUP_PREFIX, Containment

log = logging.getLogger("hydra_trio.builder")

#: Shells standing by at most (fewer if the builder runs fewer builds at once): beyond, a
#: burst of builds starts the usual way, when the kernel's lock is warm anyway.
STANDBY_MOST = 4
#: A script larger than this goes the usual way: written at once, it never waits for the socket.
SCRIPT_MOST = 32 * 1024
#: What a standing-by shell runs first: move itself into its cgroup ($1 is its cgroup.procs).
_ENTER = b'echo 0 > "$1" || exit 2\n'
#: Names a script may ``export``: a shell variable's, and none the shell sets or reads itself.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHELL_NAMES = frozenset(
    {"CDPATH", "ENV", "HISTFILE", "IFS", "LINENO", "MAIL", "MAILCHECK", "MAILPATH", "OLDPWD"}
    | {"OPTARG", "OPTIND", "PPID", "PS1", "PS2", "PS4", "PWD", "SHELLOPTS", "BASHOPTS"}
    | {"BASH_ENV", "SHLVL", "UID", "EUID", "GROUPS", "HOSTNAME", "RANDOM", "SECONDS", "_"}
)


def script(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> bytes | None:
    """What a standing-by shell is given to run ``argv`` in ``cwd`` with exactly ``env`` (and
    the ``PWD`` it sets), or None if a shell cannot be told so (see the module docstring)."""
    if not argv or argv[0].startswith("-"):
        return None
    if any(not _NAME.fullmatch(name) or name in _SHELL_NAMES for name in env):
        return None
    lines = [f"cd -P -- {shlex.quote(str(cwd))} || exit 2", "unset OLDPWD"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    lines.append(f"exec {' '.join(shlex.quote(arg) for arg in argv)} </dev/null\n")
    text = os.fsencode("\n".join(lines))
    return text if len(text) <= SCRIPT_MOST else None


@attrs.define(eq=False)
class Shell:
    """One shell standing by: its process, cgroup, stdin (the script goes there) and the read
    end of its stdout and stderr (the build's log)."""

    popen: subprocess.Popen[bytes]
    cgroup: Path
    stdin: int
    output: int
    pidfd: int
    #: what it runs (``script``), once a build took it.
    script: bytes = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def untouched(self) -> str:
        """What became of it since it was started, "" if nothing: it ended (its pidfd is
        readable), or something was written to its output (the shell's own error, or a build
        that opened the pipe through ``/proc``: nothing of it may reach the build that takes
        the shell)."""
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        poller.register(self.output, select.POLLIN)
        ready = {fd for fd, _events in poller.poll(0)}
        if self.pidfd in ready:
            return "had ended"
        if self.output in ready:
            return "had output before any build took it"
        return ""

    def run(self) -> bool:
        """Give it its script: it executes the command next.  False if it died meanwhile
        (then it is discarded)."""
        try:
            # a socket takes up to its buffer at once (over 100 KiB; SCRIPT_MOST is less)
            written = os.write(self.stdin, self.script)
        except OSError:  # BrokenPipeError
            written = -1
        os.close(self.stdin)
        self.stdin = -1
        if written == len(self.script):
            return True
        self.discard()
        return False

    def containment(self, marker: str) -> Containment:
        return Containment(marker, self.cgroup)

    def discard(self) -> None:
        """End it if it has not run a command (SIGKILL through its pidfd: never another
        process) and close what of its pipes and pidfd it still holds.  Its cgroup is left to
        the caller.  Reaped at once if it has exited, else by the next ``reap``."""
        if self.stdin >= 0:
            os.close(self.stdin)
            self.stdin = -1
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                _kill(self.pidfd)
        for fd in (self.output, self.pidfd):
            if fd >= 0:
                os.close(fd)
        self.output = self.pidfd = -1
        contain.untrack_main(self.popen.pid)
        if self.popen.poll() is None:
            _ENDING.append(self.popen)

    def hand_over(self) -> tuple[int, int]:
        """Its output's read end and pidfd, which the caller owns from now on."""
        output, pidfd = self.output, self.pidfd
        self.output = self.pidfd = -1
        return output, pidfd


def _pidfd_open(pid: int) -> int:
    if sys.platform == "linux":
        return os.pidfd_open(pid)
    raise OSError(errno.ENOSYS, "no pidfds here")  # not called: for_builds gives no standby


def _kill(pidfd: int) -> None:
    if sys.platform == "linux":
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


#: Shells ended but not reaped yet (``Shell.discard``); ``reap`` waits for them.
_ENDING: list[subprocess.Popen[bytes]] = []


def reap() -> None:
    """Reap the shells ended since the last call that have exited (never blocks)."""
    _ENDING[:] = [popen for popen in _ENDING if popen.poll() is None]


def for_builds(builds: Path, max_jobs: int, *, sandboxed: bool = False) -> Standby | None:
    """The standby of a builder keeping its build directories in ``builds`` and running
    ``max_jobs`` builds at once (in a sandbox if ``sandboxed``), not filled yet; or None
    where builds get no cgroups, or could reach the shells (``out_of_reach``)."""
    if not sys.platform.startswith("linux"):
        return None
    parent = contain.cgroup_parent()
    if parent is None:
        return None
    if not out_of_reach(sandboxed):
        log.info(
            "builds start without shells standing by: a build of this builder's user could "
            "trace them (no --sandbox, not root, kernel.yama.ptrace_scope 0)"
        )
        return None
    return Standby(min(max_jobs, STANDBY_MOST), parent, contain.owner_tag(builds))


def out_of_reach(sandboxed: bool) -> bool:
    """Whether a build can do nothing to a shell standing by that it cannot do already to
    the builds running beside it: it runs in a sandbox (its own PID namespace: it sees none
    of the builder's processes), or as root (the builder is root and so are its builds: they
    can do anything to anything), or the kernel lets no process trace one it did not start
    (Yama's ``ptrace_scope`` 1 or more).  Otherwise a build of the builder's user could
    trace a shell standing by (that user's and dumpable, unlike the builder) and so reach a
    build that starts after its own has ended.  (Opening the shell's stdin through
    ``/proc/<pid>/fd`` fails whatever the user: it is a socket; something written into its
    output pipe that way is seen before the shell is given a build: ``Shell.untouched``.)"""
    if sandboxed or os.geteuid() == 0:
        return True
    try:
        scope = Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()
    except OSError:
        return False
    return scope.isdigit() and int(scope) >= 1


class Standby:
    """Up to ``size`` shells standing by under ``parent`` (the builder's cgroup), named after
    ``owner`` (``contain.owner_tag`` of the builds directory), so a builder restarted on the
    same work dir removes what a killed one left (see the module docstring)."""

    def __init__(self, size: int, parent: Path, owner: str) -> None:
        self.size = size
        self.parent = parent
        self.owner = owner
        self._ready: list[Shell] = []
        #: shells ended whose cgroups are removed once they have exited (``_tidy``).
        self._ending: list[Shell] = []
        self._closed = False
        #: shells started, and taken by builds, so far.
        self.started = 0
        self.taken = 0

    def take(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> Shell | None:
        """A shell to run ``argv`` in ``cwd`` with ``env`` (``Shell.run``); None: start it the
        usual way."""
        text = script(argv, cwd, env)
        if text is None:
            return None
        self._tidy()
        while self._ready:
            shell = self._ready.pop()
            why = shell.untouched()
            if not why:
                self.taken += 1
                shell.script = text
                return shell
            log.warning("a shell standing by for builds (pid %d) %s", shell.pid, why)
            self._remove(shell)
        return None

    def fill(self) -> None:
        """Start shells until ``size`` stand by (a ``mkdir`` and a ``vfork`` each: on the loop,
        as a build's own start would be).  A shell that cannot be started is logged, and the
        standby stops trying: builds start the usual way."""
        self._tidy()
        while not self._closed and len(self._ready) < self.size:
            try:
                shell = self._start()
            except OSError as exc:
                log.warning("cannot start a shell standing by for builds: %s", exc)
                self.size = 0
                return
            self._ready.append(shell)
            self.started += 1

    def close(self) -> None:
        """End every shell standing by and remove its cgroup (each exits at once: blocking
        only for as long as that takes, bounded)."""
        self._closed = True
        ready, self._ready = self._ready, []
        for shell in ready:
            shell.discard()
        for shell in [*ready, *self._ending]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                shell.popen.wait(timeout=1.0)
            with contextlib.suppress(OSError):
                shell.cgroup.rmdir()
        self._ending = []
        reap()

    def _start(self) -> Shell:
        cgroup = self.parent / f"{CGROUP_PREFIX}{self.owner}-standby-{uuid.uuid4().hex[:8]}"
        cgroup.mkdir()
        try:
            # stdin a socket, not a pipe: a process of the same user can open another's pipe
            # through /proc/<pid>/fd (and so write into the next build's script), not a socket
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            stdin, stdin_read = ours.detach(), theirs.detach()
            try:
                read, write = os.pipe()
                try:
                    with contain.spawning():
                        popen = subprocess.Popen(
                            ["/bin/sh", "-s", str(cgroup / "cgroup.procs")],
                            stdin=stdin_read,
                            stdout=write,
                            stderr=write,
                            env={},
                            start_new_session=True,
                        )
                        contain.track_main(popen.pid)
                except BaseException:
                    os.close(read)
                    raise
                finally:
                    os.close(write)
            except BaseException:
                os.close(stdin)
                raise
            finally:
                os.close(stdin_read)
            shell = Shell(popen, cgroup, stdin, read, -1)
            try:
                shell.pidfd = _pidfd_open(popen.pid)
                os.write(stdin, _ENTER)
            except OSError:
                shell.discard()
                raise
        except BaseException:
            with contextlib.suppress(OSError):
                cgroup.rmdir()  # fails while a killed shell is still in it: then left over
            raise
        return shell

    def _remove(self, shell: Shell) -> None:
        shell.discard()
        self._ending.append(shell)
        self._tidy()

    def _tidy(self) -> None:
        """Remove the cgroups of the ended shells that have exited (a killed process leaves
        its cgroup a moment later, and the kernel refuses to remove it until then)."""
        reap()
        ending = []
        for shell in self._ending:
            if shell.popen.poll() is None:
                ending.append(shell)
                continue
            with contextlib.suppress(OSError):
                shell.cgroup.rmdir()
        self._ending = ending
