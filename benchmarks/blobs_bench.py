"""The runner's per-file cost of committing small outputs (issue 18), without daemons.

Times ``BlobStore`` as ``UploadReceiver`` drives it for N small uploads (~10 bytes each, like
``shapes_bench.py``'s): ``small`` (staged, on the event loop), ``write_small`` (256 a call),
``verify_many`` (256 a call), ``sync_data``, ``place`` (256 a call), ``sync_entries``, one
thread, in a fresh store under ``--dir``.  Each phase: wall time and this process's CPU.

To compare two trees in one run, alternating (A, B, A, B, ...), median of ``--repeat``::

    .venv/bin/python benchmarks/blobs_bench.py --files 10000 --repeat 3 \\
        --tree /work/main --tree .

Each measurement runs in a fresh interpreter importing ``hydra_trio`` from its tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 256
PHASES = ("stage", "write", "verify", "sync_data", "place", "sync_entries")


def measure(files: int, where: Path) -> dict[str, tuple[float, float]]:
    """One run in this interpreter: {phase: (wall seconds, CPU seconds)}."""
    import hashlib

    from hydra_trio.runner.blobs import BlobStore

    store = BlobStore(where / "blobs")
    datas = [f"x {i}\n".encode() for i in range(files)]
    figures: dict[str, tuple[float, float]] = {}

    def timed(phase: str, run: object) -> object:
        wall, cpu = time.perf_counter(), time.process_time()
        value = run()  # type: ignore[operator]
        figures[phase] = (time.perf_counter() - wall, time.process_time() - cpu)
        return value

    uploads = timed(
        "stage", lambda: [store.small(f"d/file-{i}", data) for i, data in enumerate(datas)]
    )
    assert isinstance(uploads, list)
    batches = [uploads[start : start + BATCH] for start in range(0, files, BATCH)]
    os.sync()  # start the commit with no write-back of the staging left over
    timed("write", lambda: [store.write_small(batch) for batch in batches])
    declared = [(len(data), hashlib.sha256(data).hexdigest()) for data in datas]
    keeping = []

    def verify() -> None:
        for start in range(0, files, BATCH):
            batch = [
                (upload, *declared[start + n])
                for n, upload in enumerate(uploads[start : start + BATCH])
            ]
            problems, kept = store.verify_many(batch)
            assert not any(problems), problems
            keeping.extend(kept)

    timed("verify", verify)
    timed("sync_data", lambda: store.sync_data(keeping))
    dirs: set[Path] = set()
    timed(
        "place",
        lambda: [dirs.update(store.place(keeping[s : s + BATCH])) for s in range(0, files, BATCH)],
    )
    timed("sync_entries", lambda: store.sync_entries(dirs))
    assert all(store.has(sha) for _, sha in declared)
    return figures


def run_tree(tree: Path, files: int, where: Path) -> dict[str, tuple[float, float]]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(where), "--files", str(files)],
        env={**os.environ, "PYTHONPATH": str(tree.resolve())},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    figures: dict[str, tuple[float, float]] = json.loads(out.stdout)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tree", type=Path, action="append", help="source trees to compare")
    parser.add_argument("--dir", type=Path, default=None, help="where stores are made")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.files, args.child)))
        return
    trees: list[Path] = args.tree or [Path(__file__).resolve().parent.parent]
    # Every store is kept until the end: on ext4 without a journal, creating a file skips
    # the free inodes of its block group deleted in the last ~30 s (``recently_deleted``),
    # and removing one run's files before the next may slow the next's creations (seen once
    # under /tmp; not reproduced under /var/tmp: docs/performance.md).
    base = Path(tempfile.mkdtemp(dir=args.dir, prefix="blobs-bench-"))
    try:
        runs = measure_all(trees, args.files, args.repeat, base)
    finally:
        shutil.rmtree(base)
    print(f"load: {os.getloadavg()}")
    print(f"medians of {args.repeat} (wall s / CPU s), {args.files} files:")
    for tree in trees:
        cells = []
        for phase in PHASES:
            wall = statistics.median(run[phase][0] for run in runs[tree])
            cpu = statistics.median(run[phase][1] for run in runs[tree])
            cells.append(f"{phase} {wall:.2f}/{cpu:.2f}")
        total = statistics.median(sum(w for w, _ in run.values()) for run in runs[tree])
        print(f"  {tree}: total {total:.2f} s; " + ", ".join(cells))


def measure_all(
    trees: list[Path], files: int, repeat: int, base: Path
) -> dict[Path, list[dict[str, tuple[float, float]]]]:
    runs: dict[Path, list[dict[str, tuple[float, float]]]] = {tree: [] for tree in trees}
    print(f"load: {os.getloadavg()}", flush=True)
    for repetition in range(repeat):
        for number, tree in enumerate(trees):
            where = base / f"{repetition}-{number}"
            where.mkdir()
            figures = run_tree(tree, files, where)
            runs[tree].append(figures)
            total = sum(wall for wall, _ in figures.values())
            print(
                f"run {repetition + 1} {tree}: total {total:.2f} s "
                + " ".join(f"{p} {figures[p][0]:.2f}/{figures[p][1]:.2f}" for p in PHASES),
                flush=True,
            )
    return runs


if __name__ == "__main__":
    main()
