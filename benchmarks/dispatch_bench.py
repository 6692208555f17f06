"""One `Farm.dispatch` call with a big farm and a big queue: how long it holds the event loop.

In-process, no network: a `Farm` with ``--machines`` connected machines (``--slots`` job slots
each, half of them supporting a ``kvm`` feature, speed factors 1-3) and ``--builds`` queued
builds (a tenth needing ``kvm``), then one ``dispatch`` that fills every slot, timed; the median
of ``--repeat`` fresh farms.  The baseline is the same farm's cheapest possible pass: building
the list of free machines once per assignment, which is what choosing by a scan costs at least.

    .venv/bin/python benchmarks/dispatch_bench.py                 # 2,000 machines, 10,000 builds
    .venv/bin/python benchmarks/dispatch_bench.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import figures
from figures import Figure

from hydra_trio.protocol.messages import Hello, Message
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.model import BuildSpec, BuildState


class _Session:
    def __init__(self, name: str) -> None:
        self.session_id = name

    def post(self, message: Message) -> None:
        pass

    def close(self, reason: str) -> None:
        pass


def make_farm(machines: int, slots: int, builds: int) -> Farm:
    farm = Farm()
    for index in range(builds):
        features = frozenset({"kvm"}) if index % 10 == 0 else frozenset()
        farm.submit(BuildSpec(command=("true",), system="x", required_features=features), 0.0)
    for index in range(machines):
        hello = Hello(
            protocol_version="1.0",
            machine_id=f"m{index}",
            hostname=f"h{index}",
            systems=("x",),
            max_jobs=slots,
            speed_factor=1.0 + index % 3,
            supported_features=("kvm",) if index % 2 else (),
        )
        farm.attach(_Session(str(index)), hello, 0.0)
    return farm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--builds", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200 machines, 1,000 builds, 1 run")
    parser.add_argument("--figures", type=Path, help="write the summary figures here (run_all)")
    args = parser.parse_args()
    if args.quick:
        args.machines, args.builds, args.repeat = 200, 1000, 1
    seconds, scans = [], []
    assigned = 0
    for _ in range(args.repeat):
        farm = make_farm(args.machines, args.slots, args.builds)
        start = time.perf_counter()
        farm.dispatch(0.0)
        seconds.append(time.perf_counter() - start)
        assigned = sum(b.state is BuildState.RUNNING for b in farm.builds.values())
        start = time.perf_counter()
        for _ in range(assigned):
            [m for m in farm.machines.values() if m.free_slots > 0]
        scans.append(time.perf_counter() - start)
    result = Figure(
        f"one dispatch: {assigned:,} assignments over {args.machines:,} machines",
        statistics.median(seconds) * 1000,
        "ms",
        statistics.median(scans) * 1000,
        "one scan of the machines per assignment",
    )
    print(
        f"{args.builds:,} queued builds, {args.machines:,} machines x {args.slots} slots; "
        f"medians of {args.repeat}"
    )
    figures.print_table([result])
    figures.write(args.figures, [result])


if __name__ == "__main__":
    main()
