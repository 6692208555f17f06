"""The dashboard page and the ``GET /builds`` listing it polls."""

from __future__ import annotations

import base64
import hashlib
import re
import tempfile
from pathlib import Path

import httpx

from hydra_trio.runner.blobs import Storage
from hydra_trio.runner.dashboard import DASHBOARD_HTML
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.http import MAX_LIMIT, create_app
from hydra_trio.runner.model import Build, BuildSpec

SYSTEM = "x86_64-linux"


def client_for(farm: Farm) -> httpx.AsyncClient:
    """The real application (the POST /builds route sits beside the GET one)."""
    storage = Storage.in_dir(Path(tempfile.mkdtemp(prefix="hydra-trio-dashboard-")))
    app = create_app(farm, storage, default_system=SYSTEM)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://runner")


def submit(farm: Farm, count: int) -> list[Build]:
    return [
        farm.submit(BuildSpec(command=("true", str(i)), system=SYSTEM), 0.0) for i in range(count)
    ]


async def test_builds_newest_first_with_default_limit() -> None:
    """Without parameters the newest 50 builds come first, with the total count."""
    farm = Farm()
    builds = submit(farm, 60)
    async with client_for(farm) as client:
        response = await client.get("/builds")
    assert response.status_code == 200
    body = response.json()
    assert [b["id"] for b in body["builds"]] == [b.id for b in reversed(builds)][:50]
    assert body["total"] == 60
    assert body["builds"][0]["command"] == ["true", "59"]
    assert body["builds"][0]["waitingReason"].startswith("no connected machine")


async def test_builds_limit() -> None:
    """``limit`` caps the list to the newest builds."""
    farm = Farm()
    builds = submit(farm, 5)
    async with client_for(farm) as client:
        response = await client.get("/builds", params={"limit": "2"})
        everything = await client.get("/builds", params={"limit": str(MAX_LIMIT)})
    assert [b["id"] for b in response.json()["builds"]] == [builds[4].id, builds[3].id]
    assert len(everything.json()["builds"]) == 5


async def test_builds_state_filter() -> None:
    """``state`` keeps builds in the given states, repeated or comma-separated."""
    farm = Farm()
    builds = submit(farm, 4)
    farm.cancel(builds[1].id, 0.0)
    farm.cancel(builds[2].id, 0.0)
    async with client_for(farm) as client:
        cancelled = (await client.get("/builds?state=cancelled")).json()
        queued = (await client.get("/builds?state=queued")).json()
        both = (await client.get("/builds?state=queued,cancelled&limit=3")).json()
        repeated = (await client.get("/builds?state=running&state=cancelled")).json()
    assert [b["id"] for b in cancelled["builds"]] == [builds[2].id, builds[1].id]
    assert all(b["state"] == "cancelled" for b in cancelled["builds"])
    assert [b["id"] for b in queued["builds"]] == [builds[3].id, builds[0].id]
    assert [b["id"] for b in both["builds"]] == [b.id for b in reversed(builds[1:])]
    assert both["total"] == 4
    assert [b["id"] for b in repeated["builds"]] == [builds[2].id, builds[1].id]


async def test_builds_bad_parameters() -> None:
    """A limit outside 1..MAX_LIMIT, not an integer, or an unknown state is a 400."""
    farm = Farm()
    submit(farm, 1)
    async with client_for(farm) as client:
        for query in ("limit=abc", "limit=0", "limit=-1", f"limit={MAX_LIMIT + 1}", "limit=1.5"):
            response = await client.get(f"/builds?{query}")
            assert response.status_code == 400, query
            assert "limit" in response.json()["error"]
        response = await client.get("/builds?state=exploded")
        assert response.status_code == 400
        assert "exploded" in response.json()["error"]
        posted = await client.post("/builds", json={"command": ["true"]})
        assert posted.status_code == 201  # the POST beside the GET still works


async def test_dashboard_is_self_contained_html() -> None:
    """``GET /`` serves HTML that names no other host and does not use innerHTML."""
    async with client_for(Farm()) as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.text == DASHBOARD_HTML
    assert re.search(r"https?://", response.text, re.IGNORECASE) is None
    assert re.search(r"//[a-z0-9.-]+\.[a-z]{2,}/", response.text, re.IGNORECASE) is None
    assert "innerHTML" not in response.text and "outerHTML" not in response.text
    assert "document.write" not in response.text


