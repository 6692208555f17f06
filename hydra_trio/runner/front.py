"""What the HTTP API answers before a request reaches the farm: writes the runner cannot make
durable now, and requests to a runner that is not the leader.

``Front`` is ASGI middleware around the application of ``runner.http``.  It answers by itself:

- a call that changes state (any method but GET and HEAD) while the database does not take
  writes (``Persister.unavailable``): ``503 {"error": <why>}``, or ``507`` when the database's
  disk is full, with ``Retry-After``.  Nothing is changed in memory first, so a client that
  gets the error has changed nothing and may simply retry.
- every request to a standby (see ``runner.leadership``): ``GET /status`` gets
  ``{"role": "standby", "leader": <leader's HTTP URL>}``, anything else ``503 {"error": ...,
  "leader": <URL>}``.

A write that the database stops taking while it waits for its commit still reaches the
application, whose ``persist`` raises ``StoreUnavailable``: ``unavailable_response`` turns it
into the same answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from hydra_trio.runner.store import StoreUnavailable

_READ_METHODS = frozenset({"GET", "HEAD"})
#: seconds a client is told to wait before retrying a write the database could not take.
RETRY_AFTER = 2


def unavailable_response(exc: StoreUnavailable) -> JSONResponse:
    return JSONResponse(
        {"error": f"{exc}; nothing was changed, try again later"},
        status_code=507 if exc.disk_full else 503,
        headers={"Retry-After": str(RETRY_AFTER)},
    )


class Front:
    """ASGI middleware: see the module's docstring.  ``unavailable`` says why writes cannot be
    made durable now (None: they can); ``standby`` returns the leader's URL while this runner
    is a standby (None: it leads)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        unavailable: Callable[[], StoreUnavailable | None] = lambda: None,
        standby: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self.app = app
        self.unavailable = unavailable
        self.standby = standby

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        standby = self.standby()
        if standby is not None:
            if scope["method"] in _READ_METHODS and scope["path"] == "/status":
                response = JSONResponse({**standby, "role": "standby"})
            else:
                leader = standby.get("leader")
                response = JSONResponse(
                    {
                        "error": "this queue runner is a standby; ask the leader"
                        + (f" at {leader}" if leader else " (none elected yet)"),
                        "leader": leader,
                    },
                    status_code=503,
                    headers={"Retry-After": str(RETRY_AFTER)},
                )
            await response(scope, receive, send)
            return
        if scope["method"] not in _READ_METHODS:
            problem = self.unavailable()
            if problem is not None:
                await unavailable_response(problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)
