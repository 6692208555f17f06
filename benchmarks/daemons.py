"""Running the real daemons as subprocesses, shared by the farm benchmarks.

The benchmarks run as scripts (``.venv/bin/python benchmarks/X.py``), so this directory is on
``sys.path`` and they ``import daemons`` as a sibling module.  Only the processes started here
are ever signalled, through their ``Popen`` handles; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import platform
import pstats
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Container
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` itself (all its threads, not its children), from
    ``/proc/<pid>/stat``; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """This process's user + system CPU seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def print_profiles(directory: Path, top: int) -> None:
    for path in sorted(directory.glob("*.prof")):
        print(f"\n===== {path} =====")
        stats = pstats.Stats(str(path))
        stats.sort_stats("cumulative").print_stats(top)
        stats.sort_stats("tottime").print_stats(top)


class Daemons:
    """Subprocesses in ``workdir`` (each logging to ``<name>.log``), and an HTTP client.

    ``profile``: run the daemons named in ``profiled`` (all of them if ``None``) under
    ``cProfile``, writing ``profile/<name>.prof``.  ``daemon_args`` are appended to every
    ``hydra_trio`` command line.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        client_timeout: float,
        stop_grace: float = 10.0,
        profile: Path | None = None,
        profiled: Container[str] | None = None,
        daemon_args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.stop_grace = stop_grace
        self.profile = profile
        self.profiled = profiled
        self.daemon_args = daemon_args
        self.processes: dict[str, subprocess.Popen[Any]] = {}
        self.client = httpx.Client(timeout=client_timeout)
        self.url = ""
        self.port = 0

    def spawn(self, name: str, *args: str, pipe: bool = False) -> subprocess.Popen[Any]:
        """``python *args``, without the caller's ``HYDRA_TRIO_*`` environment variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_TRIO_")}
        with (self.workdir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe else log,
                stderr=log,
                cwd=self.workdir,
                env=env,
                text=pipe,
            )
        self.processes[name] = process
        return process

    def daemon(self, name: str, *args: str) -> subprocess.Popen[Any]:
        """``python -m hydra_trio *args``, under ``cProfile`` if asked."""
        command: list[str] = []
        if self.profile is not None and (self.profiled is None or name in self.profiled):
            command += ["-m", "cProfile", "-o", str(self.profile / f"{name}.prof")]
        return self.spawn(name, *command, "-m", "hydra_trio", *args, *self.daemon_args)

    def start_runner(self, *options: str) -> None:
        """Start the queue runner on free ports (retrying if one was taken meanwhile) and wait
        for ``GET /status``; ``options`` go before ``--state-dir``."""
        for _ in range(5):
            self.port, http = free_port(), free_port()
            runner = self.daemon(
                "runner",
                "queue-runner",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--http",
                f"127.0.0.1:{http}",
                *options,
                "--state-dir",
                str(self.workdir / "state"),
            )
            self.url = f"http://127.0.0.1:{http}"
            deadline = time.monotonic() + 20
            while runner.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):
                    if self.client.get(f"{self.url}/status").status_code == 200:
                        return
                time.sleep(0.05)
            self.stop(runner)
            del self.processes["runner"]
            if "cannot listen" not in (self.workdir / "runner.log").read_text():
                raise RuntimeError(f"the runner did not start; see {self.workdir}/runner.log")
        raise RuntimeError("no free ports for the runner")

    def stop(self, process: subprocess.Popen[Any]) -> None:
        """SIGINT (the daemons' stop-now), SIGKILL after ``stop_grace``; then reap."""
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(self.stop_grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(self.stop_grace)

    def close(self) -> None:
        for process in reversed(list(self.processes.values())):
            self.stop(process)
            if process.stdout is not None:
                process.stdout.close()
        self.client.close()
