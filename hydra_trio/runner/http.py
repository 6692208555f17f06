"""The HTTP API (Starlette), served by hypercorn's trio worker inside the runner's nursery.

Handlers only read the farm or call one of its transitions; none of them blocks.  Every
caller mistake is a JSON ``{"error": ...}`` with a 4xx status.
"""

from __future__ import annotations

import contextlib
import heapq
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from hydra_trio.runner.blobs import Storage
from hydra_trio.runner.dashboard import dashboard
from hydra_trio.runner.farm import Farm, InvalidGraphError, UnknownBuildError
from hydra_trio.runner.metrics import render_metrics
from hydra_trio.runner.model import Build, BuildState
from hydra_trio.runner.specs import SpecError, parse_graph, parse_spec

#: Limit on request bodies: big enough for a graph of MAX_GRAPH_BUILDS small builds; it keeps a
#: client from making the runner buffer arbitrary amounts.
MAX_BODY = 64 * 1024 * 1024
#: Bodies at least this large are parsed in a worker thread, so a big graph does not stall the
#: event loop (smaller ones are not worth a thread hop).
_THREAD_JSON = 256 * 1024


#: ``GET /builds`` returns this many builds unless ``limit`` says otherwise ...
DEFAULT_LIMIT = 50
#: ... and never more than this.
MAX_LIMIT = 500


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def list_builds(farm: Farm, request: Request) -> Response:
    """``GET /builds?limit=N&state=S``: the newest builds first (by submission order).

    ``limit`` is 1..MAX_LIMIT (default DEFAULT_LIMIT).  ``state`` keeps only builds in that
    state; it may be repeated or comma-separated (``state=succeeded,failed``).  The answer is
    ``{"builds": [Build.to_json(), ...], "total": <builds matching the filter>}``.
    """
    params = request.query_params
    raw_limit = params.get("limit", str(DEFAULT_LIMIT)).strip()
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= MAX_LIMIT:
        return _error(400, f"limit must be an integer from 1 to {MAX_LIMIT}, not {raw_limit!r}")
    limit = int(raw_limit)

    states: set[BuildState] | None = None
    names = [name.strip() for value in params.getlist("state") for name in value.split(",")]
    if any(names):
        states = set()
        for name in filter(None, names):
            try:
                states.add(BuildState(name))
            except ValueError:
                valid = ", ".join(s.value for s in BuildState)
                return _error(400, f"unknown state {name!r} (one of: {valid})")

    matching = [b for b in farm.builds.values() if states is None or b.state in states]
    newest = heapq.nlargest(limit, matching, key=lambda b: b.seq)
    now = trio.current_time()
    return JSONResponse(
        {
            "builds": [b.to_json(farm.waiting_reason(b, now)) for b in newest],
            "total": len(matching),
        }
    )


async def _json_body(request: Request) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise HTTPException(413, f"request body larger than {MAX_BODY} bytes")
    body = bytearray()
    async with contextlib.aclosing(request.stream()) as chunks:
        async for chunk in chunks:
            body += chunk
            if len(body) > MAX_BODY:
                raise HTTPException(413, f"request body larger than {MAX_BODY} bytes")
    try:
        if len(body) < _THREAD_JSON:
            return json.loads(body or b"null")
        return await trio.to_thread.run_sync(json.loads, body)
    except ValueError as exc:
        raise HTTPException(400, f"the body is not valid JSON: {exc}") from None


async def _no_persistence() -> None:
    return None


