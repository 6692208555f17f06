"""The ``nix`` executor: realise one Nix derivation in the builder's own Nix store.

Theory of operation
-------------------
An ``Assign`` with ``drv`` set lists in ``store_paths`` one ``nix-store --export`` file per
store path of the derivation's input closure (the derivation file, its input derivations, the
outputs of its inputs with their closures), each after the paths it references.  The executor:

1. *fetching*: asks its store which of those paths it lacks, fetches only their files through
   the session's verified input cache (``Fetch``: the same bounded, hash-checked transfer as
   any input), and imports them with one ``nix-store --import``;
2. *building*: runs ``nix-store --realise`` with the build's ``timeout`` and ``max_silent``
   handed to Nix (``--timeout``, ``--max-silent-time``), its output streamed as the log;
3. *uploading*: exports every path of the outputs' closure into ``$OUT/nix/store/<name>`` and
   uploads those files as the build's outputs, in closure order (paths the runner sent as
   inputs are listed, not uploaded: the runner has them).

Failures map onto the usual statuses: the builder script failing is ``build-failed``; Nix's
timeout ``timed-out`` (or ``silent-too-long``); a fetch or import error ``fetch-failed``, an
export error ``upload-failed``, any other error of Nix itself (exit status other than 100-104)
``internal-error``: those three are infrastructure failures, retried.

Cancelling (an ``Abort``, the connection dying) interrupts ``nix-store`` with SIGINT, so Nix
kills its build processes (they run as build users, outside the process group, and a SIGKILL
of nix-store would orphan them), and SIGKILLs the group if it has not exited 10 s later.  The
log-size limit and the backstop limits interrupt it the same way.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
from pathlib import Path

import attrs
import trio

from hydra_trio.builder.attempt import Send, attempt
from hydra_trio.builder.builddir import BuildDir
from hydra_trio.builder.inputs import Fetch, FetchError
from hydra_trio.builder.outputs import hash_beneath, upload
from hydra_trio.builder.process import Outcome, Started, kill_group, run_command
from hydra_trio.nixstore import NixError, NixStore, export_label, is_store_path, label_path
from hydra_trio.protocol.messages import (
    Assign,
    BuildStatus,
    FileInfo,
    LogChunk,
    Message,
    Phase,
    Result,
)

#: Seconds our own limits wait beyond Nix's before they kill it: Nix enforces the build's
#: limits itself (it knows its build processes); these only catch a Nix that hangs.
BACKSTOP = 30.0
#: Seconds an interrupted nix-store has to stop its builds before its group is killed.
INTERRUPT_GRACE = 10.0
#: Nix's exit statuses for a build that failed (100), timed out (101), had the wrong hash
#: (102) or was not deterministic (104); they combine bits, so 100-111 in all.
_NIX_BUILD_FAILURE = range(100, 112)
_NIX_TIMEOUT_BIT = 1
#: Log bytes kept to tell a timeout from silence in Nix's message.
_TAIL = 4096


def _interrupt_group(pid: int) -> None:
    """Ask nix-store to stop (it then kills its build processes and exits)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGINT)


async def _interrupt(process: Started) -> None:
    _interrupt_group(process.pid)
    with trio.move_on_after(INTERRUPT_GRACE):
        await process.wait()
    kill_group(process.pid)


async def execute_nix(
    store: NixStore,
    assign: Assign,
    build_dir: Path,
    send: Send,
    base_env: dict[str, str],
    fetch: Fetch,
) -> Result:
    """Realise ``assign.drv`` in ``store``; ``build_dir`` (created fresh, removed afterwards)
    holds Nix's temporary files and the exports being uploaded."""
    async with attempt(assign, build_dir, send) as phases:
        drv = assign.drv
        if not (is_store_path(drv) and drv.endswith(".drv")):
            return phases.result(BuildStatus.BUILD_FAILED, error=f"not a derivation: {drv}")
        try:
            async with phases.timed(Phase.FETCHING):
                await fetch_closure(store, assign, fetch)
        except (FetchError, NixError) as exc:
            return phases.result(BuildStatus.FETCH_FAILED, error=str(exc))
        async with phases.timed(Phase.BUILDING):
            ended = await _realise(store, assign, phases.dir, send)
        if ended.status is not BuildStatus.SUCCESS:
            return phases.result(ended.status, exit_code=ended.exit_code, error=ended.error)
        async with phases.timed(Phase.UPLOADING):
            ended, outputs = await _upload_closure(store, assign, phases.dir.out, send, ended)
        return phases.result(
            ended.status, exit_code=ended.exit_code, error=ended.error, outputs=outputs
        )


