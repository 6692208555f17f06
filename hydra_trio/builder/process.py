"""A build's command as a child process in its own process group, under the build's limits.

``run_command`` starts ``assign.command``, forwards its merged stdout and stderr as
``LogChunk``s, and enforces ``timeout`` (wall clock), ``max_silent`` (no output) and
``max_log_bytes``.  Each limit stops the process with its own status.  Everything the command
starts is in the build's ``Containment`` (its own cgroup, else the subreaper's tree, see
``contain``): when the command exits, what it left running has ``LINGER`` seconds to end by
itself and is then killed, and the log is read for at most ``LINGER`` more, so a background
child (in the process group or out of it with ``setsid``) can neither hold the log pipe open
nor outlive its build.  A timeout, a cancel (an ``Abort``, the connection lost) and the end
of the build kill the whole containment.  How the command itself is stopped first is the
caller's: SIGKILL of the group by default, an interrupt for ``nix-store`` (see ``nixexec``).
Killing a containment blocks (see ``contain``): it runs in a thread, never on the loop, unless
nothing of the build runs any more (``kill_quick``, ``close_quick``: a few system calls).  On
Linux the command itself is started on the loop (``_Child``: a ``vfork`` that returns once the
child has executed, cheaper than the thread hop ``trio.run_process`` makes for it); with a
``preexec_fn`` (a build user), or elsewhere, through ``trio.run_process``.

With a build user (``buildusers``), the command enters its cgroup as the builder and then
becomes that user, and when it ends every process of that user is killed too (a build user
runs nothing else), before the caller reads ``$OUT``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

import attrs
import trio

from hydra_trio.builder import contain
from hydra_trio.builder.attempt import Send
from hydra_trio.builder.buildusers import BuildUser, kill_uid
from hydra_trio.builder.contain import MARKER_VARIABLE, Containment
from hydra_trio.builder.standby import Shell, Standby
from hydra_trio.protocol.messages import Assign, BuildStatus, LogChunk

#: Log bytes per LogChunk frame at most (a read returns what the pipe has, up to this).
LOG_CHUNK = 64 * 1024
#: Seconds the output read is held for more before it goes out as one LogChunk (unless
#: LOG_CHUNK bytes come first).  A command that prints a line at a time made a frame a line:
#: 5,000 lines over 1.5 s cost the runner 1.2 s of CPU (a thread hop and a file append per
#: frame); held 50 ms, at most 20 frames a second, and the live log lags by as much.
LOG_LINGER = 0.05

#: Seconds what a command left running has to end by itself after it exited (then it is
#: killed), and then the most the log is still read.
LINGER = 1.0


class Started(Protocol):
    """A build's main process, as this module and ``deliver_cancel`` use it: a
    ``trio.Process``, or a ``_Child`` (started on the event loop)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def stdout(self) -> trio.abc.ReceiveStream | None: ...

    async def wait(self) -> int: ...


#: Stops a process when its build is cancelled or its wall-clock limit passes.
DeliverCancel = Callable[[Started], Awaitable[object]]
#: Stops a process (by pid) when its log or silence limit is hit.
Stop = Callable[[int], None]


