"""BlobStore: small uploads written a batch at a time, checked and kept, or removed."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from hydra_trio.runner.blobs import BlobStore, PendingUpload


def small_uploads(blobs: BlobStore, datas: list[bytes]) -> list[PendingUpload]:
    uploads = [blobs.small(f"out/f{i}", data) for i, data in enumerate(datas)]
    blobs.write_small(uploads)
    return uploads


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def temporaries(root: Path) -> list[Path]:
    """The store's temporary files: in ``tmp``, and small uploads' beside the blobs."""
    return [*(root / "tmp").iterdir(), *root.glob("??/.upload-*")]


def test_small_uploads_are_written_then_kept_read_only_and_nothing_is_left_behind(
    tmp_path: Path,
) -> None:
    blobs = BlobStore(tmp_path)
    datas = [f"file {i}\n".encode() for i in range(300)] + [b""]
    uploads = small_uploads(blobs, datas)
    assert all(not u.staged and not u.done for u in uploads)
    assert len(temporaries(tmp_path)) == len(datas)
    # each in the directory of its blob: placing it is a rename within that directory
    assert {p.parent.name for p in temporaries(tmp_path)} == {sha(d)[:2] for d in datas}
    problems = blobs.commit_many([(u, len(d), sha(d)) for u, d in zip(uploads, datas, strict=True)])
    assert problems == [""] * len(datas)
    for data in datas:
        kept = blobs.path_of(sha(data))
        assert kept.read_bytes() == data
        assert not stat.S_IMODE(kept.stat().st_mode) & 0o222  # read-only
    assert temporaries(tmp_path) == []
    assert all(u.done for u in uploads)


def test_a_small_upload_that_does_not_match_is_removed_and_the_others_kept(
    tmp_path: Path,
) -> None:
    blobs = BlobStore(tmp_path)
    datas = [b"one", b"two", b"three"]
    uploads = small_uploads(blobs, datas)
    declared = [(3, sha(b"one")), (3, sha(b"TWO")), (4, sha(b"three"))]
    problems = blobs.commit_many([(u, *d) for u, d in zip(uploads, declared, strict=True)])
    assert problems[0] == ""
    assert f"received 3 bytes with sha256 {sha(b'two')}" in problems[1]
    assert f"declared 4 bytes with {sha(b'three')}" in problems[2]
    assert blobs.has(sha(b"one"))
    assert not blobs.has(sha(b"two")) and not blobs.has(sha(b"three"))
    assert temporaries(tmp_path) == []


def test_a_blob_the_store_has_already_is_not_written_twice(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    first = small_uploads(blobs, [b"same"])
    assert blobs.commit_many([(first[0], 4, sha(b"same"))]) == [""]
    inode = blobs.path_of(sha(b"same")).stat().st_ino
    again = small_uploads(blobs, [b"same"])
    assert blobs.commit_many([(again[0], 4, sha(b"same"))]) == [""]
    assert blobs.path_of(sha(b"same")).stat().st_ino == inode
    assert temporaries(tmp_path) == []


def test_a_temporary_name_taken_already_is_not_overwritten(tmp_path: Path) -> None:
    """Two stores on one directory (or a leftover of the same name): the file there stays
    as it is and the upload gets another name."""
    blobs = BlobStore(tmp_path)
    other = BlobStore(tmp_path)
    taken = tmp_path / sha(b"mine")[:2] / f".{blobs._prefix}0"  # the first name it tries
    taken.parent.mkdir()
    taken.write_bytes(b"someone else's")
    [upload] = small_uploads(blobs, [b"mine"])
    assert taken.read_bytes() == b"someone else's"
    assert blobs.commit_many([(upload, 4, sha(b"mine"))]) == [""]
    assert blobs.path_of(sha(b"mine")).read_bytes() == b"mine"
    assert other.remove_partial_uploads() == 1  # the leftover, once no runner writes there


def test_small_uploads_that_cannot_be_created_are_refused_alone_and_reported(
    tmp_path: Path,
) -> None:
    """The directory a small upload is written in cannot be made (something else is in its
    place, as a failing disk might make it): each upload of the batch is refused (its result
    will be upload-failed), the fault is reported, and the store works again once the
    directory can be made."""
    blobs = BlobStore(tmp_path)
    in_the_way = [tmp_path / sha(data)[:2] for data in (b"a", b"b")]
    for path in in_the_way:
        path.write_bytes(b"not a directory")
    uploads = small_uploads(blobs, [b"a", b"b"])
    assert all(u.done and u.file is None and not u.staged for u in uploads)
    problems = blobs.commit_many(
        [(u, 1, sha(d)) for u, d in zip(uploads, [b"a", b"b"], strict=True)]
    )
    assert all("refused" in p for p in problems)
    assert blobs.health.warning("outputs") is not None
    for path in in_the_way:
        path.unlink()
    [upload] = small_uploads(blobs, [b"a"])
    assert blobs.commit_many([(upload, 1, sha(b"a"))]) == [""]
    assert blobs.health.warning("outputs") is None


def test_small_uploads_a_killed_runner_left_are_removed_and_the_blobs_kept(
    tmp_path: Path,
) -> None:
    """A runner killed between writing small uploads and placing them leaves ``.upload-*``
    files beside the blobs: the next one removes them at start, and nothing else."""
    blobs = BlobStore(tmp_path)
    [kept] = small_uploads(blobs, [b"kept"])
    assert blobs.commit_many([(kept, 4, sha(b"kept"))]) == [""]
    small_uploads(blobs, [b"one", b"two"])  # written, never placed: the runner "dies" here
    assert len(temporaries(tmp_path)) == 2
    (tmp_path / "notes").write_text("not a blob directory")
    assert BlobStore(tmp_path).remove_partial_uploads() == 2
    assert temporaries(tmp_path) == []
    assert blobs.path_of(sha(b"kept")).read_bytes() == b"kept"
