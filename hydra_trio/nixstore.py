"""A Nix store, driven through the Nix 2.x command-line tools, for the runner and the builders.

Theory of operation
-------------------
Everything here runs ``nix-store`` or ``nix`` as a child process through ``trio.run_process``,
so nothing blocks the event loop.  A ``NixStore`` is either the machine's own store (``root``
None: whatever ``NIX_REMOTE`` and nix.conf say, usually the nix-daemon) or a local chroot store
(``root`` a directory: ``--store DIR``, the store paths live under ``DIR/nix/store``), which is
how one machine holds several independent stores in the tests.

Closures move between stores as ``nix-store --export`` streams, *one file per store path*: a
file per path is content-addressed like any other input or output file (the same path exports
to the same bytes), so the existing fetch and upload machinery carries them, hash-checked and
chunked, and a store that already has a path simply does not fetch its file.  ``import_files``
feeds such files to one ``nix-store --import`` as one stream (each file's end marker dropped
but the last one's), in the order given, which must list every path after the paths it
references (``nix-store --query --requisites`` order).

Errors of the tools become ``NixError`` with the tool's last error line.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import attrs
import trio

from hydra_trio.protocol.errors import HydraTrioError

#: The store directory every store here uses (chroot stores keep it and move the files).
STORE_DIR = "/nix/store"
#: Bytes read from an export file per thread hop while feeding ``nix-store --import``.
_FEED_CHUNK = 1024 * 1024
#: Paths given to one command at most (the kernel's limit on arguments is far above this).
_ARGS_PER_CALL = 2000


class NixError(Exception):
    """A Nix command failed; the message is one line saying which and why."""


class NixSetupError(NixError, HydraTrioError):
    """Nix cannot build on this machine; the message says what to set up."""


def is_store_path(path: str) -> bool:
    """A direct child of the store directory with a plausible name (``<hash>-<name>``): a
    check on text from clients and peers before it reaches a command line."""
    if not path.startswith(STORE_DIR + "/"):
        return False
    base = path[len(STORE_DIR) + 1 :]
    return (
        len(base) > 33
        and base[32] == "-"
        and "/" not in base
        and not base.startswith("-")
        and all(c.isalnum() or c in "+-._?=" for c in base)
    )


def export_label(path: str) -> str:
    """The relative file name an export of ``path`` travels under (``nix/store/<base>``)."""
    return path.lstrip("/")


def label_path(label: str) -> str:
    """The store path an export file's label names (the inverse of ``export_label``)."""
    return "/" + label


