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

A shell standing by is the next build's, so no build may reach it: a build of the builder's
own user could stop it (``kill -STOP``), freeze or empty its cgroup, or trace it, and so reach
a build that starts after its own has ended.  So shells stand by only where builds cannot do
more to them than they can already do to everything (``out_of_reach``): builds in a sandbox
(their own PID namespace, no cgroup file system), or a root builder, whose builds are root.
An unprivileged builder without ``--sandbox``, and a builder with build users (whose commands
start through a ``preexec_fn``), start every build the usual way.  Where they stand by, their
stdin is a socket all the same (no process can open it through ``/proc/<pid>/fd``, as it could
a pipe), and a shell whose output holds anything when taken is ended, not used.

A build whose environment the shell cannot ``export`` exactly (a name that is not a shell
variable's, or one the shell treats as its own, such as ``PWD``, ``IFS`` or bash's ``BASH*``),
whose command starts with ``-`` (``exec`` would take it for an option), whose command or
environment holds a NUL (which ``subprocess`` refuses and a shell would drop), or whose script
would not fit in the socket at once, is started the usual way (``Containment.wrap``); so is one
that finds no shell ready.  The script is one ``{ ...; }`` block: cut short, it runs nothing.
A cold move holds the kernel's ``cgroup_mutex`` for the grace period, and every ``mkdir`` or
``rmdir`` of a cgroup waits for it meanwhile, on the event loop too: so a replacement, started
right after a build's command runs (``fill``, a ``mkdir`` and a ``vfork`` on the loop, as the
wrapper's were), is told to move only once that build's own cgroup is gone (``enter``).
A shell that died while standing by (its move into the cgroup failed, someone killed it) is
found when taken and replaced.  Closing the standby ends the shells; a shell whose
stdin reaches its end exits by itself, also when the builder is killed, and the empty cgroups
a killed builder leaves are removed by the next one (``remove_leftover_cgroups``).
"""

from __future__ import annotations

import collections
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
import time
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
#: Seconds without starting shells after one could not be started.
FILL_RETRY = 60.0
#: A script larger than this goes the usual way: written at once, it never waits for the socket.
SCRIPT_MOST = 32 * 1024
#: What a standing-by shell runs first: move itself into its cgroup ($1 is its cgroup.procs).
_ENTER = b'echo 0 > "$1" || exit 2\n'
#: Names a script may ``export``: a shell variable's, and none the shell sets or reads itself.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHELL_NAMES = frozenset(
    {"CDPATH", "ENV", "HISTFILE", "IFS", "LINENO", "MAIL", "MAILCHECK", "MAILPATH", "OLDPWD"}
    | {"OPTARG", "OPTIND", "PPID", "PS1", "PS2", "PS4", "PWD", "SHELLOPTS", "SHLVL", "UID"}
    | {"EUID", "GROUPS", "HOSTNAME", "RANDOM", "SECONDS", "FUNCNAME", "SRANDOM", "HISTCMD"}
    | {"DIRSTACK", "PIPESTATUS", "_"}
)
#: ... and none beginning so (bash's own: ``BASH_VERSINFO`` is read-only, ``BASHPID`` set).
_SHELL_PREFIXES = ("BASH", "COMP_", "EPOCH")


def script(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> bytes | None:
    """What a standing-by shell is given to run ``argv`` in ``cwd`` with exactly ``env`` (and
    the ``PWD`` it sets), or None if a shell cannot be told so (see the module docstring)."""
    if not argv or argv[0].startswith("-"):
        return None
    for name in env:
        if not _NAME.fullmatch(name) or name in _SHELL_NAMES or name.startswith(_SHELL_PREFIXES):
            return None
    lines = ["{", f"cd -P -- {shlex.quote(str(cwd))} || exit 2", "unset OLDPWD"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    lines += [f"exec {' '.join(shlex.quote(arg) for arg in argv)} </dev/null", "}\n"]
    text = os.fsencode("\n".join(lines))
    if b"\0" in text or len(text) > SCRIPT_MOST:
        return None
    return text


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
    #: whether it has been told to move into its cgroup (``_ENTER``): a replacement started
    #: while a build runs is told once that build's own cgroup is gone (``Standby.enter``).
    entered: bool = False

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
        (then it is discarded: give it back with ``Standby.drop``)."""
        # (not told to move yet: it moves first, and the command waits for that)
        text = self.script if self.entered else _ENTER + self.script
        try:
            # non-blocking: a socket takes up to its buffer at once (over 100 KiB here;
            # SCRIPT_MOST is less), and what takes less (a smaller buffer) fails the shell
            written = os.write(self.stdin, text)
        except OSError:  # BrokenPipeError, BlockingIOError
            written = -1
        os.close(self.stdin)
        self.stdin = -1
        if written == len(text):
            return True
        self.discard()
        return False

    def enter(self) -> None:
        """Tell it to move into its cgroup now (a failure shows when it is taken)."""
        if not self.entered and self.stdin >= 0:
            self.entered = True
            with contextlib.suppress(OSError):
                os.write(self.stdin, _ENTER)

    def containment(self, marker: str) -> Containment:
        return Containment(marker, self.cgroup)

    def discard(self) -> None:
        """End it if it has not run a command (SIGKILL through its pidfd: never another
        process) and close what of its pipes and pidfd it still holds.  Reaping it and its
        cgroup are left to the caller (``Standby.drop``)."""
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
            "builds start without shells standing by (builder/standby.py): a build of this "
            "builder's user could reach them (no --sandbox, not root)"
        )
        return None
    return Standby(min(max_jobs, STANDBY_MOST), parent, contain.owner_tag(builds))


