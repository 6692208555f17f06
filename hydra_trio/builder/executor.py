"""The ``command`` executor: run one build's command in a fresh directory.

The caller owns the returned ``Result`` and sends it.  An attempt (``attempt``) fetches the
build's inputs into ``$IN`` (``FetchError``: ``fetch-failed``, retried), runs its command
(``process``), and uploads what it left in ``$OUT`` (``outputs``).  Cancelling ``execute`` (an
``Abort``, or the connection's nursery being cancelled) kills the whole process group and
removes the build directory.  Limits: ``timeout`` (wall clock), ``max_silent`` (no output),
``max_log_bytes`` and ``max_output_bytes``; each kills the whole group and gives its own status.
With build users (``users``, see ``buildusers``), the attempt runs as a user of its own, taken
from the pool for the attempt: its directory is that user's, ``$IN`` readable only, and its
outputs are read once everything running as that user is dead.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import trio

from hydra_trio.builder import buildusers
from hydra_trio.builder.attempt import Send, attempt
from hydra_trio.builder.builddir import BUILD_DIR_VARIABLE, BuildDir
from hydra_trio.builder.buildusers import BuildUser, BuildUserPool
from hydra_trio.builder.inputs import Fetch, FetchError, place_inputs
from hydra_trio.builder.outputs import BadOutput, OutputTooLarge, nothing_in, scan_and_upload
from hydra_trio.builder.process import run_command
from hydra_trio.builder.sandbox import Sandbox
from hydra_trio.builder.standby import Standby
from hydra_trio.protocol.messages import Assign, BuildStatus, FileInfo, Phase, Result


async def execute(
    assign: Assign,
    build_dir: Path,
    send: Send,
    base_env: dict[str, str],
    fetch: Fetch | None = None,
    *,
    sandbox: Sandbox | None = None,
    users: BuildUserPool | None = None,
    standby: Standby | None = None,
) -> Result:
    """Run ``assign`` in ``build_dir`` (created fresh, removed afterwards): fetch its inputs
    into ``$IN``, run the command (in ``sandbox``, if given; as a build user of ``users`` if
    given; else through a shell of ``standby``, if given, see ``standby``), upload what it
    left in ``$OUT``."""
    with users.lease() if users is not None else contextlib.nullcontext() as user:
        return await _execute(assign, build_dir, send, base_env, fetch, sandbox, user, standby)


async def _execute(
    assign: Assign,
    build_dir: Path,
    send: Send,
    base_env: dict[str, str],
    fetch: Fetch | None,
    sandbox: Sandbox | None,
    user: BuildUser | None,
    standby: Standby | None,
) -> Result:
    async with attempt(assign, build_dir, send) as phases:
        if assign.network and sandbox is not None and not sandbox.allow_network:
            # the runner sends such builds only to builders offering NETWORK_FEATURE; this
            # one does not: fail at once, as the build would fail without its network
            error = "the build asks for the network; this builder's sandbox gives builds none"
            return phases.result(BuildStatus.BUILD_FAILED, error=error)
        if user is not None:
            buildusers.hand_over(phases.dir.path, user)
        if assign.inputs:
            try:
                async with phases.timed(Phase.FETCHING):
                    if fetch is None:
                        raise FetchError("this builder cannot fetch inputs")
                    await place_inputs(assign, phases.dir.inputs, fetch)
                    if user is not None:
                        await trio.to_thread.run_sync(buildusers.open_inputs, phases.dir.inputs)
            except FetchError as exc:
                return phases.result(BuildStatus.FETCH_FAILED, error=str(exc))
        async with phases.timed(Phase.BUILDING):
            argv = None
            if sandbox is not None:
                argv = sandbox.argv(
                    assign.command, phases.dir, phases.dir.work, network=assign.network
                )
            env = build_env(assign, phases.dir, base_env)
            # everything running as ``user`` is dead once this returns: $OUT stays as it is
            ended = await run_command(
                assign, phases.dir.work, env, send, argv=argv, user=user, standby=standby
            )
        if user is not None:
            buildusers.take_back(phases.dir.path, phases.dir.mode)
        status, error = ended.status, ended.error
        outputs: list[FileInfo] = []
        # else no uploading phase, no thread hop to find nothing: one frame fewer per no-op build
        if status is BuildStatus.SUCCESS and not nothing_in(phases.dir.out):
            try:
                async with phases.timed(Phase.UPLOADING):  # (the scan, and the uploads with it)
                    outputs = await scan_and_upload(
                        assign, phases.dir.out, assign.limits.max_output_bytes, send
                    )
            except OutputTooLarge as exc:
                status, error = BuildStatus.OUTPUT_LIMIT_EXCEEDED, str(exc)
            except BadOutput as exc:  # the runner discards what it got: not listed
                status, error = BuildStatus.BUILD_FAILED, str(exc)
        return phases.result(status, exit_code=ended.exit_code, error=error, outputs=outputs)


def build_env(assign: Assign, build_dir: BuildDir, base_env: dict[str, str]) -> dict[str, str]:
    """The environment a build's command runs in (README, "What a build is": ``OUT``, ``IN``)."""
    return {
        **base_env,
        "HOME": str(build_dir.work),
        "TMPDIR": str(build_dir.tmp),
        "OUT": str(build_dir.out),
        "IN": str(build_dir.inputs),
        "HYDRA_TRIO_BUILD_ID": assign.build_id,
        "HYDRA_TRIO_ATTEMPT": str(assign.attempt),
        # also how a builder started after this one was killed finds what it left running
        BUILD_DIR_VARIABLE: str(build_dir.path),
        **assign.env,
    }
