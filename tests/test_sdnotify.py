"""Readiness for systemd (``Type=notify``): the runner says READY=1 once its ports listen."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from hydra_trio import sdnotify

from .helpers.procs import real_farm


def test_without_a_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_an_unreachable_notify_socket_is_a_warning_not_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False
    assert "cannot notify the service manager" in caplog.text


def test_abstract_socket_names(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"hydra-trio-test-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STATUS=x")
        assert manager.recv(4096) == b"STATUS=x"


@pytest.mark.realnet
async def test_the_runner_and_a_builder_notify_readiness(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "notify"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        await manager.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        with trio.fail_after(60):
            async with real_farm(tmp_path) as farm:
                await farm.start_runner()
                messages = [await _receive(manager)]
                assert messages[0].startswith("READY=1\nSTATUS=builders on 127.0.0.1:")
                await farm.start_builder("b1")
                messages += [await _receive(manager), await _receive(manager)]
                assert messages[1].startswith("READY=1\nSTATUS=connecting to 127.0.0.1:")
                assert messages[2].startswith("STATUS=connected to 127.0.0.1:")


async def _receive(sock: trio.socket.SocketType) -> str:
    data: bytes = await sock.recv(4096)
    return data.decode()