def out_of_reach(sandboxed: bool) -> bool:
    """Whether a build can do nothing to a shell standing by that it cannot do already to
    anything: it runs in a sandbox (its own PID namespace, and no cgroup file system: it sees
    none of the builder's processes or cgroups), or as root (the builder is root, and so are
    its builds).  Otherwise a build of the builder's user could stop a shell, freeze or empty
    its cgroup, or trace it, and so reach a build that starts after its own has ended (a
    stricter ``ptrace_scope`` would stop only the last)."""
    return sandboxed or os.geteuid() == 0


class Standby:
    """Up to ``size`` shells standing by under ``parent`` (the builder's cgroup), named after
    ``owner`` (``contain.owner_tag`` of the builds directory), so a builder restarted on the
    same work dir removes what a killed one left (see the module docstring).  Its methods are
    called on the event loop."""

    def __init__(self, size: int, parent: Path, owner: str) -> None:
        self.size = size
        self.parent = parent
        self.owner = owner
        #: oldest first: the first taken has surely moved into its cgroup.
        self._ready: collections.deque[Shell] = collections.deque()
        #: shells ended and not reaped yet, their pids still tracked (so no subreaper's
        #: ``waitpid`` takes them) and their cgroups still there (``_tidy``).
        self._ending: list[Shell] = []
        self._closed = False
        #: after a shell could not be started, no other is tried before this (monotonic).
        self._retry_at = 0.0
        #: shells started, and taken by builds, so far.
        self.started = 0
        self.taken = 0

    def take(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> Shell | None:
        """A shell to run ``argv`` in ``cwd`` with ``env`` (``Shell.run``); None: start it the
        usual way.  No cgroup is touched here (a ``rmdir`` could wait on the kernel's lock)."""
        text = script(argv, cwd, env)
        if text is None:
            return None
        while self._ready:
            shell = self._ready.popleft()
            why = shell.untouched()
            if not why:
                self.taken += 1
                shell.script = text
                return shell
            log.warning("a shell standing by for builds (pid %d) %s", shell.pid, why)
            self.drop(shell)
        return None

    def fill(self, enter: bool = True) -> None:
        """Start shells until ``size`` stand by (a ``mkdir`` and a ``vfork`` each), and remove
        the cgroups of those ended since; each moves into its cgroup at once if ``enter``,
        else when told (``enter``).  A ``mkdir`` waits while any process's cold move holds the
        kernel's cgroup lock (a shell told to move as the last build ended, say); with
        ``enter=False`` the shells started here add no such move while builds run.  A shell
        that cannot be started is logged, and none is tried for ``FILL_RETRY`` seconds: builds
        start the usual way meanwhile."""
        self._tidy()
        if time.monotonic() < self._retry_at:
            return
        while not self._closed and len(self._ready) < self.size:
            try:
                shell = self._start(enter)
            except OSError as exc:
                log.warning(
                    "cannot start a shell standing by for builds (trying again in %g s): %s",
                    FILL_RETRY,
                    exc,
                )
                self._retry_at = time.monotonic() + FILL_RETRY
                return
            self._ready.append(shell)
            self.started += 1

    def enter(self) -> None:
        """Tell the shells not yet told to move into their cgroups.  A cold move holds the
        kernel's cgroup lock for the grace period, and the event loop removes a build's cgroup
        when it ends: a replacement started while a build runs moves once it has ended."""
        for shell in list(self._ready):
            shell.enter()

    def close(self) -> None:
        """End every shell standing by and remove its cgroup (each exits at once: blocking
        only for as long as that takes, bounded)."""
        self._closed = True
        for shell in self._ready:
            shell.discard()
        ending = [*self._ready, *self._ending]
        self._ready.clear()
        self._ending = []
        for shell in ending:
            with contextlib.suppress(subprocess.TimeoutExpired):
                shell.popen.wait(timeout=1.0)
            if shell.popen.returncode is not None:
                contain.untrack_main(shell.pid)
            with contextlib.suppress(OSError):
                shell.cgroup.rmdir()

    def _start(self, enter: bool) -> Shell:
        cgroup = self.parent / f"{CGROUP_PREFIX}{self.owner}-standby-{uuid.uuid4().hex[:8]}"
        cgroup.mkdir()
        try:
            # stdin a socket, not a pipe: a process of the same user can open another's pipe
            # through /proc/<pid>/fd (and so write into the next build's script), not a socket
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.setblocking(False)  # the script never waits for the shell (``Shell.run``)
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
                if enter:
                    shell.entered = True
                    os.write(stdin, _ENTER)
            except OSError:
                self.drop(shell)  # (and its cgroup with it, once it has exited)
                raise
        except BaseException:
            with contextlib.suppress(OSError):
                cgroup.rmdir()  # fails while a killed shell is still in it: then left over
            raise
        return shell

    def drop(self, shell: Shell) -> None:
        """End ``shell`` (taken and not run, dead, or unusable); it is reaped and its cgroup
        removed (unless a build's containment did) once it has exited (``_tidy``)."""
        shell.discard()
        self._ending.append(shell)

    def _tidy(self) -> None:
        """Reap the ended shells that have exited (never waiting), stop tracking their pids
        only then, and remove their cgroups (a killed process leaves its cgroup a moment
        later, and the kernel refuses to remove it until then)."""
        ending = []
        for shell in self._ending:
            if shell.popen.poll() is None:
                ending.append(shell)
                continue
            contain.untrack_main(shell.pid)
            with contextlib.suppress(OSError):
                shell.cgroup.rmdir()
        self._ending = ending
