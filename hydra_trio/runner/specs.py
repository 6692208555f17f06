"""Validation of build specs and graphs from clients (JSON bodies and TOML graph files).

Pure functions: each error is a ``SpecError`` whose message names the field (and, in a graph,
the build), so the HTTP layer can answer 422 with it and the CLI can print it as one line.
"""

from __future__ import annotations

import difflib
import heapq
import json
import math
from typing import Any

import attrs

from hydra_trio.nixstore import is_store_path
from hydra_trio.protocol.messages import NETWORK_FEATURE, Assign
from hydra_trio.protocol.validators import MAX_LIST, MAX_STRING, encodable
from hydra_trio.runner.model import BuildSpec

#: Builds one graph submission may hold: a limit against abuse that still admits very large
#: evaluations (Hydra jobsets of tens of thousands of steps).
MAX_GRAPH_BUILDS = 100_000
#: The longest build name: it becomes a file name under $IN on the builders of its
#: dependents, and file systems allow 255 bytes.
MAX_NAME_BYTES = 255


class SpecError(ValueError):
    """A build spec from a client is invalid; the message names the field."""


class BodyError(ValueError):
    """A request body is not JSON this API reads (HTTP 400)."""


#: How deep a JSON body may nest arrays and objects.  A graph needs 4 levels; the limit keeps
#: a body of 10,000 ``[`` from reaching the parser's recursion limit (a RecursionError, which
#: was a 500) or any code that walks the value.
MAX_JSON_DEPTH = 32


def decode_json(data: bytes | bytearray) -> Any:
    """The JSON value of a request body (empty: null); ``BodyError`` saying why not."""
    too_deep = f"the body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
    try:
        value = json.loads(data or b"null")
    except RecursionError:
        raise BodyError(too_deep) from None
    except ValueError as exc:
        raise BodyError(f"the body is not valid JSON: {exc}") from None
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BodyError(too_deep)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return value


#: The fields of one build in ``POST /builds`` (and in each entry of a graph's ``builds``).
SPEC_FIELDS = (
    "command",
    "name",
    "system",
    "requiredFeatures",
    "after",
    "priority",
    "timeout",
    "maxSilent",
    "env",
    "network",
)
#: The fields of a ``{"drv": ...}`` body.
DRV_FIELDS = ("drv", "priority", "timeout", "maxSilent")
#: The fields of a graph body.
GRAPH_FIELDS = ("builds",)
#: What a misspelt field may have meant: each kind of body names the others' keys too.
_ALL_FIELDS = (*SPEC_FIELDS, "drv", "builds")


