"""The HTTP API of a real queue runner on loopback (real sockets and time: no autojump)."""

from __future__ import annotations

import gc
import hashlib
import json
import threading
import warnings
from typing import Any

import httpx
import pytest
import trio

from hydra_trio.protocol.messages import FileInfo
from hydra_trio.runner import http as runner_http
from hydra_trio.runner import model

from .helpers.common import SYSTEM
from .helpers.runner import LIMIT, Runner

pytestmark = pytest.mark.realnet


MACHINE_FIELDS = {
    "machineId",
    "hostname",
    "systems",
    "supportedFeatures",
    "mandatoryFeatures",
    "maxJobs",
    "speedFactor",
    "currentJobs",
    "sinceLastPing",
    "connected",
    "state",
    "drainRequested",
    "succeededBuilds",
    "failedBuilds",
    "lostBuilds",
}
BUILD_FIELDS = {
    "id",
    "name",
    "state",
    "status",
    "attempts",
    "machine",
    "exitCode",
    "outputs",
    "submittedAt",
    "startedAt",
    "finishedAt",
}


async def test_status_lists_machines_with_every_contract_field_and_queue_counts(
    runner: Runner,
) -> None:
    """GET /status: each machine has every field the contract names; queue counts by state."""
    with trio.fail_after(LIMIT):
        response = await runner.client.get("/status")
        assert response.status_code == 200
        assert response.json() == {
            "machines": [],
            "queue": {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0},
            "counters": {
                "staleResultsRejected": 0,
                "buildersLostIdle": 0,
                "buildersLostWhileBuilding": 0,
                "requeued": {},
                "framesRejected": {},
                "handshakesRejected": {},
            },
            "role": "leader",
            "warnings": [],
        }
        await runner.start_builder("b1")
        await runner.submit()
        await runner.submit(system="other-system")  # no machine can build it: stays queued
        data = (await runner.client.get("/status")).json()
        assert len(data["machines"]) == 1
        machine = data["machines"][0]
        assert set(machine) >= MACHINE_FIELDS
        assert machine["hostname"] == "b1"
        assert machine["systems"] == [SYSTEM]
        assert machine["supportedFeatures"] == ["network"]  # unsandboxed: builds have it
        assert machine["mandatoryFeatures"] == []
        assert machine["maxJobs"] == 1
        assert machine["speedFactor"] == 1.0
        assert machine["connected"] is True
        assert machine["state"] == "connected"
        assert machine["lostBuilds"] == 0
        assert 0 <= machine["sinceLastPing"] < 5
        assert set(data["queue"]) == {"queued", "running", "succeeded", "failed", "cancelled"}
        assert sum(data["queue"].values()) == 2
        assert data["queue"]["queued"] >= 1


async def test_status_machines_are_their_to_json_and_follow_changes(runner: Runner) -> None:
    """/status joins each machine's kept encoding: the same as its to_json, after changes."""
    from hydra_trio.runner.model import Machine

    for i in range(5):
        runner.farm.registry.machines[f"m{i}"] = Machine(
            machine_id=f"m{i}",
            hostname=f"h{i}\u00e9",  # not ASCII: written as UTF-8, as JSONResponse does
            systems=(SYSTEM,),
            supported_features=frozenset({"kvm", "big"}),
            mandatory_features=frozenset(),
            max_jobs=2,
            speed_factor=1.5,
        )

    def timeless(response: httpx.Response) -> Any:
        data = json.loads(response.content)
        for machine in data["machines"]:
            del machine["sinceLastPing"]  # the clock moves between calls
        return data

    def expected() -> list[dict[str, Any]]:
        machines = [m.to_json(trio.current_time()) for m in runner.farm.machines.values()]
        for machine in machines:
            del machine["sinceLastPing"]
        return machines

    with trio.fail_after(LIMIT):
        first = await runner.client.get("/status")
        assert first.headers["content-type"] == "application/json"
        assert timeless(first)["machines"] == expected()
        machine = runner.farm.machines["m0"]
        machine.hostname = "renamed"  # a hello's field
        machine.disconnect_reason = 'said "bye" \u2014 \\ twice'  # a session's field
        machine.succeeded_builds = 3
        changed = await runner.client.get("/status")
    assert timeless(changed)["machines"] == expected()
    assert changed.json()["machines"][0]["hostname"] == "renamed"
    assert changed.json()["machines"][0]["disconnectReason"] == 'said "bye" \u2014 \\ twice'
    assert changed.json()["machines"][1]["hostname"] == "h1\u00e9"
    assert changed.json()["machines"][1]["supportedFeatures"] == ["big", "kvm"]


