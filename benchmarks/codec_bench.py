"""Codec throughput: hydra-trio's real codec against a bare msgpack baseline, in the same run.

For each message (the ``Ping`` of an idle builder and its ``Pong``, a ``Ping`` carrying two running
builds, and a realistic ``Assign``) it times:

- **hydra-trio**: ``codec.encode(message)`` then ``FrameDecoder.feed(frame)`` -- the attrs message
  is turned into its wire map, packed, framed, then unframed, unpacked, and rebuilt as a validated
  message (every field validator runs).
- **bare**: the same bytes from ``struct`` header + ``msgpack`` ``Packer.pack`` of the equivalent
  plain dict, then header unpack + ``msgpack.unpackb``: no message objects, no validation.

Each is measured encode+decode together, and encode-only and decode-only to show where the time
goes.  Every measurement is repeated ``--repeat`` times, interleaved (hydra, bare, hydra, ...) so
both see the same machine noise; the tables show medians, and ratios are of medians of the same
run.  Each timed loop is bounded both by an iteration count and by ``--max-seconds``.

    .venv/bin/python benchmarks/codec_bench.py            # defaults: 7 repetitions
    .venv/bin/python benchmarks/codec_bench.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import figures
import msgpack
from figures import Figure

# HYDRA_BENCH_PATH=DIR measures the hydra_trio package found in DIR (e.g. a modified copy).
_REPO = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, os.environ.get("HYDRA_BENCH_PATH", _REPO))

from hydra_trio.protocol import codec  # noqa: E402
from hydra_trio.protocol.messages import (  # noqa: E402
    Assign,
    BuildRef,
    FileInfo,
    InputSpec,
    Limits,
    Message,
    Ping,
    Pong,
)

HEADER = struct.Struct(">I")


def sample_ping() -> Ping:
    return Ping(
        seq=123_456,
        load=1.75,
        disk_free=48_318_382_080,
        running=(
            BuildRef(build_id="b-0000417", attempt=1),
            BuildRef(build_id="b-0000420", attempt=3),
        ),
    )


def _sha(seed: int) -> str:
    return f"{seed:064x}"


def sample_assign() -> Assign:
    return Assign(
        build_id="b-0000421",
        attempt=2,
        name="hello-2.12.1",
        command=("/bin/sh", "-c", "./configure --prefix=$OUT && make -j4 && make check install"),
        env={
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/homeless-shelter",
            "LANG": "C.UTF-8",
            "SOURCE_DATE_EPOCH": "315532800",
            "NIX_BUILD_CORES": "4",
            "CFLAGS": "-O2 -pipe",
            "system": "x86_64-linux",
            "out": "/hydra/out",
        },
        inputs=(
            InputSpec(
                name="src",
                build_id="b-0000400",
                files=(
                    FileInfo(path="hello-2.12.1.tar.gz", size=1_009_645, sha256=_sha(1)),
                    FileInfo(path="patches/fix-tests.patch", size=2_311, sha256=_sha(2)),
                ),
            ),
            InputSpec(
                name="gettext",
                build_id="b-0000388",
                files=(
                    FileInfo(path="bin/msgfmt", size=181_208, sha256=_sha(3), executable=True),
                    FileInfo(path="lib/libintl.so.8", size=0, sha256=_sha(4), link="libintl.so"),
                    FileInfo(path="lib/libintl.so", size=94_112, sha256=_sha(5)),
                ),
            ),
        ),
        limits=Limits(
            timeout=36_000.0, max_silent=7_200.0, max_log_bytes=64 << 20, max_output_bytes=1 << 32
        ),
    )


# ---------------------------------------------------------------------------------------------
# The two contestants, as closures over one message.


def hydra_ops(message: Message) -> dict[str, Callable[[], Any]]:
    decoder = codec.FrameDecoder()  # one per connection, as in FramedChannel
    encode = codec.encode
    feed = decoder.feed
    frame = encode(message)

    def roundtrip() -> Any:
        return feed(encode(message))

    def encode_only() -> Any:
        return encode(message)

    def decode_only() -> Any:
        return feed(frame)

    return {"enc+dec": roundtrip, "encode": encode_only, "decode": decode_only}


def bare_ops(wire: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
    unpackb = msgpack.unpackb
    pack_header = HEADER.pack
    unpack_header = HEADER.unpack_from

    def encode() -> bytes:
        body = pack(wire)
        return pack_header(len(body)) + body  # type: ignore[no-any-return]

    def decode(frame: bytes) -> Any:
        (length,) = unpack_header(frame, 0)
        return unpackb(frame[4 : 4 + length])

    frame = encode()

    def roundtrip() -> Any:
        return decode(encode())

    def decode_only() -> Any:
        return decode(frame)

    return {"enc+dec": roundtrip, "encode": encode, "decode": decode_only}


def time_loop(op: Callable[[], Any], count: int, max_seconds: float) -> float:
    """Seconds per call over up to ``count`` calls, stopping early after ``max_seconds``."""
    clock = time.perf_counter
    chunk = 1000
    done = 0
    start = clock()
    deadline = start + max_seconds
    while done < count:
        for _ in range(min(chunk, count - done)):
            op()
        done += min(chunk, count - done)
        if clock() >= deadline:
            break
    return (clock() - start) / done


def run(repeat: int, count: int, max_seconds: float) -> dict[str, Any]:
    messages = {
        "Ping (idle)": Ping(seq=123_456),  # what the ping/pong benchmark sends
        "Pong": Pong(seq=123_456),
        "Ping (2 running)": sample_ping(),
        "Assign (realistic)": sample_assign(),
    }
    results: dict[str, Any] = {}
    for label, message in messages.items():
        frame = codec.encode(message)
        wire = msgpack.unpackb(frame[4:])  # the exact wire map, as a plain dict
        contestants = {"hydra": hydra_ops(message), "bare": bare_ops(wire)}
        assert contestants["bare"]["encode"]() == frame, "baseline must produce the same bytes"
        assert contestants["hydra"]["decode"]() == [message]
        samples: dict[str, dict[str, list[float]]] = {
            name: {op: [] for op in ops} for name, ops in contestants.items()
        }
        # warm-up
        for ops in contestants.values():
            for op in ops.values():
                time_loop(op, min(count, 2000), max_seconds)
        for _ in range(repeat):
            for op_name in ("enc+dec", "encode", "decode"):
                for name, ops in contestants.items():
                    gc.collect()
                    samples[name][op_name].append(time_loop(ops[op_name], count, max_seconds))
        results[label] = {
            "bytes": len(frame),
            "median_seconds": {
                name: {op: statistics.median(s) for op, s in ops.items()}
                for name, ops in samples.items()
            },
            "samples": samples,
        }
    return results


def print_table(results: dict[str, Any], repeat: int, count: int) -> None:
    print(
        f"codec: frames/s, medians of {repeat} repetitions x {count:,} frames "
        f"(Python {platform.python_version()}, msgpack {'.'.join(map(str, msgpack.version))}, "
        f"hydra_trio from {Path(codec.__file__).parent.parent.parent})"
    )
    header = (
        f"{'message':<20} {'frame B':>7} {'hydra enc+dec/s':>16} {'bare enc+dec/s':>15} "
        f"{'hydra/bare':>10} | {'hydra enc':>9} {'hydra dec':>9} {'bare enc':>8} {'bare dec':>8}"
    )
    print(header)
    print("-" * len(header))
    for label, r in results.items():
        h, b = r["median_seconds"]["hydra"], r["median_seconds"]["bare"]
        print(
            f"{label:<20} {r['bytes']:>7} {1 / h['enc+dec']:>16,.0f} {1 / b['enc+dec']:>15,.0f} "
            f"{b['enc+dec'] / h['enc+dec']:>10.2f} | "
            f"{h['encode'] * 1e6:>7.2f}us {h['decode'] * 1e6:>7.2f}us "
            f"{b['encode'] * 1e6:>6.2f}us {b['decode'] * 1e6:>6.2f}us"
        )
    print("(hydra/bare: hydra-trio throughput as a fraction of the bare baseline's; per-frame")
    print(" times on the right are medians of the separate encode-only and decode-only loops)")


def figures_of(results: dict[str, Any]) -> list[Figure]:
    return [
        Figure(
            f"codec encode+decode, {label}",
            1 / r["median_seconds"]["hydra"]["enc+dec"],
            "frames/s",
            1 / r["median_seconds"]["bare"]["enc+dec"],
            "bare msgpack",
        )
        for label, r in results.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--count", type=int, default=50_000, help="frames per timed loop")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="cap per timed loop")
    parser.add_argument("--quick", action="store_true", help="3 x 5,000 frames (smoke test)")
    parser.add_argument("--json", metavar="FILE", help="also write raw results as JSON")
    parser.add_argument("--figures", type=Path, help="write the summary figures here (run_all)")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.count = 3, 5_000
    results = run(args.repeat, args.count, args.max_seconds)
    print_table(results, args.repeat, args.count)
    figures.write(args.figures, figures_of(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
