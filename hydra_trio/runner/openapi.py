"""The HTTP API described as OpenAPI 3.1 (``GET /openapi.json``; docs/http.md explains it).

A hand-written description, not one derived from the handlers: it is the contract clients are
written against, and ``tests/test_http_doc.py`` checks it against the application (every route
is described, every field a build or machine has is listed) and against docs/http.md.
"""

from __future__ import annotations

from typing import Any

from hydra_trio import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}
_STR = {"type": "string"}
_STRS = {"type": "array", "items": _STR}
_SECONDS_OR_NULL = {"type": ["number", "null"], "exclusiveMinimum": 0}
_TS = {"type": ["number", "null"], "description": "seconds since the Unix epoch"}


def _answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    if schema is None:
        return {"description": description}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    reasons = {
        400: "a malformed request: bad query parameter, body not JSON or nested too deeply",
        403: "the call needs the runner's token (`Authorization: Bearer <token>`)",
        404: "no such build, machine or output",
        409: "the request names more than one machine, or an output that is a link",
        410: "the output's file is missing from the runner's state dir",
        413: "the body is larger than 64 MiB",
        422: "the body is JSON but not a valid request; the message names the field",
        503: "the database is unreachable (writes), or this runner is a standby",
        507: "the database's disk is full (writes)",
    }
    return {str(code): _answer(reasons[code], _ERROR) for code in codes}


_BUILD_ID = {"name": "build_id", "in": "path", "required": True, "schema": _STR}
_MACHINE = {
    "name": "machine_id",
    "in": "path",
    "required": True,
    "schema": _STR,
    "description": "a machine id, or a hostname only one machine has",
}

_BUILD_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["command"],
    "properties": {
        "command": {**_STRS, "minItems": 1, "description": "argv; each at most 64 KiB"},
        "name": {**_STR, "description": "one path component; `$IN/<name>` of its dependents"},
        "system": {**_STR, "description": "default: the runner's system"},
        "requiredFeatures": _STRS,
        "after": {**_STRS, "description": "ids of builds (names, in a graph) it depends on"},
        "priority": {"type": "integer", "default": 0},
        "timeout": _SECONDS_OR_NULL,
        "maxSilent": _SECONDS_OR_NULL,
        "env": {"type": "object", "additionalProperties": _STR},
        "network": {
            "type": "boolean",
            "default": False,
            "description": "needs the network: the same as requiring the feature `network`",
        },
    },
}

_BUILD = {
    "type": "object",
    "properties": {
        "id": _STR,
        "name": {"type": ["string", "null"]},
        "command": _STRS,
        "system": _STR,
        "requiredFeatures": _STRS,
        "after": _STRS,
        "priority": {"type": "integer"},
        "timeout": _SECONDS_OR_NULL,
        "maxSilent": _SECONDS_OR_NULL,
        "state": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
        "status": {
            "type": ["string", "null"],
            "description": "why it ended: success, build-failed, timed-out, silent-too-long, "
            "log-limit-exceeded, output-limit-exceeded, dependency-failed, builder-lost, "
            "fetch-failed, upload-failed, internal-error, cancelled",
        },
        "phase": {"enum": ["fetching", "building", "uploading", None]},
        "attempts": {"type": "integer", "description": "dispatches so far"},
        "machine": {"type": ["string", "null"], "description": "hostname of its builder"},
        "machineId": {"type": ["string", "null"]},
        "exitCode": {"type": ["integer", "null"]},
        "error": {"type": ["string", "null"]},
        "waitingFor": {**_STRS, "description": "unfinished builds it depends on"},
        "waitingReason": {"type": ["string", "null"], "description": "why it is still queued"},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"path": _STR, "size": {"type": "integer"}, "sha256": _STR},
            },
        },
        "drv": {"type": ["string", "null"]},
        "storePaths": {"type": "object", "additionalProperties": _STR},
        "timings": {"type": "object", "additionalProperties": {"type": "number"}},
        "submittedAt": _TS,
        "startedAt": _TS,
        "finishedAt": _TS,
    },
}

_MACHINE_JSON = {
    "type": "object",
    "properties": {
        "machineId": _STR,
        "hostname": _STR,
        "systems": _STRS,
        "supportedFeatures": _STRS,
        "mandatoryFeatures": _STRS,
        "maxJobs": {"type": "integer"},
        "speedFactor": {"type": "number"},
        "executors": _STRS,
        "currentJobs": {"type": "integer"},
        "sinceLastPing": {"type": "number"},
        "connected": {"type": "boolean"},
        "state": {"enum": ["connected", "draining", "disconnected"]},
        "drainRequested": {
            "type": "boolean",
            "description": "an operator drained it: it gets no builds until undrained, also "
            "after it reconnects or the runner restarts",
        },
        "succeededBuilds": {"type": "integer"},
        "failedBuilds": {"type": "integer"},
        "lostBuilds": {"type": "integer"},
        "disconnectReason": {"type": ["string", "null"]},
        "load": {"type": "number", "description": "load average (1 min) of the builder"},
        "diskFree": {"type": "integer", "description": "free bytes in its work dir"},
        "lowDisk": {
            "type": "boolean",
            "description": "its free disk is below its minimum: no new build until it has room",
        },
    },
}

