"""The commands: the click group ``main`` and one function per command of CONTRACT.md.

Each command parses its options (``configs``, ``options``), then hands over: the daemons to
``daemons``, the client commands to a ``RunnerClient`` and ``render``.  A command function reads
as what the command does; option declarations, HTTP and formatting live in those modules.
Its length is the number of commands (each with its option decorators), not any one of them.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from hydra_trio import __version__, net
from hydra_trio.cli import daemons, render
from hydra_trio.cli.client import DEFAULT_URL, RunnerClient, RunnerClientError
from hydra_trio.cli.configs import (
    BuilderOptions,
    RunnerOptions,
    ServerTlsOptions,
    builder_options,
    load_token,
    runner_options,
    server_tls_options,
)
from hydra_trio.cli.errors import fail
from hydra_trio.cli.graph import GraphFileError, load_graph
from hydra_trio.cli.options import (
    HOSTPORT,
    SECONDS,
    F,
    LoggingOptions,
    config_option,
    logging_options,
    option,
    token_file_option,
)
from hydra_trio.protocol.errors import HydraTrioError

P = ParamSpec("P")
T = TypeVar("T")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hydra-trio")
def main() -> None:
    """hydra-trio: a build farm whose builder connections can never die silently."""


# ---------------------------------------------------------------------------------------------
# Daemons.


@main.command("queue-runner")
@config_option
@runner_options
@option("--http", type=HOSTPORT, default="127.0.0.1:7421", help="HTTP API, metrics, dashboard.")
@server_tls_options
@logging_options
def queue_runner(
    runner: RunnerOptions, http: net.HostPort, tls: ServerTlsOptions, log_options: LoggingOptions
) -> None:
    """Run the queue runner: builders dial in, builds are handed out."""
    daemons.setup_logging(log_options.log_level, log_options.log_format)
    daemons.run_runner_daemon(runner.runner_config(http, tls))


@main.command("builder")
@config_option
@builder_options
@logging_options
def builder(options: BuilderOptions, log_options: LoggingOptions) -> None:
    """Run a builder: connect to the queue runner and run what it assigns."""
    daemons.setup_logging(log_options.log_level, log_options.log_format)
    try:
        options.check_build_users()
    except HydraTrioError as exc:
        fail(str(exc))
    config = options.builder_config()
    if config.sandbox is not None:  # before the token file's name is gone (re-executed)
        hidden = [("work dir", config.work_dir)]
        if options.token_file is not None:
            hidden.append(("token file", options.token_file))
        try:
            config.sandbox.check_hidden(hidden)
        except HydraTrioError as exc:
            fail(str(exc))
    if config.token is not None and options.token_fd is None:
        daemons.reexec_hiding_token_file(config.token)
    daemons.run_builder_daemon(config)


@main.command("up")
@config_option
@option("--builders", type=click.IntRange(min=0), default=2, help="Local builders to start.")
@option("--http", type=HOSTPORT, default="127.0.0.1:7421", help="HTTP API and dashboard.")
@runner_options
@option("--max-jobs", type=click.IntRange(min=1), default=2, help="Job slots per builder.")
@option("--ping-interval", type=SECONDS, default=10.0, help="Builders' ping interval.")
@option(
    "--submit",
    "graph_file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="A TOML graph to submit once the farm is up (something to look at).",
)
@logging_options
def up(
    builders: int,
    http: net.HostPort,
    runner: RunnerOptions,
    max_jobs: int,
    ping_interval: float,
    graph_file: str | None,
    log_options: LoggingOptions,
) -> None:
    """A queue runner and N local builders in one process (trying it out; one-machine farms)."""
    from hydra_trio.runner.specs import SpecError, parse_graph

    daemons.setup_logging(log_options.log_level, log_options.log_format)
    config = runner.runner_config(http)
    graph = None
    if graph_file is not None:
        try:
            graph = load_graph(graph_file)
            parse_graph(graph, config.default_system)  # refused before anything starts
        except (GraphFileError, SpecError) as exc:
            raise click.BadParameter(str(exc), param_hint="--submit") from None
    farm = daemons.LocalFarm(
        runner=config,
        builders=builders,
        max_jobs=max_jobs,
        ping_interval=ping_interval,
        graph=graph,
    )
    daemons.run_local_farm(farm)


# ---------------------------------------------------------------------------------------------
# Client commands.


def client_options(f: F) -> F:
    f = token_file_option("The runner's token, sent as 'Authorization: Bearer' on every call.")(f)
    f = option("--url", default=DEFAULT_URL, help="The queue runner's HTTP API.")(f)
    return config_option(f)


def _client(url: str, token_file: Path | None) -> RunnerClient:
    return RunnerClient(url, load_token(token_file))


class _SubmitCommand(click.Command):
    """``submit``, whose COMMAND's own options (``sh -c ...``) need a ``--`` before them: an
    option click does not know, given without ``--``, says so instead of only naming it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        given = list(args)  # click consumes ``args``
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            if "--" in given:
                raise
            hint = f"(the COMMAND goes after --: hydra-trio submit -- {' '.join(given)})"
            raise click.UsageError(f"{exc.format_message()} {hint}", ctx) from None