async def _upload_closure(
    store: NixStore, assign: Assign, out_dir: Path, send: Send, built: Outcome
) -> tuple[Outcome, list[FileInfo]]:
    """Export the outputs' closure and upload what the runner lacks; how the build ended
    then, and the outputs it lists."""
    try:
        outputs, new = await _export_outputs(store, assign, out_dir)
    except NixError as exc:
        return attrs.evolve(built, status=BuildStatus.UPLOAD_FAILED, error=str(exc)), []
    limit = assign.limits.max_output_bytes
    total = sum(f.size for f in new)
    if limit is not None and total > limit:
        error = f"outputs are {total} bytes, the limit is {limit}"
        return attrs.evolve(built, status=BuildStatus.OUTPUT_LIMIT_EXCEEDED, error=error), []
    await upload(assign, out_dir, new, send)
    return built, outputs


async def fetch_closure(store: NixStore, assign: Assign, fetch: Fetch) -> None:
    """Fetch the export files of the input paths ``store`` lacks and import them."""
    for info in assign.store_paths:
        if info.link or not is_store_path(label_path(info.path)):
            raise FetchError(f"input {info.path[:200]!r} is not a store path's export")
    missing = await store.invalid(label_path(info.path) for info in assign.store_paths)
    files = [
        await fetch(assign, info) for info in assign.store_paths if label_path(info.path) in missing
    ]
    await store.import_files(files)
    if still := await store.invalid(label_path(info.path) for info in assign.store_paths):
        raise FetchError(f"after the import, {sorted(still)[0]} is still not valid")


async def _realise(store: NixStore, assign: Assign, build_dir: BuildDir, send: Send) -> Outcome:
    limits = assign.limits
    command = store.realise_args(assign.drv)
    if limits.timeout is not None:
        command += ["--timeout", str(math.ceil(limits.timeout))]
    if limits.max_silent is not None:
        command += ["--max-silent-time", str(math.ceil(limits.max_silent))]
    backstop = attrs.evolve(
        limits,
        timeout=None if limits.timeout is None else limits.timeout + BACKSTOP,
        max_silent=None if limits.max_silent is None else limits.max_silent + BACKSTOP,
    )
    tail = bytearray()

    async def send_keeping_tail(message: Message) -> None:
        if isinstance(message, LogChunk):
            tail.extend(message.data)
            del tail[:-_TAIL]
        await send(message)

    env = {
        **store.env(),
        "HOME": str(build_dir.work),
        "TMPDIR": str(build_dir.tmp),
    }
    run = attrs.evolve(assign, command=tuple(command), limits=backstop)
    ended = await run_command(
        run, build_dir.work, env, send_keeping_tail, _interrupt, _interrupt_group
    )
    code = ended.exit_code
    if ended.status is not BuildStatus.BUILD_FAILED or code is None:
        return ended
    message = _last_error_line(bytes(tail))
    error = message or ended.error
    if code in _NIX_BUILD_FAILURE and (code - 100) & _NIX_TIMEOUT_BIT:
        if "of silence" in message:
            return Outcome(BuildStatus.SILENT_TOO_LONG, code, error)
        return Outcome(BuildStatus.TIMED_OUT, code, error)
    if code in _NIX_BUILD_FAILURE:
        return Outcome(BuildStatus.BUILD_FAILED, code, error)
    # Nix itself failed (its store, the disk, a lock): not the derivation's fault.
    return Outcome(BuildStatus.INTERNAL_ERROR, code, f"nix-store failed: {error}")


def _last_error_line(log: bytes) -> str:
    lines = [line.strip() for line in log.decode("utf-8", "replace").splitlines()]
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1].removeprefix("error:").strip()[:500] if errors else ""


async def _export_outputs(
    store: NixStore, assign: Assign, out_dir: Path
) -> tuple[list[FileInfo], list[FileInfo]]:
    """Export the closure of ``assign.drv``'s outputs into ``out_dir``.  Returns every file of
    the closure in closure order, and those of them to upload (the ones the runner did not
    send as inputs)."""
    closure = await store.requisites(await store.outputs(assign.drv))
    from_runner = {info.path: info for info in assign.store_paths}
    listed: list[FileInfo] = []
    new: list[FileInfo] = []
    for path in closure:
        label = export_label(path)
        if label in from_runner:
            listed.append(from_runner[label])
            continue
        target = out_dir / label
        await trio.to_thread.run_sync(
            functools.partial(target.parent.mkdir, parents=True, exist_ok=True)
        )
        await store.export(path, target)
        size, sha256 = await trio.to_thread.run_sync(hash_beneath, out_dir, label)
        info = FileInfo(path=label, size=size, sha256=sha256)
        listed.append(info)
        new.append(info)
    return listed, new
