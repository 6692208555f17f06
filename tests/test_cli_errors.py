"""Every mistake a user can make on the command line is one line naming what was wrong, a
non-zero exit status and no traceback: bad options, bad --config files and keys, a runner that
cannot be reached or is not a runner, bad graph files."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import Result

from .helpers.cli import clean_environment, invoke

GRAPH = '[build.a]\ncommand = ["true"]\n'


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No HYDRA_TRIO_* from the developer's shell; files are made in tmp_path; no daemon runs
    (a command that got past its checks would start one: ``started`` says so)."""
    clean_environment(monkeypatch, tmp_path)
    files = {
        "not-toml.toml": "listen = [\n",
        "typo.toml": 'lisen = "127.0.0.1:1"\n',
        "other-command.toml": '[queue-runner]\nsystems = "x86_64-linux"\n',
        "bad-table.toml": '[queue-runer]\nlisten = "127.0.0.1:1"\n',
        "bad-value.toml": 'max-tries = "many"\n',
        "empty-token": "\n",
        "graph.toml": GRAPH,
        "graph-not-toml.toml": "[build.a\n",
        "graph-unknown-key.toml": '[build.a]\ncomand = ["true"]\n',
        "graph-no-builds.toml": "x = 1\n",
        "graph-bad-command.toml": '[build.a]\ncommand = "true"\n',
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "a-dir").mkdir()

    def no_daemon(*args: Any) -> None:
        raise AssertionError("a daemon was started")

    monkeypatch.setattr(trio, "run", no_daemon)


def assert_one_line(result: Result, *named: str) -> str:
    """Exit status non-zero by SystemExit (click's usage errors, ``fail``), never another
    exception; exactly one error line, naming each of ``named``; no traceback."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.startswith(("Error:", "hydra-trio: error:"))
    ]
    assert len(lines) == 1, result.stderr
    for name in named:
        assert name in lines[0]
    return lines[0]


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens (a port bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class _NotARunner(BaseHTTPRequestHandler):
    """Answers every request as ``path`` says: ``/html/...`` a web page, ``/422/...`` a
    runner's refusal of a submission, ``/list/...`` JSON that is not an object."""

    def _answer(self) -> None:
        kind = self.path.split("/")[1]
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if kind == "html":
            status, body, ctype = 200, b"<html>hello</html>", "text/html"
        elif kind == "list":
            status, body, ctype = 200, b"[1, 2]", "application/json"
        else:
            error = {"error": "build 'a': command: must be a non-empty list of strings"}
            status, body, ctype = 422, json.dumps(error).encode(), "application/json"
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def other_server() -> Iterator[str]:
    """A loopback HTTP server that is not a queue runner (see ``_NotARunner``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotARunner)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


BAD_OPTIONS = [
    (["queue-runner", "--listen", "nope"], ["--listen", "'nope' is not HOST:PORT"]),
    (["queue-runner", "--max-tries", "0"], ["--max-tries"]),
    (["queue-runner", "--token-file", "empty-token"], ["--token-file", "empty"]),
    (["queue-runner", "--token-file", "missing"], ["--token-file", "missing"]),
    (["queue-runner", "--tls-cert", "c.pem"], ["--tls-cert and --tls-key go together"]),
    (["queue-runner", "--state-dir", "graph.toml"], ["--state-dir"]),
    (["queue-runner", "--log-level", "loud"], ["--log-level", "loud"]),
    (["queue-runner", "--no-such-option"], ["--no-such-option"]),
    (["queue-runner", "--hydra-db", "postgresql:///h"], ["--hydra-db and --hydra-data"]),
    (["queue-runner", "--hydra-db", "mysql:///h", "--hydra-data", "d"], ["--hydra-db"]),
    (["builder"], ["--server"]),
    (["builder", "--server", "r:1", "--systems", ""], ["--systems"]),
    (["builder", "--server", "r:1", "--executor", "docker"], ["docker", "command, nix"]),
    (["builder", "--server", "r:1", "--tls-key", "k.pem"], ["--tls-cert and --tls-key"]),
    (["builder", "--server", "r:1", "--tls-ca", "missing.pem"], ["missing.pem"]),
    (["builder", "--server", "r:1", "--ping-interval", "-1"], ["--ping-interval"]),
    (["up", "--builders", "-1"], ["--builders"]),
    (["submit", "--url", "http://127.0.0.1:1"], ["COMMAND"]),
    (["submit", "--url", "http://127.0.0.1:1", "--file", "graph.toml", "--", "x"], ["--file"]),
    (["submit", "--url", "http://127.0.0.1:1", "--drv", "/tmp/x.drv"], ["--drv"]),
    (["submit", "--url", "http://127.0.0.1:1", "--timeout", "never", "--", "x"], ["--timeout"]),
    (["status", "--url", "http://[::1"], ["invalid --url"]),
    (["show"], ["BUILD_ID"]),
    (["no-such-command"], ["no-such-command"]),
]


@pytest.mark.parametrize(("args", "named"), BAD_OPTIONS, ids=lambda v: " ".join(v)[:60])
def test_a_bad_option_is_one_line(args: list[str], named: list[str]) -> None:
    """A bad option value, a missing or unknown option or command: one line naming it."""
    assert_one_line(invoke(args), *named)


BAD_CONFIGS = [
    ("missing.toml", ["cannot read missing.toml"]),
    ("a-dir", ["a-dir"]),
    ("not-toml.toml", ["not-toml.toml is not valid TOML"]),
    ("typo.toml", ["typo.toml", "lisen is not an option", "did you mean 'listen'?"]),
    ("other-command.toml", ["[queue-runner] systems is not an option of queue-runner"]),
    ("bad-table.toml", ["[queue-runer] is not a command"]),
    ("bad-value.toml", ["bad-value.toml: max-tries = 'many'"]),
]


def test_a_bad_value_in_the_file_is_blamed_on_the_file_not_the_environment() -> None:
    """The file's key and value are named, and not the option's environment variable (which
    is not set): an operator looks where the message points."""
    result = invoke(["queue-runner", "--config", "bad-value.toml"])
    assert_one_line(result, "bad-value.toml: max-tries = 'many'")
    assert "HYDRA_TRIO_MAX_TRIES" not in result.output


@pytest.mark.parametrize(("path", "named"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_a_bad_config_file_or_key_is_one_line(path: str, named: list[str]) -> None:
    """A --config file that cannot be read, is not TOML, has a key no command knows, a key
    of another command in this command's table, a table that is no command, or a bad value."""
    assert_one_line(invoke(["queue-runner", "--config", path]), *named)