@attrs.frozen
class Outcome:
    """How a command ended: its status, exit status (None if it never exited by itself) and
    the error the result reports ("" for success)."""

    status: BuildStatus
    exit_code: int | None
    error: str = ""


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (gone already, or not ours: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def kill_on_cancel(process: Started) -> None:
    kill_group(process.pid)


async def run_command(
    assign: Assign,
    cwd: Path,
    env: dict[str, str],
    send: Send,
    deliver_cancel: DeliverCancel = kill_on_cancel,
    stop: Stop = kill_group,
    *,
    argv: Sequence[str] | None = None,
    user: BuildUser | None = None,
    standby: Standby | None = None,
) -> Outcome:
    """Run ``assign.command`` in ``cwd`` under its limits, as ``user`` if given (else as the
    builder).  ``deliver_cancel`` stops it when the build is cancelled or the wall-clock
    limit passes, ``stop(pid)`` when the log or silence limit does (by default both SIGKILL
    its process group); then, and whenever the command ends, everything it started is
    killed (and with ``user``, everything running as ``user``).  ``argv``: what to execute
    instead of the bare command (the command wrapped in its sandbox,
    ``sandbox.Sandbox.argv``).  ``standby``: shells standing by in cgroups of their own, one
    of which runs the command if it can (``standby``), without ``user`` only."""
    marker = env.get(MARKER_VARIABLE) or str(cwd.parent)
    env = {**env, MARKER_VARIABLE: marker}
    argv = list(assign.command if argv is None else argv)
    shell = standby.take(argv, cwd, env) if standby is not None and user is None else None
    if shell is not None:
        containment = shell.containment(marker)
    else:
        containment = Containment.create(marker, cwd.parent.name)  # a mkdir: on the loop
    try:
        return await _run_contained(
            assign, argv, cwd, env, send, deliver_cancel, stop, containment, user, standby, shell
        )
    finally:
        with trio.CancelScope(shield=True):
            if not containment.close_quick():  # nothing left running: no thread hop
                await trio.to_thread.run_sync(containment.close)
            if user is not None:
                await trio.to_thread.run_sync(kill_uid, user)
            if standby is not None:  # this build's cgroup is gone: its replacement may move
                standby.enter()


async def _run_contained(
    assign: Assign,
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    send: Send,
    deliver_cancel: DeliverCancel,
    stop: Stop,
    containment: Containment,
    user: BuildUser | None,
    standby: Standby | None = None,
    shell: Shell | None = None,
) -> Outcome:
    timeout = assign.limits.timeout if assign.limits.timeout is not None else math.inf
    limited: Outcome | None = None
    process: Started | None = None
    child: _Child | None = None
    start_error: OSError | None = None

    async def cancel(process: Started) -> None:
        try:
            await deliver_cancel(process)
        finally:
            await trio.to_thread.run_sync(containment.kill)

    async def stop_all(pid: int) -> None:
        stop(pid)
        await trio.to_thread.run_sync(containment.kill)

    def enter() -> None:  # in the child: the cgroup needs the builder's rights, then drop them
        containment.enter()
        if user is not None:
            user.drop()

    preexec_fn: Callable[[], None] | None = enter
    if user is None:  # no preexec_fn: it makes subprocess fork the builder (Containment.wrap)
        wrapped = containment.wrap(argv)
        if wrapped != argv:
            start_error = _missing(argv[0], cwd, env)
        argv, preexec_fn = wrapped, None
    try:
        with trio.move_on_after(timeout) as wall:
            async with trio.open_nursery() as nursery:
                try:
                    if start_error is not None:  # as subprocess would have raised it
                        raise start_error
                    with contain.spawning():
                        if shell is not None and shell.run():
                            process = child = _Child.standing_by(shell)
                            nursery.start_soon(_supervise, child, cancel)
                        elif preexec_fn is None and SPAWN_ON_LOOP:
                            process = child = _Child.spawn(argv, cwd, env)
                            nursery.start_soon(_supervise, child, cancel)
                        else:
                            process = await nursery.start(
                                functools.partial(
                                    trio.run_process,
                                    argv,
                                    cwd=str(cwd),
                                    env=env,
                                    stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT,
                                    start_new_session=True,
                                    preexec_fn=preexec_fn,
                                    check=False,
                                    deliver_cancel=cancel,
                                )
                            )
                        assert process is not None
                        contain.track_main(process.pid)
                        containment.started(process.pid)
                except (OSError, subprocess.SubprocessError) as exc:  # could not be started
                    start_error = exc if isinstance(exc, OSError) else OSError(str(exc))
                else:
                    assert process is not None
                    if standby is not None:  # a replacement, moved once this build ends
                        standby.fill(enter=False)
                    reading = trio.CancelScope()
                    nursery.start_soon(_end_with_main, process, containment, reading)
                    limited = await _stream_log(process, assign, send, stop_all, reading)
    finally:  # also when the build is cancelled from outside (an Abort)
        if process is not None:
            contain.untrack_main(process.pid)
        if child is not None:
            child.close()
        if shell is not None and (child is None or child.popen is not shell.popen):
            assert standby is not None
            standby.drop(shell)  # taken, but it did not run the command
    if start_error is not None:
        return await _not_started(assign, send, start_error)
    if wall.cancelled_caught:
        return Outcome(BuildStatus.TIMED_OUT, None, f"timed out after {timeout:g} s")
    assert process is not None
    code = process.returncode
    if limited is not None:
        return attrs.evolve(limited, exit_code=code)
    if code == 0:
        return Outcome(BuildStatus.SUCCESS, 0)
    return Outcome(BuildStatus.BUILD_FAILED, code, f"exit status {code}")


@attrs.define(eq=False)
class _Child:
    """A command started on the event loop (Linux, no ``preexec_fn``): ``subprocess`` starts
    it with ``vfork``, which returns once the child has executed, about 0.2 ms of the
    builder's CPU against 0.4 ms through the worker thread ``trio.run_process`` uses (the
    hop, a GIL handoff each way, costs more than the fork; issue 22).  Its merged output is
    ``stdout``; it is waited for through a pidfd."""

    popen: subprocess.Popen[bytes]
    stdout: trio.lowlevel.FdStream
    pidfd: int
    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)

    @classmethod
    def spawn(cls, argv: Sequence[str], cwd: Path, env: dict[str, str]) -> _Child:
        """Start ``argv`` in its own session, its stdout and stderr on one pipe (raises
        ``OSError`` or ``SubprocessError`` as ``subprocess.Popen`` does, and ``OSError`` if
        no pidfd can be had for it, once it is killed and reaped)."""
        read, write = os.pipe()
        try:
            popen = subprocess.Popen(
                argv,
                cwd=str(cwd),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=write,
                stderr=write,
                start_new_session=True,
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        try:
            pidfd = _pidfd_open(popen.pid)
        except OSError:  # out of file descriptors: it cannot be waited for on the loop
            os.close(read)
            kill_group(popen.pid)
            popen.wait()  # killed: at once
            raise
        return cls(popen, trio.lowlevel.FdStream(read), pidfd)

    @classmethod
    def standing_by(cls, shell: Shell) -> _Child:
        """The command ``shell`` runs now that it has its script (``Shell.run``)."""
        output, pidfd = shell.hand_over()
        return cls(shell.popen, trio.lowlevel.FdStream(output), pidfd)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        """Wait until it exits (any number of tasks at once) and reap it."""
        async with self._lock:
            if self.popen.returncode is None:
                await trio.lowlevel.wait_readable(self.pidfd)
                self.popen.wait()  # it has exited: reaps it at once
        assert self.popen.returncode is not None
        return self.popen.returncode

    def close(self) -> None:
        """Close its pipe and pidfd (once nothing waits for them)."""
        self.stdout.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _pidfd_open(pid: int) -> int:
    if sys.platform == "linux":
        return os.pidfd_open(pid)
    raise OSError(errno.ENOSYS, "no pidfds here")  # not called: SPAWN_ON_LOOP is False


def _pidfds_work() -> bool:
    """Whether this kernel (and Python) give pidfds (Linux 5.3 and later)."""
    try:
        os.close(_pidfd_open(os.getpid()))
    except (OSError, AttributeError):
        return False
    return True


#: Start a build's command on the event loop (``_Child``) unless it needs a ``preexec_fn``:
#: on Linux with pidfds.
SPAWN_ON_LOOP = sys.platform == "linux" and _pidfds_work()


async def _supervise(child: _Child, deliver_cancel: DeliverCancel) -> None:
    """What ``trio.run_process`` does for a process it started: wait for it to exit, and if
    cancelled meanwhile, ``deliver_cancel`` it and still wait until it has exited."""
    try:
        await child.wait()
    except BaseException:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                killer = trio.CancelScope(shield=True)

                async def kill() -> None:
                    with killer:
                        await deliver_cancel(child)

                nursery.start_soon(kill)
                await child.wait()
                killer.cancel()
        raise


def _missing(program: str, cwd: Path, env: dict[str, str]) -> OSError | None:
    """Why ``program`` cannot be executed, as ``subprocess`` would say it (it raises before
    the child runs; through ``Containment.wrap`` the shell would say it instead), or None.
    A few ``stat`` calls: on the event loop."""
    if "/" in program:
        path = cwd / program
        if not path.exists():
            return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if path.is_dir() or not os.access(path, os.X_OK):
            return PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
        return None
    if not _on_path(program, env.get("PATH", os.defpath)):
        return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    return None


#: Where ``shutil.which`` last found a program on a PATH (``_on_path``), at most ``_FOUND_MOST``.
_FOUND: dict[tuple[str, str], str] = {}
_FOUND_MOST = 256


def _on_path(program: str, path: str) -> bool:
    """Whether ``program`` is an executable file in a directory of ``path``, as
    ``shutil.which`` says; looked up once per program and PATH, then only checked where it was
    found (``shutil.which`` takes a ``stat`` per directory, ~50 us a build on a long PATH).
    Only whether it exists matters here: the shell looks it up again to execute it."""
    key = (program, path)
    found = _FOUND.get(key)
    if found is not None:
        if os.access(found, os.X_OK) and not os.path.isdir(found):
            return True
        del _FOUND[key]
    found = shutil.which(program, path=path)
    if found is None:
        return False
    if len(_FOUND) >= _FOUND_MOST:
        _FOUND.clear()
    _FOUND[key] = found
    return True


async def _not_started(assign: Assign, send: Send, exc: OSError) -> Outcome:
    """A command that could not be started fails its build as a shell's would (127), with
    why in the log."""
    message = f"cannot run {assign.command[0]!r}: {exc.strerror or exc}\n"
    await send(LogChunk(build_id=assign.build_id, attempt=assign.attempt, data=message.encode()))
    return Outcome(BuildStatus.BUILD_FAILED, 127, message.strip())


async def _end_with_main(
    process: Started, containment: Containment, reading: trio.CancelScope
) -> None:
    """When the command exits, what it left running has ``LINGER`` seconds to end by itself,
    then it is killed; the log is read for ``LINGER`` more at most, so a descendant that
    escaped even the kill cannot hold the log pipe open (the build never hangs on it)."""
    await process.wait()
    containment.main_exited()
    with trio.move_on_after(LINGER):
        await _until_empty(containment)
    if not containment.kill_quick():
        await trio.to_thread.run_sync(containment.kill)
    reading.deadline = trio.current_time() + LINGER


async def _until_empty(containment: Containment) -> None:
    """Return once none of the build's processes runs (polled: a cgroup's ``populated`` is a
    small file read, on the loop; the fallback's a walk of the builder's descendants, in a
    thread)."""
    for _ in itertools.count():
        if containment.cgroup is not None:
            populated = containment.populated()
        else:
            populated = await trio.to_thread.run_sync(containment.populated)
        if not populated:
            return
        await trio.sleep(0.02)


async def _stream_log(
    process: Started,
    assign: Assign,
    send: Send,
    stop: Callable[[int], Awaitable[None]],
    reading: trio.CancelScope,
) -> Outcome | None:
    """Forward the merged stdout/stderr as LogChunks until EOF, enforcing ``max_silent`` and
    ``max_log_bytes``.  Returns how the build ended if a limit was hit (its exit status yet
    unknown), else None."""
    assert process.stdout is not None
    stdout = process.stdout
    limits = assign.limits
    max_silent = limits.max_silent if limits.max_silent is not None else math.inf
    max_log = limits.max_log_bytes
    log_bytes = 0
    # (held for less than max_silent, so that what was read goes out before silence ends it)
    linger = min(LOG_LINGER, max_silent / 2)
    #: read and not yet sent (``linger``), and when it goes out at the latest
    held: list[bytes] = []
    held_size = 0
    send_at = math.inf

    async def send_held() -> None:
        nonlocal held, held_size, send_at
        data = held[0] if len(held) == 1 else b"".join(held)
        held, held_size, send_at = [], 0, math.inf
        await send(LogChunk(build_id=assign.build_id, attempt=assign.attempt, data=data))

    with trio.CancelScope(deadline=trio.current_time() + max_silent) as silence:
        with reading:
            while True:
                data: bytes | bytearray = b""
                with trio.move_on_at(send_at) as lingering:  # (cancelled, a read loses nothing)
                    data = await stdout.receive_some(LOG_CHUNK - held_size)
                if lingering.cancelled_caught:
                    await send_held()
                    continue
                if not data:
                    break
                silence.deadline = trio.current_time() + max_silent
                over = max_log is not None and log_bytes + len(data) > max_log
                if over:
                    assert max_log is not None
                    data = data[: max_log - log_bytes]
                log_bytes += len(data)
                if data:
                    if not held:
                        send_at = trio.current_time() + linger
                    held.append(bytes(data))
                    held_size += len(data)
                if held and (over or held_size >= LOG_CHUNK):
                    await send_held()
                if over:
                    await stop(process.pid)
                    return Outcome(
                        BuildStatus.LOG_LIMIT_EXCEEDED, None, f"log exceeded {max_log} bytes"
                    )
        if held:  # read before the end of the output (or before reading was given up)
            await send_held()
        # Closing stdout and stderr does not escape max_silent: a command that does and then
        # hangs is still silent.
        await process.wait()
    if silence.cancelled_caught:
        await stop(process.pid)
        return Outcome(BuildStatus.SILENT_TOO_LONG, None, f"no output for {max_silent:g} s")
    return None
