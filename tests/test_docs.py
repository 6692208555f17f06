"""The configuration examples in docs/deploy.md use real option names with valid values."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import click
import pytest

from hydra_trio.cli import main

DEPLOY = Path(__file__).parent.parent / "docs" / "deploy.md"


def toml_blocks() -> list[dict[str, object]]:
    text = DEPLOY.read_text()
    return [tomllib.loads(block) for block in re.findall(r"```toml\n(.*?)```", text, re.S)]


def test_deploy_md_has_a_config_for_each_daemon() -> None:
    assert {name for block in toml_blocks() for name in block} == {"queue-runner", "builder"}


@pytest.mark.parametrize("block", toml_blocks(), ids=lambda b: next(iter(b)))
def test_every_key_is_an_option_of_its_command(block: dict[str, dict[str, object]]) -> None:
    [(command_name, options)] = block.items()
    command = main.commands[command_name]
    ctx = click.Context(command)
    for key, value in options.items():
        matches = [p for p in command.params if p.name == key.replace("-", "_")]
        assert matches, f"[{command_name}] {key} is not an option"
        [param] = matches
        if isinstance(param.type, click.Path):
            continue  # the files do not exist here
        param.type_cast_value(ctx, value)  # raises for a value the option refuses


def test_the_guides_graph_is_a_valid_graph(tmp_path: Path) -> None:
    from hydra_trio.cli import load_graph
    from hydra_trio.runner.specs import parse_graph

    text = (DEPLOY.parent / "guide.md").read_text()
    [block] = re.findall(r"```toml\n(.*?)```", text, re.S)
    path = tmp_path / "graph.toml"
    path.write_text(block)
    specs, names = parse_graph(load_graph(str(path)), "x86_64-linux")
    assert names == ["compile", "test"] and specs[1].after
