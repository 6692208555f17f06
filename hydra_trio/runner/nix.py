"""Nix derivations as build graphs: what the runner does with a ``drv`` submission and with
the outputs of a Nix build.

Theory of operation
-------------------
A submission names one derivation in the runner's Nix store.  ``plan`` reads its whole
derivation graph (``nix show-derivation --recursive``) and which outputs are already valid,
then walks down from the top the way Nix itself would: a derivation with an output missing
is a *step* (one build of the farm), and so, recursively, are the input derivations of a step
that have outputs missing; a derivation whose outputs are all valid is not built, and nothing
below it is looked at.  Each step depends on the steps among its input derivations, so the
farm schedules them like any graph (system = the derivation's ``system``, required features =
its ``requiredSystemFeatures``).  An unfinished build of the same derivation already in the
farm is depended on instead of being queued twice.

Inputs travel as ``nix-store --export`` files, one per store path (``hydra_trio.nixstore``).
For each step the runner exports, into its blob store, the part of the input closure no build
of the farm produces: the closure of the derivation file itself and of the input derivations'
outputs that were already valid.  The rest, the outputs of the steps it depends on, are those
builds' outputs: the builder of a Nix build uploads its output closure as export files, and
``import_outputs`` imports them into the runner's store before the result is committed, so a
dependent finds them both in the blob store (for its builder) and in the store.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from hydra_trio.nixstore import STORE_DIR, NixError, NixStore, export_label, is_store_path
from hydra_trio.protocol.messages import BuildStatus, FileInfo, Result
from hydra_trio.runner.blobs import BlobError, BlobStore
from hydra_trio.runner.model import BuildSpec
from hydra_trio.runner.specs import DrvRequest, SpecError

log = logging.getLogger("hydra_trio.runner")


@attrs.frozen(kw_only=True)
class Plan:
    """What a submission of ``drv`` needs built."""

    drv: str
    #: the steps, each after the steps it depends on; ``after`` holds names of this plan's
    #: steps or ids of unfinished builds already in the farm.
    specs: list[BuildSpec]
    names: list[str]
    #: the top derivation's outputs: (output name, store path).
    outputs: tuple[tuple[str, str], ...]
    #: the id of an unfinished build of the top derivation already in the farm (then
    #: nothing new is queued).
    existing: str | None = None


def step_name(drv: str) -> str:
    """A step's name: its derivation's file name without ``.drv`` (``<hash>-<name>``)."""
    return drv.rsplit("/", 1)[-1].removesuffix(".drv")


async def plan(
    store: NixStore,
    blobs: BlobStore,
    request: DrvRequest,
    existing: Callable[[str], str | None] = lambda drv: None,
    exports: dict[str, FileInfo] | None = None,
) -> Plan:
    """Read ``request.drv``'s graph from ``store`` and export the inputs of each step to build
    into ``blobs``.  ``existing(drv)`` is the id of an unfinished build of ``drv`` already in
    the farm, if any.  ``exports`` remembers the export file of each store path across
    submissions (a store path never changes), so a path is exported once while its file is
    in ``blobs``.  A derivation that is not in the store is a ``SpecError``."""
    drv = request.drv
    if not (await store.is_valid(drv)):
        raise SpecError(f"drv: {drv} is not in the runner's Nix store")
    try:
        graph = await store.derivations(drv)
    except NixError as exc:
        raise SpecError(f"drv: {drv} is not a derivation the runner can read: {exc}") from None
    outputs = {path: _outputs(path, info) for path, info in graph.items()}
    if drv not in outputs:
        raise SpecError(f"drv: {drv} is not a derivation")
    invalid = await store.invalid(p for outs in outputs.values() for p in outs.values())

    # Depth first from the top, as Nix would: a derivation with all outputs valid is not built
    # (and its inputs are not looked at).  ``order`` lists every step after its inputs.
    steps: dict[str, list[str]] = {}
    order: list[str] = []
    reused: dict[str, str] = {}

    def visit(path: str) -> None:
        if path in steps or path in reused:
            return
        if other := existing(path):
            reused[path] = other
            return
        deps: list[str] = []
        steps[path] = deps
        for input_drv in _input_drvs(graph[path]):
            if input_drv not in outputs:
                raise SpecError(f"drv: input {input_drv} of {path} is not in the graph")
            if any(p in invalid for p in outputs[input_drv].values()):
                visit(input_drv)
                deps.append(input_drv)
        order.append(path)

    top_outputs = tuple(sorted(outputs[drv].items()))
    if not any(p in invalid for p in outputs[drv].values()):
        return Plan(drv=drv, specs=[], names=[], outputs=top_outputs)
    visit(drv)
    if drv in reused:
        return Plan(drv=drv, specs=[], names=[], outputs=top_outputs, existing=reused[drv])

    exported: dict[str, FileInfo] = {} if exports is None else exports
    specs: list[BuildSpec] = []
    for path in order:
        info = graph[path]
        built_here = set(steps[path])
        valid_inputs = [
            outputs[d][name]
            for d, names in _input_drvs(info).items()
            if d not in built_here
            for name in names
            if name in outputs[d]
        ]
        needed = await store.requisites([path, *valid_inputs])
        nix_inputs = []
        for store_path in needed:
            known = exported.get(store_path)
            if known is None or not await trio.to_thread.run_sync(blobs.has, known.sha256):
                exported[store_path] = await _export(store, blobs, store_path)
            nix_inputs.append(exported[store_path])
        system = info.get("system")
        if not isinstance(system, str) or not system:
            raise SpecError(f"drv: {path} has no system")
        specs.append(
            BuildSpec(
                command=("nix-store", "--realise", path),
                name=step_name(path),
                system=system,
                required_features=_required_features(info),
                after=tuple(step_name(d) if d in steps else reused[d] for d in steps[path]),
                priority=request.priority,
                timeout=request.timeout,
                max_silent=request.max_silent,
                drv=path,
                drv_outputs=tuple(sorted(outputs[path].items())),
                nix_inputs=tuple(nix_inputs),
            )
        )
    log.info("%s: %d derivations to build, %d already queued", drv, len(specs), len(reused))
    return Plan(drv=drv, specs=specs, names=[s.name for s in specs], outputs=top_outputs)


def _outputs(path: str, info: Any) -> dict[str, str]:
    """A derivation's outputs by name; refuses what this runner cannot build yet."""
    raw = info.get("outputs") if isinstance(info, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise SpecError(f"drv: {path} lists no outputs")
    found: dict[str, str] = {}
    for name, output in raw.items():
        out_path = output.get("path") if isinstance(output, dict) else None
        if not isinstance(out_path, str) or not is_store_path(out_path):
            raise SpecError(
                f"drv: {path} has an output without a fixed store path ({name}): "
                "content-addressed derivations are not supported yet"
            )
        found[name] = out_path
    return found


def _required_features(info: Any) -> frozenset[str]:
    """``requiredSystemFeatures``: a space-separated string in the environment, or a list in
    the ``__json`` of a derivation with structured attributes."""
    env = info.get("env") if isinstance(info, dict) else None
    if not isinstance(env, dict):
        return frozenset()
    features: Any = env.get("requiredSystemFeatures", "")
    if "__json" in env:
        try:
            structured = json.loads(env["__json"])
        except (TypeError, ValueError):
            structured = {}
        if isinstance(structured, dict):
            features = structured.get("requiredSystemFeatures", [])
    if isinstance(features, str):
        return frozenset(features.split())
    if isinstance(features, list):
        return frozenset(f for f in features if isinstance(f, str))
    return frozenset()


def _input_drvs(info: Any) -> dict[str, list[str]]:
    raw = info.get("inputDrvs") if isinstance(info, dict) else None
    if not isinstance(raw, dict):
        return {}
    return {
        d: [n for n in names if isinstance(n, str)]
        for d, names in raw.items()
        if isinstance(d, str) and isinstance(names, list)
    }


async def _export(store: NixStore, blobs: BlobStore, path: str) -> FileInfo:
    """Export one store path into the blob store."""
    tmp = await trio.to_thread.run_sync(blobs.new_temp, "export")
    try:
        await store.export(path, tmp)
    except NixError as exc:
        await trio.to_thread.run_sync(tmp.unlink)
        raise SpecError(f"drv: cannot export {path} from the runner's store: {exc}") from None
    size, sha256 = await trio.to_thread.run_sync(blobs.add_file, tmp)
    return FileInfo(path=export_label(path), size=size, sha256=sha256)


async def import_outputs(
    store: NixStore, blobs: BlobStore, outputs: tuple[tuple[str, str], ...], result: Result
) -> Result:
    """Import a successful Nix build's uploaded output closure into the runner's store and
    check that its outputs are then valid.  A failure is ``upload-failed`` (retried)."""
    exports = [
        f.sha256
        for f in result.outputs
        if not f.link and f.path.startswith(STORE_DIR.lstrip("/") + "/")
    ]
    copies: list[Path] = []  # (of packed exports, for nix-store to read)
    try:
        files = [await trio.to_thread.run_sync(blobs.as_file, sha, copies) for sha in exports]
        await store.import_files(files)
        missing = await store.invalid(path for _, path in outputs)
    except NixError as exc:
        error = f"importing the outputs into the runner's store: {exc}"
    except (BlobError, OSError) as exc:
        error = f"reading the uploaded closure: {exc}"
    else:
        if not missing:
            return result
        error = f"the uploaded closure lacks {', '.join(sorted(missing))}"
    finally:
        for copy in copies:
            await trio.to_thread.run_sync(copy.unlink, True)
    log.warning("build %s attempt %d: %s", result.build_id, result.attempt, error)
    return attrs.evolve(result, status=BuildStatus.UPLOAD_FAILED, error=error, outputs=())
