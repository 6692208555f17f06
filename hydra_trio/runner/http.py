"""The HTTP API (Starlette), served by hypercorn's trio worker inside the runner's nursery.

Handlers only read the farm or call one of its transitions; none of them blocks.  Every
caller mistake is a JSON ``{"error": ...}`` with a 4xx status.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
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
from hydra_trio.runner.farm import Farm, InvalidGraphError, UnknownBuildError
from hydra_trio.runner.metrics import render_metrics
from hydra_trio.runner.model import Build
from hydra_trio.runner.specs import SpecError, parse_graph, parse_spec

#: Limit on request bodies: big enough for a graph of MAX_GRAPH_BUILDS small builds; it keeps a
#: client from making the runner buffer arbitrary amounts.
MAX_BODY = 64 * 1024 * 1024


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _json_body(request: Request) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"request body larger than {MAX_BODY} bytes")
    try:
        return json.loads(body or b"null")
    except ValueError as exc:
        raise HTTPException(400, f"the body is not valid JSON: {exc}") from None


def create_app(farm: Farm, storage: Storage, *, default_system: str) -> Starlette:
    """The Starlette application over ``farm``."""

    async def status(request: Request) -> Response:
        now = trio.current_time()
        return JSONResponse(
            {
                "machines": [m.to_json(now) for m in farm.machines.values()],
                "queue": farm.queue_counts(),
            }
        )

    async def submit(request: Request) -> Response:
        body = await _json_body(request)
        try:
            if isinstance(body, dict) and "builds" in body:
                specs, names = parse_graph(body, default_system)
                index = {name: i for i, name in enumerate(names)}
                builds = farm.submit_graph(specs, trio.current_time(), index.get)
                return JSONResponse(
                    {"ids": {name: b.id for name, b in zip(names, builds, strict=True)}},
                    status_code=201,
                )
            build = farm.submit(parse_spec(body, default_system), trio.current_time())
        except (SpecError, InvalidGraphError) as exc:
            return _error(422, str(exc))
        return JSONResponse({"id": build.id}, status_code=201)

    def _build(request: Request) -> Any:
        try:
            return farm.get(request.path_params["build_id"])
        except UnknownBuildError:
            raise HTTPException(404, f"no build {request.path_params['build_id']!r}") from None

    def build_json(build: Build) -> dict[str, Any]:
        return build.to_json(farm.waiting_reason(build, trio.current_time()))

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
                return FileResponse(
                    storage.blobs.path_of(info.sha256),
                    media_type="application/octet-stream",
                    filename=path.rsplit("/", 1)[-1],
                )
        return _error(404, f"build {build.id} has no output {path!r}")

    async def cancel(request: Request) -> Response:
        build = _build(request)
        farm.cancel(build.id, trio.current_time())
        return JSONResponse(build_json(build))

    async def drain(request: Request) -> Response:
        try:
            machine = farm.drain(request.path_params["machine_id"])
        except KeyError:
            return _error(404, f"no machine {request.path_params['machine_id']!r}")
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
            Route("/status", status),
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
