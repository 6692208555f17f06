"""The builder's small inputs, many to a file: packs in the input cache.

A fetched input of at most ``PACKED_MAX`` bytes is not given a cache entry of its own (a
file, linked at each target): the batch a writer's thread hop keeps is written one after the
other into one new *pack*, ``<cache>/packs/<n>.pack``, in one ``write``, and its places
(sha256, offset, size) into ``<n>.idx`` beside it.  Each ``$IN`` target of a small input is a
file of its own, created with the input's bytes (read-only): one creation per target, where
an entry of its own cost a creation and a link (100,000 files on a new ext4: 4.4 s for the
entries and their links, 2.5 s for the creations alone), and a build can never reach the cache
through its ``$IN`` file (a hard link shares the inode, see ``cache``).

Nothing here is trusted without its hash: a blob is hashed each time it is read (a small
input hashes in microseconds), and one that does not match (a pack cut short by a crash, a
file changed by someone) is forgotten, so the caller fetches it again.  So packs are never
synced, and a crash leaves at worst a pack without its index (removed by ``load``) or an
index whose last line is cut (skipped, or naming bytes that fail their hash).  One builder
uses a work dir at a time (its lock), so this process is the only writer.

Index files are plain text, one blob a line: ``<sha256> <offset> <size>``.  Every method
blocks: call them through a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import attrs

from hydra_trio.diskio import write_new
from hydra_trio.protocol.validators import is_sha256

#: Inputs up to this size are kept in packs and copied into ``$IN``; larger ones are entries
#: of their own, linked (a copy of a larger file would cost more than the link it saves).
PACKED_MAX = 16 * 1024


@attrs.define(eq=False)
class InputPacks:
    """The packs under ``root`` and where each blob in them is (read at the first use)."""

    root: Path
    #: sha256 -> (pack number, offset, size).
    _places: dict[str, tuple[int, int, int]] = attrs.field(factory=dict, init=False)
    _next: int = attrs.field(default=0, init=False)
    _loaded: bool = attrs.field(default=False, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    #: counts, for tests and benchmarks: blobs forgotten because they failed their hash.
    discarded: int = attrs.field(default=0, init=False)

    def has(self, sha256: str, size: int) -> bool:
        """Whether a blob with this content is packed (not read: ``read`` checks it)."""
        self._load()
        place = self._places.get(sha256)
        return place is not None and place[2] == size

    def add(self, blobs: Iterable[tuple[str, bytes]]) -> None:
        """Pack ``blobs`` (sha256, bytes: hash already checked) not packed yet, in one new
        pack.  A failed write (a full disk) leaves neither the pack nor its index."""
        self._load()
        with self._lock:
            fresh: dict[str, bytes] = {}
            for sha256, data in blobs:
                if sha256 not in self._places:
                    fresh.setdefault(sha256, data)
            if not fresh:
                return
            number = self._next
            self._next += 1
        lines: list[str] = []
        offset = 0
        for sha256, data in fresh.items():
            lines.append(f"{sha256} {offset} {len(data)}\n")
            offset += len(data)
        pack, index = self._paths(number)
        write_new(pack, b"".join(fresh.values()))  # (each leaves nothing if it fails)
        try:
            write_new(index, "".join(lines).encode())
        except BaseException:
            _remove(pack)
            raise
        with self._lock:
            offset = 0
            for sha256, data in fresh.items():
                self._places.setdefault(sha256, (number, offset, len(data)))
                offset += len(data)

    def read(self, wanted: Iterable[str]) -> dict[str, bytes]:
        """The bytes of each packed blob of ``wanted`` that still has its hash (one open per
        pack); a blob that does not is forgotten (and absent from the answer)."""
        self._load()
        by_pack: dict[int, list[tuple[int, int, str]]] = {}
        for sha256 in wanted:
            place = self._places.get(sha256)
            if place is not None:
                by_pack.setdefault(place[0], []).append((place[1], place[2], sha256))
        found: dict[str, bytes] = {}
        bad: list[str] = []
        for number, blobs in by_pack.items():
            try:
                fd = os.open(self._paths(number)[0], os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                bad.extend(sha256 for _, _, sha256 in blobs)
                continue
            try:
                for offset, size, sha256 in sorted(blobs):
                    data = os.pread(fd, size, offset)
                    if len(data) == size and hashlib.sha256(data).hexdigest() == sha256:
                        found[sha256] = data
                    else:
                        bad.append(sha256)
            finally:
                os.close(fd)
        if bad:
            with self._lock:
                for sha256 in bad:
                    self._places.pop(sha256, None)
                self.discarded += len(bad)
        return found

    def _paths(self, number: int) -> tuple[str, str]:
        base = os.path.join(self.root, str(number))
        return base + ".pack", base + ".idx"

    def _load(self) -> None:
        """Read every index (once, in the order the packs were written): a pack without one
        (a crash between the two writes) and an index without its pack are removed; a line
        that does not parse, and anything else in the directory, are skipped."""
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self.root.mkdir(parents=True, exist_ok=True)
            found: dict[int, set[str]] = {}
            for entry in os.scandir(self.root):
                stem, _, kind = entry.name.partition(".")
                ours = stem.isascii() and stem.isdigit() and kind in ("pack", "idx")
                if ours and entry.is_file(follow_symlinks=False):
                    found.setdefault(int(stem), set()).add(kind)
            for number in sorted(found):
                self._next = max(self._next, number + 1)
                pack, index = self._paths(number)
                if found[number] != {"pack", "idx"}:
                    _remove(pack if "pack" in found[number] else index)
                    continue
                try:
                    self._read_index(number, index)
                except OSError:  # unreadable: its blobs are fetched again when needed
                    continue
            self._loaded = True

    def _read_index(self, number: int, path: str) -> None:
        with open(path, encoding="ascii", errors="replace") as file:
            for line in file:
                fields = line.split()
                if (
                    line.endswith("\n")
                    and len(fields) == 3
                    and is_sha256(fields[0])
                    and fields[1].isdigit()
                    and fields[2].isdigit()
                ):
                    self._places.setdefault(fields[0], (number, int(fields[1]), int(fields[2])))


def _remove(path: Path | str) -> None:
    with contextlib.suppress(OSError):  # (gone already, or not ours to remove: left)
        os.unlink(path)