@attrs.frozen
class NixStore:
    """One Nix store: the machine's own (``root`` None) or a chroot store under ``root``."""

    root: Path | None = None
    #: features this machine offers builds beyond Nix's own ``system-features`` (a builder's
    #: ``--features``): the runner only sends derivations requiring them here.
    system_features: tuple[str, ...] = ()

    def _store_args(self) -> list[str]:
        return [] if self.root is None else ["--store", str(self.root)]

    def env(self) -> dict[str, str]:
        """The environment for the Nix tools: a chroot store is always opened directly (no
        daemon); the machine's store as its configuration says."""
        env = dict(os.environ)
        if self.root is not None:
            env["NIX_REMOTE"] = "local"
        return env

    def realise_args(self, drv: str) -> list[str]:
        """``nix-store --realise`` of ``drv`` in this store, substituters off (inputs come
        from the runner).  A chroot store's sandbox gets /bin, /lib, /lib64 and /usr, so
        derivations whose builder is ``/bin/sh`` run there."""
        return ["nix-store", *self._store_args(), "--realise", drv, *self._build_options()]

    def _build_options(self) -> list[str]:
        args = ["--option", "substituters", ""]
        if self.root is not None:
            args += ["--option", "sandbox-paths", "/bin /lib /lib64 /usr"]
        if self.system_features:
            args += ["--option", "extra-system-features", " ".join(self.system_features)]
        return args

    async def _run(self, *args: str, stdout: IO[bytes] | None = None) -> bytes:
        """Run a Nix tool on this store; its stdout (or into ``stdout``), or ``NixError``
        naming the tool, its first argument and its last error line."""
        command = [args[0], *self._store_args(), *args[1:]]
        output: Any = {"capture_stdout": True} if stdout is None else {"stdout": stdout}
        try:
            done = await trio.run_process(
                command,
                stdin=subprocess.DEVNULL,
                capture_stderr=True,
                check=False,
                env=self.env(),
                **output,
            )
        except OSError as exc:
            raise NixError(f"cannot run {args[0]}: {exc.strerror or exc}") from None
        if done.returncode != 0:
            raise NixError(f"{' '.join(args[:2])}: {_last_error(done.stderr)}")
        return done.stdout or b""

    async def check_can_build(self) -> None:
        """Build a trivial derivation (``/bin/sh`` writing its output; a new one each call,
        so nothing cached answers for Nix) in this store, or raise ``NixError`` saying in one
        line what to set up.  A builder with the nix executor calls this at start, so a
        machine where Nix cannot build refuses to serve instead of failing every build it is
        given as ``internal-error``."""
        nonce = f"{os.getpid()}-{time.time_ns()}"
        expr = (
            'builtins.derivation { name = "hydra-trio-check"; system = builtins.currentSystem;'
            ' builder = "/bin/sh"; args = [ "-c" "echo ok > $out" ]; PATH = "/bin:/usr/bin";'
            f' nonce = "{nonce}"; }}'
        )
        try:
            drv = (await self._run("nix-instantiate", "--expr", expr)).decode().strip()
            await self._run("nix-store", "--realise", drv, *self._build_options())
        except NixError as exc:
            message = f"--executor nix: {self.describe()} cannot build: {_setup_hint(str(exc))}"
            raise NixSetupError(message) from None

    def describe(self) -> str:
        return "this machine's Nix store" if self.root is None else f"the Nix store {self.root}"

    async def is_valid(self, path: str) -> bool:
        return not await self.invalid([path])

    async def invalid(self, paths: Iterable[str]) -> set[str]:
        """The paths of ``paths`` that are not valid in this store."""
        found: set[str] = set()
        todo = list(paths)
        for start in range(0, len(todo), _ARGS_PER_CALL):
            chunk = todo[start : start + _ARGS_PER_CALL]
            out = await self._run("nix-store", "--check-validity", "--print-invalid", *chunk)
            found.update(out.decode().split())
        return found

    async def outputs(self, drv: str) -> list[str]:
        """The output paths of the derivation ``drv`` (which must be in this store)."""
        out = await self._run("nix-store", "--query", "--outputs", drv)
        return out.decode().split()

    async def requisites(self, paths: Sequence[str]) -> list[str]:
        """The closure of ``paths``, every path after the paths it references."""
        if not paths:
            return []
        out = await self._run("nix-store", "--query", "--requisites", *paths)
        return out.decode().split()

    async def nar_sizes(self, paths: Sequence[str]) -> list[int]:
        """The NAR size of each of ``paths`` (valid in this store), in order."""
        sizes: list[int] = []
        for start in range(0, len(paths), _ARGS_PER_CALL):
            chunk = paths[start : start + _ARGS_PER_CALL]
            out = await self._run("nix-store", "--query", "--size", *chunk)
            sizes += [int(word) for word in out.decode().split()]
        return sizes

    def real_path(self, path: str) -> Path:
        """Where the store path ``path`` is on disk (under ``root`` for a chroot store)."""
        return Path(path) if self.root is None else self.root / path.lstrip("/")

    async def derivations(self, drv: str) -> dict[str, Any]:
        """``nix show-derivation --recursive``: every derivation in ``drv``'s closure, by path."""
        out = await self._run(
            "nix",
            "show-derivation",
            "--extra-experimental-features",
            "nix-command",
            "--recursive",
            drv,
        )
        try:  # megabytes for a large graph: parsed off the event loop
            parsed = await trio.to_thread.run_sync(json.loads, out)
        except ValueError as exc:
            raise NixError(f"nix show-derivation gave no JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise NixError("nix show-derivation gave no JSON object")
        return parsed

    async def export(self, path: str, target: Path) -> None:
        """Write ``nix-store --export path`` to the file ``target``."""
        f = await trio.to_thread.run_sync(target.open, "wb")
        try:
            await self._run("nix-store", "--export", path, stdout=f)
        except NixError as exc:
            raise NixError(f"{exc} (exporting {path})") from None
        finally:
            await trio.to_thread.run_sync(f.close)

    async def import_files(self, files: Sequence[Path]) -> None:
        """Import export files, in the order given, with one ``nix-store --import``."""
        if not files:
            return
        command = ["nix-store", *self._store_args(), "--import"]
        stderr: list[bytes] = []
        async with trio.open_nursery() as nursery:
            try:
                process: trio.Process = await nursery.start(
                    functools.partial(
                        trio.run_process,
                        command,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        check=False,
                        env=self.env(),
                    )
                )
            except OSError as exc:
                raise NixError(f"cannot run nix-store: {exc.strerror or exc}") from None
            nursery.start_soon(_collect, process, stderr)
            assert process.stdin is not None
            try:
                for index, name in enumerate(files):
                    last = index == len(files) - 1
                    await _feed(name, process.stdin, keep_end=last)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # it stopped reading: its exit status and stderr say why
            await process.stdin.aclose()
            code = await process.wait()
        if code != 0:
            raise NixError(f"nix-store --import: {_last_error(b''.join(stderr))}")


#: How an export stream ends: the 64-bit little-endian 0 after the last path (each path
#: starts with a 1).  A one-path export file therefore cannot simply be concatenated with the
#: next: ``nix-store --import`` would stop at its end marker.
_END_OF_EXPORT = bytes(8)


async def _feed(name: Path, stdin: trio.abc.SendStream, *, keep_end: bool) -> None:
    """Send one export file to ``nix-store --import``; without its end marker unless
    ``keep_end`` (the last file), so that several files make one stream."""
    f = await trio.to_thread.run_sync(name.open, "rb")
    try:
        size = (await trio.to_thread.run_sync(os.fstat, f.fileno())).st_size
        if size < len(_END_OF_EXPORT):
            raise NixError(f"{name.name} is not a nix-store --export file (too short)")
        left = size if keep_end else size - len(_END_OF_EXPORT)
        while left > 0:
            data = await trio.to_thread.run_sync(f.read, min(_FEED_CHUNK, left))
            if not data:
                raise NixError(f"{name.name} shrank while it was imported")
            left -= len(data)
            await stdin.send_all(data)
        if not keep_end:
            end = await trio.to_thread.run_sync(f.read)
            if end != _END_OF_EXPORT:
                raise NixError(f"{name.name} is not a nix-store --export file (no end marker)")
    finally:
        await trio.to_thread.run_sync(f.close)


async def _collect(process: trio.Process, into: list[bytes]) -> None:
    """Read a child's stderr to the end, keeping its last few chunks (the error is there)."""
    assert process.stderr is not None
    while data := await process.stderr.receive_some(65536):
        into.append(bytes(data))
        del into[:-16]


def _setup_hint(error: str) -> str:
    """``error`` with what to do about the usual cause: Nix running as root builds as the
    users of ``build-users-group`` (``nixbld`` by default), which a bare Nix install lacks."""
    if "build-users-group" in error or "nixbld" in error:
        return (
            f"{error} (create the build users: on Debian/Ubuntu `apt-get install "
            "nix-setup-systemd`, elsewhere Nix's multi-user install; or, for a single-user "
            "store, set `build-users-group =` in nix.conf or NIX_CONFIG)"
        )
    return error


def _last_error(stderr: bytes) -> str:
    """The line of a Nix tool's stderr that says what went wrong (its last ``error:`` line,
    else its last line)."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    line = (errors or lines or ["failed without a message"])[-1]
    return line.removeprefix("error:").strip()[:500]
