"""Command line: a click group that parses options into frozen configs and calls trio.run."""

from __future__ import annotations

import click

from hydra_trio import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hydra-trio")
def main() -> None:
    """hydra-trio: a build farm whose builder connections can never die silently."""