def test_a_config_key_of_another_command_at_top_level_is_fine(tmp_path: Path) -> None:
    """One file may configure several commands: a top-level key of another command's option
    is not an error (``systems`` is the builder's; queue-runner ignores it)."""
    (tmp_path / "shared.toml").write_text('systems = "x86_64-linux"\nmax-tries = 0\n')
    line = assert_one_line(invoke(["queue-runner", "--config", "shared.toml"]))
    assert "shared.toml: max-tries = 0" in line  # got past the keys to the values


CLIENT_COMMANDS = [
    ["submit", "--", "true"],
    ["submit", "--file", "graph.toml"],
    ["submit", "--drv", "/nix/store/00000000000000000000000000000000-x.drv"],
    ["status"],
    ["show", "abc"],
    ["log", "abc"],
    ["log", "--follow", "abc"],
    ["cancel", "abc"],
    ["drain", "m1"],
]


@pytest.mark.parametrize("args", CLIENT_COMMANDS, ids=" ".join)
def test_an_unreachable_runner_is_one_line(args: list[str], dead_url: str) -> None:
    """Every client command against a runner that is not there: one line naming the URL."""
    result = invoke([args[0], "--url", dead_url, *args[1:]])
    assert_one_line(result, "cannot reach the queue runner", dead_url)
    assert result.exit_code == 1


#: ``log ID`` is left out: a log is any text, so a web page is a (strange) log.
JSON_COMMANDS = [args for args in CLIENT_COMMANDS if args != ["log", "abc"]]


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=" ".join)
def test_a_server_that_is_not_a_runner_is_one_line(args: list[str], other_server: str) -> None:
    """A --url that answers, but not as a queue runner does (a web page where JSON belongs,
    JSON that is not an object): one line naming the URL, exit 1."""
    for kind in ("html", "list"):
        result = invoke([args[0], "--url", f"{other_server}/{kind}", *args[1:]])
        assert_one_line(result, other_server)
        assert result.exit_code == 1


