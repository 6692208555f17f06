"""The command line (``hydra-trio``, ``python -m hydra_trio``): a click group that parses
options into frozen configs and calls ``trio.run``.

- ``commands``: the click group ``main`` and one function per command of CONTRACT.md.
- ``options``: option plumbing (types, environment variables, ``--config FILE``, typed option
  records); ``configs``: the daemons' option records and the configs built from them.
- ``daemons``: logging, ``trio.run``, signals, the start-up of a builder and of ``up``.
- ``client``: ``RunnerClient``, the HTTP calls of the client commands.
- ``graph``: a TOML graph file as a ``POST /builds`` body.
- ``render``: what the client commands print.
- ``errors``: ``fail``, the one-line end of a user's mistake.

Option precedence is command line > environment > file > default.  User mistakes are one line
on stderr and exit status 2 (usage) or 1 (everything else), never a traceback.
"""

from __future__ import annotations

from hydra_trio.cli.commands import main
from hydra_trio.cli.graph import load_graph

__all__ = ["load_graph", "main"]
