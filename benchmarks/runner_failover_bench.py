"""Runner failover: two queue runners on one PostgreSQL database, and a graceful restart.

Three scenarios, each repeated (fresh processes, database and state every time), on loopback:

- **kill**: runners A (leader) and B (standby) on one throwaway PostgreSQL, ``--builder-timeout
  3`` (so ``--lease-timeout`` 3); 3 builders with 10 job slots each and ``--server A,B
  --ping-interval 1 --ping-timeout 3``; 30 builds of ``sleep 8`` running on them.  SIGKILL of
  A; measured from the kill: the time until every build runs again (on B, attempt >= 2).
  Then every build must succeed (lost = builds that did not), and each must be committed once
  (double commits = builds with more than one ``finished`` line in the two runners' logs).
- **freeze**: the same farm; SIGSTOP of A for 6 s (twice its lease), B takes over and the
  builds finish there; SIGCONT of A.  Stale commits = rows of ``builds`` that change after A
  woke (B is idle by then: any change is A's).  A must say it stood down.
- **restart**: one runner on SQLite with 30 builds of ``sleep 30`` running; SIGTERM with
  ``--stop-grace 1``, start it again on the same state dir, wait until all 30 run again.
  Tries used = the sum of the builds' ``infra_failures`` in the database (the restart must use
  none) and the machines' ``lostBuilds`` (must stay 0).

    .venv/bin/python benchmarks/runner_failover_bench.py            # 5 repetitions each
    .venv/bin/python benchmarks/runner_failover_bench.py --quick    # 1 each

Needs PostgreSQL (``tests/helpers/pg.py`` finds it) for kill and freeze; without it they are
skipped with a line saying so.  Only the processes this script starts are ever signalled,
through their ``Popen`` handles.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import figures
import httpx
from daemons import Daemons, cpu_model, free_port
from figures import Figure, Goal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

T = TypeVar("T")
BUILDER_TIMEOUT = 3.0
BUILDERS = 3
JOBS = 10
BUILDS = BUILDERS * JOBS
FREEZE = 6.0


def wait(what: str, check: Callable[[], T | None], limit: float = 120.0) -> T:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            value = check()
            if value:
                return value
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


class Farm:
    def __init__(self, workdir: Path, db: str | None) -> None:
        self.d = Daemons(workdir, client_timeout=10, stop_grace=15)
        self.workdir = workdir
        self.db = db
        self.runners: dict[str, tuple[str, str]] = {}  # name -> (builder address, HTTP URL)

    def runner(self, name: str, *extra: str) -> str:
        """Start runner ``name`` (again on its ports, if it ran before); its HTTP URL."""
        if name in self.runners:
            address, url = self.runners[name]
            port, http = int(address.rsplit(":", 1)[1]), int(url.rsplit(":", 1)[1])
        else:
            port, http = free_port(), free_port()
        args = [
            "--builder-timeout",
            f"{BUILDER_TIMEOUT:g}",
            "--state-dir",
            str(self.workdir / name),
        ]
        if self.db is not None:
            args += ["--db", self.db, "--data-dir", str(self.workdir / "data")]
        self.d.daemon(
            name, "queue-runner", "--listen", f"127.0.0.1:{port}", "--http",
            f"127.0.0.1:{http}", *args, *extra,
        )  # fmt: skip
        self.runners[name] = (f"127.0.0.1:{port}", f"http://127.0.0.1:{http}")
        return f"http://127.0.0.1:{http}"

    def status(self, url: str) -> dict[str, Any]:
        result: dict[str, Any] = self.d.client.get(f"{url}/status").json()
        return result

    def role(self, url: str, role: str) -> dict[str, Any]:
        return wait(f"{url} {role}", lambda: (s := self.status(url))["role"] == role and s)

    def builders(self, leader: str) -> None:
        servers = ",".join(address for address, _ in self.runners.values())
        for index in range(BUILDERS):
            self.d.daemon(
                f"b{index}", "builder", "--server", servers, "--max-jobs", str(JOBS),
                "--ping-interval", "1", "--ping-timeout", "3", "--hostname", f"b{index}",
                "--work-dir", str(self.workdir / f"b{index}"),
            )  # fmt: skip
        wait(
            "builders",
            lambda: sum(m["connected"] for m in self.status(leader)["machines"]) == BUILDERS,
        )

    def submit(self, url: str, seconds: float) -> list[str]:
        return [
            self.d.client.post(f"{url}/builds", json={"command": ["sleep", f"{seconds:g}"]}).json()[
                "id"
            ]
            for _ in range(BUILDS)
        ]

    def leader_with_builds_running(self, seconds: float) -> tuple[str, str, list[str]]:
        """runnerA leading, runnerB standing by, the builders on A, and BUILDS builds of
        ``sleep seconds`` all running on them: (A's URL, B's URL, the build ids)."""
        a = self.runner("runnerA")
        self.role(a, "leader")
        b = self.runner("runnerB")
        self.role(b, "standby")
        self.builders(a)
        ids = self.submit(a, seconds)
        wait(f"{BUILDS} running", lambda: all(x["state"] == "running" for x in self.builds(a, ids)))
        return a, b, ids

    def builds(self, url: str, ids: list[str]) -> list[dict[str, Any]]:
        return [self.d.client.get(f"{url}/builds/{i}").json() for i in ids]

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")


def _pg_rows(db: str) -> dict[str, tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT id, state, status, attempts, infra_failures, machine_id, finished_at "
            "FROM builds"
        ).fetchall()
    return {row[0]: tuple(row[1:]) for row in rows}


def kill(workdir: Path, db: str) -> dict[str, float]:
    farm = Farm(workdir, db)
    try:
        _, b, ids = farm.leader_with_builds_running(8)
        killed = time.monotonic()
        farm.d.processes["runnerA"].kill()
        farm.role(b, "leader")
        wait(
            "all running again",
            lambda: all(
                x["state"] == "running" and x["attempts"] >= 2 for x in farm.builds(b, ids)
            ),
        )
        again = time.monotonic() - killed
        wait(
            "all finished",
            lambda: all(x["state"] in ("succeeded", "failed") for x in farm.builds(b, ids)),
        )
        lost = sum(x["state"] != "succeeded" for x in farm.builds(b, ids))
        logs = farm.log("runnerA") + farm.log("runnerB")
        double = sum(len(re.findall(rf"build {i} finished", logs)) > 1 for i in ids)
        return {"running_again_s": again, "lost": lost, "double_commits": double}
    finally:
        farm.d.close()


def freeze(workdir: Path, db: str) -> dict[str, float]:
    farm = Farm(workdir, db)
    try:
        a, b, ids = farm.leader_with_builds_running(2)
        runner_a = farm.d.processes["runnerA"]
        runner_a.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        farm.role(b, "leader")
        takeover = time.monotonic() - frozen
        wait(
            "all succeeded on B",
            lambda: all(x["state"] == "succeeded" for x in farm.builds(b, ids)),
        )
        time.sleep(max(0.0, FREEZE - (time.monotonic() - frozen)))
        before = _pg_rows(db)
        runner_a.send_signal(signal.SIGCONT)
        farm.role(a, "standby")
        time.sleep(2.0)  # whatever A still does after waking
        after = _pg_rows(db)
        stale = sum(before.get(i) != row for i, row in after.items())
        stood_down = "lost the leadership" in farm.log(
            "runnerA"
        ) or "nothing was written" in farm.log("runnerA")
        lost = sum(x["state"] != "succeeded" for x in farm.builds(b, ids))
        return {
            "takeover_s": takeover,
            "stale_commits": stale,
            "lost": lost,
            "stood_down": stood_down,
        }
    finally:
        farm.d.close()


def restart(workdir: Path) -> dict[str, float]:
    farm = Farm(workdir, None)
    try:
        url = farm.runner("runner", "--stop-grace", "1")
        farm.role(url, "leader")
        farm.builders(url)
        ids = farm.submit(url, 30)
        wait("30 running", lambda: all(x["state"] == "running" for x in farm.builds(url, ids)))
        runner = farm.d.processes["runner"]
        stopped = time.monotonic()
        runner.send_signal(signal.SIGTERM)
        runner.wait(30)
        stop_s = time.monotonic() - stopped
        url = farm.runner("runner", "--stop-grace", "1")  # same state dir
        farm.role(url, "leader")
        wait(
            "all running again", lambda: all(x["state"] == "running" for x in farm.builds(url, ids))
        )
        again = time.monotonic() - stopped
        lost_builds = sum(m["lostBuilds"] for m in farm.status(url)["machines"])
        farm.d.stop(farm.d.processes["runner"])
        with sqlite3.connect(workdir / "runner" / "queue.sqlite") as conn:
            tries = conn.execute("SELECT SUM(infra_failures) FROM builds").fetchone()[0]
        return {
            "stop_s": stop_s,
            "running_again_s": again,
            "tries_used": tries,
            "lost_builds": lost_builds,
        }
    finally:
        farm.d.close()


def summary(name: str, runs: list[dict[str, float]]) -> None:
    print(f"\n{name}: {len(runs)} repetitions")
    for key in runs[0]:
        values = [float(r[key]) for r in runs]
        print(
            f"  {key:18} median {statistics.median(values):8.2f}   min {min(values):8.2f}   "
            f"max {max(values):8.2f}   all {', '.join(f'{v:g}' for v in values)}"
        )


def _figures(results: dict[str, list[dict[str, float]]]) -> list[Figure]:
    def worst(name: str, key: str) -> float:
        return max(float(r[key]) for r in results[name])

    def median(name: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in results[name])

    out = []
    if results["kill"]:
        out += [
            Figure(
                "leader kill -9, 30 builds -> all running again, worst run",
                worst("kill", "running_again_s"),
                "s",
                goal=Goal("<", 2 * BUILDER_TIMEOUT),
            ),
            Figure(
                "leader kill -9 -> all running again, median",
                median("kill", "running_again_s"),
                "s",
            ),
            Figure("leader kill -9: builds lost", worst("kill", "lost"), goal=Goal("==", 0)),
            Figure(
                "leader kill -9: double commits",
                worst("kill", "double_commits"),
                goal=Goal("==", 0),
            ),
        ]
    if results["freeze"]:
        out.append(
            Figure(
                "frozen leader woken: stale commits",
                worst("freeze", "stale_commits"),
                goal=Goal("==", 0),
            )
        )
    out.append(
        Figure(
            "graceful restart, 30 running: tries used",
            worst("restart", "tries_used"),
            goal=Goal("==", 0),
        )
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repetition each")
    parser.add_argument("--figures", type=Path, help="write the summary figures here (run_all)")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    goal = 2 * BUILDER_TIMEOUT
    print(
        f"runner failover, {cpu_model()}, builder timeout {BUILDER_TIMEOUT:g} s "
        f"(goal: every build running again within {goal:g} s)"
    )
    from tests.helpers.pg import Cluster, find_bindir

    bindir = find_bindir()
    cluster = Cluster.start(bindir) if bindir is not None else None
    try:
        results: dict[str, list[dict[str, float]]] = {"kill": [], "freeze": [], "restart": []}
        for _ in range(repeat):
            if cluster is not None:
                with tempfile.TemporaryDirectory(prefix="hydra-trio-failover-") as tmp:
                    results["kill"].append(kill(Path(tmp), cluster.new_database()))
                with tempfile.TemporaryDirectory(prefix="hydra-trio-failover-") as tmp:
                    results["freeze"].append(freeze(Path(tmp), cluster.new_database()))
            with tempfile.TemporaryDirectory(prefix="hydra-trio-failover-") as tmp:
                results["restart"].append(restart(Path(tmp)))
        if cluster is None:
            print("PostgreSQL is not installed: the kill and freeze scenarios were skipped")
        for name, runs in results.items():
            if runs:
                summary(name, runs)
        summary_figures = _figures(results)
        print()
        figures.print_table(summary_figures)
        figures.write(args.figures, summary_figures)
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
