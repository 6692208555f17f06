"""The command line: help, option parsing and precedence, and one-line user errors."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import trio
from click.testing import Result

from hydra_trio import cli
from hydra_trio.cli import daemons
from hydra_trio.net import HostPort

from .helpers.cli import clean_environment, invoke

COMMANDS = sorted(cli.main.commands)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_environment(monkeypatch, tmp_path)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Replaces ``trio.run`` so a daemon command parses its options and stops there; yields
    the list of daemon mains it would have run."""
    mains: list[Any] = []

    def fake_run(fn: Any, main: Any, *args: Any) -> None:
        assert fn is daemons.run_until_signal
        mains.append(main)

    monkeypatch.setattr(trio, "run", fake_run)
    yield mains


def runner_config(mains: list[Any]) -> Any:
    """The RunnerConfig queue-runner would have started with."""
    (main,) = mains
    return main.args[0]


def builder_config(mains: list[Any]) -> Any:
    """The BuilderConfig builder would have started with."""
    (main,) = mains
    return main.args[0]


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    """--help of every command exits 0, shows its usage, and shows defaults or env vars."""
    result = invoke([command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: hydra-trio {command} ")
    assert "--config FILE" in result.stdout
    assert "default:" in result.stdout
    assert "env var: HYDRA_TRIO_" in result.stdout


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (
            "queue-runner",
            [
                "--listen HOST:PORT",
                "default: 127.0.0.1:7420",
                "default: 127.0.0.1:7421",
                "default: ./hydra-trio-state",
                "env var: HYDRA_TRIO_BUILDER_TIMEOUT; default: 30.0",
                "env var: HYDRA_TRIO_HANDSHAKE_TIMEOUT; default: 10.0",
                "env var: HYDRA_TRIO_MAX_TRIES; default: 3",
            ],
        ),
        (
            "builder",
            [
                "env var: HYDRA_TRIO_SERVER; required",
                "env var: HYDRA_TRIO_MAX_JOBS; default: 1",
                "env var: HYDRA_TRIO_SPEED_FACTOR; default: 1.0",
                "env var: HYDRA_TRIO_PING_INTERVAL; default: 10.0",
                "3 x interval",
                "default: ./hydra-trio-builder",
            ],
        ),
        ("up", ["env var: HYDRA_TRIO_BUILDERS; default: 2", "default: 127.0.0.1:7421"]),
        ("status", ["env var: HYDRA_TRIO_URL; default: http://127.0.0.1:7421"]),
        ("submit", ["default: http://127.0.0.1:7421", "--wait", "--after"]),
    ],
)
def test_help_shows_the_contract_defaults(command: str, shown: list[str]) -> None:
    """The defaults CONTRACT.md fixes are the ones --help shows."""
    result = invoke([command, "--help"])
    text = " ".join(result.stdout.split())
    for item in shown:
        assert item in text


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("nope", "'nope' is not HOST:PORT"),
        ("::1:7420", "put an IPv6 address in brackets"),
        ("[::1:7420", "unbalanced brackets"),
        ("127.0.0.1:http", "the port must be a number"),
        ("127.0.0.1:70000", "the port must be a number"),
    ],
)
def test_an_invalid_listen_address_is_a_one_line_usage_error(
    started: list[Any], value: str, problem: str
) -> None:
    """A bad --listen: exit 2, one Error line naming the option and the problem, no daemon."""
    result = invoke(["queue-runner", "--listen", value])
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert "--listen" in line
    assert problem in line
    assert "Traceback" not in result.output
    assert started == []


def test_a_valid_ipv6_listen_address_is_accepted(started: list[Any]) -> None:
    """[::]:7420 (all interfaces, IPv6 and IPv4) parses, without the brackets."""
    result = invoke(["queue-runner", "--listen", "[::]:7420", "--http", "[::1]:0"])
    assert result.exit_code == 0, result.output
    config = runner_config(started)
    assert config.listen == HostPort("::", 7420)
    assert config.http == HostPort("::1", 0)