async def test_dashboard_policy_allows_its_own_script_and_style() -> None:
    """The Content-Security-Policy hashes match the page's inline script and style."""
    async with client_for(Farm()) as client:
        response = await client.get("/")
    policy = response.headers["content-security-policy"]
    assert "connect-src 'self'" in policy
    for tag in ("script", "style"):
        (source,) = re.findall(rf"<{tag}>(.*?)</{tag}>", response.text, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in policy


async def test_dashboard_markup_has_no_javascript_escapes() -> None:
    """Outside its script, the page has no ``\\uXXXX`` (HTML shows such an escape literally:
    the build page once read ``\\u2190 All builds``); characters are written as entities."""
    markup = re.sub(r"<script>.*?</script>", "", DASHBOARD_HTML, flags=re.DOTALL)
    assert re.search(r"\\u[0-9a-fA-F]{4}", markup) is None
    assert "&larr; All builds" in markup


async def test_builds_are_paged_with_a_cursor() -> None:
    """``next`` asks for the following, older page; the last page has ``next: null``; builds
    submitted meanwhile do not shift the pages."""
    farm = Farm()
    builds = submit(farm, 7)
    newest_first = [b.id for b in reversed(builds)]
    async with client_for(farm) as client:
        first = (await client.get("/builds?limit=3")).json()
        submit(farm, 2)  # newer builds: the next pages stay where they were
        second = (await client.get(f"/builds?limit=3&cursor={first['next']}")).json()
        third = (await client.get(f"/builds?limit=3&cursor={second['next']}")).json()
        bad = await client.get("/builds?cursor=abc")
    assert [b["id"] for b in first["builds"]] == newest_first[:3]
    assert [b["id"] for b in second["builds"]] == newest_first[3:6]
    assert [b["id"] for b in third["builds"]] == newest_first[6:]
    assert first["total"] == 7 and third["total"] == 9
    assert third["next"] is None
    assert bad.status_code == 400 and "cursor" in bad.json()["error"]


async def test_builds_by_name_machine_and_text() -> None:
    """``name`` is exact, ``q`` finds text in the id, name or command (any case), ``machine``
    keeps the builds of a machine."""
    farm = Farm()
    docs = farm.submit(BuildSpec(command=("make", "Docs"), name="docs", system=SYSTEM), 0.0)
    farm.submit(BuildSpec(command=("make", "all"), name="docs-extra", system=SYSTEM), 0.0)
    farm.submit(BuildSpec(command=("true",), system=SYSTEM), 0.0)
    async with client_for(farm) as client:
        by_name = (await client.get("/builds?name=docs")).json()
        by_text = (await client.get("/builds?q=DOCS")).json()
        by_command = (await client.get("/builds", params={"q": "make docs"})).json()
        by_id = (await client.get(f"/builds?q={docs.id[:6]}")).json()
        by_machine = (await client.get("/builds?machine=nowhere")).json()
    assert [b["id"] for b in by_name["builds"]] == [docs.id]
    assert len(by_text["builds"]) == 2
    assert [b["id"] for b in by_command["builds"]] == [docs.id]
    assert docs.id in [b["id"] for b in by_id["builds"]]
    assert by_machine == {"builds": [], "total": 0, "next": None}


async def test_every_caller_mistake_is_a_json_4xx() -> None:
    """A body nested too deeply is a 400 (not a 500 RecursionError), an unknown field a 422
    naming the nearest valid one, a string over the limit a 422 saying so, an unknown path
    a JSON 404, a wrong method a JSON 405."""
    async with client_for(Farm()) as client:
        deep = await client.post(
            "/builds", content=b"[" * 100_000 + b"]" * 100_000, headers=JSON_TYPE
        )
        nested = await client.post("/builds", json={"command": ["true"], "env": nest(40)})
        typo = await client.post("/builds", json={"command": ["true"], "timout": 5})
        huge = await client.post("/builds", json={"command": ["echo", "x" * 100_000]})
        nowhere = await client.get("/nowhere")
        method = await client.delete("/builds")
    for response, status, text in [
        (deep, 400, "more than 32 levels deep"),
        (nested, 400, "more than 32 levels deep"),
        (typo, 422, "timout: unknown field (did you mean 'timeout'?)"),
        (huge, 422, "command[1]: 100000 characters, more than the limit of 65536"),
        (nowhere, 404, ""),
        (method, 405, ""),
    ]:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        assert text in response.json()["error"]


JSON_TYPE = {"content-type": "application/json"}


def nest(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value
