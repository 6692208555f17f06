"""Running the command line in-process (click's CliRunner) in a clean environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from hydra_trio import cli
from hydra_trio.cli import daemons


def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No HYDRA_TRIO_* from the developer's shell; relative defaults land in tmp_path; the
    root logger is left alone (setup_logging would point it at CliRunner's closed stderr)."""
    for key in list(os.environ):
        if key.startswith("HYDRA_TRIO_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(daemons, "setup_logging", lambda level, fmt: None)


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.main, args, env=env, prog_name="hydra-trio", terminal_width=200)
