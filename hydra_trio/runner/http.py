"""The HTTP API (Starlette), served by hypercorn's trio worker inside the runner's nursery.

``RunnerApi`` holds the routes, one method each, and ``routes`` lists them; ``create_app``
wraps them in a Starlette application with the error handlers and, with a token, the
``httpauth.RequireToken`` middleware.  Handlers only read the farm or call one of its
transitions; none of them blocks.  Every caller mistake is a JSON ``{"error": ...}`` with a
4xx status.

Longer than most modules on purpose: it is the routing table and its handlers, one short method
per endpoint of docs/http.md, read side by side like a declarative table.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Route

from hydra_trio.nixstore import NixError
from hydra_trio.runner import nix, openapi
from hydra_trio.runner.blobs import BlobError, Storage
from hydra_trio.runner.dashboard import dashboard
from hydra_trio.runner.farm import Farm, InvalidGraphError, UnknownBuildError
from hydra_trio.runner.front import unavailable_response
from hydra_trio.runner.httpauth import RequireToken
from hydra_trio.runner.metrics import collect_metrics, format_metrics, health_family
from hydra_trio.runner.model import (
    Build,
    BuildState,
    Machine,
    compact_json,
    json_list,
    outputs_json,
)
from hydra_trio.runner.registry import AmbiguousMachineError
from hydra_trio.runner.specs import (
    BodyError,
    DrvRequest,
    SpecError,
    decode_json,
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


#: Answers showing builds with more outputs than this in all are encoded in a worker thread.
ENCODE_INLINE = 1000
#: ``GET /builds/{id}/log?tail=N`` returns at most this many bytes (the end of the log).
MAX_TAIL = 64 * 1024

#: ``GET /builds`` returns this many builds unless ``limit`` says otherwise ...
DEFAULT_LIMIT = 50
#: ... and never more than this.
MAX_LIMIT = 500


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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
            return decode_json(body)
        return await trio.to_thread.run_sync(decode_json, body)
    except BodyError as exc:
        raise HTTPException(400, str(exc)) from None


def _limit(request: Request) -> int:
    """``?limit=N`` of ``GET /builds``: 1..MAX_LIMIT, DEFAULT_LIMIT if not given."""
    raw = request.query_params.get("limit", str(DEFAULT_LIMIT)).strip()
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise HTTPException(400, f"limit must be an integer from 1 to {MAX_LIMIT}, not {raw!r}")
    return int(raw)


def _states(request: Request) -> set[BuildState] | None:
    """``?state=S`` of ``GET /builds``, repeated or comma-separated; None: every state."""
    names = [n.strip() for value in request.query_params.getlist("state") for n in value.split(",")]
    if not any(names):
        return None
    states = set()
    for name in filter(None, names):
        try:
            states.add(BuildState(name))
        except ValueError:
            valid = ", ".join(s.value for s in BuildState)
            raise HTTPException(400, f"unknown state {name!r} (one of: {valid})") from None
    return states


async def _no_persistence() -> None:
    return None


@attrs.define(eq=False)
class RunnerApi:
    """The routes over one farm: each a method, listed in ``routes``.  Handlers only read the
    farm or call one of its transitions; ``persist`` returns once every change made so far is
    durable, and calls that change state await it before they answer."""

    farm: Farm
    storage: Storage
    default_system: str
    persist: Callable[[], Awaitable[None]] = _no_persistence

    def routes(self) -> list[Route]:
        return [
            Route("/", dashboard),
            Route("/status", self.status),
            Route("/builds", self.list_builds, methods=["GET"]),
            Route("/builds", self.submit, methods=["POST"]),
            Route("/builds/{build_id}", self.show),
            Route("/builds/{build_id}/log", self.build_log),
            Route("/builds/{build_id}/outputs/{path:path}", self.output),
            Route("/builds/{build_id}/cancel", self.cancel, methods=["POST"]),
            Route("/machines/{machine_id}/drain", self.drain, methods=["POST"]),
            Route("/machines/{machine_id}/undrain", self.undrain, methods=["POST"]),
            Route("/metrics", self.metrics),
            Route("/openapi.json", self.openapi_json),
        ]

    # -- reads ------------------------------------------------------------------------------

    async def status(self, request: Request) -> Response:
        """``{"machines": [...], "queue", "counters", "role", "warnings"}``.  The machines
        are joined from their kept encodings (``Machine.to_json_text``): with 2,000 of them,
        ``json.dumps`` of the list held the GIL, and with it the event loop, for 15-35 ms a
        call, even in a worker thread."""
        farm, now = self.farm, trio.current_time()
        machines = ",".join([m.to_json_text(now) for m in farm.machines.values()])
        rest = json.dumps(
            {
                "queue": farm.queue_counts(),
                "counters": farm.metrics.counters_json(),
                "role": "leader",
                "warnings": [w.to_json() for w in self.storage.health.warnings()],
            },
            ensure_ascii=False,
            allow_nan=False,
            separators=(",", ":"),
        )
        body = f'{{"machines":[{machines}],{rest[1:]}'
        return Response(body.encode(), media_type="application/json")

    async def list_builds(self, request: Request) -> Response:
        """``GET /builds?state=&name=&machine=&q=&limit=&cursor=``: the newest builds first
        (by submission order), a page at a time.

        ``limit`` is 1..MAX_LIMIT (default DEFAULT_LIMIT).  ``state`` keeps only builds in
        that state; it may be repeated or comma-separated (``state=succeeded,failed``).
        ``name`` keeps builds of that name, ``machine`` those run (last) on that machine (id
        or hostname), ``q`` those whose id, name or command contains the text (any case).  The
        answer is ``{"builds": [Build.to_json(), ...], "total": <builds matching>, "next":
        <cursor of the next, older page, or null>}``; ``cursor`` asks for that page.  A cursor
        is a position in the submission order, so builds submitted meanwhile do not shift the
        pages.
        """
        limit, states = _limit(request), _states(request)
        params = request.query_params
        raw_cursor = params.get("cursor", "").strip()
        if raw_cursor and not (raw_cursor.isascii() and raw_cursor.isdigit()):
            return _error(400, f"cursor must be the 'next' of a previous page, not {raw_cursor!r}")
        before = int(raw_cursor) if raw_cursor else None
        build_name = params.get("name")
        machine = params.get("machine")
        text = params.get("q", "").strip().lower()

        def wanted(b: Build) -> bool:
            return (
                (states is None or b.state in states)
                and (build_name is None or b.spec.name == build_name)
                and (machine is None or machine in (b.machine_id, b.hostname))
                and (
                    not text
                    or text in b.id
                    or text in b.spec.name.lower()
                    or text in " ".join(b.spec.command).lower()
                )
            )

        # The farm's builds are in submission (seq) order: a page is the first matches walking
        # back from the cursor, so the dashboard's polls of 100,000 builds do not each sort
        # them all.  The total of a state filter comes from the farm's counters; only a name,
        # machine or text filter counts by walking every build.
        page: list[Build] = []
        for build in reversed(self.farm.builds.values()):
            if before is not None and build.seq >= before:
                continue
            if wanted(build):
                page.append(build)
                if len(page) > limit:
                    break
        if build_name is None and machine is None and not text:
            counts = self.farm.queue_counts()
            total = sum(counts.get(s.value, 0) for s in states or BuildState)
        else:
            total = sum(1 for b in self.farm.builds.values() if wanted(b))
        more = len(page) > limit
        page = page[:limit]
        nxt = str(page[-1].seq) if more else None
        return await self._builds_answer(
            page, lambda views: {"builds": views, "total": total, "next": nxt}
        )

    async def openapi_json(self, request: Request) -> Response:
        return JSONResponse(openapi.document())

    async def show(self, request: Request) -> Response:
        return await self._builds_answer([self._build(request)], lambda views: views[0])

    async def build_log(self, request: Request) -> Response:
        build = self._build(request)
        logs = self.storage.logs
        tail = request.query_params.get("tail")
        if tail is not None:
            if not (tail.isascii() and tail.isdigit()) or not 1 <= int(tail) <= MAX_TAIL:
                return _error(400, f"tail must be a number of bytes from 1 to {MAX_TAIL}")
            data = await logs.read(build.id, build.attempts, -int(tail))
            return Response(data, media_type="text/plain; charset=utf-8")
        if request.query_params.get("follow") not in ("1", "true", "yes"):
            data = await logs.read(build.id, build.attempts)
            return Response(data, media_type="text/plain; charset=utf-8")
        return StreamingResponse(self._follow(build), media_type="text/plain; charset=utf-8")

    async def _follow(self, build: Build) -> AsyncIterator[bytes]:
        """The current attempt's log until the build ends; a retry restarts the stream with a
        marker line, as the log shown is always the current attempt's."""
        logs = self.storage.logs
        attempt, offset = build.attempts, 0
        while True:
            if build.attempts != attempt:
                attempt, offset = build.attempts, 0
                yield f"\n--- attempt {attempt} ---\n".encode()
            data = await logs.read(build.id, attempt, offset, 1024 * 1024)
            if data:
                offset += len(data)
                yield data
                continue
            if build.state.finished:
                return
            with trio.move_on_after(5):
                await logs.wait(build.id)

    async def output(self, request: Request) -> Response:
        build = self._build(request)
        path = request.path_params["path"]
        info = next((f for f in build.outputs if f.path == path), None)
        if info is None:
            return _error(404, f"build {build.id} has no output {path!r}")
        if info.link:
            return _error(409, f"{path} is a symbolic link to {info.link}")
        blobs = self.storage.blobs
        name = path.rsplit("/", 1)[-1]
        missing = f"output {path!r} of build {build.id} is missing from the runner's state dir"
        try:
            packed = await trio.to_thread.run_sync(blobs.packed, info.sha256)
        except BlobError:  # its pack is gone
            return _error(410, missing)
        if packed is not None:  # (small: read whole)
            quoted = urllib.parse.quote(name)  # (as FileResponse says it)
            disposition = (
                f'attachment; filename="{name}"'
                if quoted == name
                else f"attachment; filename*=utf-8''{quoted}"
            )
            return Response(
                packed,
                media_type="application/octet-stream",
                headers={"content-disposition": disposition},
            )
        blob = blobs.path_of(info.sha256)
        if not await trio.to_thread.run_sync(blob.is_file):
            return _error(410, missing)
        return FileResponse(blob, media_type="application/octet-stream", filename=name)

    async def metrics(self, request: Request) -> Response:
        # The snapshot is read on the event loop, where the farm cannot change meanwhile; the
        # formatting (three times as long: ~30 ms for 2,000 machines) goes to a thread.
        families = collect_metrics(self.farm, trio.current_time())
        families.append(health_family(self.storage.health))
        body = await trio.to_thread.run_sync(format_metrics, families)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # -- writes -----------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        body = await _json_body(request)
        try:
            if isinstance(body, dict) and "drv" in body:
                return await self._submit_drv(parse_drv_request(body))
            if isinstance(body, dict) and "builds" in body:
                return await self._submit_graph(body)
            spec = parse_spec(body, self.default_system)
            build = self.farm.submit(spec, trio.current_time())
        except (SpecError, InvalidGraphError) as exc:
            return _error(422, str(exc))
        await self.persist()
        return JSONResponse({"id": build.id}, status_code=201)

    async def _submit_graph(self, body: dict[str, Any]) -> Response:
        # Validating a large graph takes seconds: in a thread (it touches nothing).
        specs, names = await trio.to_thread.run_sync(parse_graph, body, self.default_system)
        index = {name: i for i, name in enumerate(names)}
        builds = self.farm.submit_graph(specs, trio.current_time(), index.get)
        await self.persist()
        return JSONResponse(
            {"ids": {name: b.id for name, b in zip(names, builds, strict=True)}}, status_code=201
        )

    async def _submit_drv(self, drv_request: DrvRequest) -> Response:
        """Queue the steps a derivation needs: ``201 {"id": <top build>, "ids": {<step name>:
        <id>}, "storePaths": ...}``; ``200`` with ``"id": null`` when its outputs are valid in
        the runner's store already (and the id of the build already queued for it, if any)."""
        farm, storage = self.farm, self.storage
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
                {"id": plan.existing, "ids": {}, "storePaths": store_paths}, status_code=200
            )
        index = {name: i for i, name in enumerate(plan.names)}
        builds = farm.submit_graph(plan.specs, trio.current_time(), index.get)
        await self.persist()
        ids = {name: b.id for name, b in zip(plan.names, builds, strict=True)}
        return JSONResponse(
            {"id": builds[-1].id, "ids": ids, "storePaths": store_paths}, status_code=201
        )

    async def cancel(self, request: Request) -> Response:
        build = self._build(request)
        self.farm.cancel(build.id, trio.current_time())
        await self.persist()
        return await self._builds_answer([build], lambda views: views[0])

    async def drain(self, request: Request) -> Response:
        return await self._machine_call(request, self.farm.drain)

    async def undrain(self, request: Request) -> Response:
        return await self._machine_call(request, self.farm.undrain)

    async def _machine_call(self, request: Request, call: Callable[[str], Machine]) -> Response:
        key = request.path_params["machine_id"]
        try:
            machine = call(key)
        except AmbiguousMachineError as exc:
            return _error(409, str(exc))
        except KeyError:
            return _error(404, f"no machine {key!r}")
        await self.persist()
        return JSONResponse(machine.to_json(trio.current_time()))

    # -- helpers ----------------------------------------------------------------------------

    def _build(self, request: Request) -> Build:
        try:
            return self.farm.get(request.path_params["build_id"])
        except UnknownBuildError:
            raise HTTPException(404, f"no build {request.path_params['build_id']!r}") from None

    def _build_json(self, build: Build, *, outputs: bool = True) -> dict[str, Any]:
        return build.to_json(self.farm.waiting_reason(build, trio.current_time()), outputs=outputs)

    async def _builds_answer(
        self, builds: Sequence[Build], shape: Callable[[list[dict[str, Any]]], Any]
    ) -> Response:
        """``shape(<each build's JSON>)`` as the answer.  When the builds list more than
        ``ENCODE_INLINE`` outputs in all, their outputs are converted and the answer encoded
        in a worker thread (their tuples never change): a build of 100,000 outputs held the
        event loop ~330 ms per ``GET``."""
        if sum(len(b.outputs) for b in builds) <= ENCODE_INLINE:
            return JSONResponse(shape([self._build_json(b) for b in builds]))
        views = [self._build_json(b, outputs=False) for b in builds]
        outputs = [b.outputs for b in builds]

        def encode() -> bytes:
            # Each build's outputs are encoded JSON_PIECE at a time (``json_list``) and
            # spliced in where a placeholder string was encoded.
            token = secrets.token_hex(8)
            spliced: dict[str, str] = {}
            for index, (view, files) in enumerate(zip(views, outputs, strict=True)):
                view["outputs"] = placeholder = f"\x00{token}-{index}\x00"
                spliced[compact_json(placeholder)] = json_list(files, outputs_json)
            text = compact_json(shape(views))
            return re.sub("|".join(map(re.escape, spliced)), lambda m: spliced[m[0]], text).encode()

        return Response(await trio.to_thread.run_sync(encode), media_type="application/json")


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StoreUnavailable)
    return unavailable_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, exc.detail)


