"""Facts about this machine used as defaults (system type, hostname)."""

from __future__ import annotations

import fcntl
import platform
import resource
import socket
from pathlib import Path
from typing import IO


def default_system() -> str:
    """Nix-style system double of this machine, e.g. ``x86_64-linux``."""
    machine = platform.machine().lower() or "unknown"
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return f"{machine}-{platform.system().lower() or 'unknown'}"


def default_hostname() -> str:
    return socket.gethostname() or "localhost"


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the new one.

    Every builder connection, log being written and upload in flight holds a descriptor, and
    the common soft default (1024) is far below what a busy runner needs, while the hard limit
    (often 512k or more) is not.  Servers such as nginx and PostgreSQL do the same.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit we have
    return soft


def lock_dir(directory: Path) -> IO[bytes] | None:
    """Take ``directory``'s single-instance lock (its file ``lock``, created with the
    directory if need be) without waiting.  Returns the open file, which holds the lock until
    it is closed, or None when another process holds it.  Blocking: call through a thread."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = (directory / "lock").open("a+b")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock
