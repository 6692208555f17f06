"""How a user's mistake ends a command: one line on stderr and a non-zero exit status.

Usage mistakes that click can attribute to an option (a bad value, a missing argument) are
``click.UsageError``/``click.BadParameter``: click prints them as one ``Error:`` line and exits
with status 2.  Everything else a user can meet (an unreachable runner, a refused request, a
port in use) goes through ``fail``: ``hydra-trio: error: ...`` and exit status 1.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click


def fail(message: str) -> NoReturn:
    """A user-facing error: one line, exit status 1."""
    click.echo(f"hydra-trio: error: {message}", err=True)
    sys.exit(1)