def test_queue_runner_defaults_are_the_contracts(started: list[Any]) -> None:
    """With nothing given, the queue runner gets the contract's defaults."""
    result = invoke(["queue-runner"])
    assert result.exit_code == 0, result.output
    config = runner_config(started)
    assert config.listen == HostPort("127.0.0.1", 7420)
    assert config.http == HostPort("127.0.0.1", 7421)
    assert config.state_dir == Path("hydra-trio-state")
    assert config.builder_timeout == 30.0
    assert config.handshake_timeout == 10.0
    assert config.max_tries == 3


PRECEDENCE = [
    # (file's top level, file's [queue-runner] table, environment, command line, expected)
    pytest.param(None, None, None, None, 30.0, id="default"),
    pytest.param(5, None, None, None, 5.0, id="file"),
    pytest.param(5, 6, None, None, 6.0, id="file-section-over-top-level"),
    pytest.param(5, 6, "7", None, 7.0, id="env-over-file"),
    pytest.param(None, None, "7", None, 7.0, id="env-over-default"),
    pytest.param(5, 6, "7", "9", 9.0, id="command-line-over-env"),
    pytest.param(5, None, None, "9", 9.0, id="command-line-over-file"),
]


@pytest.mark.parametrize(("top", "section", "env", "arg", "expected"), PRECEDENCE)
def test_option_precedence_is_command_line_then_env_then_file_then_default(
    started: list[Any],
    tmp_path: Path,
    top: int | None,
    section: int | None,
    env: str | None,
    arg: str | None,
    expected: float,
) -> None:
    """--builder-timeout from the command line beats HYDRA_TRIO_BUILDER_TIMEOUT, which beats
    the --config file ([queue-runner] over top level), which beats the default."""
    lines = [f"builder-timeout = {top}"] if top is not None else []
    if section is not None:
        lines += ["[queue-runner]", f"builder-timeout = {section}"]
    config_file = tmp_path / "runner.toml"
    config_file.write_text("\n".join(lines) + "\n")
    args = ["queue-runner", "--config", str(config_file)]
    if arg is not None:
        args += ["--builder-timeout", arg]
    result = invoke(args, env={"HYDRA_TRIO_BUILDER_TIMEOUT": env} if env else None)
    assert result.exit_code == 0, result.output
    assert runner_config(started).builder_timeout == expected


def test_every_option_can_come_from_the_file_or_the_environment(
    started: list[Any], tmp_path: Path
) -> None:
    """File values of every type (HOST:PORT, path, float, int) are converted like command-line
    values; the file itself can be named by HYDRA_TRIO_CONFIG."""
    config_file = tmp_path / "runner.toml"
    config_file.write_text(
        'listen = "[::1]:9000"\nhttp = "127.0.0.1:9001"\nstate-dir = "/var/lib/ht"\n'
        "handshake-timeout = 2.5\nmax-tries = 5\n"
    )
    result = invoke(
        ["queue-runner"],
        env={"HYDRA_TRIO_CONFIG": str(config_file), "HYDRA_TRIO_HTTP": "127.0.0.1:9002"},
    )
    assert result.exit_code == 0, result.output
    config = runner_config(started)
    assert config.listen == HostPort("::1", 9000)
    assert config.http == HostPort("127.0.0.1", 9002)
    assert config.state_dir == Path("/var/lib/ht")
    assert config.handshake_timeout == 2.5
    assert config.max_tries == 5


def test_builder_options_from_env_and_file(started: list[Any], tmp_path: Path) -> None:
    """The builder's required --server may come from the environment; lists come from a
    comma-separated env value or a TOML list; the ping timeout defaults to 3 x interval."""
    config_file = tmp_path / "builder.toml"
    config_file.write_text(
        'systems = ["x86_64-linux", "i686-linux"]\n[builder]\nping-interval = 4\nmax-jobs = 3\n'
    )
    result = invoke(
        ["builder", "--config", str(config_file), "--hostname", "b7"],
        env={"HYDRA_TRIO_SERVER": "runner.example:7420", "HYDRA_TRIO_FEATURES": "kvm, big"},
    )
    assert result.exit_code == 0, result.output
    config = builder_config(started)
    assert config.server == HostPort("runner.example", 7420)
    assert config.systems == ("x86_64-linux", "i686-linux")
    assert config.supported_features == ("kvm", "big")
    assert config.ping_interval == 4.0
    assert config.effective_ping_timeout == 12.0
    assert config.max_jobs == 3
    assert config.hostname == "b7"
    assert config.work_dir == Path("hydra-trio-builder")


