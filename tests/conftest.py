"""Shared fixtures: the store backends (SQLite always, PostgreSQL when it is installed) and
a real queue runner on loopback (``runner``)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from hydra_trio.runner.store import PostgresStore, SqliteStore, Store

from .helpers import slow_threads
from .helpers.pg import Cluster, find_bindir
from .helpers.runner import Runner, start_runner


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow-threads",
        metavar="MIN-MAX",
        help="delay every trio.to_thread.run_sync job MIN..MAX s of real time in its thread "
        "(a loaded machine; see tests/helpers/slow_threads.py)",
    )


@pytest.fixture(autouse=True)
def _slow_threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    value = request.config.getoption("--slow-threads")
    if value:
        slowed = slow_threads.slow_run_sync(*slow_threads.parse(value))
        monkeypatch.setattr(trio.to_thread, "run_sync", slowed)


def pytest_configure(config: pytest.Config) -> None:
    """The suite's Nix stores are chroot stores under its temporary directories, used by one
    user: Nix builds as that user (``build-users-group =``), so the tests need no ``nixbld``
    group or build users, which a root Nix otherwise requires (and a bare ``nix-bin`` install
    lacks).  Child processes (the real daemons of the realnet and chaos tests) inherit it."""
    if config.getoption("--slow-threads"):
        slow_threads.parse(config.getoption("--slow-threads"))  # a bad value: one line, at once
    extra = os.environ.get("NIX_CONFIG", "")
    os.environ["NIX_CONFIG"] = f"{extra}\nbuild-users-group =" if extra else "build-users-group ="


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``linux`` skip themselves on other platforms (the macOS CI job runs the
    rest: everything the builder does on a Mac)."""
    if sys.platform == "linux":
        return
    skip = pytest.mark.skip(reason=f"needs Linux, this is {sys.platform}")
    for item in items:
        if "linux" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster | None]:
    bindir = find_bindir()
    if bindir is None:
        yield None
        return
    cluster = Cluster.start(bindir)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, pg_cluster: Cluster | None) -> str:
    """A URL of an empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.sqlite'}"
    if pg_cluster is None:
        pytest.skip("PostgreSQL is not installed: skipped the PostgreSQL half of the store tests")
    return pg_cluster.new_database()


@pytest.fixture
def store(store_url: str, tmp_path: Path) -> Iterator[Store]:
    from hydra_trio.runner.store import open_store

    opened = open_store(store_url, tmp_path)
    assert isinstance(opened, SqliteStore | PostgresStore)
    opened.migrate()
    try:
        yield opened
    finally:
        opened.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    bindir = find_bindir()
    if bindir is None:
        lines = ["PostgreSQL: not installed, the PostgreSQL half of the store tests is skipped"]
    else:
        lines = [f"PostgreSQL: {bindir}"]
    if shutil.which("nix-store") is None:
        lines.append("Nix: not installed, the Nix build tests (tests/test_nix.py) are skipped")
    else:
        lines.append(f"Nix: {shutil.which('nix-store')}")
    return lines


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[Runner]:
    """A real queue runner on loopback with the defaults, served until the test ends; its
    ``client`` talks to its HTTP API."""
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as client:
        started = await start_runner(nursery, tmp_path, client)
        assert started.addresses.http[0].startswith("http://127.0.0.1:")
        yield started
        nursery.cancel_scope.cancel()
