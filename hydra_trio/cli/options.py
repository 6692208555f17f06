"""Option plumbing shared by every command.

Every option can also come from ``HYDRA_TRIO_<OPTION>`` (``option`` names the variable) or
from ``--config FILE`` (TOML, same names, either at top level or in a ``[queue-runner]`` /
``[builder]`` / ... table); precedence is command line > environment > file > default.  A key
of the file that no command knows, a key of a command's table that is not one of its options,
and a table that is not a command are usage errors: a typo in a config file must not be
silently ignored.

``options_record`` turns a group of options into one typed, frozen record argument, so the
command functions take ``RunnerOptions`` instead of ``**kw: Any`` and mypy checks every use.
"""

from __future__ import annotations

import difflib
import functools
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import click

from hydra_trio import net

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R", bound=attrs.AttrsInstance)


class HostPortType(click.ParamType):  # type: ignore[type-arg]
    name = "HOST:PORT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> net.HostPort:
        if isinstance(value, net.HostPort):
            return value
        try:
            return net.HostPort.parse(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class HostPortListType(click.ParamType):  # type: ignore[type-arg]
    """``HOST:PORT[,HOST:PORT...]`` (a TOML list too)."""

    name = "HOST:PORT[,...]"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[net.HostPort, ...]:
        if isinstance(value, tuple) and all(isinstance(v, net.HostPort) for v in value):
            return value
        items = value if isinstance(value, list) else str(value).split(",")
        return tuple(HOSTPORT.convert(item.strip(), param, ctx) for item in items if item.strip())


class ListType(click.ParamType):  # type: ignore[type-arg]
    """A comma-separated list (TOML lists are accepted too)."""

    name = "LIST"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, ...]:
        if isinstance(value, (list, tuple)):
            return tuple(str(v) for v in value)
        return tuple(item.strip() for item in str(value).split(",") if item.strip())


HOSTPORT = HostPortType()
HOSTPORT_LIST = HostPortListType()
LIST = ListType()
SECONDS = click.FloatRange(min=0, min_open=True)


def option(*decls: str, **kwargs: Any) -> Callable[[F], F]:
    """``click.option`` with the contract's environment variable and defaults shown."""
    long = next(d for d in decls if d.startswith("--"))
    kwargs.setdefault("envvar", "HYDRA_TRIO_" + long[2:].replace("-", "_").upper())
    kwargs.setdefault("show_default", True)
    kwargs.setdefault("show_envvar", True)
    return click.option(*decls, **kwargs)


def path_option(name: str, help: str, *, directory: bool = False) -> Callable[[F], F]:
    """An optional file (or, with ``directory``, directory) option, as a ``Path``."""
    kind = click.Path(file_okay=not directory, dir_okay=directory, path_type=Path)
    return option(name, type=kind, default=None, help=help)


def token_file_option(help: str) -> Callable[[F], F]:
    return path_option("--token-file", help)


# ---------------------------------------------------------------------------------------------
# --config FILE


def _param_names(command: click.Command) -> set[str]:
    return {p.name for p in command.params if p.name is not None and p.expose_value}


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if not value:
        return
    try:
        with open(value, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{value} is not valid TOML: {exc}") from None
    command = ctx.info_name or ""
    group = ctx.parent.command if ctx.parent is not None else None
    commands = group.commands if isinstance(group, click.Group) else {command: ctx.command}
    _check_config_keys(value, data, command, commands)
    merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
    section = data.get(command)
    if isinstance(section, dict):
        merged.update(section)
    ctx.default_map = {key.replace("-", "_"): v for key, v in merged.items()}
    _check_config_values(ctx, value, ctx.default_map)


def _check_config_values(ctx: click.Context, path: str, values: Mapping[str, Any]) -> None:
    """Convert each of this command's values from the file as its option would, so a bad one
    is blamed on the file and its key (click would blame the option's environment variable)."""
    for param in ctx.command.params:
        if param.name not in values or not isinstance(param, click.Option):
            continue
        raw = values[param.name]
        try:
            param.type_cast_value(ctx, raw)
        except click.BadParameter as exc:
            key = param.name.replace("_", "-")
            raise click.UsageError(f"{path}: {key} = {raw!r}: {exc.message}", ctx) from None


def _check_config_keys(
    path: str, data: dict[str, Any], command: str, commands: Mapping[str, click.Command]
) -> None:
    """Raise a usage error naming the first key of the file that means nothing here."""
    every = set().union(*(_param_names(c) for c in commands.values()))
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in commands:
                raise click.BadParameter(
                    f"{path}: [{key}] is not a command (tables: {', '.join(sorted(commands))})"
                )
            if key == command:
                own = _param_names(commands[key])
                for inner in value:
                    if inner.replace("-", "_") not in own:
                        raise click.BadParameter(
                            f"{path}: [{key}] {inner} is not an option of {key}"
                            + _nearest(inner, own)
                        )
        elif key.replace("-", "_") not in every:
            raise click.BadParameter(
                f"{path}: {key} is not an option of any command{_nearest(key, every)}"
            )


def _nearest(key: str, names: set[str]) -> str:
    """`` (did you mean 'builder-timeout'?)`` for the valid name closest to ``key``, if any."""
    close = difflib.get_close_matches(key.replace("-", "_"), sorted(names), n=1, cutoff=0.75)
    return f" (did you mean '{close[0].replace('_', '-')}'?)" if close else ""


def config_option(f: F) -> F:
    return option(
        "--config",
        type=click.Path(dir_okay=False),
        callback=_load_config,
        is_eager=True,
        expose_value=False,
        help="TOML file with the same option names.",
    )(f)


# ---------------------------------------------------------------------------------------------
# Option groups as typed records.


def options_record(record: type[R], argument: str, *options: Callable[[F], F]) -> Callable[[F], F]:
    """Declare ``options`` on a command and pass their values to it as one ``record`` instance,
    the keyword argument ``argument``.

    The options' parameter names must be exactly the record's fields.  That is checked here,
    when the command is declared (at import), so a misspelt option fails every test at once
    instead of raising ``KeyError`` when a user runs the command."""
    fields = [field.name for field in attrs.fields(record)]

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in fields}
            return f(*args, **kwargs, **{argument: record(**values)})

        declared: list[click.Parameter] = getattr(command, "__click_params__", [])
        before = len(declared)
        decorated: Any = command
        for decorator in reversed(options):
            decorated = decorator(decorated)
        added = {p.name for p in decorated.__click_params__[before:]}
        if added != set(fields):
            raise TypeError(
                f"{record.__name__}: options {sorted(map(str, added))} != fields {sorted(fields)}"
            )
        return decorated  # type: ignore[no-any-return]

    return decorate


# ---------------------------------------------------------------------------------------------
# Logging.


@attrs.frozen(kw_only=True)
class LoggingOptions:
    #: least severe level logged (``--log-level``).
    log_level: str
    #: ``text`` or ``json`` (``--log-format``).
    log_format: str


logging_options = options_record(
    LoggingOptions,
    "log_options",
    option(
        "--log-format", type=click.Choice(["text", "json"]), default="text", help="Log line format."
    ),
    option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        help="Least severe messages logged.",
    ),
)
