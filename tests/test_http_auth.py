"""HTTP authentication: the bearer token on the API, the graph-size limit, and the client's
``--token-file``.

Most tests drive the application in process (``httpx.ASGITransport``, as test_dashboard does);
the ones that need a real server (a body that is never sent, the command-line client) run a
real queue runner on loopback, as test_http does.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
from click.testing import Result

from hydra_trio.runner import http as runner_http
from hydra_trio.runner import specs
from hydra_trio.runner.blobs import Storage
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.http import create_app
from hydra_trio.runner.model import BuildSpec, BuildState, Machine

from .helpers.cli import clean_environment, invoke
from .helpers.common import SYSTEM
from .helpers.runner import LIMIT, Runner, start_runner


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No HYDRA_TRIO_* from the shell in the CLI tests."""
    clean_environment(monkeypatch, tmp_path)


TOKEN = b"s3cret-token"
AUTH = {"Authorization": "Bearer s3cret-token"}
MACHINE = "machine-1"

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def farm_with_a_build_and_a_machine() -> Farm:
    """A farm holding one queued build and one known (disconnected, not draining) machine."""
    farm = Farm()
    farm.submit(BuildSpec(command=("true",), system=SYSTEM), 0.0)
    farm.registry.machines[MACHINE] = Machine(
        machine_id=MACHINE,
        hostname="host-1",
        systems=(SYSTEM,),
        supported_features=frozenset(),
        mandatory_features=frozenset(),
        max_jobs=1,
        speed_factor=1.0,
    )
    return farm


def app_for(farm: Farm, tmp_path: Path, **auth: Any) -> Any:
    return create_app(farm, Storage.in_dir(tmp_path), default_system=SYSTEM, **auth)


