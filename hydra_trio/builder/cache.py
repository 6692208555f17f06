"""The builder's verified input cache, and placing its entries under a build's ``$IN``.

Theory of operation.  A small input (at most ``packs.PACKED_MAX`` bytes) is kept in a pack
(``packs``) and each of its ``$IN`` entries is a new read-only file holding its bytes: one
creation per target, no inode shared with a build.  What follows is about the larger ones.

A fetched input is written once: into the cache, as
``<cache>/<sha256[:2]>/<sha256>`` (read-only, 0444; an executable input also gets a 0555
sibling ``<sha256>.x``, a copy made once, since a hard link shares its mode).  ``$IN`` entries
are then **reflinks** of the cache entry where the file system has them (btrfs, XFS: an inode
of their own, copy-on-write), else **hard links** of it (ext4), and a copy only where neither
works (another file system, EXDEV; too many links, EMLINK).  A hard link shares the inode, so
a build running as the builder's user could ``chmod u+w`` its ``$IN`` file and write into the
cache entry (poisoning every later build that gets it).  The guard: each entry's identity
(``Identity``: inode, size, mtime, ctime, mode, owner) is recorded whenever this process
verified it (wrote it after checking its hash, or rehashed it), and again after each link it
makes (a link changes the inode's ctime).  Before an entry is linked again its ``lstat`` must
match; otherwise (a build chmod-ed or wrote it: either changes ctime, which a user cannot set
back; or the builder restarted and remembers nothing) it is rehashed, and discarded if it no
longer matches (the caller fetches it again).  What remains (docs/security.md): a build of
the same user running *at the same time* as another that has the same entry linked can change
it under that other build.  With per-build users (``--build-users``) a build cannot write the
builder's files at all.

A large fetched file is written in ``tmp`` and renamed into the cache once its hash is
checked; a small one (checked in memory) is written where it stays and linked at its targets
at once (``write``): an entry part-written by a killed builder is one the next process never
verified, so it is rehashed, and removed, before any use.

Every method blocks (system calls, hashing): call them through a thread, a batch at a time.
A lock keeps one placement's check, link and record together across threads.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import stat
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import attrs

from hydra_trio.builder.packs import PACKED_MAX, InputPacks
from hydra_trio.diskio import write_new

#: ``ioctl(FICLONE)``: share the source's blocks copy-on-write (btrfs, XFS, bcachefs).
_FICLONE = 0x40049409
_BLOCK = 1024 * 1024
#: errors of a reflink attempt that mean "not on this file system": stop trying.
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS}
#: errors of ``link`` after which a copy is made instead.
_NO_LINK = {errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS}
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: where an entry goes under ``$IN``: whether it is executable, and the path (which must not
#: exist; its directory must).
Target = tuple[bool, "Path | str"]
#: a fetched content to keep: sha256, size, its bytes (in pieces), where it goes.
Fetched = tuple[str, int, Sequence[bytes], Sequence[Target]]
#: a content to place from the cache: sha256, size, executable, target.
Placing = tuple[str, int, bool, "Path | str"]


@attrs.frozen
class Identity:
    """What ``lstat`` said of a cache entry when this process last verified or linked it."""

    ino: int
    dev: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    uid: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(
            st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid
        )


@attrs.define(eq=False)
class InputCache:
    """The cache directory ``root`` and the identities of the entries verified in it."""

    root: Path
    #: None: not tried yet; False: a reflink failed here (hard links from then on).
    reflinks: bool | None = None
    #: the small inputs (``packs``).
    packs: InputPacks = attrs.field(init=False)
    _known: dict[str, Identity] = attrs.field(factory=dict, init=False)
    _dirs: set[str] = attrs.field(factory=set, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    #: counts, for tests and benchmarks: entries rehashed, and discarded as tampered.
    rehashed: int = attrs.field(default=0, init=False)
    discarded: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.packs = InputPacks(self.root / "packs")

    def path_of(self, sha256: str, executable: bool = False) -> Path:
        return self.root / sha256[:2] / (sha256 + (".x" if executable else ""))

    def _entry(self, sha256: str) -> str:
        """``path_of`` as a string (no ``Path`` object per file on the hot paths)."""
        return os.path.join(self.root, sha256[:2], sha256)

    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def _parent_made(self, parent: str) -> None:
        """Make the directory ``parent`` once (remembered: one ``mkdir`` per directory)."""
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)

    def kept(self, path: Path) -> None:
        """``path`` (a cache entry) was just written, its hash checked: remember its identity."""
        with self._lock:
            self._known[str(path)] = Identity.of(os.lstat(path))

    def keep(self, fetched: Sequence[Fetched]) -> None:
        """Keep fetched contents (hashes already checked) and place each at its targets: a
        small one (``PACKED_MAX``) as a new read-only file holding its bytes at each target,
        then all of them in one pack; a larger one as an entry of its own (``write``)."""
        packed: list[tuple[str, bytes]] = []
        for sha256, size, chunks, targets in fetched:
            if size > PACKED_MAX:
                self.write(sha256, size, chunks, targets)
                continue
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            for executable, target in targets:
                write_new(target, data, 0o555 if executable else 0o444)
            packed.append((sha256, data))
        self.packs.add(packed)

    def place_packed(self, files: Sequence[Placing]) -> list[int]:
        """Place each of ``files`` whose content is packed (a copy of its bytes, read-only);
        return the indices of the others (entries of their own, or packed blobs that failed
        their hash), in order."""
        found = self.packs.read(
            sha256
            for sha256, size, _, _ in files
            if size <= PACKED_MAX and self.packs.has(sha256, size)
        )
        rest: list[int] = []
        for index, (sha256, size, executable, target) in enumerate(files):
            data = found.get(sha256) if size <= PACKED_MAX else None
            if data is None:
                rest.append(index)
            else:
                write_new(target, data, 0o555 if executable else 0o444)
        return rest

    def write(
        self, sha256: str, size: int, chunks: Sequence[bytes], targets: Sequence[Target]
    ) -> None:
        """Write a fetched small content, its hash already checked, as its cache entry, and
        place it at each of ``targets`` (see ``place``); if the entry is there already (another
        build fetched it meanwhile, or a process before this one), just place it.

        The entry is written where it stays, not in ``tmp`` and renamed: one creation instead
        of a creation and a rename, and one ``lstat`` after its links instead of one after the
        write and two per link (100,000 files: about half the writer's time).  The lock is
        held from the creation to the identity, so no other placement in this process ever
        sees the entry part-written (it would rehash it and remove it); a builder killed
        mid-write leaves an entry this process never verified, which the next one rehashes
        (and removes, as it does not match) before any use.  A failed write (a full disk)
        removes the entry, whatever ``close`` says."""
        path = self._entry(sha256)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        with self._lock:
            self._parent_made(os.path.dirname(path))
            wrote = True
            try:
                write_new(path, data)
            except FileExistsError:
                wrote = not self._verified(path, sha256, size, 0o444)
                if wrote:  # not the content (a write cut short by a crash): removed, anew
                    write_new(path, data)
            if wrote:
                linked = self.reflinks is False and self._link_all(path, targets)
                self._known[path] = Identity.of(os.lstat(path))
                if linked:
                    return
            for executable, target in targets:
                self._place(sha256, size, executable, target)

    def _link_all(self, path: str, targets: Sequence[Target]) -> bool:
        """Hard-link the entry just written at each (non-executable) target; False, with
        nothing linked, where ``_place``'s general way is needed (an executable target, or a
        link refused)."""
        if any(executable for executable, _ in targets):
            return False
        for done, (_, target) in enumerate(targets):
            try:
                os.link(path, target, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
                for _, linked in targets[:done]:
                    os.unlink(linked)
                return False
        return True

    def has(self, sha256: str, size: int, packed: bool = True) -> bool:
        """Whether a verified entry with this content is in the cache, or (``packed``) a pack
        (an entry changed since it was verified is rehashed; one that no longer matches is
        removed: fetch it again)."""
        if packed and size <= PACKED_MAX and self.packs.has(sha256, size):
            return True
        path = self._entry(sha256)
        if not os.path.lexists(path):  # most of a first fetch: no lock to wait for, no Path
            return False  # (an identity left for it matches nothing: _verified lstats first)
        with self._lock:
            return self._verified(path, sha256, size, 0o444)

    def has_entry(self, sha256: str, size: int) -> bool:
        """Whether a verified entry of its own (``path_of``) holds this content, made from its
        pack if it is only packed (a Nix import reads files, not packs)."""
        if self.has(sha256, size, packed=False):
            return True
        data = self.packs.read([sha256]).get(sha256) if size <= PACKED_MAX else None
        if data is None or len(data) != size:
            return False
        self.write(sha256, size, [data], [])
        return True

    def place(self, sha256: str, size: int, executable: bool, target: Path | str) -> None:
        """Put the verified entry at ``target`` (which must not exist; its directory must):
        a reflink, else a hard link, else a copy; read-only.  Raises ``FileNotFoundError`` if
        the entry is missing or no longer matches (the caller fetches it again)."""
        with self._lock:
            self._place(sha256, size, executable, target)

    def _place(self, sha256: str, size: int, executable: bool, target: Path | str) -> None:
        """``place``, the lock held."""
        source = self.path_of(sha256)
        if not self._verified(source, sha256, size, 0o444):
            raise FileNotFoundError(errno.ENOENT, "not in the input cache", str(source))
        if executable:
            source = self._executable(source, sha256, size)
        mode = 0o555 if executable else 0o444
        if self.reflinks is not False and self._reflink(source, target, mode):
            return
        try:
            os.link(source, target, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            copy(source, target, mode)
            return
        # The link changed the entry's ctime: what it is now is what we verified.
        self._known[str(source)] = Identity.of(os.lstat(source))

    def _verified(self, path: Path | str, sha256: str, size: int, mode: int) -> bool:
        """Whether ``path`` holds the content ``sha256`` (see the module docstring)."""
        key = str(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._known.pop(key, None)
            return False
        if self._known.get(key) == Identity.of(st):
            return True
        self.rehashed += 1
        if (
            stat.S_ISREG(st.st_mode)
            and st.st_uid == os.geteuid()
            and st.st_size == size
            and _sha256_of(path) == sha256
        ):
            if stat.S_IMODE(st.st_mode) != mode:
                os.chmod(path, mode, follow_symlinks=False)
            self._known[key] = Identity.of(os.lstat(path))
            return True
        self.discarded += 1
        self._known.pop(key, None)
        os.unlink(path)
        return False

    def _executable(self, source: Path, sha256: str, size: int) -> Path:
        """The 0555 sibling of the verified entry ``source``, made (by a copy) if missing."""
        path = self.path_of(sha256, executable=True)
        if self._verified(path, sha256, size, 0o555):
            return path
        self._parent_made(str(self.tmp_dir()))
        tmp = self.tmp_dir() / f"x-{threading.get_ident()}-{sha256}"
        tmp.unlink(missing_ok=True)
        try:
            copy(source, tmp, 0o555)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._known[str(path)] = Identity.of(os.lstat(path))
        return path

    def _reflink(self, source: Path, target: Path | str, mode: int) -> bool:
        """Clone ``source`` to ``target``; False (and nothing at ``target``) if this file
        system cannot (then ``reflinks`` is False, so it is tried once, not per file)."""
        if sys.platform != "linux":  # the number means FICLONE on Linux only
            self.reflinks = False
            return False
        dst = os.open(target, _CREATE, 0o600)
        try:
            with source.open("rb") as src:
                fcntl.ioctl(dst, _FICLONE, src.fileno())
            os.fchmod(dst, mode)
        except OSError as exc:
            os.close(dst)
            os.unlink(target)
            if exc.errno in _NO_REFLINK:
                self.reflinks = False
                return False
            raise
        os.close(dst)
        self.reflinks = True
        return True


def _sha256_of(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as file:
        while block := file.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def copy(source: Path, target: Path | str, mode: int) -> None:
    """A copy of ``source`` at ``target`` (must not exist; never through a link), ``mode``."""
    with source.open("rb") as src, os.fdopen(os.open(target, _CREATE, 0o600), "wb") as dst:
        copied = False
        if sys.platform == "linux":
            try:
                while os.copy_file_range(src.fileno(), dst.fileno(), _BLOCK * 16):
                    pass
                copied = True
            except OSError:  # no copy_file_range between these files
                src.seek(0)
                dst.seek(0)
                dst.truncate()
        if not copied:
            shutil.copyfileobj(src, dst, _BLOCK)
        os.fchmod(dst.fileno(), mode)