BAD_GRAPHS = [
    ("graph-not-toml.toml", ["graph-not-toml.toml is not valid TOML"]),
    ("graph-unknown-key.toml", ["unknown keys comand"]),
    ("graph-no-builds.toml", ["no [build.NAME] tables"]),
    ("a-dir", ["a-dir"]),
    ("missing.toml", ["missing.toml"]),
]


@pytest.mark.parametrize(("path", "named"), BAD_GRAPHS, ids=[g[0] for g in BAD_GRAPHS])
def test_a_bad_graph_file_is_one_line(path: str, named: list[str]) -> None:
    """submit --file and up --submit with a graph file that is unreadable or has the wrong
    shape: one line naming the option and the problem, before any request or daemon."""
    submit = invoke(["submit", "--url", "http://127.0.0.1:1", "--file", path])
    assert_one_line(submit, "--file", *named)
    up = invoke(["up", "--submit", path])
    assert_one_line(up, "--submit", *named)


def test_a_graph_the_runner_refuses_is_one_line(other_server: str) -> None:
    """up --submit checks the builds themselves before starting; submit --file shows the
    runner's refusal (HTTP 422) as one line."""
    up = invoke(["up", "--submit", "graph-bad-command.toml"])
    assert_one_line(up, "--submit", "command: must be a non-empty list of strings")
    submit = invoke(["submit", "--url", f"{other_server}/422", "--file", "graph.toml"])
    assert_one_line(submit, "must be a non-empty list of strings", "HTTP 422")
    assert submit.exit_code == 1


@pytest.mark.parametrize(
    "entry",
    [[sys.executable, "-m", "hydra_trio"], [str(Path(sys.executable).parent / "hydra-trio")]],
)
def test_the_entry_points_print_one_line_without_a_traceback(
    entry: list[str], dead_url: str
) -> None:
    """``python -m hydra_trio`` and the console script: a user error in a real process is one
    line on stderr (after click's usage hint for usage errors), nothing else."""
    usage = subprocess.run(
        [*entry, "queue-runner", "--listen", "nope"], capture_output=True, text=True, timeout=60
    )
    assert usage.returncode == 2
    assert "Traceback" not in usage.stderr
    assert usage.stderr.splitlines()[-1].startswith("Error: Invalid value for '--listen'")
    client = subprocess.run(
        [*entry, "status", "--url", dead_url], capture_output=True, text=True, timeout=60
    )
    assert client.returncode == 1
    (line,) = client.stderr.splitlines()
    assert line.startswith("hydra-trio: error: cannot reach the queue runner")


def _start_runner(state_dir: Path, listen: str) -> subprocess.CompletedProcess[str]:
    """``queue-runner`` in a real process, where it must fail at start."""
    argv = [sys.executable, "-m", "hydra_trio", "queue-runner", "--listen", listen]
    argv += ["--http", "127.0.0.1:0", "--state-dir", str(state_dir)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def assert_one_error_line(process: subprocess.CompletedProcess[str], *named: str) -> None:
    assert process.returncode == 1
    assert "Traceback" not in process.stderr
    lines = [line for line in process.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith("hydra-trio: error: ")
    for name in named:
        assert name in lines[0]


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    """queue-runner on a builder port another socket holds: one line, exit 1."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        process = _start_runner(tmp_path / "state", f"127.0.0.1:{port}")
    assert_one_error_line(process, f"cannot listen for builders (--listen) on 127.0.0.1:{port}")


def test_a_state_dir_in_use_is_one_line(tmp_path: Path) -> None:
    """queue-runner on a state dir another runner holds: one line naming it, exit 1."""
    from hydra_trio.runner.daemon import lock_state_dir

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    lock = lock_state_dir(state_dir)
    try:
        process = _start_runner(state_dir, "127.0.0.1:0")
    finally:
        lock.close()
    assert_one_error_line(process, str(state_dir), "--state-dir")


def test_a_command_with_options_but_without_double_dash_says_where_they_go() -> None:
    """``submit sh -c 'echo'``: click stops at ``-c``; the line says the COMMAND goes after
    ``--`` and shows the corrected call."""
    assert_one_line(
        invoke(["submit", "sh", "-c", "echo hi"]),
        "No such option '-c'",
        "the COMMAND goes after --: hydra-trio submit -- sh -c echo hi",
    )