async def test_submit_returns_201_with_the_new_builds_id_and_show_describes_it(
    runner: Runner,
) -> None:
    """POST /builds answers 201 {"id"}; GET /builds/{id} has every contract field."""
    with trio.fail_after(LIMIT):
        response = await runner.client.post(
            "/builds",
            json={"command": ["echo", "hi"], "name": "greet", "priority": 3, "timeout": 60},
        )
        assert response.status_code == 201
        assert response.headers["content-type"].startswith("application/json")
        assert set(response.json()) == {"id"}
        build_id = response.json()["id"]
        data = (await runner.client.get(f"/builds/{build_id}")).json()
        assert set(data) >= BUILD_FIELDS
        assert data["id"] == build_id
        assert data["name"] == "greet"
        assert data["command"] == ["echo", "hi"]
        assert data["state"] == "queued"
        assert data["status"] is None
        assert data["attempts"] == 0
        assert data["machine"] is None
        assert data["exitCode"] is None
        assert data["outputs"] == []
        assert data["priority"] == 3
        assert data["timeout"] == 60
        assert isinstance(data["submittedAt"], float)
        assert data["startedAt"] is None
        assert data["finishedAt"] is None
        assert "no connected machine" in data["waitingReason"]


@pytest.mark.parametrize(
    "path",
    ["/builds/nope", "/builds/nope/log", "/builds/nope/outputs/f"],
)
async def test_an_unknown_build_is_a_404_with_a_json_error(runner: Runner, path: str) -> None:
    """Reading an unknown build id answers 404 {"error": ...} naming the id."""
    with trio.fail_after(LIMIT):
        response = await runner.client.get(path)
        assert response.status_code == 404
        assert "nope" in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x"}, "command"),
        ({"command": []}, "command"),
        ({"command": "echo hi"}, "command"),
        ({"command": ["echo", 1]}, "command"),
        ({"command": ["true"], "timeout": -1}, "timeout"),
        ({"command": ["true"], "timeout": "soon"}, "timeout"),
        ({"command": ["true"], "maxSilent": 0}, "maxSilent"),
        ({"command": ["true"], "after": ["no-such-build"]}, "after"),
        ({"command": ["true", "\ud800"]}, "command"),
        ({"command": ["true"], "env": {"A": "\udcff"}}, "env"),
        ({"command": ["true"], "system": "\ud800"}, "system"),
        ({"command": ["true"], "priority": "high"}, "priority"),
        ({"command": ["true"], "requiredFeatures": "kvm"}, "requiredFeatures"),
        (["true"], "object"),
    ],
)
async def test_an_invalid_build_spec_is_a_422_naming_the_field(
    runner: Runner, body: Any, field: str
) -> None:
    """An invalid POST /builds body: 422 {"error"} naming the field; nothing is queued."""
    with trio.fail_after(LIMIT):
        response = await runner.client.post(  # ASCII JSON: "\ud800" escapes, as clients send
            "/builds", content=json.dumps(body), headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
        assert field in response.json()["error"]
        assert runner.farm.builds == {}


@pytest.mark.parametrize("name", ["a/b", "..", "."])
async def test_a_name_that_is_not_a_single_path_component_is_a_422(
    runner: Runner, name: str
) -> None:
    """A build's name is its dependents' $IN/<name>: one that is not a plain file name is
    refused at submission rather than failing every dependent later."""
    with trio.fail_after(LIMIT):
        response = await runner.client.post("/builds", json={"command": ["true"], "name": name})
        assert response.status_code == 422, response.text
        assert "name" in response.json()["error"]


async def test_an_oversized_body_is_a_413(runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """A body past the limit is refused with 413 (limit lowered: the real one is 64 MiB),
    and the request's body stream is closed, not left to the garbage collector."""
    monkeypatch.setattr(runner_http, "MAX_BODY", 1000)
    with trio.fail_after(LIMIT), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        body = b'{"command": ["true"], "name": "' + b"x" * 2000 + b'"}'
        response = await runner.client.post(
            "/builds", content=body, headers={"content-type": "application/json"}
        )
        gc.collect()  # an unclosed body stream is reported now, not in a later test
    assert response.status_code == 413
    assert "1000" in response.json()["error"]
    assert runner.farm.builds == {}
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


async def test_a_body_that_is_not_json_is_a_400(runner: Runner) -> None:
    """Malformed JSON answers 400 {"error": ...}."""
    with trio.fail_after(LIMIT):
        response = await runner.client.post(
            "/builds", content=b'{"command": [', headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert "JSON" in response.json()["error"]
        assert runner.farm.builds == {}


async def test_cancel_ends_a_queued_build_and_is_idempotent(runner: Runner) -> None:
    """POST /builds/{id}/cancel: the build is cancelled; cancelling it again changes nothing;
    an unknown id is a 404."""
    with trio.fail_after(LIMIT):
        build_id = await runner.submit()
        response = await runner.client.post(f"/builds/{build_id}/cancel")
        assert response.status_code == 200
        assert response.json()["state"] == "cancelled"
        assert response.json()["status"] == "cancelled"
        shown = (await runner.client.get(f"/builds/{build_id}")).json()
        assert shown["state"] == "cancelled"
        assert shown["finishedAt"] is not None
        again = await runner.client.post(f"/builds/{build_id}/cancel")
        assert again.status_code == 200
        assert again.json()["state"] == "cancelled"
        assert (await runner.client.get("/status")).json()["queue"]["cancelled"] == 1
        missing = await runner.client.post("/builds/nope/cancel")
        assert missing.status_code == 404
        assert "error" in missing.json()


async def test_drain_of_an_unknown_machine_is_a_404(runner: Runner) -> None:
    """POST /machines/{id}/drain with an unknown id or hostname: 404 {"error"}."""
    with trio.fail_after(LIMIT):
        response = await runner.client.post("/machines/nope/drain")
        assert response.status_code == 404
        assert "nope" in response.json()["error"]


async def test_drain_of_a_hostname_two_live_builders_share_is_a_409_naming_both(
    runner: Runner,
) -> None:
    """Two builders on one host (two work dirs): drain by hostname is a 409 naming both machine
    ids, and changes nothing; by machine id it drains that one only."""
    with trio.fail_after(LIMIT):
        await runner.start_builder("twin", work="twin-1")
        await runner.start_builder("twin", work="twin-2")
        ids = sorted(m.machine_id for m in runner.farm.machines.values())
        assert len(ids) == 2
        response = await runner.client.post("/machines/twin/drain")
        assert response.status_code == 409
        error = response.json()["error"]
        assert all(machine_id in error for machine_id in ids)
        assert not any(m.drain_requested for m in runner.farm.machines.values())
        response = await runner.client.post(f"/machines/{ids[0]}/drain")
        assert response.status_code == 200
        assert response.json()["drainRequested"] is True
        assert [m.machine_id for m in runner.farm.machines.values() if m.drain_requested] == [
            ids[0]
        ]


async def test_undrain_gives_a_drained_machine_builds_again(runner: Runner) -> None:
    """POST /machines/{id}/undrain clears the drain /status shows; unknown: 404."""
    with trio.fail_after(LIMIT):
        await runner.start_builder("b1")
        drained = await runner.client.post("/machines/b1/drain")
        assert drained.json()["drainRequested"] is True
        status = (await runner.client.get("/status")).json()
        assert [m["drainRequested"] for m in status["machines"]] == [True]
        undrained = await runner.client.post("/machines/b1/undrain")
        assert undrained.status_code == 200
        assert undrained.json()["drainRequested"] is False
        status = (await runner.client.get("/status")).json()
        assert [m["drainRequested"] for m in status["machines"]] == [False]
        missing = await runner.client.post("/machines/nope/undrain")
        assert missing.status_code == 404
        assert "nope" in missing.json()["error"]


async def test_metrics_are_prometheus_text_named_hydra_trio(runner: Runner) -> None:
    """GET /metrics: text/plain, every family and sample named hydra_trio_*, with the
    builds-by-state gauge counting a queued build."""
    with trio.fail_after(LIMIT):
        await runner.submit()
        response = await runner.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        lines = [line for line in response.text.splitlines() if line]
        assert lines
        for line in lines:
            name = line.split()[2] if line.startswith("# ") else line
            assert name.startswith("hydra_trio_"), line
        assert "# TYPE hydra_trio_builds gauge" in lines
        assert 'hydra_trio_builds{state="queued"} 1.0' in lines


async def test_a_build_runs_end_to_end_on_a_real_builder(runner: Runner) -> None:
    """Submitted over HTTP, run by a real builder over TCP: it succeeds, its log says hi,
    and its output f is listed and downloadable."""
    with trio.fail_after(LIMIT):
        await runner.start_builder("b1")
        build_id = await runner.submit(command=["sh", "-c", "echo hi; echo x > $OUT/f"])
        while (data := (await runner.client.get(f"/builds/{build_id}")).json())["state"] in (
            "queued",
            "running",
        ):
            await trio.sleep(0.05)
        assert data["state"] == "succeeded", data
        assert data["status"] == "success"
        assert data["exitCode"] == 0
        assert data["attempts"] == 1
        assert data["machine"] == "b1"
        assert data["outputs"] == [
            {"path": "f", "size": 2, "sha256": hashlib.sha256(b"x\n").hexdigest()}
        ]
        assert data["startedAt"] <= data["finishedAt"]
        log = await runner.client.get(f"/builds/{build_id}/log")
        assert log.status_code == 200
        assert log.headers["content-type"].startswith("text/plain")
        assert "hi" in log.text
        output = await runner.client.get(f"/builds/{build_id}/outputs/f")
        assert output.status_code == 200
        assert output.content == b"x\n"  # (from its pack: a small output)
        assert output.headers["content-disposition"] == 'attachment; filename="f"'
        machine = (await runner.client.get("/status")).json()["machines"][0]
        assert machine["succeededBuilds"] == 1
        assert machine["currentJobs"] == 0


async def test_builds_with_many_outputs_are_shown_whole_from_a_worker_thread(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build listing more outputs than ENCODE_INLINE is shown, alone or in a list, with
    every output in order, encoded off the event loop, JSON_PIECE outputs per piece (one
    ``json.dumps`` of them all holds the GIL, and so the event loop, for its whole length):
    the same JSON as inline."""
    on_loop: list[bool] = []
    pieces: list[int] = []
    outputs_json = model.outputs_json

    def watched(files: tuple[FileInfo, ...]) -> list[dict[str, Any]]:
        on_loop.append(threading.current_thread() is threading.main_thread())
        pieces.append(len(files))
        return outputs_json(files)

    with trio.fail_after(LIMIT):
        build_id = await runner.submit("true")
        build = runner.farm.builds[build_id]
        build.outputs = tuple(
            FileInfo(path=f"d/f{i}", size=i, sha256=hashlib.sha256(b"%d" % i).hexdigest())
            for i in range(runner_http.ENCODE_INLINE + 5)
        )
        inline = build.to_json(runner.farm.waiting_reason(build, trio.current_time()))
        monkeypatch.setattr(runner_http, "outputs_json", watched)
        shown = (await runner.client.get(f"/builds/{build_id}")).json()
        listed = (await runner.client.get("/builds")).json()["builds"]
    assert shown == json.loads(json.dumps(inline))
    assert [b for b in listed if b["id"] == build_id] == [shown]
    assert len(shown["outputs"]) == runner_http.ENCODE_INLINE + 5
    assert shown["outputs"][7] == {"path": "d/f7", "size": 7, "sha256": build.outputs[7].sha256}
    count = runner_http.ENCODE_INLINE + 5
    expected = [min(model.JSON_PIECE, count - at) for at in range(0, count, model.JSON_PIECE)]
    assert len(expected) > 1
    assert on_loop == [False] * 2 * len(expected)
    assert pieces == expected * 2
