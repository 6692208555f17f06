"""Hydra's status API, for Hydra's web UI (``/status/machines`` and the other ``/status/*``
views of Hydra's runner, ``reference/hydra-anchor.md`` section 3.8), from the farm and the
Hydra queue, with hydra-trio's liveness fields added to each machine.

``/status`` itself stays hydra-trio's (``CONTRACT.md``); only its sub-paths are Hydra's.  A
field Hydra's runner has and hydra-trio does not measure (memory, pressure, per-phase step
times) is left out rather than made up.
"""

from __future__ import annotations

import time
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from hydra_trio.hydra.queue import HydraQueue
from hydra_trio.runner.model import Build, BuildState, Machine, MachineState


def machine_json(machine: Machine, queue: HydraQueue, now: float, wall: float) -> dict[str, Any]:
    connected = machine.state is not MachineState.DISCONNECTED
    since_ping = max(0.0, now - machine.last_ping_at)
    free = machine.free_slots
    return {
        "systems": list(machine.systems),
        "hostname": machine.hostname,
        "uptime": round(now - machine.connected_at, 3) if connected else 0,
        "speedFactor": machine.speed_factor,
        "maxJobs": machine.max_jobs,
        "supportedFeatures": sorted(machine.supported_features),
        "mandatoryFeatures": sorted(machine.mandatory_features),
        "score": free * machine.speed_factor,
        "hasCapacity": free > 0,
        "hasDynamicCapacity": free > 0,
        "hasStaticCapacity": free > 0,
        "jobs": sorted(b.spec.drv for b in machine.running.values() if b.spec.drv),
        "stats": {
            "currentJobs": len(machine.running) if connected else 0,
            "nrStepsDone": machine.succeeded_builds + machine.failed_builds,
            "lastPing": round(wall - since_ping),
            "sinceLastPing": round(since_ping, 3),
            "load1": machine.load,
            "succeededBuilds": machine.succeeded_builds,
            "failedBuilds": machine.failed_builds,
        },
        # hydra-trio's liveness fields
        "machineId": machine.machine_id,
        "connected": connected,
        "state": machine.state.value,
        "disconnectReason": machine.disconnect_reason or None,
        "lostBuilds": machine.lost_builds,
    }


def _lowest_builds(queue: HydraQueue) -> dict[str, int]:
    """Per farm step, the lowest id of the Hydra builds needing it: one pass from the tops
    in id order (the first build to reach a step is its lowest)."""
    lowest: dict[str, int] = {}
    farm = queue.farm
    for build_id in sorted(queue.builds):
        todo = [queue.top[build_id]] if build_id in queue.top else []
        while todo:
            step = todo.pop()
            if step in lowest:
                continue
            lowest[step] = build_id
            build = farm.builds.get(step)
            if build is not None:
                todo.extend(d for d in build.spec.after if d not in lowest)
    return lowest


def step_json(build: Build, lowest: int | None, now: float) -> dict[str, Any]:
    runnable = build.state is BuildState.QUEUED and not build.waiting_for
    return {
        "drvPath": build.spec.drv,
        "system": build.spec.system,
        "runnable": runnable,
        "finished": build.state.finished,
        "cancelled": build.state is BuildState.CANCELLED,
        "alreadyScheduled": build.state is BuildState.RUNNING,
        "previousFailure": False,
        "created": round(build.submitted_at),
        "tries": build.attempts,
        "highestGlobalPriority": build.spec.priority // 1000,
        "highestLocalPriority": build.spec.priority % 1000,
        "lowestBuildId": lowest,
        "depsCount": len(build.waiting_for),
        "machine": build.hostname if build.state is BuildState.RUNNING else None,
    }


def routes(queue: HydraQueue) -> list[BaseRoute]:
    """The ``/status/*`` routes of Hydra's runner over ``queue``."""
    farm = queue.farm

    def steps(only_runnable: bool = False) -> list[dict[str, Any]]:
        lowest = _lowest_builds(queue)
        now = trio.current_time()
        found = [step_json(farm.builds[s], b, now) for s, b in lowest.items() if s in farm.builds]
        found = [s for s in found if not s["finished"]]
        return [s for s in found if s["runnable"]] if only_runnable else found

    async def machines(request: Request) -> Response:
        now, wall = trio.current_time(), time.time()
        listed = {m.hostname: machine_json(m, queue, now, wall) for m in farm.machines.values()}
        return JSONResponse({"machines": listed, "machinesCount": len(listed)})

    async def builds(request: Request) -> Response:
        listed = [
            {
                "id": b.id,
                "drvPath": b.drv,
                "jobsetId": b.jobset_id,
                "name": b.job,
                "timestamp": b.timestamp,
                "maxSilentTime": b.maxsilent or queue.config.default_max_silent,
                "timeout": b.timeout or queue.config.default_timeout,
                "localPriority": b.priority,
                "globalPriority": b.global_priority,
                "finishedInDb": False,
            }
            for b in sorted(queue.builds.values(), key=lambda b: b.id)
        ]
        return JSONResponse({"builds": listed, "buildCount": len(listed)})

    async def all_steps(request: Request) -> Response:
        listed = steps()
        return JSONResponse({"steps": listed, "stepCount": len(listed)})

    async def runnable(request: Request) -> Response:
        listed = steps(only_runnable=True)
        return JSONResponse({"steps": listed, "stepCount": len(listed)})

    async def queues(request: Request) -> Response:
        by_system: dict[str, list[dict[str, Any]]] = {}
        for step in steps(only_runnable=True):
            by_system.setdefault(step["system"], []).append(step)
        return JSONResponse({"queues": by_system})

    async def jobsets(request: Request) -> Response:
        listed = {
            f"{b.project}:{b.jobset}": {
                "id": b.jobset_id,
                "projectName": b.project,
                "name": b.jobset,
            }
            for b in queue.builds.values()
        }
        return JSONResponse({"jobsets": listed, "jobsetCount": len(listed)})

    async def active(request: Request) -> Response:
        try:
            build_id = int(request.path_params["build_id"])
        except ValueError:
            return JSONResponse({"error": "a build id is a number"}, status_code=404)
        return JSONResponse({"active": build_id in queue.builds})

    return [
        Route("/status/machines", machines),
        Route("/status/builds", builds),
        Route("/status/steps", all_steps),
        Route("/status/runnable", runnable),
        Route("/status/queues", queues),
        Route("/status/jobsets", jobsets),
        Route("/status/build/{build_id}/active", active),
    ]
