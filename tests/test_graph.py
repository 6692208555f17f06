"""parse_graph: graph files and POST /builds bodies with named builds."""

from __future__ import annotations

import pytest

from hydra_trio.runner.specs import SpecError, parse_graph


def graph(*entries: tuple[str, list[str]]) -> dict[str, object]:
    return {"builds": [{"name": n, "command": ["true"], "after": a} for n, a in entries]}


def test_builds_are_ordered_as_listed_as_far_as_their_dependencies_allow() -> None:
    body = graph(("a", []), ("b", ["d"]), ("c", []), ("d", []), ("e", []))
    specs, names = parse_graph(body, "x86_64-linux")
    assert names == ["a", "c", "d", "b", "e"]
    assert [s.after for s in specs] == [(), (), (), ("d",), ()]


def test_independent_builds_keep_their_listing_order() -> None:
    names = [f"n{i:02}" for i in range(30)]
    assert parse_graph(graph(*((n, []) for n in names)), "x86_64-linux")[1] == names


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (graph(("a", ["b"]), ("b", ["a"]), ("c", [])), "a cycle through 'a', 'b'"),
        (graph(("a", []), ("a", [])), "'a' is defined twice"),
        ({"builds": []}, "the graph is empty"),
        ({"builds": [{"command": ["true"]}]}, "every build of a graph needs a name"),
    ],
)
def test_a_broken_graph_is_refused_with_what_is_wrong(
    body: dict[str, object], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        parse_graph(body, "x86_64-linux")
