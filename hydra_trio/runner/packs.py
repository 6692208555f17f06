"""Small blobs, many to a file: the blob store's packs and their index.

An output that arrives whole in one frame (64 KiB at most from a builder of this project,
most outputs) is not given a file of its own: ``BlobStore.write_small`` writes a batch of
them (up to ``SMALL_BATCH`` files or about 1 MiB) one after the other into one new *pack*,
``<root>/packs/<name>.pack``, in one ``write``.  A file per blob cost the runner most of a
result's commit at 100,000 outputs: a create, a rename and a page of the page cache each,
where a pack costs one of each per 256.

A pack is written once and never changed.  Its blobs become visible when a result that lists
them is committed: their places (sha256, pack, offset, size) are written to an *index file*
under a temporary name, made durable with the packs' data, then linked into place as
``<root>/packs/<name>.idx`` (the commit point: never over another index file), and that made
durable too, before the result counts.  So a crash at any moment leaves either an index file
naming complete, durable blobs, or none.  Packs no index names (their results never
committed) are removed when a runner starts leading (``PackIndex.load``), once they are
``UNNAMED_GRACE`` old: on a data dir shared over NFS, a listing may not show yet an index
file the previous leader published a moment before.  Readers find a packed blob through the
index files, read as the store opens and again as a runner starts leading.

Index files are plain text, one blob a line: ``<sha256> <pack> <offset> <size>``.  Methods
block: call them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from pathlib import Path

import attrs

from hydra_trio.diskio import HashMismatch, write_new
from hydra_trio.protocol.validators import is_sha256

#: How old a pack no index file names must be before ``load`` removes it (seconds).
UNNAMED_GRACE = 600.0


@attrs.define(eq=False)
class Pack:
    """One pack file, and how many of its blobs are still waiting to be kept or dropped."""

    path: str
    waiting: int
    #: a committed index file names it: it stays.
    kept: bool = False


class PackedFile:
    """The place of a small upload ``write_small`` wrote into a pack: what ``HashingFile`` is
    to a streamed upload (its size, hash and where it is), kept by being indexed, not
    renamed."""

    __slots__ = ("index", "kept", "offset", "pack", "sha256", "size")

    def __init__(self, index: PackIndex, pack: Pack, offset: int, size: int, sha256: str):
        self.index = index
        self.pack = pack
        self.offset = offset
        self.size = size
        self.sha256 = sha256
        #: an index file names it (``PackIndex.publish``).
        self.kept = False

    @property
    def tmp(self) -> Path:
        return Path(self.pack.path)

    def hexdigest(self) -> str:
        return self.sha256

    def close(self) -> None:
        """Nothing to close (``write_small`` closed the pack)."""

    def verify(self, size: int, sha256: str) -> None:
        if self.size != size or self.sha256 != sha256:
            raise HashMismatch(self.size, self.sha256, size, sha256)

    def discard(self) -> None:
        """Done with it, unkept: its pack is removed once none of its blobs is kept or
        waiting."""
        if not self.kept:
            self.index.settle(self.pack, kept=False)
            self.kept = True  # (settled: a second discard counts nothing)


@attrs.define(eq=False)
class PackIndex:
    """The packs of one blob store and where each packed blob is."""

    dir: Path
    #: sha256 -> (pack path, offset, size) of every blob a committed index file names.
    places: dict[str, tuple[str, int, int]] = attrs.field(factory=dict, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def __attrs_post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.load(clean=False)

    def find(self, sha256: str) -> tuple[str, int, int] | None:
        return self.places.get(sha256)

    def write(self, name: str, pieces: list[bytes], shas: list[str]) -> list[PackedFile]:
        """Write ``pieces`` (their hashes: ``shas``) one after the other into a new pack
        ``name``, read-only from the start; the place of each (``OSError`` if it could not be
        written whole: nothing is left of it)."""
        path = f"{self.dir}/{name}.pack"
        write_new(path, b"".join(pieces))
        pack = Pack(path, len(pieces))
        files, offset = [], 0
        for data, sha256 in zip(pieces, shas, strict=True):
            files.append(PackedFile(self, pack, offset, len(data), sha256))
            offset += len(data)
        return files

    def settle(self, pack: Pack, kept: bool) -> None:
        """One blob of ``pack`` was kept or dropped; a pack none of whose blobs was kept is
        removed once all are settled."""
        with self._lock:
            pack.waiting -= 1
            pack.kept |= kept
            unused = pack.waiting == 0 and not pack.kept
        if unused:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pack.path)

    def stage(self, name: str, files: list[PackedFile]) -> str:
        """Write the index file of ``files`` (kept by one result) under a temporary name;
        ``publish`` makes it count once it (and the packs) are durable."""
        tmp = f"{self.dir}/.{name}.idx"
        lines = "".join(
            f"{f.sha256} {os.path.basename(f.pack.path)} {f.offset} {f.size}\n" for f in files
        )
        write_new(tmp, lines.encode())
        return tmp

    def publish(self, tmp: str, files: list[PackedFile]) -> None:
        """Link the index file ``stage`` wrote into place (under another name if its name is
        taken: an index file is never replaced), then remove its temporary name: ``files``
        are in the store."""
        head, name = os.path.split(tmp)
        final = os.path.join(head, name[1:])
        while True:
            try:
                os.link(tmp, final)
                break
            except FileExistsError:
                final = os.path.join(head, f"{name[1:-4]}-{secrets.token_hex(8)}.idx")
        os.unlink(tmp)
        places = self.places
        for f in files:
            places.setdefault(f.sha256, (f.pack.path, f.offset, f.size))
            if not f.kept:
                f.kept = True
                self.settle(f.pack, kept=True)

    def forget(self, files: list[PackedFile]) -> None:
        """``publish`` made ``files`` visible, but what followed failed (their index may not
        be durable): look for them no more, so that an upload of the same content is kept
        anew.  (Their index file stays: after a restart it counts if it was made durable.)"""
        for f in files:
            if self.places.get(f.sha256) == (f.pack.path, f.offset, f.size):
                del self.places[f.sha256]

    def drop_staged(self, tmp: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

    def load(self, clean: bool = True) -> int:
        """Read every index file (again as a runner starts leading: another may have written
        some since this process started), and (``clean``: only while no other runner writes
        here) remove what no committed result names: packs no index file names (once
        ``UNNAMED_GRACE`` old) and index files never published.  Returns how many files
        were removed."""
        places: dict[str, tuple[str, int, int]] = {}
        named: set[str] = set()
        removed = 0
        with os.scandir(self.dir) as entries:
            names = [entry.name for entry in entries]
        for name in names:
            if name.startswith(".") and name.endswith(".idx"):  # never published
                if clean:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.dir / name)
                    removed += 1
            elif name.endswith(".idx"):
                named.update(_read_index(self.dir, name, places))
        packs = {name for name in names if name.endswith(".pack")}
        old = time.time() - UNNAMED_GRACE
        for name in packs - named if clean else ():
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.dir / name).st_mtime < old:
                    os.unlink(self.dir / name)
                    removed += 1
        missing = {f"{self.dir}/{name}" for name in named - packs}
        self.places = {sha: place for sha, place in places.items() if place[0] not in missing}
        return removed


def _read_index(where: Path, name: str, places: dict[str, tuple[str, int, int]]) -> set[str]:
    """Add the places an index file names (a line that is not one is skipped); the packs it
    names."""
    named: set[str] = set()
    paths: dict[str, str] = {}  # (one string per pack, shared by its blobs)
    with open(where / name, encoding="ascii", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) != 4 or not is_sha256(fields[0]) or not fields[1].endswith(".pack"):
                continue
            if "/" in fields[1] or not (fields[2].isdigit() and fields[3].isdigit()):
                continue
            pack = paths.get(fields[1])
            if pack is None:
                pack = paths[fields[1]] = f"{where}/{fields[1]}"
                named.add(fields[1])
            places.setdefault(fields[0], (pack, int(fields[2]), int(fields[3])))
    return named
