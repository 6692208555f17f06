"""docs/http.md and GET /openapi.json stay true: every route is described in both, the
fields of a build and a machine are the ones the API sends, and every example of the page,
run in order against the real application, gets the status and answer shown."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from hydra_trio.runner.blobs import Storage
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.http import create_app
from hydra_trio.runner.model import Machine
from hydra_trio.runner.openapi import document

DOC = (Path(__file__).parent.parent / "docs" / "http.md").read_text(encoding="utf-8")
SYSTEM = "x86_64-linux"
EXAMPLE = re.compile(r"```http-example\n(.*?)```", re.DOTALL)


def app_routes(app: Any) -> set[tuple[str, str]]:
    """(method, OpenAPI-style path) of every route of the application."""
    routes = set()
    for route in app.routes:
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)
        for method in route.methods or ():
            if method != "HEAD":
                routes.add((method, path))
    return routes


def machine(machine_id: str, hostname: str) -> Machine:
    return Machine(
        machine_id=machine_id,
        hostname=hostname,
        systems=(SYSTEM,),
        supported_features=frozenset(),
        mandatory_features=frozenset(),
        max_jobs=1,
        speed_factor=1.0,
    )


def the_farm() -> Farm:
    """What the page says its examples run against."""
    farm = Farm()
    for machine_id, hostname in [
        ("m-twin-1", "twin"),
        ("m-twin-2", "twin"),
        ("m-0001", "builder-1"),
    ]:
        farm.registry.machines[machine_id] = machine(machine_id, hostname)
    return farm


def _named_id(ids: dict[str, str], match: re.Match[str]) -> str:
    """An example's ``<name>``: the id of the build of that name."""
    return ids[match[1]]


def app_for(farm: Farm, tmp_path: Path) -> Any:
    return create_app(farm, Storage.in_dir(tmp_path), default_system=SYSTEM)


def test_openapi_describes_every_route(tmp_path: Path) -> None:
    """Each route of the application is a path and method of the OpenAPI document and a
    ``### `METHOD /path``` section of docs/http.md, and neither describes any other."""
    routes = app_routes(app_for(Farm(), tmp_path))
    described = {
        (method.upper(), path) for path, item in document()["paths"].items() for method in item
    }
    assert described == routes
    # the page writes {id} for every path parameter of a build or a machine
    documented = set(re.findall(r"^### `(GET|POST) (/\S*)`", DOC, re.MULTILINE))

    def shape(routes: set[tuple[str, str]]) -> set[tuple[str, str]]:
        return {(method, re.sub(r"\{\w+\}", "{}", path)) for method, path in routes}

    assert shape(documented) == shape(routes)


async def test_the_documented_fields_are_the_fields_sent(tmp_path: Path) -> None:
    """The Build and Machine schemas, and the field tables of docs/http.md, name exactly the
    fields GET /builds/{id} and GET /status send."""
    farm = the_farm()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app_for(farm, tmp_path)), base_url="http://runner"
    ) as client:
        build_id = (await client.post("/builds", json={"command": ["true"]})).json()["id"]
        build = (await client.get(f"/builds/{build_id}")).json()
        status = (await client.get("/status")).json()
    schemas = document()["components"]["schemas"]
    assert set(schemas["Build"]["properties"]) == set(build)
    assert set(schemas["Machine"]["properties"]) == set(status["machines"][0])
    assert set(schemas["Status"]["properties"]) == set(status)

    def table_fields(heading: str) -> set[str]:
        section = DOC.split(heading, 1)[1].split("\n#", 1)[0]
        rows = re.findall(r"^\| (`.*?) \|", section, re.MULTILINE)
        return {name for row in rows for name in re.findall(r"`(\w+)`", row)}

    assert table_fields("### `GET /builds/{id}`") == set(build)
    assert table_fields("### `GET /status`") == set(status["machines"][0])


def matches(expected: Any, actual: Any) -> bool:
    """``actual`` has what ``expected`` shows: the same scalars, every key of an object
    (more keys allowed), lists of the same length; ``"<...>"`` matches anything."""
    if isinstance(expected, str) and re.fullmatch(r"<[^>]*>", expected):
        return True
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            key in actual and matches(value, actual[key]) for key, value in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual and type(expected) is type(actual))


def parse_example(text: str) -> tuple[str, str, Any, int, Any]:
    request, _, answer = text.partition("\n\n")
    line, _, body = request.partition("\n")
    method, path = line.split()
    status, _, expected = answer.strip().partition("\n")
    return (
        method,
        path,
        json.loads(body) if body.strip() else None,
        int(status),
        json.loads(expected) if expected.strip() else None,
    )


EXAMPLES = [parse_example(text) for text in EXAMPLE.findall(DOC)]


def test_the_page_has_examples_of_each_kind() -> None:
    """Examples of success and of mistakes, for builds and machines."""
    assert len(EXAMPLES) >= 15
    assert {status for *_, status, _ in EXAMPLES} >= {200, 201, 400, 404, 409, 422}


async def test_every_example_gets_the_answer_shown(tmp_path: Path) -> None:
    """Run in order against the application (builds made by one example are there for the
    next), each example gets its status and an answer that matches the one shown."""
    farm = the_farm()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app_for(farm, tmp_path)), base_url="http://runner"
    ) as client:
        for method, path, body, status, expected in EXAMPLES:
            ids = {b.spec.name: b.id for b in farm.builds.values() if b.spec.name}
            url = re.sub(r"<(\w+)>", functools.partial(_named_id, ids), path)
            response = await client.request(method, url, json=body)
            where = f"{method} {path}: {response.text[:500]}"
            assert response.status_code == status, where
            assert response.headers["content-type"] == "application/json", where
            if expected is not None:
                assert matches(expected, response.json()), where


@pytest.mark.parametrize("status", ["400", "403", "404", "409", "410", "413", "422", "503", "507"])
def test_every_error_status_is_in_the_table(status: str) -> None:
    """The errors table of docs/http.md has each status the API answers with."""
    assert f"| `{status}` |" in DOC
