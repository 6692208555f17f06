"""Real daemons as child processes over loopback TCP, for the ``realnet`` tests.

``real_farm(tmp_path)`` is an async context manager owning one nursery: every daemon started
through it runs under ``trio.run_process`` in that nursery, so leaving the block (normally, on a
failed assertion, or on a timeout) cancels them all and waits for each.  Cancelling one sends
SIGCONT (it may have been stopped by the test), then SIGINT (the daemons' "stop now": a builder
kills its builds' process groups; SIGTERM would make a builder drain and wait for its builds),
then SIGKILL if it is still there after ``STOP_GRACE`` seconds.  Only the processes started here
are ever signalled, by their own ``trio.Process`` handle, which never signals a reaped pid.

Each daemon writes stdout and stderr to ``<tmp_path>/<name>.log``; the logs are printed when the
block exits, so pytest shows them for a failing test (and swallows them for a passing one).

Every wait here is bounded and fails with what it was waiting for and the last value seen.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
import psutil
import trio

from hydra_trio.builder import contain

T = TypeVar("T")

#: Seconds a daemon gets to exit after SIGINT before it is killed.
STOP_GRACE = 5.0
#: Seconds between two polls of the HTTP API.
POLL = 0.02
#: The fields of a build or machine that ``wait_for`` prints when they change.
SHOWN = frozenset({"state", "status", "attempts", "machine", "currentJobs", "disconnectReason"})
#: Runner start attempts when a port picked as free was taken in between.
PORT_ATTEMPTS = 5


def free_port() -> int:
    """A port that was free a moment ago (the caller retries if it is taken by then)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def daemon_env() -> dict[str, str]:
    """The test's environment without HYDRA_TRIO_* settings that could leak into the daemons."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_TRIO_")}


async def _stop(process: trio.Process) -> None:
    """``deliver_cancel`` for the daemons: resume, interrupt, and kill if need be."""
    process.send_signal(signal.SIGCONT)
    process.send_signal(signal.SIGINT)
    with trio.move_on_after(STOP_GRACE):
        await process.wait()
        return
    process.kill()


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not count: an orphan's
    reaper may be a PID 1 that is slow to reap, or never does)."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


@attrs.define(eq=False)
class Daemon:
    """One daemon process and its log file."""

    name: str
    process: trio.Process
    log_path: Path

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@attrs.define(eq=False)
class RealFarm:
    """A queue runner and builders as processes, and an HTTP client for the runner's API."""

    tmp_path: Path
    nursery: trio.Nursery
    client: httpx.AsyncClient
    daemons: list[Daemon] = attrs.field(factory=list)
    builder_port: int = 0
    url: str = ""

    async def start(self, name: str, *args: str) -> Daemon:
        """Run ``python -m hydra_trio ARGS`` as ``name`` (its output in ``<name>.log``)."""
        log_path = self.tmp_path / f"{name}.log"
        with log_path.open("ab") as log_file:
            process: trio.Process = await self.nursery.start(
                functools.partial(
                    trio.run_process,
                    [sys.executable, "-m", "hydra_trio", *args],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=str(self.tmp_path),
                    env=daemon_env(),
                    check=False,
                    deliver_cancel=_stop,
                )
            )
        daemon = Daemon(name=name, process=process, log_path=log_path)
        self.daemons.append(daemon)
        return daemon

    async def start_runner(self, *extra: str, builder_timeout: float = 3.0) -> Daemon:
        """Start the queue runner on free ports; returns once its HTTP API answers."""
        for _ in range(PORT_ATTEMPTS):
            builder_port, http_port = free_port(), free_port()
            runner = await self.start(
                "runner",
                "queue-runner",
                "--listen",
                f"127.0.0.1:{builder_port}",
                "--http",
                f"127.0.0.1:{http_port}",
                "--builder-timeout",
                f"{builder_timeout:g}",
                "--state-dir",
                str(self.tmp_path / "state"),
                *extra,
            )
            url = f"http://127.0.0.1:{http_port}"
            with trio.fail_after(20):
                while runner.process.returncode is None:
                    with contextlib.suppress(httpx.TransportError):
                        if (await self.client.get(f"{url}/status")).status_code == 200:
                            self.builder_port, self.url = builder_port, url
                            return runner
                    await trio.sleep(POLL)
            await runner.process.wait()
            if not any(sign in runner.log() for sign in ("cannot listen", "already in use")):
                raise AssertionError(f"the queue runner exited:\n{runner.log()}")
            self.daemons.remove(runner)
        raise AssertionError(f"no free pair of ports in {PORT_ATTEMPTS} attempts")

    async def start_builder(
        self, hostname: str, *extra: str, server: str | None = None, wait: bool = True
    ) -> Daemon:
        """Start a builder (1 slot, ping every 1 s, timeout 3 s); with ``wait``, returns once
        the runner lists it as connected."""
        builder = await self.start(
            hostname,
            "builder",
            "--server",
            server or f"127.0.0.1:{self.builder_port}",
            "--ping-interval",
            "1",
            "--ping-timeout",
            "3",
            "--max-jobs",
            "1",
            "--hostname",
            hostname,
            "--work-dir",
            str(self.tmp_path / "builders" / hostname),
            *extra,
        )
        if wait:
            with trio.fail_after(20):
                await self.wait_for(
                    f"{hostname} connected",
                    lambda m: m is not None and m["state"] == "connected",
                    functools.partial(self.machine, hostname),
                )
        return builder

    # -- the HTTP API -----------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        response = await self.client.get(f"{self.url}/status")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def machine(self, hostname: str) -> dict[str, Any] | None:
        for machine in (await self.status())["machines"]:
            if machine["hostname"] == hostname:
                result: dict[str, Any] = machine
                return result
        return None

    async def submit(self, *command: str) -> str:
        response = await self.client.post(f"{self.url}/builds", json={"command": list(command)})
        assert response.status_code == 201, response.text
        build_id: str = response.json()["id"]
        return build_id

    async def build(self, build_id: str) -> dict[str, Any]:
        response = await self.client.get(f"{self.url}/builds/{build_id}")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def wait_for(
        self, what: str, predicate: Callable[[T], bool], get: Callable[[], Awaitable[T]]
    ) -> T:
        """Poll ``get()`` until ``predicate`` holds for its value; returns that value.

        Unbounded: callers wrap it in ``trio.fail_after``.  Each change of the value (of its
        SHOWN keys, for a dict) is printed, so a failing test shows what it saw."""
        last: object = None
        while True:
            value = await get()
            shown = (
                {k: v for k, v in value.items() if k in SHOWN} if isinstance(value, dict) else value
            )
            if shown != last:
                print(f"{time.monotonic():.3f} waiting for {what}: {shown!r}")
                last = shown
            if predicate(value):
                return value
            await trio.sleep(POLL)

    async def wait_build(
        self, build_id: str, what: str, predicate: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        return await self.wait_for(
            f"build {build_id}: {what}", predicate, functools.partial(self.build, build_id)
        )

    def show_logs(self) -> None:
        for daemon in self.daemons:
            code = daemon.process.returncode
            print(f"===== {daemon.name} (pid {daemon.process.pid}, exit {code}) =====")
            print(daemon.log())


@contextlib.asynccontextmanager
async def real_farm(tmp_path: Path) -> AsyncIterator[RealFarm]:
    """A nursery of daemons: all of them are stopped and waited for when the block exits,
    however it exits (yielding inside the nursery is safe in an ``asynccontextmanager``)."""
    farm: RealFarm | None = None
    try:
        async with httpx.AsyncClient(timeout=5.0) as client, trio.open_nursery() as nursery:
            farm = RealFarm(tmp_path=tmp_path, nursery=nursery, client=client)
            try:
                yield farm
            finally:
                nursery.cancel_scope.cancel()  # each daemon's _stop runs, bounded by STOP_GRACE
    finally:
        if farm is not None:
            farm.show_logs()  # complete now: every daemon has exited
        # what a builder restarted on each work dir would remove: the cgroups of the builds and
        # shells standing by that a builder killed by the test left (never reused otherwise)
        for work_dir in sorted((tmp_path / "builders").glob("*")):
            contain.remove_leftover_cgroups(work_dir.absolute() / "builds")