def test_the_builder_without_a_server_is_a_usage_error(started: list[Any]) -> None:
    """--server is required: exit 2 naming it."""
    result = invoke(["builder"])
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert "--server" in line
    assert started == []


@pytest.mark.parametrize(
    ("args", "env", "problem"),
    [
        (["--builder-timeout", "0"], None, "--builder-timeout"),
        (["--builder-timeout", "soon"], None, "--builder-timeout"),
        ([], {"HYDRA_TRIO_MAX_TRIES": "0"}, "HYDRA_TRIO_MAX_TRIES"),
        ([], {"HYDRA_TRIO_BUILDER_TIMEOUT": "x"}, "HYDRA_TRIO_BUILDER_TIMEOUT"),
        (["--config", "missing.toml"], None, "cannot read missing.toml"),
    ],
)
def test_a_bad_option_value_is_a_one_line_usage_error(
    started: list[Any], args: list[str], env: dict[str, str] | None, problem: str
) -> None:
    """Bad values from the command line, the environment or --config: exit 2 and one Error
    line that names where the value came from."""
    result = invoke(["queue-runner", *args], env=env)
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert problem in line
    assert started == []


def test_a_config_file_that_is_not_toml_is_a_usage_error(
    started: list[Any], tmp_path: Path
) -> None:
    """Invalid TOML in --config: exit 2, one line naming the file."""
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = [\n")
    result = invoke(["queue-runner", "--config", str(bad)])
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert "bad.toml is not valid TOML" in line
    assert started == []


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens (a port bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    "args",
    [
        ["submit", "--", "echo", "hi"],
        ["status"],
        ["status", "--json"],
        ["show", "abc"],
        ["log", "abc"],
        ["cancel", "abc"],
        ["drain", "m1"],
    ],
    ids=lambda args: "-".join(a for a in args if a not in ("--", "echo", "hi")),
)
def test_an_unreachable_runner_is_one_line_and_exit_1(args: list[str], dead_url: str) -> None:
    """A client command against a runner that is not there: exit 1, one stderr line
    'hydra-trio: error: cannot reach ...' naming the URL, no traceback, nothing on stdout."""
    result = invoke([args[0], "--url", dead_url, *args[1:]])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    (line,) = result.stderr.splitlines()
    assert line.startswith("hydra-trio: error: cannot reach ")
    assert dead_url in line
    assert result.stdout == ""


def test_the_client_url_can_come_from_the_environment_or_a_file(
    dead_url: str, tmp_path: Path
) -> None:
    """--url follows the same precedence: HYDRA_TRIO_URL over the --config file."""
    config_file = tmp_path / "client.toml"
    config_file.write_text('url = "http://127.0.0.1:1"\n')
    from_file = invoke(["status", "--config", str(config_file)])
    assert "at http://127.0.0.1:1:" in from_file.stderr
    from_env = invoke(["status", "--config", str(config_file)], env={"HYDRA_TRIO_URL": dead_url})
    assert from_env.exit_code == 1
    assert dead_url in from_env.stderr


def test_an_invalid_url_is_one_line_and_exit_1() -> None:
    """A malformed --url is a user mistake too: one line, exit 1, no traceback."""
    result = invoke(["status", "--url", "http://[::1"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    (line,) = result.stderr.splitlines()
    assert line.startswith("hydra-trio: error: ")


def test_submit_without_a_command_is_a_usage_error() -> None:
    """submit with neither COMMAND nor --file: exit 2 with one line saying what to give."""
    result = invoke(["submit", "--url", "http://127.0.0.1:1"])
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert "COMMAND" in line


def test_commands_are_the_contracts() -> None:
    """The console script has exactly the commands CONTRACT.md names, and those added since
    (builds, undrain: issue 20)."""
    assert set(COMMANDS) == {
        "queue-runner",
        "builder",
        "up",
        "submit",
        "status",
        "show",
        "log",
        "cancel",
        "drain",
        "builds",
        "undrain",
    }
    assert isinstance(cli.main, click.Group)


def test_builder_executors(started: list[Any], tmp_path: Path) -> None:
    """--executor defaults to command; command,nix and --nix-store DIR are taken as given."""
    assert invoke(["builder", "--server", "r:7420"]).exit_code == 0
    assert builder_config(started).executors == ("command",)
    started.clear()
    result = invoke(
        ["builder", "--server", "r:7420", "--executor", "command,nix", "--nix-store", "st"]
    )
    assert result.exit_code == 0, result.output
    config = builder_config(started)
    assert (config.executors, config.nix_store) == (("command", "nix"), Path("st"))


def test_builder_unknown_executor_is_a_usage_error() -> None:
    """--executor with a name that is not command or nix: exit 2, one line naming both."""
    result = invoke(["builder", "--server", "r:7420", "--executor", "docker"])
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert "docker" in line and "command, nix" in line


@pytest.mark.parametrize(
    "args",
    [
        ["--drv", "/tmp/x.drv"],
        ["--drv", "/nix/store/00000000000000000000000000000000-x"],
        ["--drv", "/nix/store/00000000000000000000000000000000-x.drv", "--", "true"],
        ["--drv", "/nix/store/00000000000000000000000000000000-x.drv", "--name", "n"],
    ],
)
def test_submit_drv_usage_errors(args: list[str]) -> None:
    """submit --drv with something that is not a derivation's store path, or with a COMMAND
    or options the derivation decides: exit 2 with one line, before any request."""
    result = invoke(["submit", "--url", "http://127.0.0.1:1", *args])
    assert result.exit_code == 2
    assert len(error_lines(result)) == 1


def test_the_daemons_collector_settings() -> None:
    """tune_gc (called by run_daemon) freezes what exists and collects the young less often."""
    code = (
        "import gc; from hydra_trio.system import tune_gc, GC_YOUNG_THRESHOLD as T; "
        "d = gc.get_threshold(); t = tune_gc(); "
        "print(t == (T, d[1], d[2]) == gc.get_threshold(), gc.get_freeze_count() > 1000)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_the_daemons_hand_the_gil_over_every_millisecond() -> None:
    """run_daemon sets the switch interval (system.tune_switch_interval) before its main."""
    code = (
        "import sys; from hydra_trio.cli.daemons import run_daemon\n"
        "async def main():\n"
        "    print(sys.getswitchinterval())\n"
        "print(sys.getswitchinterval()); run_daemon(main)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert [float(x) for x in out.stdout.split()] == [0.005, 0.001]


def test_several_runners_options_reach_the_configs(started: list[Any], tmp_path: Path) -> None:
    """builder --server A,B (or HYDRA_TRIO_SERVER) lists every runner; queue-runner takes
    --data-dir, --lease-timeout (default: the builder timeout) and --stop-grace."""
    result = invoke(
        ["builder", "--hostname", "b"], env={"HYDRA_TRIO_SERVER": "a.example:7420,b.example:7420"}
    )
    assert result.exit_code == 0, result.output
    config = builder_config(started)
    assert config.server == HostPort("a.example", 7420)
    assert config.addresses == (HostPort("a.example", 7420), HostPort("b.example", 7420))
    started.clear()
    result = invoke(["queue-runner", "--data-dir", str(tmp_path / "data"), "--stop-grace", "3"])
    assert result.exit_code == 0, result.output
    runner = runner_config(started)
    assert runner.data_dir == tmp_path / "data"
    assert runner.stop_grace == 3.0
    assert runner.effective_lease_timeout == runner.builder_timeout == 30.0
    started.clear()
    result = invoke(["queue-runner", "--lease-timeout", "5"])
    assert result.exit_code == 0, result.output
    assert runner_config(started).effective_lease_timeout == 5.0


def test_the_commands_up_suggests_name_the_program_as_the_shell_can_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make run`` starts .venv/bin/hydra-trio, which is not on PATH: the commands printed
    to try name that path; where PATH finds the same program, its bare name."""
    from hydra_trio.cli.daemons import program

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "hydra-trio"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert program(".venv/bin/hydra-trio") == ".venv/bin/hydra-trio"
    assert program("/usr/lib/python3/hydra_trio/__main__.py").endswith(" -m hydra_trio")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert program(str(exe)) == "hydra-trio"
