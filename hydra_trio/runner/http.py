"""The HTTP API (Starlette), served by hypercorn's trio worker inside the runner's nursery.

Handlers only read the farm or call one of its transitions; none of them blocks.  Every
caller mistake is a JSON ``{"error": ...}`` with a 4xx status.

Authentication (``--token-file``): with a token, ``_RequireToken`` sits in front of every
route and answers 403 to a call without ``Authorization: Bearer <token>`` before the route
runs, so before a byte of the body is read.  Calls that change state (every method but GET and
HEAD) always need it; reads need it only with ``token_for_reads``, and even then the dashboard
page ``GET /`` stays open: it is a fixed page that holds no data, and its script sends the
token on every request it makes (see ``create_app``).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from hydra_trio.auth import bearer_ok
from hydra_trio.nixstore import NixError
from hydra_trio.runner import nix
from hydra_trio.runner.blobs import Storage
from hydra_trio.runner.dashboard import dashboard
from hydra_trio.runner.farm import Farm, InvalidGraphError, UnknownBuildError
from hydra_trio.runner.front import unavailable_response
from hydra_trio.runner.metrics import collect_metrics, format_metrics, health_family
from hydra_trio.runner.model import Build, BuildState
from hydra_trio.runner.specs import (
    DrvRequest,
    SpecError,
    parse_drv_request,
    parse_graph,
    parse_spec,
)
from hydra_trio.runner.store import StoreUnavailable

#: Limit on request bodies: big enough for a graph of MAX_GRAPH_BUILDS small builds; it keeps a
#: client from making the runner buffer arbitrary amounts.
MAX_BODY = 64 * 1024 * 1024
#: Bodies at least this large are parsed in a worker thread, so a big graph does not stall the
#: event loop (smaller ones are not worth a thread hop).
_THREAD_JSON = 256 * 1024


#: ``GET /builds/{id}/log?tail=N`` returns at most this many bytes (the end of the log).
MAX_TAIL = 64 * 1024

#: ``GET /builds`` returns this many builds unless ``limit`` says otherwise ...
DEFAULT_LIMIT = 50
#: ... and never more than this.
MAX_LIMIT = 500


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


#: Encode a JSON answer in a worker thread from this many list items on (``/status`` with 2,000
#: machines: ~0.8 MB, 15-35 ms of ``json.dumps``).  The encoder holds the GIL, but the switch
#: interval hands the loop back every few ms, so pings are answered meanwhile.
LARGE_JSON_ITEMS = 200


async def _json(payload: dict[str, Any], items: int) -> Response:
    """``JSONResponse(payload)``, encoded in a thread when it holds ``items`` >= the limit.
    The payload must be a snapshot nobody changes meanwhile (fresh dicts and lists)."""
    if items < LARGE_JSON_ITEMS:
        return JSONResponse(payload)
    body = await trio.to_thread.run_sync(
        functools.partial(
            json.dumps, payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )
    )
    return Response(body.encode(), media_type="application/json")


#: Methods that only read; every other method changes state (or may, in a later route).
_READ_METHODS = frozenset({"GET", "HEAD"})
#: Reads that stay open with ``token_for_reads``: the dashboard page itself (no data in it).
_OPEN_PATHS = frozenset({"/"})


class _RequireToken:
    """ASGI middleware: a call that needs the token and lacks it gets a 403, before routing.

    It runs before the route does, so a client without the token can neither make the runner
    read (let alone buffer) its body nor learn which routes exist.  Non-HTTP scopes
    (lifespan) pass through: the app has no websocket routes.
    """

    def __init__(self, app: ASGIApp, *, token: bytes, token_for_reads: bool) -> None:
        self.app = app
        self.token = token
        self.token_for_reads = token_for_reads

    def _needs_token(self, scope: Scope) -> bool:
        if scope["method"] not in _READ_METHODS:
            return True
        return self.token_for_reads and scope["path"] not in _OPEN_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._needs_token(scope):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization")
        if bearer_ok(self.token, header):
            await self.app(scope, receive, send)
            return
        what = "changes state" if scope["method"] not in _READ_METHODS else "reads the farm"
        if header is None:
            problem = f"this call {what} and needs the runner's token"
        else:
            problem = "the Authorization header does not carry the runner's token"
        response = JSONResponse(
            {"error": f"{problem}: send 'Authorization: Bearer <token>'"},
            status_code=403,
            headers={"WWW-Authenticate": 'Bearer realm="hydra-trio"'},
        )
        await response(scope, receive, send)


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
    token: bytes | None = None,
    token_for_reads: bool = False,
) -> Starlette:
    """The Starlette application over ``farm``.  ``persist`` returns once every change made so
    far is durable; calls that change state await it before they answer.

    With ``token``, every call but GET and HEAD needs ``Authorization: Bearer <token>`` and
    gets a JSON 403 (with ``WWW-Authenticate: Bearer``) without it; with ``token_for_reads``
    as well, so does every read except the dashboard page ``GET /``.  The page is open because
    it is the same fixed HTML for everyone; each of its requests (the JSON API, logs, output
    downloads) carries the token.  The operator gives it the token once per browser tab: by
    opening ``http://runner:7421/#token=<token>`` (the page moves it to ``sessionStorage`` and
    removes it from the address at once; a fragment is never sent to a server) or by typing it
    into the prompt the page shows when the runner answers 403.  Prometheus scrapes
    ``/metrics`` in that mode with ``authorization: {credentials_file: <token file>}``.
    """
    if token is not None and not token:
        raise ValueError("an empty token would let every caller in")  # load_token refuses one

    async def status(request: Request) -> Response:
        now = trio.current_time()
        return await _json(
            {
                "machines": [m.to_json(now) for m in farm.machines.values()],
                "queue": farm.queue_counts(),
                "counters": farm.metrics.counters_json(),
                "role": "leader",
                "warnings": [w.to_json() for w in storage.health.warnings()],
            },
            len(farm.machines),
        )

    async def submit(request: Request) -> Response:
        body = await _json_body(request)
        try:
            if isinstance(body, dict) and "drv" in body:
                return await submit_drv(parse_drv_request(body))
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

    async def submit_drv(drv_request: DrvRequest) -> Response:
        """Queue the steps a derivation needs: ``201 {"id": <top build>, "ids": {<step name>:
        <id>}, "storePaths": ...}``; ``200`` with ``"id": null`` when its outputs are valid in
        the runner's store already (and the id of the build already queued for it, if any)."""

        unfinished = {
            b.spec.drv: b.id for b in farm.builds.values() if b.spec.drv and not b.state.finished
        }
        try:
            plan = await nix.plan(
                storage.nix, storage.blobs, drv_request, unfinished.get, storage.nix_exports
            )
        except NixError as exc:
            raise SpecError(f"drv: the runner's Nix store: {exc}") from None
        store_paths = dict(plan.outputs)
        if not plan.specs:
            return JSONResponse(
                {"id": plan.existing, "ids": {}, "storePaths": store_paths},
                status_code=200,
            )
        index = {name: i for i, name in enumerate(plan.names)}
        builds = farm.submit_graph(plan.specs, trio.current_time(), index.get)
        await persist()
        return JSONResponse(
            {
                "id": builds[-1].id,
                "ids": {name: b.id for name, b in zip(plan.names, builds, strict=True)},
                "storePaths": store_paths,
            },
            status_code=201,
        )

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
        tail = request.query_params.get("tail")
        if tail is not None:
            if not (tail.isascii() and tail.isdigit()) or not 1 <= int(tail) <= MAX_TAIL:
                return _error(400, f"tail must be a number of bytes from 1 to {MAX_TAIL}")
            data = await storage.logs.read(build.id, build.attempts, -int(tail))
            return Response(data, media_type="text/plain; charset=utf-8")
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
        # The snapshot is read on the event loop, where the farm cannot change meanwhile; the
        # formatting (three times as long: ~30 ms for 2,000 machines) goes to a thread.
        families = collect_metrics(farm, trio.current_time())
        families.append(health_family(storage.health))
        body = await trio.to_thread.run_sync(format_metrics, families)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def store_unavailable(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StoreUnavailable)
        return unavailable_response(exc)

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
        exception_handlers={HTTPException: http_error, StoreUnavailable: store_unavailable},
        middleware=(
            []
            if token is None
            else [Middleware(_RequireToken, token=token, token_for_reads=token_for_reads)]
        ),
    )