_LIST_PARAMETERS = [
    {
        "name": "state",
        "in": "query",
        "schema": _STR,
        "description": "only builds in these states (comma-separated or repeated)",
    },
    {"name": "name", "in": "query", "schema": _STR, "description": "only builds of this name"},
    {
        "name": "machine",
        "in": "query",
        "schema": _STR,
        "description": "only builds run (last) on this machine: its id or hostname",
    },
    {
        "name": "q",
        "in": "query",
        "schema": _STR,
        "description": "only builds whose id, name or command contains this text (any case)",
    },
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
    },
    {
        "name": "cursor",
        "in": "query",
        "schema": _STR,
        "description": "the `next` of the previous page: the builds older than it",
    },
]


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the queue runner's HTTP API."""
    write_errors = _errors(403, 503, 507)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hydra-trio queue runner",
            "version": __version__,
            "description": 'Errors are JSON `{"error": "..."}`; a 4xx is the caller\'s '
            "mistake.  With a token configured, every call that changes state needs "
            "`Authorization: Bearer <token>` (and reads too with --http-token-for-reads).",
        },
        "paths": {
            "/": {
                "get": {"summary": "the dashboard (HTML)", "responses": {"200": _answer("HTML")}}
            },
            "/status": {
                "get": {
                    "summary": "machines, queue counts, counters, role, warnings",
                    "responses": {
                        "200": _answer("the farm", {"$ref": "#/components/schemas/Status"})
                    },
                }
            },
            "/builds": {
                "get": {
                    "summary": "builds, newest first, a page at a time",
                    "parameters": _LIST_PARAMETERS,
                    "responses": {
                        "200": _answer("a page", {"$ref": "#/components/schemas/BuildList"}),
                        **_errors(400, 403),
                    },
                },
                "post": {
                    "summary": "submit a build, a graph of named builds, or a Nix derivation",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/BuildSpec"},
                                        {"$ref": "#/components/schemas/Graph"},
                                        {"$ref": "#/components/schemas/Drv"},
                                    ]
                                }
                            }
                        },
                    },
                    "responses": {
                        "201": _answer(
                            'queued: `{"id"}` for one build, `{"ids": {name: id}}` for a graph',
                            {"type": "object"},
                        ),
                        "200": _answer("a derivation whose outputs are already valid"),
                        **_errors(400, 413, 422),
                        **write_errors,
                    },
                },
            },
            "/builds/{build_id}": {
                "get": {
                    "summary": "one build",
                    "parameters": [_BUILD_ID],
                    "responses": {
                        "200": _answer("the build", {"$ref": "#/components/schemas/Build"}),
                        **_errors(403, 404),
                    },
                }
            },
            "/builds/{build_id}/log": {
                "get": {
                    "summary": "the current attempt's log (text/plain)",
                    "parameters": [
                        _BUILD_ID,
                        {
                            "name": "follow",
                            "in": "query",
                            "schema": {"enum": ["1", "true", "yes"]},
                            "description": "stream until the build ends",
                        },
                        {
                            "name": "tail",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 65536},
                            "description": "only the last N bytes",
                        },
                    ],
                    "responses": {"200": _answer("text/plain"), **_errors(400, 403, 404)},
                }
            },
            "/builds/{build_id}/outputs/{path}": {
                "get": {
                    "summary": "one output file (application/octet-stream)",
                    "parameters": [
                        _BUILD_ID,
                        {"name": "path", "in": "path", "required": True, "schema": _STR},
                    ],
                    "responses": {"200": _answer("the file"), **_errors(403, 404, 409, 410)},
                }
            },
            "/builds/{build_id}/cancel": {
                "post": {
                    "summary": "cancel a queued or running build (a finished one is unchanged)",
                    "parameters": [_BUILD_ID],
                    "responses": {
                        "200": _answer("the build", {"$ref": "#/components/schemas/Build"}),
                        **_errors(404),
                        **write_errors,
                    },
                }
            },
            "/machines/{machine_id}/drain": {
                "post": {
                    "summary": "no new builds for the machine; a connected builder finishes its "
                    "builds and leaves; remembered until undrain",
                    "parameters": [_MACHINE],
                    "responses": {
                        "200": _answer("the machine", {"$ref": "#/components/schemas/Machine"}),
                        **_errors(404, 409),
                        **write_errors,
                    },
                }
            },
            "/machines/{machine_id}/undrain": {
                "post": {
                    "summary": "the machine gets builds again",
                    "parameters": [_MACHINE],
                    "responses": {
                        "200": _answer("the machine", {"$ref": "#/components/schemas/Machine"}),
                        **_errors(404, 409),
                        **write_errors,
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus text format",
                    "responses": {"200": _answer("text/plain")},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "this description",
                    "responses": {"200": _answer("OpenAPI 3.1", {"type": "object"})},
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": _STR,
                        "leader": {"type": "string", "description": "on a standby's 503"},
                    },
                },
                "BuildSpec": _BUILD_SPEC,
                "Graph": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["builds"],
                    "properties": {
                        "builds": {
                            "type": "array",
                            "items": {"allOf": [_BUILD_SPEC], "required": ["name", "command"]},
                        }
                    },
                },
                "Drv": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["drv"],
                    "properties": {
                        "drv": {**_STR, "description": "/nix/store/...drv"},
                        "priority": {"type": "integer"},
                        "timeout": _SECONDS_OR_NULL,
                        "maxSilent": _SECONDS_OR_NULL,
                    },
                },
                "Build": _BUILD,
                "BuildList": {
                    "type": "object",
                    "properties": {
                        "builds": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Build"},
                        },
                        "total": {"type": "integer", "description": "builds matching the filter"},
                        "next": {
                            "type": ["string", "null"],
                            "description": "the cursor of the next (older) page; null on the last",
                        },
                    },
                },
                "Machine": _MACHINE_JSON,
                "Status": {
                    "type": "object",
                    "properties": {
                        "machines": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Machine"},
                        },
                        "queue": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "counters": {"type": "object"},
                        "role": {"enum": ["leader", "standby"]},
                        "warnings": {"type": "array"},
                    },
                },
            }
        },
    }