def client_for(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://runner")


def the_build(farm: Farm) -> str:
    (build_id,) = farm.builds
    return build_id


def writes(build_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every state-changing call of the API, as (path, POST body)."""
    return [
        ("/builds", {"command": ["true"]}),
        (f"/builds/{build_id}/cancel", {}),
        (f"/machines/{MACHINE}/drain", {}),
    ]


def reads(build_id: str) -> list[str]:
    return [
        "/status",
        "/builds",
        f"/builds/{build_id}",
        f"/builds/{build_id}/log",
        "/metrics",
    ]


def assert_unchanged(farm: Farm, build_id: str) -> None:
    assert list(farm.builds) == [build_id]
    assert farm.builds[build_id].state is BuildState.QUEUED
    assert not farm.machines[MACHINE].drain_requested


def assert_refused(response: httpx.Response, problem: str) -> None:
    assert response.status_code == 403, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert problem in error
    assert "Authorization: Bearer <token>" in error


@pytest.mark.parametrize("call", range(3), ids=["submit", "cancel", "drain"])
async def test_a_write_without_the_token_is_a_403_and_changes_nothing(
    tmp_path: Path, call: int
) -> None:
    """With a token configured, each state-changing call without one is a JSON 403 saying
    the token is missing, and the farm is left as it was."""
    farm = farm_with_a_build_and_a_machine()
    build_id = the_build(farm)
    path, body = writes(build_id)[call]
    async with client_for(app_for(farm, tmp_path, token=TOKEN)) as client:
        response = await client.post(path, json=body)
    assert_refused(response, "this call changes state and needs the runner's token")
    assert_unchanged(farm, build_id)


@pytest.mark.parametrize(
    "header",
    ["Bearer wrong-token", "Bearer s3cret-token-and-more", "Bearer", "s3cret-token", "Basic czM="],
)
async def test_a_write_with_a_wrong_token_is_a_403_and_changes_nothing(
    tmp_path: Path, header: str
) -> None:
    """A wrong token, an empty one, or another scheme: 403 saying the header is not the
    runner's token, and nothing changes."""
    farm = farm_with_a_build_and_a_machine()
    build_id = the_build(farm)
    async with client_for(app_for(farm, tmp_path, token=TOKEN)) as client:
        for path, body in writes(build_id):
            response = await client.post(path, json=body, headers={"Authorization": header})
            assert_refused(response, "does not carry the runner's token")
    assert_unchanged(farm, build_id)


async def test_writes_with_the_right_token_work(tmp_path: Path) -> None:
    """With ``Authorization: Bearer <token>`` submit, cancel and drain do what they do
    without a token configured."""
    farm = farm_with_a_build_and_a_machine()
    build_id = the_build(farm)
    async with client_for(app_for(farm, tmp_path, token=TOKEN)) as client:
        submitted = await client.post("/builds", json={"command": ["true"]}, headers=AUTH)
        cancelled = await client.post(f"/builds/{build_id}/cancel", headers=AUTH)
        drained = await client.post(f"/machines/{MACHINE}/drain", headers=AUTH)
    assert submitted.status_code == 201, submitted.text
    assert submitted.json()["id"] in farm.builds
    assert cancelled.status_code == 200
    assert farm.builds[build_id].state is BuildState.CANCELLED
    assert drained.status_code == 200
    assert farm.machines[MACHINE].drain_requested


async def test_reads_but_logs_and_outputs_stay_open_by_default_with_a_token(
    tmp_path: Path,
) -> None:
    """A token alone protects writes and what builds print and leave (issue 19: a log may
    hold a secret a build printed): the log and outputs are 403 without the token, 200 with
    it; every other read and the dashboard answer 200."""
    farm = farm_with_a_build_and_a_machine()
    build_id = the_build(farm)
    private = [f"/builds/{build_id}/log", f"/builds/{build_id}/outputs/x"]
    async with client_for(app_for(farm, tmp_path, token=TOKEN)) as client:
        for path in [*reads(build_id), "/"]:
            response = await client.get(path)
            if path in private:
                assert_refused(response, "reads the farm")
            else:
                assert response.status_code == 200, (path, response.text)
        for path in private:
            response = await client.get(path, headers={"Authorization": f"Bearer {TOKEN.decode()}"})
            assert response.status_code != 403, (path, response.text)


async def test_http_public_logs_opens_logs_and_outputs_again(tmp_path: Path) -> None:
    farm = farm_with_a_build_and_a_machine()
    app = app_for(farm, tmp_path, token=TOKEN, public_logs=True)
    async with client_for(app) as client:
        for path in [*reads(the_build(farm)), "/"]:
            response = await client.get(path)
            assert response.status_code == 200, (path, response.text)


async def test_with_token_for_reads_every_read_but_the_dashboard_page_needs_the_token(
    tmp_path: Path,
) -> None:
    """token_for_reads: GET and HEAD of the API are 403 without the token and 200 with it;
    the dashboard page, which holds no data, stays open."""
    farm = farm_with_a_build_and_a_machine()
    app = app_for(farm, tmp_path, token=TOKEN, token_for_reads=True)
    async with client_for(app) as client:
        for path in reads(the_build(farm)):
            assert_refused(await client.get(path), "this call reads the farm")
            assert (await client.head(path)).status_code == 403
            assert (await client.get(path, headers=AUTH)).status_code == 200, path
        page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")


async def test_a_body_without_the_token_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An oversized body without the token is a 403, not a 413: the app answers before it
    reads a single chunk of the body."""
    monkeypatch.setattr(runner_http, "MAX_BODY", 1000)
    farm = farm_with_a_build_and_a_machine()
    app = app_for(farm, tmp_path, token=TOKEN)
    received: list[str] = []

    async def spying(scope: Any, receive: Any, send: Any) -> None:
        async def spy() -> Any:
            message = await receive()
            received.append(message["type"])
            return message

        await app(scope, spy, send)

    async with client_for(spying) as client:
        response = await client.post(
            "/builds", content=b"x" * 5000, headers={"content-type": "application/json"}
        )
    assert_refused(response, "needs the runner's token")
    assert "http.request" not in received
    assert_unchanged(farm, the_build(farm))


async def test_an_oversized_body_with_the_token_is_a_413(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the token, the body limit applies as before: 413 naming it, nothing queued."""
    monkeypatch.setattr(runner_http, "MAX_BODY", 1000)
    farm = farm_with_a_build_and_a_machine()
    body = b'{"command": ["true"], "name": "' + b"x" * 2000 + b'"}'
    async with client_for(app_for(farm, tmp_path, token=TOKEN)) as client:
        response = await client.post(
            "/builds", content=body, headers={**AUTH, "content-type": "application/json"}
        )
    assert response.status_code == 413
    assert "1000" in response.json()["error"]
    assert_unchanged(farm, the_build(farm))


async def test_a_graph_over_the_limit_is_refused_with_a_clear_message_and_nothing_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph with more than MAX_GRAPH_BUILDS builds is a 422 naming the count and the
    limit, and none of it is queued; a graph at the limit is accepted."""
    monkeypatch.setattr(specs, "MAX_GRAPH_BUILDS", 3)
    farm = Farm()

    def graph(n: int) -> dict[str, Any]:
        return {"builds": [{"name": f"b{i}", "command": ["true"]} for i in range(n)]}

    async with client_for(app_for(farm, tmp_path, token=TOKEN)) as client:
        over = await client.post("/builds", json=graph(4), headers=AUTH)
        assert over.status_code == 422
        assert over.json()["error"].startswith(
            "builds: 4 builds in one graph, more than the limit of 3"
        )
        assert farm.builds == {}
        at = await client.post("/builds", json=graph(3), headers=AUTH)
    assert at.status_code == 201, at.text
    assert len(farm.builds) == 3


def test_an_empty_token_is_refused() -> None:
    """An empty token would match an empty bearer header: create_app refuses it."""
    with pytest.raises(ValueError, match="empty token"):
        create_app(Farm(), Storage.in_dir(Path("unused")), default_system=SYSTEM, token=b"")


# -- a real runner on loopback ----------------------------------------------------------------


@pytest.fixture(params=[False], ids=["writes-need-the-token"])
async def guarded(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Runner]:
    """A real runner with TOKEN (and with token_for_reads when parametrized so); its
    ``client`` sends the token."""
    async with (
        trio.open_nursery() as nursery,
        httpx.AsyncClient(headers=AUTH, timeout=10) as client,
    ):
        yield await start_runner(
            nursery, tmp_path, client, token=TOKEN, http_token_for_reads=request.param
        )
        nursery.cancel_scope.cancel()


FOR_READS = pytest.mark.parametrize("guarded", [True], ids=["reads-need-the-token"], indirect=True)


async def post_headers_only(runner: Runner, headers: dict[str, str]) -> h11.Response:
    """POST /builds declaring a body one byte over MAX_BODY and sending none of it; the
    runner's answer (it must come without the body, which never will)."""
    port = int(runner.addresses.http[0].rsplit(":", 1)[1])
    conn = h11.Connection(h11.CLIENT)
    declared = {"host": "runner", "content-length": str(runner_http.MAX_BODY + 1), **headers}
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            conn.send(h11.Request(method="POST", target="/builds", headers=list(declared.items())))
        )
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                return event
            else:
                raise AssertionError(f"unexpected {event!r}")


@pytest.mark.realnet
@pytest.mark.parametrize(("headers", "status"), [({}, 403), (AUTH, 413)], ids=["none", "token"])
async def test_the_runner_answers_before_a_huge_body_is_sent(
    guarded: Runner, headers: dict[str, str], status: int
) -> None:
    """A real runner answers a 64 MiB body it has not received yet: 403 without the token
    (not 413: the token comes first), 413 with it."""
    with trio.fail_after(LIMIT):
        response = await post_headers_only(guarded, headers)
    assert response.status_code == status
    assert guarded.farm.builds == {}


# -- the command-line client ---------------------------------------------------------------


def token_file(tmp_path: Path, token: bytes = TOKEN) -> Path:
    path = tmp_path / "token"
    path.write_bytes(token + b"\n")
    path.chmod(0o600)
    return path


async def run_cli(args: list[str], env: dict[str, str] | None = None) -> Result:
    """The command line in a worker thread (its httpx client blocks), the runner on the loop."""
    return await trio.to_thread.run_sync(functools.partial(invoke, args, env))


def refused_line(result: Result, hint: str) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("hydra-trio: error: the queue runner refused the request: ")
    assert line.endswith(f"({hint})")
    return line


@pytest.mark.realnet
@FOR_READS
@pytest.mark.parametrize("via", ["option", "env", "config"])
async def test_the_client_sends_the_token_from_its_file(
    guarded: Runner, tmp_path: Path, via: str
) -> None:
    """With --token-file, HYDRA_TRIO_TOKEN_FILE or token-file in --config, submit, status,
    show, log --follow, cancel and drain all work against a runner whose reads and writes
    need the token."""
    url = guarded.addresses.http[0]
    path = str(token_file(tmp_path))
    env = None
    if via == "option":
        extra = ["--token-file", path]
    elif via == "env":
        extra, env = [], {"HYDRA_TRIO_TOKEN_FILE": path}
    else:
        config = tmp_path / "client.toml"
        config.write_text(f"token-file = {path!r}\n")
        extra = ["--config", str(config)]
    guarded.farm.registry.machines[MACHINE] = farm_with_a_build_and_a_machine().machines[MACHINE]

    async def ok(*args: str) -> str:
        result = await run_cli([args[0], "--url", url, *extra, *args[1:]], env)
        assert result.exit_code == 0, result.output
        return result.stdout

    with trio.fail_after(LIMIT):
        build_id = (await ok("submit", "--", "true")).strip()
        assert build_id in guarded.farm.builds
        assert "queue: " in await ok("status")
        assert "state: queued" in await ok("show", build_id)
        assert await ok("cancel", build_id) == f"{build_id}: cancelled\n"
        assert await ok("log", build_id, "--follow") == ""  # streamed with the token too
        assert await ok("drain", MACHINE) == "host-1: disconnected\n"  # known, not connected
    assert guarded.farm.machines[MACHINE].drain_requested


@pytest.mark.realnet
@pytest.mark.parametrize(
    "args",
    [["submit", "--", "true"], ["cancel", "BUILD"], ["drain", MACHINE]],
    ids=["submit", "cancel", "drain"],
)
async def test_the_client_without_the_token_is_one_line_and_exit_1(
    guarded: Runner, args: list[str]
) -> None:
    """A write without --token-file: one line quoting the runner's refusal and saying to pass
    --token-file, exit 1, and nothing changed."""
    guarded.farm.registry.machines[MACHINE] = farm_with_a_build_and_a_machine().machines[MACHINE]
    build_id = await guarded.submit()
    args = [build_id if a == "BUILD" else a for a in args]
    with trio.fail_after(LIMIT):
        result = await run_cli([args[0], "--url", guarded.addresses.http[0], *args[1:]])
    line = refused_line(result, "pass --token-file")
    assert "needs the runner's token" in line
    assert_unchanged(guarded.farm, build_id)


@pytest.mark.realnet
@FOR_READS
async def test_the_client_with_a_wrong_token_is_one_line_and_exit_1(
    guarded: Runner, tmp_path: Path
) -> None:
    """A token file holding another token: one line asking whether it is the runner's."""
    path = token_file(tmp_path, b"not-the-token")
    with trio.fail_after(LIMIT):
        result = await run_cli(
            ["status", "--url", guarded.addresses.http[0], "--token-file", str(path)]
        )
    refused_line(result, "is --token-file the runner's token?")


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "No such file or directory"), (b"\n\n", "empty"), (b"t\xc3\xa9", "printable ASCII")],
    ids=["missing", "empty", "not-ascii"],
)
def test_a_bad_token_file_is_a_usage_error(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    """A token file that cannot be used stops the client before any request: a usage error
    (exit 2) whose one error line names the option and the problem."""
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content)
        os.chmod(path, 0o600)
    result = invoke(["status", "--url", "http://127.0.0.1:1", "--token-file", str(path)])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    [line] = [x for x in result.stderr.splitlines() if x.startswith("Error:")]
    assert "--token-file" in line and problem in line