def create_app(
    farm: Farm,
    storage: Storage,
    *,
    default_system: str,
    persist: Callable[[], Awaitable[None]] = _no_persistence,
    token: bytes | None = None,
    token_for_reads: bool = False,
    extra_routes: Sequence[BaseRoute] = (),
    public_logs: bool = False,
) -> Starlette:
    """The Starlette application over ``farm`` (``RunnerApi``'s routes).  ``persist`` returns
    once every change made so far is durable; calls that change state await it before they
    answer.

    With ``token``, every call but GET and HEAD needs ``Authorization: Bearer <token>`` and
    gets a JSON 403 (with ``WWW-Authenticate: Bearer``) without it; so do a build's log and
    outputs unless ``public_logs``; with ``token_for_reads`` as well, so does every read
    except the dashboard page ``GET /``.  The page is open because
    it is the same fixed HTML for everyone; each of its requests (the JSON API, logs, output
    downloads) carries the token.  The operator gives it the token once per browser tab: by
    opening ``http://runner:7421/#token=<token>`` (the page moves it to ``sessionStorage`` and
    removes it from the address at once; a fragment is never sent to a server) or by typing it
    into the prompt the page shows when the runner answers 403.  Prometheus scrapes
    ``/metrics`` in that mode with ``authorization: {credentials_file: <token file>}``.
    """
    if token is not None and not token:
        raise ValueError("an empty token would let every caller in")  # load_token refuses one
    api = RunnerApi(farm, storage, default_system, persist)
    return Starlette(
        routes=[*extra_routes, *api.routes()],  # extra: Hydra mode\'s /status/*
        exception_handlers={HTTPException: _http_error, StoreUnavailable: _store_unavailable},
        middleware=(
            []
            if token is None
            else [
                Middleware(
                    RequireToken,
                    token=token,
                    token_for_reads=token_for_reads,
                    public_logs=public_logs,
                )
            ]
        ),
    )
