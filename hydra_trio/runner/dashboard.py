"""The operator dashboard (``GET /``): one self-contained page.

Plain HTML, CSS and vanilla JavaScript (in ``static/``), with no build step and nothing
fetched from another host (a runner may have no internet).  It polls the JSON API every second
and renders everything it gets from it as text nodes, never as markup.  Its
Content-Security-Policy allows exactly its own inline script and style (by hash) and requests
to its own origin.
"""

from __future__ import annotations

import base64
import hashlib
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

_STATIC = resources.files("hydra_trio.runner") / "static"
_CSS = (_STATIC / "dashboard.css").read_text(encoding="utf-8")
_JS = (_STATIC / "dashboard.js").read_text(encoding="utf-8")
_BODY = (_STATIC / "dashboard-body.html").read_text(encoding="utf-8")


def _csp_source(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


#: The whole page; it loads nothing but the JSON API (and output files the operator opens).
DASHBOARD_HTML = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    "<title>hydra-trio</title>\n"
    '<link rel="icon" href="data:,">\n'
    f"<style>{_CSS}</style>\n</head>\n<body>{_BODY}<script>{_JS}</script>\n</body>\n</html>\n"
)

#: Headers served with the page: the policy allows exactly its inline style and script.
DASHBOARD_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; "
        f"script-src {_csp_source(_JS)}; "
        f"style-src {_csp_source(_CSS)}; "
        "connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def dashboard(request: Request) -> Response:
    """``GET /``: the dashboard page."""
    return HTMLResponse(DASHBOARD_HTML, headers=DASHBOARD_HEADERS)
