"""The HTTP API's authentication (``--token-file``): ``RequireToken`` sits in front of every
route and answers 403 to a call without ``Authorization: Bearer <token>`` before the route
runs, so before a byte of the body is read.  Calls that change state (every method but GET and
HEAD) always need it; so do a build's log and outputs (``/builds/{id}/log``,
``/builds/{id}/outputs/...``: what builds print and leave may hold secrets, docs/security.md)
unless ``public_logs``; other reads need it only with ``token_for_reads``, and even then the
dashboard page ``GET /`` stays open: it is a fixed page that holds no data, and its script
sends the token on every request it makes (see ``http.create_app``).
"""

from __future__ import annotations

import re

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from hydra_trio.auth import bearer_ok

#: Methods that only read; every other method changes state (or may, in a later route).
_READ_METHODS = frozenset({"GET", "HEAD"})
#: Reads that stay open with ``token_for_reads``: the dashboard page itself (no data in it).
_OPEN_PATHS = frozenset({"/"})
#: Reads that need the token whenever there is one (unless ``public_logs``): a build's log
#: and its outputs.
_PRIVATE_READS = re.compile(r"^/builds/[^/]+/(?:log|outputs)(?:/|$)")


class RequireToken:
    """ASGI middleware: a call that needs the token and lacks it gets a 403, before routing.

    It runs before the route does, so a client without the token can neither make the runner
    read (let alone buffer) its body nor learn which routes exist.  Non-HTTP scopes
    (lifespan) pass through: the app has no websocket routes.
    """

    def __init__(
        self, app: ASGIApp, *, token: bytes, token_for_reads: bool, public_logs: bool = False
    ) -> None:
        self.app = app
        self.token = token
        self.token_for_reads = token_for_reads
        self.public_logs = public_logs

    def _needs_token(self, scope: Scope) -> bool:
        if scope["method"] not in _READ_METHODS:
            return True
        if not self.public_logs and _PRIVATE_READS.match(scope["path"]):
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
