"""What the runner's dependencies are doing to it: the database and the disk.

Theory of operation
-------------------
A dependency fault fails only the thing it concerns: a full disk truncates the log being
written or fails the upload being received, a lost database connection holds writes until it
is back.  None of them ends a builder's session or the runner.  But each must be visible to
the operator, or a farm silently degrades: ``Health`` keeps one current warning per
dependency (``/status`` ``warnings``) and a count of faults per kind (``/metrics``
``hydra_trio_dependency_faults_total{kind}``).  A warning clears itself at the next success of
the same dependency (the database committed a batch, a log or output write went through).

Faults are reported from worker threads (the disk writes happen there) as well as from the
event loop, so the state is guarded by a lock; every method is a few dict operations.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import Counter

import attrs

#: The kinds of fault counted, each the ``kind`` label of the metric:
FAULT_KINDS = (
    #: a write to the database failed (connection lost, database unreachable or full).
    "database",
    #: a build log could not be written (disk full or failing): the log was truncated.
    "logs",
    #: an uploaded output could not be written or kept: the build is ``upload-failed``.
    "outputs",
)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, or SQLite's way of saying it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "disk is full" in str(exc) or "No space left" in str(exc)


@attrs.frozen
class Problem:
    """One dependency's current problem, for ``/status``."""

    #: ``database``, ``logs`` or ``outputs``.
    kind: str
    message: str
    #: wall-clock time (``time.time()``) of the first fault of this episode.
    since: float
    #: the disk (or the database's disk) is full: submissions answer 507, not 503.
    disk_full: bool

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "message": self.message,
            "since": self.since,
            "diskFull": self.disk_full,
        }


@attrs.define(eq=False)
class Health:
    faults: Counter[str] = attrs.field(factory=Counter)
    _warnings: dict[str, Problem] = attrs.field(factory=dict)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def fault(self, kind: str, message: str, exc: BaseException | None = None) -> None:
        """Count a fault of ``kind`` and make ``message`` its current warning."""
        assert kind in FAULT_KINDS, kind
        full = exc is not None and is_disk_full(exc)
        with self._lock:
            self.faults[kind] += 1
            old = self._warnings.get(kind)
            since = old.since if old is not None else time.time()
            self._warnings[kind] = Problem(kind, message, since, full)

    def ok(self, kind: str) -> None:
        """``kind`` works again: its warning goes."""
        if kind in self._warnings:  # the common case, lock-free: nothing to clear
            with self._lock:
                self._warnings.pop(kind, None)

    def warning(self, kind: str) -> Problem | None:
        return self._warnings.get(kind)

    def warnings(self) -> list[Problem]:
        with self._lock:
            return sorted(self._warnings.values(), key=lambda w: w.kind)
