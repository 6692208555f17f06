"""parse_spec and friends: each caller mistake is one line naming the field and the reason."""

from __future__ import annotations

import pytest

from hydra_trio.protocol.validators import MAX_STRING
from hydra_trio.runner.specs import SpecError, parse_drv_request, parse_graph, parse_spec

SYSTEM = "x86_64-linux"
DRV = "/nix/store/" + "a" * 32 + "-hello.drv"


def error(parse: object, body: object) -> str:
    assert callable(parse)
    with pytest.raises(SpecError) as caught:
        parse(body)
    return str(caught.value)


def spec(body: object) -> object:
    return parse_spec(body, SYSTEM)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("timout", "timout: unknown field (did you mean 'timeout'?)"),
        ("max_silent", "max_silent: unknown field (did you mean 'maxSilent'?)"),
        ("features", "features: unknown field (did you mean 'requiredFeatures'?)"),
        ("drvv", "drvv: unknown field (did you mean 'drv'?)"),
        (
            "zzz",
            "zzz: unknown field (the fields are command, name, system, requiredFeatures, "
            "after, priority, timeout, maxSilent, env, network)",
        ),
    ],
)
def test_an_unknown_field_is_refused_naming_the_nearest_valid_one(key: str, message: str) -> None:
    """A misspelt field is an error naming it and the field it probably meant, not dropped."""
    assert error(spec, {"command": ["true"], key: 5}) == message


def test_unknown_fields_in_a_graph_entry_and_a_drv_body() -> None:
    """The graph's entries, the graph body and a drv body are as strict as a single build."""
    graph = {"builds": [{"name": "a", "command": ["true"], "afterr": []}]}
    assert error(lambda b: parse_graph(b, SYSTEM), graph) == (
        "build 'a': afterr: unknown field (did you mean 'after'?)"
    )
    assert error(lambda b: parse_graph(b, SYSTEM), {**graph, "priorty": 1}).startswith(
        "priorty: unknown field (did you mean 'priority'?)"
    )
    assert error(parse_drv_request, {"drv": DRV, "timeot": 5}) == (
        "timeot: unknown field (did you mean 'timeout'?)"
    )


def test_a_string_over_the_limit_says_so() -> None:
    """An argument, a name or an env value longer than the protocol's string limit is refused
    with that limit as the reason (it once read 'every item must be a string, got str')."""
    huge = "x" * (MAX_STRING + 1)
    assert error(spec, {"command": ["echo", huge]}) == (
        f"command[1]: {MAX_STRING + 1} characters, more than the limit of {MAX_STRING} per string"
    )
    assert error(spec, {"command": ["true"], "name": huge}).startswith(
        f"name: {MAX_STRING + 1} characters, more than the limit of {MAX_STRING}"
    )
    assert error(spec, {"command": ["true"], "env": {"A": huge}}).startswith("env[1]: ")
    assert error(spec, {"command": ["true"], "system": huge}).startswith("system[0]: ")
    assert error(spec, {"command": ["echo", "\ud800"]}) == (
        "command[1]: not valid Unicode text (a lone surrogate)"
    )


def test_a_string_at_the_limit_is_accepted() -> None:
    """Exactly MAX_STRING characters is still fine."""
    assert (
        parse_spec({"command": ["echo", "x" * MAX_STRING]}, SYSTEM).command[1] == "x" * MAX_STRING
    )