def create_app(
    farm: Farm,
    storage: Storage,
    *,
    default_system: str,
    persist: Callable[[], Awaitable[None]] = _no_persistence,
) -> Starlette:
    """The Starlette application over ``farm``.  ``persist`` returns once every change made so
    far is durable; calls that change state await it before they answer."""

    async def status(request: Request) -> Response:
        now = trio.current_time()
        return JSONResponse(
            {
                "machines": [m.to_json(now) for m in farm.machines.values()],
                "queue": farm.queue_counts(),
                "counters": {
                    "staleResultsRejected": farm.stale_rejected,
                    "buildersLostIdle": farm.builders_lost_idle,
                    "buildersLostWhileBuilding": farm.builders_lost_busy,
                    "requeued": dict(farm.requeued),
                },
            }
        )

    async def submit(request: Request) -> Response:
        body = await _json_body(request)
        try:
            if isinstance(body, dict) and "builds" in body:
                # Validating a large graph takes seconds: in a thread (it touches nothing).
                specs, names = await trio.to_thread.run_sync(parse_graph, body, default_system)
                index = {name: i for i, name in enumerate(names)}
                builds = farm.submit_graph(specs, trio.current_time(), index.get)
                await persist()
                return JSONResponse(
                    {"ids": {name: b.id for name, b in zip(names, builds, strict=True)}},
                    status_code=201,
                )
            build = farm.submit(parse_spec(body, default_system), trio.current_time())
        except (SpecError, InvalidGraphError) as exc:
            return _error(422, str(exc))
        await persist()
        return JSONResponse({"id": build.id}, status_code=201)

    def _build(request: Request) -> Any:
        try:
            return farm.get(request.path_params["build_id"])
        except UnknownBuildError:
            raise HTTPException(404, f"no build {request.path_params['build_id']!r}") from None

    def build_json(build: Build) -> dict[str, Any]:
        return build.to_json(farm.waiting_reason(build, trio.current_time()))

    async def builds(request: Request) -> Response:
        return await list_builds(farm, request)

    async def show(request: Request) -> Response:
        return JSONResponse(build_json(_build(request)))

    async def build_log(request: Request) -> Response:
        build = _build(request)
        if request.query_params.get("follow") not in ("1", "true", "yes"):
            data = await storage.logs.read(build.id, build.attempts)
            return Response(data, media_type="text/plain; charset=utf-8")
        return StreamingResponse(_follow(build), media_type="text/plain; charset=utf-8")

    async def _follow(build: Build) -> AsyncIterator[bytes]:
        # Streams the current attempt's log until the build ends; a retry restarts the stream
        # with a marker line, as the log shown is always the current attempt's.
        attempt, offset = build.attempts, 0
        while True:
            if build.attempts != attempt:
                attempt, offset = build.attempts, 0
                yield f"\n--- attempt {attempt} ---\n".encode()
            data = await storage.logs.read(build.id, attempt, offset, 1024 * 1024)
            if data:
                offset += len(data)
                yield data
                continue
            if build.state.finished:
                return
            with trio.move_on_after(5):
                await storage.logs.wait(build.id)

    async def output(request: Request) -> Response:
        build = _build(request)
        path = request.path_params["path"]
        for info in build.outputs:
            if info.path == path:
                if info.link:
                    return _error(409, f"{path} is a symbolic link to {info.link}")
                blob = storage.blobs.path_of(info.sha256)
                if not await trio.to_thread.run_sync(blob.is_file):
                    return _error(
                        410,
                        f"output {path!r} of build {build.id} is missing from the "
                        "runner's state dir",
                    )
                return FileResponse(
                    blob,
                    media_type="application/octet-stream",
                    filename=path.rsplit("/", 1)[-1],
                )
        return _error(404, f"build {build.id} has no output {path!r}")

    async def cancel(request: Request) -> Response:
        build = _build(request)
        farm.cancel(build.id, trio.current_time())
        await persist()
        return JSONResponse(build_json(build))

    async def drain(request: Request) -> Response:
        try:
            machine = farm.drain(request.path_params["machine_id"])
        except KeyError:
            return _error(404, f"no machine {request.path_params['machine_id']!r}")
        await persist()
        return JSONResponse(machine.to_json(trio.current_time()))

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(
            render_metrics(farm, trio.current_time()), media_type="text/plain; version=0.0.4"
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, exc.detail)

    return Starlette(
        routes=[
            Route("/", dashboard),
            Route("/status", status),
            Route("/builds", builds, methods=["GET"]),
            Route("/builds", submit, methods=["POST"]),
            Route("/builds/{build_id}", show),
            Route("/builds/{build_id}/log", build_log),
            Route("/builds/{build_id}/outputs/{path:path}", output),
            Route("/builds/{build_id}/cancel", cancel, methods=["POST"]),
            Route("/machines/{machine_id}/drain", drain, methods=["POST"]),
            Route("/metrics", metrics),
        ],
        exception_handlers={HTTPException: http_error},
    )