def check_fields(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse a key that is not in ``allowed``, naming the nearest valid one: a misspelt
    optional field (``"timout"``) would otherwise be dropped silently, and its limit with it."""
    for key in body:
        if key in allowed:
            continue
        shown = str(key)[:100]
        near = nearest(shown, _ALL_FIELDS)
        hint = f"did you mean {near!r}?" if near else f"the fields are {', '.join(allowed)}"
        raise SpecError(f"{shown}: unknown field ({hint})")


def nearest(word: str, choices: tuple[str, ...]) -> str | None:
    """The choice ``word`` most likely misspells, if any: the same but for case, ``-`` and
    ``_`` (``max_silent``), a part of it (``features``), or a close spelling (``timout``)."""

    def norm(text: str) -> str:
        return text.lower().replace("_", "").replace("-", "")

    normal = {norm(c): c for c in choices}
    key = norm(word)
    if key in normal:
        return normal[key]
    if len(key) >= 4:
        for form, choice in normal.items():
            if key in form:
                return choice
    close = difflib.get_close_matches(key, list(normal), n=1, cutoff=0.6)
    return normal[close[0]] if close else None


def _check_strings(field: str, texts: list[str]) -> None:
    """Each string at most MAX_STRING characters, and at most MAX_LIST of them: the limits of
    the wire protocol the build is sent over, said as such (not as a type mismatch)."""
    if len(texts) > MAX_LIST:
        raise SpecError(f"{field}: {len(texts)} items, more than the limit of {MAX_LIST}")
    for index, text in enumerate(texts):
        if len(text) > MAX_STRING:
            raise SpecError(
                f"{field}[{index}]: {len(text)} characters, more than the limit of "
                f"{MAX_STRING} per string"
            )
        if not text.isascii() and not encodable(text):
            raise SpecError(f"{field}[{index}]: not valid Unicode text (a lone surrogate)")


def parse_spec(body: Any, default_system: str) -> BuildSpec:
    """Validate a ``POST /builds`` body into a ``BuildSpec``."""
    if not isinstance(body, dict):
        raise SpecError("the body must be a JSON object")
    check_fields(body, SPEC_FIELDS)
    command = body.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
        raise SpecError("command: must be a non-empty list of strings")
    _check_strings("command", command)
    name = body.get("name") or ""
    if not isinstance(name, str):
        raise SpecError("name: must be a string")
    if len(name) > MAX_STRING:
        raise SpecError(f"name: {len(name)} characters, more than the limit of {MAX_STRING}")
    if "/" in name or "\0" in name or name in (".", ".."):
        # The name becomes $IN/<name> on the builders of its dependents.
        raise SpecError(f"name: {name!r} must be a single path component (no '/', not . or ..)")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise SpecError(
            f"name: {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes (UTF-8), the longest "
            "file name $IN/<name> can have"
        )
    system = body.get("system") or default_system
    if not isinstance(system, str):
        raise SpecError("system: must be a string")
    features = body.get("requiredFeatures") or []
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise SpecError("requiredFeatures: must be a list of strings")
    network = body.get("network", False)
    if not isinstance(network, bool):
        raise SpecError("network: must be true or false")
    if network:
        # as the feature: run only on a builder whose builds have the network (unsandboxed,
        # or --sandbox-allow-network), which then gives this one its own (Assign.network)
        features = [*features, NETWORK_FEATURE]
    after = body.get("after") or []
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        raise SpecError("after: must be a list of build ids")
    priority = body.get("priority", 0)
    if type(priority) is not int:
        raise SpecError("priority: must be an integer")
    env = body.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise SpecError("env: must be an object of strings")
    _check_strings("env", [*env, *env.values()])
    spec = BuildSpec(
        command=tuple(command),
        name=name,
        system=system,
        required_features=frozenset(features),
        after=tuple(after),
        priority=priority,
        timeout=_seconds(body, "timeout"),
        max_silent=_seconds(body, "maxSilent"),
        env=tuple(sorted(env.items())),
    )
    for field, texts in (("system", [system]), ("requiredFeatures", features), ("after", after)):
        _check_strings(field, texts)
    try:  # what will be sent to a builder passes the protocol's own validators
        Assign(build_id="check", attempt=1, name=name, command=spec.command, env=dict(spec.env))
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    return spec


@attrs.frozen(kw_only=True)
class DrvRequest:
    """A validated ``{"drv": ...}`` body of ``POST /builds``: build a Nix derivation."""

    drv: str
    priority: int = 0
    timeout: float | None = None
    max_silent: float | None = None


#: Fields of ``POST /builds`` that make no sense with ``drv`` (the derivation says them).
_NOT_WITH_DRV = ("command", "name", "system", "requiredFeatures", "after", "env", "builds")


def parse_drv_request(body: Any) -> DrvRequest:
    """Validate ``{"drv": "/nix/store/...drv", "priority", "timeout", "maxSilent"}``."""
    if not isinstance(body, dict):
        raise SpecError("the body must be a JSON object")
    drv = body.get("drv")
    if not isinstance(drv, str) or not is_store_path(drv) or not drv.endswith(".drv"):
        raise SpecError(
            f"drv: {str(drv)[:300]!r} is not a derivation's store path (/nix/store/...drv)"
        )
    clash = [key for key in _NOT_WITH_DRV if body.get(key)]
    if clash:
        raise SpecError(f"{clash[0]}: not allowed with drv (the derivation says it)")
    check_fields(body, DRV_FIELDS)
    priority = body.get("priority", 0)
    if type(priority) is not int:
        raise SpecError("priority: must be an integer")
    return DrvRequest(
        drv=drv,
        priority=priority,
        timeout=_seconds(body, "timeout"),
        max_silent=_seconds(body, "maxSilent"),
    )


def _seconds(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise SpecError(f"{key}: must be a positive number of seconds")
    return float(value)


def parse_graph(body: Any, default_system: str) -> tuple[list[BuildSpec], list[str]]:
    """Validate ``{"builds": [{"name": ..., "command": ..., "after": [...]}, ...]}``.

    ``after`` entries name other builds of the graph or existing build ids.  Returns the specs
    in an order where every build comes after the graph builds it names (otherwise in the
    order listed), with ``after``
    still holding names, and the list of names in that order.  A cycle, a duplicate or
    missing name, or too many builds is a ``SpecError``.
    """
    if not isinstance(body, dict) or not isinstance(body.get("builds"), list):
        raise SpecError("builds: must be a list of build specs")
    check_fields(body, GRAPH_FIELDS)
    entries = body["builds"]
    if not entries:
        raise SpecError("builds: the graph is empty")
    if len(entries) > MAX_GRAPH_BUILDS:
        raise SpecError(
            f"builds: {len(entries)} builds in one graph, more than the limit of "
            f"{MAX_GRAPH_BUILDS}; submit it in parts (after may name earlier builds by id)"
        )
    specs: dict[str, BuildSpec] = {}
    for index, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise SpecError(f"builds[{index}].name: every build of a graph needs a name")
        if name in specs:
            raise SpecError(f"builds[{index}].name: {name!r} is defined twice")
        try:
            specs[name] = parse_spec(entry, default_system)
        except SpecError as exc:
            raise SpecError(f"build {name!r}: {exc}") from None
    # Kahn's algorithm, taking the ready build listed first: builds are queued (and, at one
    # priority, run) in the order they are listed, as far as their dependencies allow.
    # What is left over lies on a cycle.
    position = {name: index for index, name in enumerate(specs)}
    pending = {n: {a for a in s.after if a in specs} for n, s in specs.items()}
    dependents: dict[str, list[str]] = {n: [] for n in specs}
    for name, deps in pending.items():
        for dep in deps:
            dependents[dep].append(name)
    ready = [(position[n], n) for n, deps in pending.items() if not deps]
    order: list[str] = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for dependent in dependents[name]:
            pending[dependent].discard(name)
            if not pending[dependent]:
                heapq.heappush(ready, (position[dependent], dependent))
    if len(order) < len(specs):
        cycle = sorted(n for n in specs if n not in order)
        raise SpecError(f"after: the graph has a cycle through {', '.join(map(repr, cycle))}")
    return [specs[n] for n in order], order
