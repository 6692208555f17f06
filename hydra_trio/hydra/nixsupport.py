"""What a build's outputs say about it, for Hydra's tables: ``nix-support/hydra-build-products``,
``nix-support/hydra-metrics``, ``nix-support/hydra-release-name`` and ``nix-support/failed``
(``reference/hydra-db-contract.md`` section 3.5, the Rust runner's rules).

``parse_*`` are pure; ``read_outputs`` reads the files (blocking: call it in a worker thread).
Store paths are logical (``/nix/store/...``); ``real`` maps one to where it is on disk, which
differs for a chroot store.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from pathlib import Path

import attrs

from hydra_trio.nixstore import STORE_DIR

_PRODUCT = re.compile(r'^([a-zA-Z0-9_-]+)\s+([a-zA-Z0-9_-]+)\s+("[^"]+"|\S+)(?:\s+(\S+))?\s*$')
_METRIC = re.compile(r"^([a-zA-Z0-9._-]+)\s+(\S+)(?:\s+(\S+))?\s*$")
_UNIT = re.compile(r"^[a-zA-Z0-9._%-]+$")
_RELEASE = re.compile(r"^[a-zA-Z0-9.@:_-]+$")
#: a nix-support file larger than this is not read (a build's own files, but not trusted).
MAX_FILE = 1 << 20


@attrs.frozen(kw_only=True)
class Product:
    """One ``buildproducts`` row (without build and number)."""

    type: str
    subtype: str
    path: str
    name: str
    default_path: str = ""
    file_size: int | None = None
    sha256: str | None = None


@attrs.frozen(kw_only=True)
class Metric:
    name: str
    value: float
    unit: str | None = None


@attrs.frozen(kw_only=True)
class OutputFacts:
    """What the outputs of a successful step say, for the success transaction."""

    products: tuple[Product, ...] = ()
    metrics: tuple[Metric, ...] = ()
    release_name: str | None = None
    #: ``nix-support/failed`` in an output: buildstatus 6.
    failed: bool = False


def _store_path_of(path: str) -> str:
    """``/nix/store/<hash>-name/sub/dir`` -> ``/nix/store/<hash>-name``."""
    rest = path[len(STORE_DIR) + 1 :]
    return f"{STORE_DIR}/{rest.split('/', 1)[0]}"


def parse_products(text: str) -> list[tuple[str, str, str, str]]:
    """``type subtype path [defaultPath]`` lines -> (type, subtype, path, defaultPath);
    lines that do not fit, or whose path is not inside the store, are skipped."""
    found = []
    for line in text.splitlines():
        match = _PRODUCT.match(line.strip())
        if match is None:
            continue
        kind, subtype, path, default = match.groups()
        path = path.strip('"')
        if not path.startswith(STORE_DIR + "/") or "/../" in path or path.endswith("/.."):
            continue
        found.append((kind, subtype, path.rstrip("/"), default or ""))
    return found


def parse_metrics(text: str) -> list[Metric]:
    """``name value [unit]`` lines; a later line with the same name wins."""
    metrics: dict[str, Metric] = {}
    for line in text.splitlines():
        match = _METRIC.match(line.strip())
        if match is None:
            continue
        name, raw, unit = match.groups()
        try:
            value = float(raw)
        except ValueError:
            continue
        if not math.isfinite(value):
            continue
        metrics[name] = Metric(
            name=name, value=value, unit=unit if unit and _UNIT.match(unit) else None
        )
    return list(metrics.values())


def parse_release_name(text: str) -> str | None:
    name = text.strip()
    return name if _RELEASE.match(name) else None


def _read(path: Path) -> str | None:
    try:
        if not path.is_file() or path.stat().st_size > MAX_FILE:
            return None
        return path.read_text(errors="replace")
    except OSError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_outputs(outputs: list[tuple[str, str]], real: Callable[[str], Path]) -> OutputFacts:
    """The facts of a step's outputs ((name, store path) in output-name order).  Blocking."""
    products: list[Product] = []
    metrics: dict[str, Metric] = {}
    release: str | None = None
    failed = False
    for name, out in outputs:
        support = real(out) / "nix-support"
        listed = _read(support / "hydra-build-products")
        if listed is not None:
            for kind, subtype, path, default in parse_products(listed):
                disk = real(path)
                if not disk.exists():
                    continue
                size = sha = None
                if disk.is_file():
                    size, sha = disk.stat().st_size, _sha256(disk)
                is_output = path == _store_path_of(path)
                products.append(
                    Product(
                        type=kind,
                        subtype=subtype,
                        path=path,
                        name="" if is_output else path.rsplit("/", 1)[-1],
                        default_path=default,
                        file_size=size,
                        sha256=sha,
                    )
                )
        elif real(out).is_dir():
            # The Rust runner's rule: per output, a directory without a products file is
            # one nix-build product.
            products.append(
                Product(
                    type="nix-build",
                    subtype="" if name == "out" else name,
                    path=out,
                    name=out.rsplit("/", 1)[-1].split("-", 1)[-1],
                )
            )
        text = _read(support / "hydra-metrics")
        if text is not None:
            metrics.update((m.name, m) for m in parse_metrics(text))
        text = _read(support / "hydra-release-name")
        if text is not None and (parsed := parse_release_name(text)) is not None:
            release = parsed
        failed = failed or (support / "failed").exists()
    return OutputFacts(
        products=tuple(products),
        metrics=tuple(metrics.values()),
        release_name=release,
        failed=failed,
    )
