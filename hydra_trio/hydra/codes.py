"""Hydra's numeric codes, and where Hydra's web UI looks for a step's log.

Pure: the mapping from hydra-trio's build statuses and phases to the integers Hydra's
``builds.buildstatus``, ``buildsteps.status`` and ``buildsteps.busy`` hold
(``reference/hydra-db-contract.md`` section 4).
"""

from __future__ import annotations

import enum
from pathlib import Path

from hydra_trio.protocol.messages import BuildStatus, Phase


class HydraStatus(enum.IntEnum):
    """``builds.buildstatus`` and ``buildsteps.status``."""

    #: built (a step), or built with all outputs (a build).
    SUCCESS = 0
    #: the builder exited non-zero.
    FAILED = 1
    #: a dependency failed (builds only).
    DEP_FAILED = 2
    #: aborted: an infrastructure failure, a cleared busy step, a drv missing from the store.
    ABORTED = 3
    #: cancelled (the web UI writes it on builds; the runner on the aborted step).
    CANCELLED = 4
    #: ``$out/nix-support/failed`` exists (builds only; the step is a success).
    FAILED_WITH_OUTPUT = 6
    #: the timeout or the max-silent time passed.
    TIMED_OUT = 7
    #: a cached failure (steps only).
    CACHED_FAILURE = 8
    #: no machine supports the system.
    UNSUPPORTED = 9
    #: the log grew past its limit.
    LOG_LIMIT = 10
    #: the outputs grew past their limit.
    OUTPUT_LIMIT = 11


class Busy(enum.IntEnum):
    """``buildsteps.busy``: what a running step does (the schema's comment is stale; these
    are the codes Hydra's runner writes and its web UI shows)."""

    #: finished (any status).
    IDLE = 0
    #: the row was just inserted at dispatch.
    PREPARING = 1
    #: connecting to the builder.
    CONNECTING = 10
    #: the builder fetches the input closure.
    SENDING_INPUTS = 20
    #: Nix builds.
    BUILDING = 30
    #: the builder uploads the output closure.
    RECEIVING_OUTPUTS = 40
    #: the runner imports the outputs.
    POST_PROCESSING = 50


_STEP_STATUS = {
    BuildStatus.SUCCESS: HydraStatus.SUCCESS,
    BuildStatus.BUILD_FAILED: HydraStatus.FAILED,
    BuildStatus.TIMED_OUT: HydraStatus.TIMED_OUT,
    # Nix reports both limits as a timeout; Hydra's runner maps both to TimedOut.
    BuildStatus.SILENT_TOO_LONG: HydraStatus.TIMED_OUT,
    BuildStatus.LOG_LIMIT_EXCEEDED: HydraStatus.LOG_LIMIT,
    BuildStatus.OUTPUT_LIMIT_EXCEEDED: HydraStatus.OUTPUT_LIMIT,
    BuildStatus.DEPENDENCY_FAILED: HydraStatus.DEP_FAILED,
    BuildStatus.BUILDER_LOST: HydraStatus.ABORTED,
    BuildStatus.FETCH_FAILED: HydraStatus.ABORTED,
    BuildStatus.UPLOAD_FAILED: HydraStatus.ABORTED,
    BuildStatus.INTERNAL_ERROR: HydraStatus.ABORTED,
    BuildStatus.CANCELLED: HydraStatus.CANCELLED,
}

_BUSY = {
    None: Busy.CONNECTING,
    Phase.FETCHING: Busy.SENDING_INPUTS,
    Phase.BUILDING: Busy.BUILDING,
    Phase.UPLOADING: Busy.RECEIVING_OUTPUTS,
}


def step_status(status: BuildStatus | None) -> HydraStatus:
    """The ``buildsteps.status`` of an attempt that ended with ``status``."""
    return _STEP_STATUS.get(status, HydraStatus.ABORTED) if status else HydraStatus.ABORTED


def busy_of(phase: Phase | None) -> Busy:
    """The ``buildsteps.busy`` of a running step in ``phase`` (None: just assigned)."""
    return _BUSY[phase]


def build_status(step: HydraStatus, is_top: bool) -> HydraStatus:
    """A build's ``buildstatus`` when a step it needs failed with ``step``: a plain failure
    of a dependency is ``DEP_FAILED``; anything else (a timeout, ...) is passed on as is.
    A cached failure is mapped as the C++ runner did (1 or 2): the web UI has no build label
    for 8."""
    if step is HydraStatus.CACHED_FAILURE:
        step = HydraStatus.FAILED
    if step is HydraStatus.FAILED and not is_top:
        return HydraStatus.DEP_FAILED
    return step


def log_path(hydra_data: Path, drv: str) -> Path:
    """Where Hydra's web UI looks for a step's log: ``build-logs/<2 chars>/<rest>`` of the
    drv's basename under the Hydra data dir."""
    base = drv.rsplit("/", 1)[-1]
    return hydra_data / "build-logs" / base[:2] / base[2:]