@main.command("submit", cls=_SubmitCommand)
@client_options
@option("--name", default="", help="A name for the build (its input dir for dependents).")
@option("--system", default=None, help="Required system [default: the runner's].")
@option("--feature", "features", multiple=True, help="Required feature (repeatable).")
@option("--after", multiple=True, help="Build id that must succeed first (repeatable).")
@option("--priority", type=int, default=0, help="Higher runs first.")
@option("--timeout", type=SECONDS, default=None, help="Wall-clock limit in seconds.")
@option("--max-silent", type=SECONDS, default=None, help="Limit on seconds without output.")
@option(
    "--network",
    is_flag=True,
    default=False,
    help="The build needs the network: it runs only on a builder that gives builds the "
    "network (unsandboxed, or --sandbox-allow-network).",
)
@option(
    "--file",
    "graph_file",
    type=click.Path(dir_okay=False, exists=True),
    help="A TOML graph of named builds (instead of COMMAND).",
)
@option(
    "--drv",
    default=None,
    help="Build this Nix derivation (/nix/store/...drv in the runner's store) and every "
    "missing dependency (instead of COMMAND).",
)
@option("--wait", is_flag=True, help="Wait for the build(s); exit 0 if all succeeded.")
@click.argument("command", nargs=-1)
def submit(
    url: str,
    token_file: Path | None,
    name: str,
    system: str | None,
    features: tuple[str, ...],
    after: tuple[str, ...],
    priority: int,
    timeout: float | None,
    max_silent: float | None,
    network: bool,
    graph_file: str | None,
    drv: str | None,
    wait: bool,
    command: tuple[str, ...],
) -> None:
    """Submit a build: hydra-trio submit [OPTIONS] -- COMMAND [ARG]...

    With --file GRAPH.toml, submit a whole graph and print one NAME ID line per build.
    With --drv /nix/store/...drv, build a Nix derivation: one build per derivation whose
    outputs the runner's store lacks; prints the top derivation's build id."""
    limits: dict[str, Any] = {}
    if timeout is not None:
        limits["timeout"] = timeout
    if max_silent is not None:
        limits["maxSilent"] = max_silent
    if drv is not None:
        if command or graph_file is not None:
            raise click.UsageError("give either --drv, --file or a COMMAND, not two of them")
        if name or system or features or after or network:
            raise click.UsageError(
                "--name, --system, --feature, --after and --network do not go with --drv"
            )
        _submit_drv(_client(url, token_file), drv, {"priority": priority, **limits}, wait)
        return
    if graph_file is not None:
        if command:
            raise click.UsageError("give either --file or a COMMAND, not both")
        if network:
            raise click.UsageError("--network does not go with --file (say network = true there)")
        try:
            graph = load_graph(graph_file)
        except GraphFileError as exc:
            raise click.BadParameter(str(exc), param_hint="--file") from None
        _submit_graph(_client(url, token_file), graph, wait)
        return
    if not command:
        raise click.UsageError("give the COMMAND to run after --, or --file GRAPH.toml")
    client = _client(url, token_file)
    body: dict[str, Any] = {
        "command": list(command),
        "name": name,
        "after": list(after),
        "requiredFeatures": list(features),
        "priority": priority,
    }
    if system:
        body["system"] = system
    if network:
        body["network"] = True
    build_id = _call(client.submit, body | limits)
    click.echo(build_id)
    if wait:
        sys.exit(_wait(client, build_id))


def _submit_graph(client: RunnerClient, graph: dict[str, Any], wait: bool) -> None:
    ids = _call(client.submit_graph, graph)
    for build_name, build_id in ids.items():
        click.echo(f"{build_name} {build_id}")
    if wait:
        sys.exit(
            max(
                (_wait(client, build_id, label=name) for name, build_id in ids.items()),
                default=0,
            )
        )


def _submit_drv(client: RunnerClient, drv: str, body: dict[str, Any], wait: bool) -> None:
    if not (drv.startswith("/nix/store/") and drv.endswith(".drv")):
        raise click.BadParameter(
            f"{drv} is not a derivation (/nix/store/...drv)", param_hint="--drv"
        )
    answer = _call(client.submit_drv, {"drv": drv, **body})
    build_id = answer.get("id")
    if build_id is None:
        paths = " ".join(answer.get("storePaths", {}).values())
        click.echo(f"nothing to build: {paths} already valid in the runner's store", err=True)
        return
    click.echo(build_id)
    if wait:
        sys.exit(_wait(client, build_id))


