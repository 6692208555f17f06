"""Facts about this machine used as defaults (system type, hostname)."""

from __future__ import annotations

import fcntl
import gc
import platform
import resource
import socket
import sys
from pathlib import Path
from typing import IO


def default_system() -> str:
    """Nix-style system double of this machine, e.g. ``x86_64-linux``."""
    machine = platform.machine().lower() or "unknown"
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return f"{machine}-{platform.system().lower() or 'unknown'}"


def default_hostname() -> str:
    return socket.gethostname() or "localhost"


#: Allocations (net, of container objects) between two collections of the youngest generation:
#: Python's default, 700, makes a runner with 2,000 builders collect hundreds of times a second.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> tuple[int, int, int]:
    """Set up the cycle collector for a long-running daemon; returns the thresholds.

    Everything alive now (modules, classes, the configuration) is moved out of the collector's
    sight for good (``gc.freeze``): nothing of it is ever garbage, and every full collection
    would walk it again.  The youngest generation is collected every ``GC_YOUNG_THRESHOLD``
    allocations instead of every 700 (the older two keep their ratios, 10 and 10).  Measured
    with 2,000 builders pinging once a second (docs/performance.md): the runner's CPU from 45 %
    to 35 % of a core, and collections pausing the loop for more than 5 ms during a reconnect
    storm from 115 to 37.  Called once by the daemons' command line, not by embedders.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    return gc.get_threshold()


#: Seconds a thread holding the GIL runs before one waiting for it gets it (CPython: 5 ms).
SWITCH_INTERVAL = 0.001


def tune_switch_interval() -> float:
    """Hand the GIL over every ``SWITCH_INTERVAL`` instead of every 5 ms; returns it.

    A worker thread doing many small blocking calls (creating 100,000 output files, each an
    open, a write and a close) releases the GIL for each and must take it back after: while
    the event loop's thread is busy (decoding the frames that bring those files), each take
    waits up to the interval.  At 5 ms a small file took 13 ms to create beside a busy
    thread instead of 0.6 ms (3.4 ms at 1 ms); the event loop waits the same way for the
    GIL after each of its own system calls while a worker computes.  Called once by the
    daemons' command line, not by embedders."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    return sys.getswitchinterval()


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
