"""``--sandbox``: each build in its own namespaces, through bubblewrap (``bwrap``).

A sandboxed build's command runs as ``bwrap <mounts> -- COMMAND``: in new mount, PID, IPC,
UTS, cgroup and network namespaces (and a user namespace where the kernel allows one), with
a root file system that holds only

- the system's programs, libraries and the few ``/etc`` files they need (``DEFAULT_PATHS``),
  read-only, and the operator's ``--sandbox-path PATH[=INSIDE]`` (read-only too);
- the build's own directory (``work``, ``out``, ``tmp`` writable, ``in`` read-only) at the
  same path as outside, so ``HOME``, ``TMPDIR``, ``OUT`` and ``IN`` mean the same inside;
- a fresh ``/proc`` (its own PID namespace: it sees its own processes only), a minimal
  ``/dev`` and an empty ``/tmp``.

So a build sees neither the builder's work dir (the input cache, other builds, the machine
id) nor the token file, nor other processes.  Its network namespace has only a loopback
interface of its own, unless the build asks for the network (``Assign.network``) and the
builder allows it (``--sandbox-allow-network``): then it shares the builder's.

Containment is unchanged: ``bwrap`` is the build's main process, in the build's cgroup;
``--die-with-parent`` and the PID namespace (its init dies, the kernel kills the rest) end
everything inside when ``bwrap`` is killed.  ``bwrap`` runs as the builder's user, not
setuid: a builder running as root gets user namespaces anyway; an unprivileged one needs
unprivileged user namespaces.  Run as another (build) user, the same argv works unchanged
(tried: ``setpriv --reuid=65534 bwrap ...`` runs the command as 65534, no capabilities), so
per-build users compose with the sandbox by starting ``bwrap`` as the build's user.

Cost: starting ``true`` in a sandbox took 11 ms (median of 30; 15 ms with the network
shared) against 0.7 ms unsandboxed, on the project's 2-core VM at load 4: small beside a
build's round trip, so nothing is pooled or cached but the default mounts.

Linux only; ``Sandbox.check`` runs a trivial sandboxed command at start, so a builder that
cannot sandbox refuses to start (one line) instead of failing every build.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from hydra_trio.builder.builddir import SUBDIRS, BuildDir
from hydra_trio.protocol.errors import HydraTrioError

#: What every sandbox holds, read-only, where it exists on the machine: programs, libraries
#: and the ``/etc`` files that name services, the dynamic linker, ``/etc/alternatives``
#: programs, time zones and TLS need.  No user data, no ``/etc/shadow``, no ``/home``,
#: ``/root``, ``/var`` or ``/run``.  A top-level link (``/bin -> usr/bin`` on a merged-usr
#: system) is recreated as the same link.
DEFAULT_PATHS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/localtime",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/mime.types",
)

#: How long the start-up check may take (a loaded machine: generous).
CHECK_TIMEOUT = 30.0


class SandboxError(HydraTrioError):
    """This machine cannot sandbox builds (one line saying why and what to do)."""


@attrs.frozen
class SandboxPath:
    """A path the operator lets builds read (``--sandbox-path PATH[=INSIDE]``)."""

    source: Path
    inside: Path

    @classmethod
    def parse(cls, text: str) -> SandboxPath:
        """``PATH`` or ``PATH=INSIDE``, both absolute; ValueError says what is wrong."""
        source, _, inside = text.partition("=")
        inside = inside or source
        for each in (source, inside):
            if not os.path.isabs(each):
                raise ValueError(f"{text}: give absolute paths (PATH or PATH=INSIDE)")
        return cls(Path(os.path.normpath(source)), Path(os.path.normpath(inside)))


@attrs.frozen(kw_only=True)
class Sandbox:
    """How this builder sandboxes builds: ``argv`` wraps one build's command."""

    #: the ``bwrap`` program.
    bwrap: str = "bwrap"
    #: the operator's paths, after ``DEFAULT_PATHS``.
    paths: tuple[SandboxPath, ...] = ()
    #: builds that ask for the network get it (``--sandbox-allow-network``).
    allow_network: bool = False

    def mounts(self) -> list[str]:
        """The ``bwrap`` arguments that make a build's root file system, without its own
        directory (the same for every build)."""
        args = list(_default_mounts())
        for extra in self.paths:
            args += ["--ro-bind", str(extra.source), str(extra.inside)]
        return args

    def argv(
        self, command: Sequence[str], build_dir: BuildDir, cwd: Path, *, network: bool = False
    ) -> list[str]:
        """``command`` run in the sandbox of ``build_dir``, starting in ``cwd``; with
        ``network`` (only if allowed: the caller checks) in the builder's network namespace."""
        path = str(build_dir.path)
        return [
            self.bwrap,
            "--unshare-all",
            *(["--share-net"] if network else []),
            "--die-with-parent",
            "--new-session",  # no ioctl(TIOCSTI) into a terminal outside
            # a builder running as root would otherwise give its builds every capability
            # in their user namespace (mount, mknod, ...); unprivileged, this is the default
            "--cap-drop",
            "ALL",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            *self.mounts(),
            "--bind",
            path,
            path,
            "--ro-bind",
            str(build_dir.inputs),
            str(build_dir.inputs),
            "--chdir",
            str(cwd),
            "--",
            *command,
        ]

    def check(self) -> None:
        """Raise ``SandboxError`` unless a trivial command runs in a sandbox here (blocking:
        call from a thread).  Checks each ``--sandbox-path`` exists first."""
        if not sys.platform.startswith("linux"):
            raise SandboxError(
                f"--sandbox needs Linux namespaces; this is {sys.platform}: run without "
                "--sandbox (docs/security.md says what a build can reach then)"
            )
        for extra in self.paths:
            if not extra.source.exists():
                raise SandboxError(f"--sandbox-path {extra.source}: no such file or directory")
        program = shutil.which(self.bwrap)
        if program is None:
            raise SandboxError(
                f"--sandbox needs bubblewrap ({self.bwrap!r} is not on PATH): install it "
                "(Debian: apt-get install bubblewrap)"
            )
        with tempfile.TemporaryDirectory(prefix="hydra-trio-sandbox-check-") as tmp:
            build_dir = BuildDir(Path(tmp), 0o755)
            for sub in SUBDIRS:
                (build_dir.path / sub).mkdir()
            argv = self.argv(TRIAL_COMMAND, build_dir, build_dir.work)
            argv[0] = program
            try:
                why = run_trial(argv, CHECK_TIMEOUT)
            except (OSError, subprocess.SubprocessError) as exc:
                raise SandboxError(f"--sandbox: cannot run {program}: {exc}") from None
        if why is not None:
            raise SandboxError(
                f"--sandbox: {program} cannot make a sandbox here ({why}); are user "
                "namespaces allowed (sysctl kernel.unprivileged_userns_clone=1), or run "
                "without --sandbox"
            )

    def check_hidden(self, hidden: Sequence[tuple[str, Path]]) -> None:
        """Raise ``SandboxError`` if a path every sandbox shows holds one of ``hidden``
        (``(what, path)``: the work dir, the token file), which builds would then read."""
        shown = [(path, f"{path} (which every sandbox shows)") for path in DEFAULT_PATHS]
        shown += [(str(p.source), f"--sandbox-path {p.source}") for p in self.paths]
        for what, path in hidden:
            real = Path(os.path.realpath(path))
            for source, named in shown:
                if os.path.lexists(source) and real.is_relative_to(os.path.realpath(source)):
                    raise SandboxError(
                        f"--sandbox: the {what} {path} is under {named}: builds would read "
                        "it; move it elsewhere (or give a narrower --sandbox-path)"
                    )


@functools.cache
def _default_mounts() -> tuple[str, ...]:
    """The ``bwrap`` arguments for ``DEFAULT_PATHS`` on this machine (looked up once: a few
    ``stat`` calls that would otherwise be on the event loop for every build)."""
    args: list[str] = []
    for path in DEFAULT_PATHS:
        if os.path.islink(path) and os.path.dirname(path) == "/":
            args += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            args += ["--ro-bind", path, path]
    return tuple(args)


#: What the start-up checks run in a sandbox.
TRIAL_COMMAND = ("sh", "-c", "exit 0")


def run_trial(argv: Sequence[str], timeout: float, **options: Any) -> str | None:
    """Run a start-up check's sandboxed command (blocking): None if it exited 0, else why not
    (the last line of its stderr, or its exit status).  ``options`` go to ``subprocess.run``
    (the user to run as); raises ``OSError`` or ``SubprocessError`` as it does."""
    ran = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
        **options,
    )
    if ran.returncode == 0:
        return None
    lines = ran.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {ran.returncode}"
