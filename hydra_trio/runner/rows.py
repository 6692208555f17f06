"""Rows of the durable queue: a build or machine as ``Store.save`` writes it and ``Store.load``
reads it back.

A row is made in two steps so the event loop does little: ``build_row``/``machine_row``
snapshot the mutable parts on the trio thread (cheap copies), and ``sql_row``/``sql_machine_row``
encode them (JSON, most of the cost) in the store's worker thread.  ``*_from_row`` is the
inverse, at start-up.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs

from hydra_trio.protocol.messages import BuildStatus, FileInfo
from hydra_trio.runner.journal import Changes
from hydra_trio.runner.model import (
    Build,
    BuildSpec,
    BuildState,
    Machine,
    MachineState,
    json_list,
)


def spec_to_json(spec: BuildSpec) -> str:
    return json.dumps(
        {
            "command": list(spec.command),
            "name": spec.name,
            "system": spec.system,
            "requiredFeatures": sorted(spec.required_features),
            "after": list(spec.after),
            "priority": spec.priority,
            "timeout": spec.timeout,
            "maxSilent": spec.max_silent,
            "env": [list(pair) for pair in spec.env],
            "drv": spec.drv,
            "drvOutputs": [list(pair) for pair in spec.drv_outputs],
            "nixInputs": [attrs.asdict(f) for f in spec.nix_inputs],
        }
    )


def spec_from_json(text: str) -> BuildSpec:
    data = json.loads(text)
    return BuildSpec(
        command=tuple(data["command"]),
        name=data["name"],
        system=data["system"],
        required_features=frozenset(data["requiredFeatures"]),
        after=tuple(data["after"]),
        priority=data["priority"],
        timeout=data["timeout"],
        max_silent=data["maxSilent"],
        env=tuple((k, v) for k, v in data["env"]),
        drv=data.get("drv", ""),
        drv_outputs=tuple((k, v) for k, v in data.get("drvOutputs", ())),
        nix_inputs=tuple(FileInfo(**f) for f in data.get("nixInputs", ())),
    )


def build_row(build: Build) -> tuple[Any, ...]:
    """A snapshot of a build for ``Store.save``: taken on the trio thread (the mutable parts
    copied), turned into SQL values by ``sql_row`` in the worker thread (the JSON encoding,
    which is most of the cost, stays off the event loop)."""
    return (
        build.id,
        build.seq,
        build.spec,  # frozen
        build.state.value,
        build.status.value if build.status else None,
        build.attempts,
        build.infra_failures,
        build.machine_id,
        build.hostname,
        build.exit_code,
        build.error,
        build.submitted_at,
        build.started_at,
        build.finished_at,
        build.outputs,  # a tuple of frozen records
        dict(build.timings),
        list(build.failed_on),
    )


#: What ``Store.save`` takes: build rows, edges, machine rows.
Rows = tuple[list[tuple[Any, ...]], list[tuple[str, str]], list[tuple[Any, ...]]]


def rows(changes: Changes, last_seen: float) -> Rows:
    """The rows of ``changes`` for ``Store.save`` (on the trio thread: see ``build_row``);
    ``last_seen``: the wall-clock time written for the machines."""
    return (
        [build_row(b) for b in changes.builds],
        changes.edges,
        [machine_row(m, last_seen) for m in changes.machines],
    )


def _file_infos(files: tuple[FileInfo, ...]) -> list[dict[str, Any]]:
    return [attrs.asdict(f) for f in files]


def sql_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    spec, outputs, timings, failed_on = row[2], row[14], row[15], row[16]
    return (
        *row[:2],
        spec_to_json(spec),
        *row[3:14],
        json_list(outputs, _file_infos),
        json.dumps(timings),
        json.dumps(failed_on),
    )


def build_from_row(row: Sequence[Any]) -> Build:
    (id_, seq, spec, state, status, attempts, infra, machine_id, hostname, exit_code, error,
     submitted_at, started_at, finished_at, outputs, timings, failed_on) = row  # fmt: skip
    return Build(
        id=id_,
        spec=spec_from_json(spec),
        seq=seq,
        submitted_at=submitted_at,
        state=BuildState(state),
        status=BuildStatus(status) if status else None,
        attempts=attempts,
        infra_failures=infra,
        machine_id=machine_id,
        hostname=hostname,
        exit_code=exit_code,
        error=error,
        started_at=started_at,
        finished_at=finished_at,
        outputs=tuple(FileInfo(**f) for f in json.loads(outputs)),
        timings=json.loads(timings),
        failed_on=json.loads(failed_on),
    )


def machine_row(machine: Machine, last_seen: float) -> tuple[Any, ...]:
    """A snapshot of a machine for ``Store.save``, as ``build_row``: immutable values taken
    on the trio thread (a reconnect storm dirties thousands of machines per batch), the JSON
    made by ``sql_machine_row`` in the worker thread."""
    return (
        machine.machine_id,
        machine.hostname,
        (
            machine.systems,  # a tuple and frozensets: nothing here changes under the thread
            machine.supported_features,
            machine.mandatory_features,
            machine.max_jobs,
            machine.speed_factor,
            machine.drain_requested,
            machine.executors,
        ),
        last_seen,
        machine.succeeded_builds,
        machine.failed_builds,
        machine.lost_builds,
    )


def sql_machine_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    systems, supported, mandatory, max_jobs, speed_factor, drain, executors = row[2]
    info = {
        "systems": list(systems),
        "supportedFeatures": sorted(supported),
        "mandatoryFeatures": sorted(mandatory),
        "maxJobs": max_jobs,
        "speedFactor": speed_factor,
        "drainRequested": drain,
        "executors": sorted(executors),
    }
    return (*row[:2], json.dumps(info), *row[3:])


def machine_from_row(row: Sequence[Any]) -> Machine:
    machine_id, hostname, info_text, _last_seen, succeeded, failed, lost = row
    info = json.loads(info_text)
    return Machine(
        machine_id=machine_id,
        hostname=hostname,
        systems=tuple(info["systems"]),
        supported_features=frozenset(info["supportedFeatures"]),
        mandatory_features=frozenset(info["mandatoryFeatures"]),
        max_jobs=info["maxJobs"],
        speed_factor=info["speedFactor"],
        state=MachineState.DISCONNECTED,
        drain_requested=info.get("drainRequested", False),
        executors=frozenset(info.get("executors", ("command",))),
        succeeded_builds=succeeded,
        failed_builds=failed,
        lost_builds=lost,
    )
