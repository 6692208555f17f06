"""Facts about this machine used as defaults (system type, hostname)."""

from __future__ import annotations

import platform
import socket


def default_system() -> str:
    """Nix-style system double of this machine, e.g. ``x86_64-linux``."""
    machine = platform.machine().lower() or "unknown"
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return f"{machine}-{platform.system().lower() or 'unknown'}"


def default_hostname() -> str:
    return socket.gethostname() or "localhost"
