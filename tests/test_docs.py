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


EMBEDDING = DEPLOY.parent / "embedding.md"
EXAMPLE = DEPLOY.parent.parent / "examples" / "embedded.py"


def test_embedding_md_shows_the_example_file() -> None:
    """docs/embedding.md carries examples/embedded.py exactly."""
    [block] = re.findall(r"```python\n(.*?)```", EMBEDDING.read_text(), re.S)
    assert block == EXAMPLE.read_text()


def test_embedding_md_lists_the_public_api() -> None:
    """The table of docs/embedding.md names exactly hydra_trio.__all__, each importable."""
    import hydra_trio

    documented = re.findall(r"^\| `(\w+)[`(]", EMBEDDING.read_text(), re.M)
    assert sorted(documented) == sorted(n for n in hydra_trio.__all__ if n != "__version__")
    for name in documented:
        assert getattr(hydra_trio, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hydra_trio.nope  # noqa: B018


@pytest.mark.realnet
async def test_the_embedding_example_runs_a_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/embedded.py serves a runner and a builder, and its build succeeds."""
    import importlib.util

    import trio

    spec = importlib.util.spec_from_file_location("embedded_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with trio.fail_after(60):
        build = await module.main(tmp_path)
    assert build["state"] == "succeeded"
    assert [(o["path"], o["size"]) for o in build["outputs"]] == [("greeting", 3)]
    assert capsys.readouterr().out == "hi\n"


def test_the_public_names_are_the_lazy_ones() -> None:
    """hydra_trio.__all__ and the names it imports on first use are the same list."""
    import hydra_trio

    assert set(hydra_trio.__all__) - {"__version__"} == set(hydra_trio._PUBLIC)
