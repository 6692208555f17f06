"""A throwaway PostgreSQL cluster for the store tests: private data dir, port and socket dir.

Found through ``pg_config --bindir`` or Debian's ``/usr/lib/postgresql/<v>/bin``.  When no
PostgreSQL is installed, ``find_bindir`` returns None and the PostgreSQL half of the store tests
is skipped with a line saying so (``make test`` installs it on CI).  initdb refuses to run as
root, so as root the cluster runs as the ``postgres`` user through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import attrs


def find_bindir() -> Path | None:
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define
class Cluster:
    bindir: Path
    root: Path
    port: int
    prefix: list[str]
    databases: int = 0

    @classmethod
    def start(cls, bindir: Path) -> Cluster:
        root = Path(tempfile.mkdtemp(prefix="hydra-trio-pg-"))
        prefix: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
            prefix = ["runuser", "-u", "postgres", "--"]
        port = _free_port()
        cluster = cls(bindir=bindir, root=root, port=port, prefix=prefix)
        data = root / "data"
        cluster._run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        cluster.start_server()
        return cluster

    def start_server(self) -> None:
        """Start the server (again, after ``stop_server``): same data, port and socket dir."""
        self._run(
            "pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-w",
            "-t", "60", "-o", f"-p {self.port} -k {self.root} -c listen_addresses='' -c fsync=off",
            "start",
        )  # fmt: skip

    def stop_server(self) -> None:
        """Stop the server, ending every connection (``fast``: as a restart by an operator)."""
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.prefix, str(self.bindir / tool), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        self.databases += 1
        name = f"test{self.databases}_{int(time.time() * 1000) % 100000}"
        self._run("createdb", "-h", str(self.root), "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql://postgres@/{name}?host={self.root}&port={self.port}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
