"""``RunnerClient``: the client commands' HTTP calls to a queue runner's API.

Synchronous (``httpx``): the client commands are short-lived scripts; ``up`` calls it from a
worker thread.  Whatever goes wrong (the runner cannot be reached, refuses the request, answers
something that is not its API) is a ``RunnerClientError`` whose message is the one line to show
the user; the commands print it with ``fail``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import attrs
import httpx

T = TypeVar("T")

#: The queue runner's HTTP API by default (CONTRACT.md).
DEFAULT_URL = "http://127.0.0.1:7421"


class RunnerClientError(Exception):
    """A call that did not get the answer it asked for; ``str()`` is one line for the user."""


@attrs.frozen
class RunnerClient:
    """The queue runner at ``url``; ``token`` (``--token-file``) goes with every call.

    ``url`` may be a comma list of runners sharing one database (``--url A,B``): each call
    goes to them in turn until one answers as the leader.  A runner that cannot be reached,
    or a standby (``503`` naming the leader), passes the call on: to the leader it named
    first, else to the next of the list."""

    url: str = DEFAULT_URL
    token: bytes | None = attrs.field(default=None, repr=False)
    #: seconds a call may take (not a log stream's: it lasts as long as the build).
    timeout: float = 30.0

    # -- the API ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self._object("GET", "/status")

    def build(self, build_id: str) -> dict[str, Any]:
        return self._object("GET", f"/builds/{build_id}")

    def submit(self, body: dict[str, Any]) -> str:
        """``POST /builds`` of one build; its id."""
        answer = self._object("POST", "/builds", json=body)
        return self._field(answer, "id", str)

    def submit_graph(self, graph: dict[str, Any]) -> dict[str, str]:
        """``POST /builds`` of a graph (``graph.load_graph``); the builds' ids by name."""
        answer = self._object("POST", "/builds", json=graph)
        return self._field(answer, "ids", dict)

    def submit_drv(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /builds`` of a derivation: ``{"id", "storePaths"}``, or ``{"storePaths"}``
        alone when the runner's store has every output already."""
        return self._object("POST", "/builds", json=body)

    def cancel(self, build_id: str) -> dict[str, Any]:
        return self._object("POST", f"/builds/{build_id}/cancel")

    def drain(self, machine: str) -> dict[str, Any]:
        return self._object("POST", f"/machines/{machine}/drain")

    def undrain(self, machine: str) -> dict[str, Any]:
        return self._object("POST", f"/machines/{machine}/undrain")

    def builds(self, params: dict[str, str]) -> dict[str, Any]:
        """``GET /builds``: ``{"builds", "total", "next"}`` (a page, newest first)."""
        return self._object("GET", "/builds", params=params)

    def log(self, build_id: str, tail: int | None = None) -> str:
        """A build's log (of its current attempt), or its last ``tail`` bytes."""
        query = f"?tail={tail}" if tail is not None else ""
        answer = self._request("GET", f"/builds/{build_id}/log{query}")
        return answer.text

    def follow_log(self, build_id: str) -> Iterator[bytes]:
        """A build's log as it grows, until the build ends."""
        try:
            with httpx.stream(
                "GET",
                self._address(f"/builds/{build_id}/log?follow=1"),
                headers=self._headers(),
                timeout=None,
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                yield from response.iter_bytes()
        except httpx.HTTPError as exc:
            raise RunnerClientError(f"lost the log stream from {self.url}: {exc}") from None

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.url.split(",") if u.strip()] or [self.url]

    def _address(self, path: str) -> str:
        return self.urls[0] + path

    def _headers(self) -> dict[str, str]:
        if self.token is None:
            return {}
        return {"Authorization": "Bearer " + self.token.decode("ascii")}  # load_token checked it

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        todo, tried = self.urls, set()
        while True:
            url = todo.pop(0)
            tried.add(url)
            try:
                response = httpx.request(
                    method, url + path, headers=self._headers(), timeout=self.timeout, **kwargs
                )
            except httpx.InvalidURL as exc:
                raise RunnerClientError(f"invalid --url {url!r}: {exc}") from None
            except httpx.HTTPError as exc:
                if todo:
                    continue  # another runner of the list may lead
                raise RunnerClientError(
                    f"cannot reach the queue runner at {url}: {exc} (is it running? "
                    "`hydra-trio up`)"
                ) from None
            leader = _standby_leader(response, path)
            if leader is not None and (todo or (leader and leader not in tried)):
                if leader and leader not in tried:
                    todo.insert(0, leader)
                continue
            self._check(response)
            return response

    def _object(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """A call whose answer is a JSON object (anything else is not a queue runner's)."""
        response = self._request(method, path, **kwargs)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise RunnerClientError(
                f"{self.url} did not answer {method} {path} like a queue runner (is --url its "
                "HTTP API?)"
            )
        return answer

    def _field(self, answer: dict[str, Any], key: str, kind: type[T]) -> T:
        value = answer.get(key)
        if not isinstance(value, kind):
            raise RunnerClientError(f"{self.url} answered without {key!r}: {answer}")
        return value

    def _check(self, response: httpx.Response) -> None:
        """A runner's error answer as a one-line error (the body must have been read)."""
        if response.status_code < 400:
            return
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            message = body.get("error", response.text)
        else:
            message = response.text.strip() or response.reason_phrase
        if response.status_code == 403:
            hint = "is --token-file the runner's token?" if self.token else "pass --token-file"
            raise RunnerClientError(f"the queue runner refused the request: {message} ({hint})")
        raise RunnerClientError(f"{message} (HTTP {response.status_code})")


def _standby_leader(response: httpx.Response, path: str) -> str | None:
    """For a standby's answer (``503 {"leader": URL}``, or its ``/status`` with ``"role":
    "standby"``): the leader's URL ("" when it knows none); None for any other answer."""
    if response.status_code != 503 and not (response.status_code == 200 and path == "/status"):
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or "leader" not in body:
        return None
    if response.status_code == 200 and body.get("role") != "standby":
        return None
    leader = body["leader"]
    return leader.rstrip("/") if isinstance(leader, str) else ""