def _call(method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``method(*args)`` of a ``RunnerClient``; what goes wrong is one line and exit 1."""
    try:
        return method(*args, **kwargs)
    except RunnerClientError as exc:
        fail(str(exc))


def _wait(client: RunnerClient, build_id: str, label: str = "") -> int:
    """Follow a build until it ends; 0 if it succeeded, else 1.  On a terminal, one line
    rewritten in place (state, phase, machine, elapsed, the log's last line); otherwise a
    plain line per change of state, phase, machine or attempt.  ``label`` (a graph build's
    name) starts each line."""
    live = sys.stderr.isatty()
    last = None
    started = time.monotonic()
    while True:
        build = _call(client.build, build_id)
        summary = render.progress_line(build, time.monotonic() - started, label)
        finished = build["state"] in render.FINISHED
        if live:
            tail = render.last_line(_call(client.log, build_id, 2048))
            line = summary + (f" | {tail}" if tail else "")
            width = shutil.get_terminal_size().columns - 1
            click.echo("\r\x1b[K" + line[:width], err=True, nl=finished)
        elif render.progress_key(build) != last:
            click.echo(summary, err=True)
            last = render.progress_key(build)
        if finished:
            if build["state"] != "succeeded":
                click.echo(render.failure_line(build_id, build), err=True)
            return 0 if build["state"] == "succeeded" else 1
        time.sleep(0.5)


@main.command("status")
@client_options
@option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def status(url: str, token_file: Path | None, as_json: bool) -> None:
    """Machines and queue counts."""
    data = _call(_client(url, token_file).status)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for line in render.status_lines(data):
        click.echo(line)


@main.command("show")
@client_options
@click.argument("build_id")
@option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def show(url: str, token_file: Path | None, build_id: str, as_json: bool) -> None:
    """One build's state."""
    data = _call(_client(url, token_file).build, build_id)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for line in render.show_lines(data):
        click.echo(line)


@main.command("builds")
@client_options
@option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]),
    help="Only builds in this state (repeatable).",
)
@option("--name", help="Only builds of this name.")
@option("--machine", help="Only builds that ran (last) on this machine (hostname or id).")
@option(
    "--limit",
    type=click.IntRange(1, 500),
    default=50,
    show_default=True,
    help="At most this many, the newest first.",
)
@option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def builds(
    url: str,
    token_file: Path | None,
    states: tuple[str, ...],
    name: str | None,
    machine: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List builds, the newest first."""
    params = {"limit": str(limit)}
    if states:
        params["state"] = ",".join(states)
    if name is not None:
        params["name"] = name
    if machine is not None:
        params["machine"] = machine
    data = _call(_client(url, token_file).builds, params)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for line in render.builds_lines(data["builds"], time.time()):
        click.echo(line)
    shown, total = len(data["builds"]), data.get("total", 0)
    if total > shown:
        click.echo(f"({shown} of {total}: --limit, --state or --name to see others)", err=True)


@main.command("log")
@client_options
@click.argument("build_id")
@option("--follow", "-f", is_flag=True, help="Keep printing until the build ends.")
@option(
    "--tail",
    type=click.IntRange(min=1),
    metavar="N",
    help="Only the last N lines (with --follow: then the rest as it comes).",
)
def log_command(
    url: str, token_file: Path | None, build_id: str, follow: bool, tail: int | None
) -> None:
    """A build's log (of its current attempt)."""
    client = _client(url, token_file)
    if tail is not None and not follow:
        click.echo(_tail(client, build_id, tail), nl=False)
        return
    if not follow:
        click.echo(_call(client.log, build_id), nl=False)
        return
    _call(client.build, build_id)  # a clear error for an unknown id
    out = sys.stdout.buffer
    skip = 0
    if tail is not None:
        # The stream starts at the beginning: leave out all but the last N lines so far.
        full = _call(client.log, build_id).encode()
        kept = _tail_text(full.decode(errors="replace"), tail).encode()
        skip = len(full) - len(kept)
    try:
        for chunk in client.follow_log(build_id):
            if skip:
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
            out.write(chunk)
            out.flush()
    except RunnerClientError as exc:
        fail(str(exc))


def _tail_text(text: str, lines: int) -> str:
    """The last ``lines`` lines of ``text`` (a last line without a newline counts)."""
    parts = text.splitlines(keepends=True)
    return "".join(parts[-lines:])


def _tail(client: RunnerClient, build_id: str, lines: int) -> str:
    """The last ``lines`` lines of a build's log: from the end the API serves (64 KiB) when
    that holds them, else from the whole log."""
    end = _call(client.log, build_id, 64 * 1024)
    if end.count("\n") > lines or len(end.encode()) < 64 * 1024:
        return _tail_text(end, lines)
    return _tail_text(_call(client.log, build_id), lines)


@main.command("cancel")
@client_options
@click.argument("build_id")
def cancel(url: str, token_file: Path | None, build_id: str) -> None:
    """Cancel a queued or running build."""
    data = _call(_client(url, token_file).cancel, build_id)
    click.echo(f"{data['id']}: {data['state']}")


@main.command("drain")
@client_options
@click.argument("machine")
def drain(url: str, token_file: Path | None, machine: str) -> None:
    """Stop giving a machine (hostname or machine id) new builds."""
    data = _call(_client(url, token_file).drain, machine)
    click.echo(f"{data['hostname']}: {data['state']}")


@main.command("undrain")
@client_options
@click.argument("machine")
def undrain(url: str, token_file: Path | None, machine: str) -> None:
    """Give a drained machine (hostname or machine id) builds again."""
    data = _call(_client(url, token_file).undrain, machine)
    click.echo(f"{data['hostname']}: {data['state']}")
