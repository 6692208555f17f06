"""A TOML graph file (``submit --file``, ``up --submit``) as the body of ``POST /builds``.

Only the file's shape is checked here (a table of builds, known keys); what the values mean is
the runner's to judge (``runner.specs.parse_graph``), as for any other submission.  Mistakes are
``GraphFileError``s whose message names the file; the commands turn them into usage errors of
their own option.
"""

from __future__ import annotations

import tomllib
from typing import Any

#: The keys a build of a graph file may have, and their names in ``POST /builds``.
GRAPH_KEYS = {
    "command": "command",
    "system": "system",
    "features": "requiredFeatures",
    "required-features": "requiredFeatures",
    "requiredFeatures": "requiredFeatures",
    "after": "after",
    "priority": "priority",
    "timeout": "timeout",
    "max-silent": "maxSilent",
    "maxSilent": "maxSilent",
    "env": "env",
    "network": "network",
}


class GraphFileError(ValueError):
    """A graph file that cannot be read or has the wrong shape (the message names it)."""


def load_graph(path: str) -> dict[str, Any]:
    """Read a TOML graph: ``[build.NAME]`` tables (or ``[[build]]`` with ``name``), each with
    ``command`` and optionally ``after``, ``system``, ``features``, ``priority``, ``timeout``,
    ``max-silent``, ``env``, ``network``.  Returns the ``POST /builds`` body."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise GraphFileError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise GraphFileError(f"{path} is not valid TOML: {exc}") from None
    table = data.get("build")
    if isinstance(table, dict):
        entries = [
            {"name": key, **value} for key, value in table.items() if isinstance(value, dict)
        ]
    elif isinstance(table, list):
        entries = [dict(entry) for entry in table if isinstance(entry, dict)]
    else:
        raise GraphFileError(f"{path}: no [build.NAME] tables")
    builds = []
    for entry in entries:
        unknown = sorted(set(entry) - set(GRAPH_KEYS) - {"name"})
        if unknown:
            raise GraphFileError(
                f"{path}: build {entry.get('name')!r} has unknown keys {', '.join(unknown)}"
            )
        builds.append(
            {"name": entry.get("name")}
            | {GRAPH_KEYS[k]: v for k, v in entry.items() if k != "name"}
        )
    return {"builds": builds}
