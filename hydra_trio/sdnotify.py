"""systemd's readiness protocol (``sd_notify``), without depending on systemd.

With ``Type=notify`` in a unit, systemd sets ``NOTIFY_SOCKET`` and waits for ``READY=1`` before
it counts the service as started (so units ordered after the runner start once its ports
listen).  Without the variable every call here does nothing, so the daemons run the same
anywhere.  The protocol is one datagram per message on a Unix socket; a name starting with
``@`` is in the abstract namespace.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("hydra_trio.sdnotify")


def notify(state: str) -> bool:
    """Send ``state`` (``"READY=1"``, ``"STOPPING=1"``, ``"STATUS=..."``, newline-separated)
    to the service manager; returns whether one was there to send it to."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        # Python opens sockets close-on-exec already (PEP 446); SOCK_CLOEXEC is Linux-only.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        # Readiness is a courtesy to the service manager; failing it must not stop the daemon.
        log.warning("cannot notify the service manager at %s: %s", address.lstrip("\0"), exc)
        return False
    return True
