"""Hydra mode against native submission: the same Nix graph built through a Hydra database
and through ``POST /builds``, wall time of each.

One process, real Nix (chroot stores) and a throwaway PostgreSQL (``tests/helpers/pg.py``)
with the part of Hydra's schema the runner uses (``tests/hydra_schema.sql``).  The graph: ``--drvs``
derivations (rounded up to whole layers: 500 -> 501) with ``/bin/sh`` builders in layers of
20, each depending on two of the layer below, and one ``all`` on top of the last layer.
Each run gets fresh stores (the runner's, with the graph instantiated, and one per builder)
and a runner with ``--builders`` Nix builders of ``--jobs`` slots:

- *native*: ``POST /builds {"drv": all}``, timed until the top build has succeeded;
- *Hydra mode*: a Hydra build per job (each of the last layer and ``all``) inserted as the
  evaluator does, ``NOTIFY builds_added``, timed until every build is finished in the
  database (its rows, products and notifications written).

Runs alternate (native, Hydra, native, Hydra, ...) ``--repeat`` times; the figure is the
median of the per-pair ratios.  Skipped with one line where Nix or PostgreSQL is missing.

    .venv/bin/python benchmarks/hydra_bench.py            # 501 derivations, one pair
    .venv/bin/python benchmarks/hydra_bench.py --quick    # 61 derivations, one pair
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import figures
import httpx
import psycopg
import trio
from figures import Figure, Goal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hydra_trio.builder.daemon import BuilderConfig, run_builder  # noqa: E402
from hydra_trio.hydra.config import HydraConfig  # noqa: E402
from hydra_trio.runner.daemon import RunnerConfig, make_farm, serve_runner  # noqa: E402
from hydra_trio.runner.model import BuildState, MachineState  # noqa: E402
from hydra_trio.system import default_system  # noqa: E402

SYSTEM = default_system()
WIDTH = 20
LIMIT = 1800.0


def graph_source(count: int, salt: str) -> str:
    layers = max(1, math.ceil((count - 1) / WIDTH))
    lines = [
        "let",
        "  mk = name: deps: builtins.derivation {",
        '    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";',
        f'    args = [ "-c" "echo {salt} > $out" ]; PATH = "/bin:/usr/bin";',
        "  };",
    ]
    for layer in range(layers):
        for i in range(WIDTH):
            deps = "" if layer == 0 else f"n{layer - 1}_{i} n{layer - 1}_{(i + 1) % WIDTH}"
            lines.append(f'  n{layer}_{i} = mk "n{layer}-{i}" [ {deps} ];')
    last = " ".join(f"n{layers - 1}_{i}" for i in range(WIDTH))
    lines.append(f'  all = mk "all" [ {last} ];')
    jobs = " ".join(f"n{layers - 1}_{i}" for i in range(WIDTH))
    lines.append(f"in {{ inherit all {jobs}; }}")
    return "\n".join(lines) + "\n"


def instantiate(source: Path, store: Path, attr: str) -> tuple[str, str]:
    env = {**os.environ, "NIX_REMOTE": "local"}
    drv = subprocess.run(
        ["nix-instantiate", "--store", str(store), str(source), "-A", attr],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    out = subprocess.run(
        ["nix-store", "--store", str(store), "--query", "--outputs", drv],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.split()[0]  # fmt: skip
    return drv, out


def jobs_of(count: int) -> list[str]:
    layers = max(1, math.ceil((count - 1) / WIDTH))
    return ["all", *(f"n{layers - 1}_{i}" for i in range(WIDTH))]


@attrs.define
class Run:
    work: Path
    count: int
    builders: int
    jobs: int
    hydra_url: str | None = None

    async def __call__(self, mode: str) -> float:
        store = self.work / "runner-store"
        source = self.work / "graph.nix"
        source.write_text(graph_source(self.count, os.urandom(4).hex()))
        jobs = {
            attr: await trio.to_thread.run_sync(instantiate, source, store, attr)
            for attr in jobs_of(self.count)
        }
        config = RunnerConfig(
            listen=attrs.evolve(RunnerConfig().listen, port=0),
            http=attrs.evolve(RunnerConfig().listen, port=0),
            state_dir=self.work / "state",
            default_system=SYSTEM,
            nix_store=store,
            hydra=HydraConfig(db=self.hydra_url, data=self.work / "hydra-data")
            if mode == "hydra" and self.hydra_url
            else None,
        )
        farm, dispatcher = make_farm(config)
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(
                functools.partial(serve_runner, config, farm=farm, dispatcher=dispatcher)
            )
            for index in range(self.builders):
                builder = BuilderConfig(
                    server=addresses.builders[0],
                    systems=(SYSTEM,),
                    hostname=f"b{index}",
                    work_dir=self.work / f"builder-{index}",
                    executors=("nix",),
                    nix_store=self.work / f"store-{index}",
                    max_jobs=self.jobs,
                )
                await nursery.start(functools.partial(run_builder, builder))
            with trio.fail_after(60):
                while True:  # polled: the farm has no event for "n machines connected"
                    connected = (m.state is MachineState.CONNECTED for m in farm.machines.values())
                    if sum(connected) >= self.builders:
                        break
                    await trio.sleep(0.01)
            start = time.perf_counter()
            with trio.fail_after(LIMIT):
                if mode == "native":
                    async with httpx.AsyncClient(base_url=addresses.http[0], timeout=None) as http:
                        answer = (await http.post("/builds", json={"drv": jobs["all"][0]})).json()
                    top = farm.builds[answer["id"]]
                    while True:
                        if top.state.finished:
                            break
                        await trio.sleep(0.02)
                    assert top.state is BuildState.SUCCEEDED, top.status
                else:
                    assert self.hydra_url is not None
                    await trio.to_thread.run_sync(queue_jobs, self.hydra_url, jobs)
                    while True:  # the database is the only witness of Hydra mode's end
                        if await trio.to_thread.run_sync(all_finished, self.hydra_url):
                            break
                        await trio.sleep(0.05)
            elapsed = time.perf_counter() - start
            built = sum(b.state is BuildState.SUCCEEDED for b in farm.builds.values())
            nursery.cancel_scope.cancel()
        print(f"  {mode:6}: {built} derivations built in {elapsed:.1f} s", flush=True)
        for entry in self.work.iterdir():
            if entry.name != "graph.nix":
                await trio.to_thread.run_sync(
                    functools.partial(shutil.rmtree, entry, ignore_errors=True)
                )
        return elapsed


def queue_jobs(url: str, jobs: dict[str, tuple[str, str]]) -> None:
    """The jobs as hydra-eval-jobset inserts them, in one transaction, then builds_added."""
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM builds")
        cur.execute("SELECT id FROM jobsets")
        row = cur.fetchone()
        assert row is not None
        for job, (drv, out) in jobs.items():
            cur.execute(
                "INSERT INTO builds (finished, timestamp, jobset_id, job, drvpath, system,"
                " priority, iscurrent) VALUES (0, %s, %s, %s, %s, %s, 100, 1) RETURNING id",
                (int(time.time()), row[0], job, drv, SYSTEM),
            )
            build = cur.fetchone()
            assert build is not None
            cur.execute(
                "INSERT INTO buildoutputs (build, name, path) VALUES (%s, 'out', %s)",
                (build[0], out),
            )
        cur.execute("NOTIFY builds_added")


def all_finished(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE finished = 0),"
            " count(*) FILTER (WHERE buildstatus != 0) FROM builds"
        ).fetchone()
    assert row is not None
    if row[1]:
        raise RuntimeError(f"{row[1]} Hydra builds failed")
    return int(row[0]) == 0


def setup_hydra(url: str) -> None:
    schema = (ROOT / "tests" / "hydra_schema.sql").read_text()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(schema)  # type: ignore[arg-type]
        conn.execute("INSERT INTO schemaversion VALUES (87)")
        conn.execute("INSERT INTO users (username, emailaddress, password) VALUES ('b', 'b', '')")
        conn.execute("INSERT INTO projects (name, displayname, owner) VALUES ('p', 'P', 'b')")
        conn.execute(
            "INSERT INTO jobsets (name, project, emailoverride, nixexprinput, nixexprpath)"
            " VALUES ('j', 'p', '', 'src', 'release.nix')"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drvs", type=int, default=500)
    parser.add_argument("--builders", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="60 derivations, one pair")
    parser.add_argument("--figures", type=Path, help="write the summary figures here (run_all)")
    args = parser.parse_args()
    if args.quick:
        args.drvs, args.repeat = 61, 1  # three layers and the top
    logging.basicConfig(level=logging.WARNING)
    if shutil.which("nix-instantiate") is None:
        print("Nix is not installed: skipped the Hydra-mode benchmark")
        figures.write(args.figures, [])
        return
    from tests.helpers.pg import Cluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        print("PostgreSQL is not installed: skipped the Hydra-mode benchmark")
        figures.write(args.figures, [])
        return
    cluster = Cluster.start(bindir)
    work = Path(tempfile.mkdtemp(prefix="hydra-trio-hydra-bench-"))
    try:
        url = cluster.new_database()
        setup_hydra(url)
        run = Run(work=work, count=args.drvs, builders=args.builders, jobs=args.jobs, hydra_url=url)
        native, hydra = [], []
        print(
            f"{WIDTH * max(1, math.ceil((args.drvs - 1) / WIDTH)) + 1} derivations, "
            f"{args.builders} Nix builders x {args.jobs} slots, "
            f"{len(jobs_of(args.drvs))} Hydra builds",
            flush=True,
        )
        for _ in range(args.repeat):
            native.append(trio.run(run, "native"))
            hydra.append(trio.run(run, "hydra"))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    total = WIDTH * max(1, math.ceil((args.drvs - 1) / WIDTH)) + 1
    result = Figure(
        f"a {total}-derivation graph through a Hydra database (wall time)",
        statistics.median(hydra),
        "s",
        statistics.median(native),
        "the same graph by POST /builds",
        Goal("<=", 1.2, of_baseline=True),
        paired_ratio=statistics.median(h / n for h, n in zip(hydra, native, strict=True)),
    )
    figures.print_table([result])
    figures.write(args.figures, [result])


if __name__ == "__main__":
    main()
