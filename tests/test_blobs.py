"""BlobStore: small uploads written a batch to a pack, checked and indexed, or removed."""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import time
from pathlib import Path

import pytest

from hydra_trio.runner.blobs import DIRECT_READ_MIN, BlobError, BlobStore, PendingUpload
from hydra_trio.runner.packs import UNNAMED_GRACE


def small_uploads(blobs: BlobStore, datas: list[bytes]) -> list[PendingUpload]:
    uploads = [blobs.small(f"out/f{i}", data) for i, data in enumerate(datas)]
    blobs.write_small(uploads)
    return uploads


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def temporaries(root: Path) -> list[Path]:
    """What the store holds that no committed result names: partial uploads in ``tmp``,
    index files not published, and packs no published index file names."""
    packs = root / "packs"
    published = [idx for idx in packs.glob("*.idx") if not idx.name.startswith(".")]
    named = {line.split()[1] for idx in published for line in idx.read_text().splitlines()}
    return [
        *(root / "tmp").iterdir(),
        *packs.glob(".*.idx"),
        *(p for p in packs.glob("*.pack") if p.name not in named),
    ]


def test_small_uploads_are_written_into_one_pack_then_indexed_and_nothing_is_left_behind(
    tmp_path: Path,
) -> None:
    blobs = BlobStore(tmp_path)
    datas = [f"file {i}\n".encode() for i in range(300)] + [b""]
    uploads = small_uploads(blobs, datas)
    assert all(not u.staged and not u.done for u in uploads)
    [pack] = (tmp_path / "packs").glob("*.pack")  # one file for the batch, read-only
    assert pack.read_bytes() == b"".join(datas)
    assert not stat.S_IMODE(pack.stat().st_mode) & 0o222
    assert not any(blobs.has(sha(d)) for d in datas)  # not visible before the commit
    problems = blobs.commit_many([(u, len(d), sha(d)) for u, d in zip(uploads, datas, strict=True)])
    assert problems == [""] * len(datas)
    for data in datas:
        assert blobs.has(sha(data))
        assert blobs.packed(sha(data)) == data
        assert blobs.read_whole(sha(data), 1024) == data
    assert blobs.read_pieces(sha(datas[12]), 2, 100, 3) == ([b"le ", b"12\n"], True)
    [index] = (tmp_path / "packs").glob("*.idx")
    assert len(index.read_text().splitlines()) == len(datas)
    assert not list(tmp_path.glob("??"))  # no file of its own
    assert temporaries(tmp_path) == []
    assert all(u.done for u in uploads)
    # a runner that starts leading finds them in the index files
    again = BlobStore(tmp_path)
    assert again.remove_partial_uploads() == 0
    assert all(again.packed(sha(d)) == d for d in datas)


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


def test_a_blob_the_store_has_already_is_not_kept_twice(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    first = small_uploads(blobs, [b"same"])
    assert blobs.commit_many([(first[0], 4, sha(b"same"))]) == [""]
    place = blobs.packs.find(sha(b"same"))
    again = small_uploads(blobs, [b"same"])
    assert blobs.commit_many([(again[0], 4, sha(b"same"))]) == [""]
    assert blobs.packs.find(sha(b"same")) == place
    assert len(list((tmp_path / "packs").glob("*.pack"))) == 1  # the second one, unused: gone
    assert temporaries(tmp_path) == []


def test_a_pack_none_of_whose_blobs_is_kept_is_removed(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    uploads = small_uploads(blobs, [b"one", b"two", b"three"])
    blobs.discard(uploads[0])
    assert len(list((tmp_path / "packs").glob("*.pack"))) == 1  # two of its blobs wait
    blobs.discard_many(uploads[1:])
    assert list((tmp_path / "packs").iterdir()) == []


def test_a_pack_name_taken_already_is_not_overwritten(tmp_path: Path) -> None:
    """Two stores on one directory (or a leftover of the same name): the file there stays
    as it is and the batch gets another name."""
    blobs = BlobStore(tmp_path)
    other = BlobStore(tmp_path)
    taken = tmp_path / "packs" / f"{blobs._pack_name()}.pack"  # the name it would try
    blobs._serial = itertools.count()  # (tried once above: try it again)
    taken.write_bytes(b"someone else's")
    [upload] = small_uploads(blobs, [b"mine"])
    assert taken.read_bytes() == b"someone else's"
    assert blobs.commit_many([(upload, 4, sha(b"mine"))]) == [""]
    assert blobs.packed(sha(b"mine")) == b"mine"
    long_ago = time.time() - UNNAMED_GRACE - 1
    os.utime(taken, (long_ago, long_ago))
    assert other.remove_partial_uploads() == 1  # the leftover, once no runner writes there
    assert not taken.exists()
    assert other.packed(sha(b"mine")) == b"mine"


def test_an_index_file_is_never_published_over_another(tmp_path: Path) -> None:
    """An index file whose name is taken (another process of the same names) is published
    under another: the one there keeps naming its blobs."""
    blobs = BlobStore(tmp_path)
    [first] = small_uploads(blobs, [b"first"])
    assert blobs.commit_many([(first, 5, sha(b"first"))]) == [""]
    [published] = (tmp_path / "packs").glob("*.idx")
    [second] = small_uploads(blobs, [b"second"])
    staged = blobs.stage_index([(0, second)])
    assert staged is not None
    os.rename(staged, tmp_path / "packs" / f".{published.name}")  # as if it had that name
    blobs.sync_data([(0, second)])
    blobs.publish_index(str(tmp_path / "packs" / f".{published.name}"), [(0, second)])
    assert len(list((tmp_path / "packs").glob("*.idx"))) == 2
    again = BlobStore(tmp_path)
    assert again.packed(sha(b"first")) == b"first" and again.packed(sha(b"second")) == b"second"


def test_blobs_whose_index_may_not_be_durable_are_kept_anew_by_the_next_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync after publishing an index failed (the result is upload-failed): its blobs are
    looked for no more, so that the next upload of the same content is kept and synced
    anew rather than taken as there already."""
    blobs = BlobStore(tmp_path)
    [upload] = small_uploads(blobs, [b"data"])

    def failing(self: BlobStore, dirs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(BlobStore, "sync_entries", failing)
    [problem] = blobs.commit_many([(upload, 4, sha(b"data"))])
    assert "cannot keep it" in problem and "Input/output error" in problem
    assert not blobs.has(sha(b"data"))
    monkeypatch.undo()
    [again] = small_uploads(blobs, [b"data"])
    assert blobs.commit_many([(again, 4, sha(b"data"))]) == [""]
    assert blobs.packs.find(sha(b"data")) == (again.file.pack.path, 0, 4)  # type: ignore[union-attr]


def test_small_uploads_that_cannot_be_written_are_refused_and_reported(
    tmp_path: Path,
) -> None:
    """The pack of a batch cannot be created (something else is where the packs are, as a
    failing disk might make it): each upload of the batch is refused (its result will be
    upload-failed), the fault is reported, and the store works again once it can write."""
    blobs = BlobStore(tmp_path)
    (tmp_path / "packs").rmdir()
    (tmp_path / "packs").write_bytes(b"not a directory")
    uploads = small_uploads(blobs, [b"a", b"b"])
    assert all(u.done and u.file is None and not u.staged for u in uploads)
    problems = blobs.commit_many(
        [(u, 1, sha(d)) for u, d in zip(uploads, [b"a", b"b"], strict=True)]
    )
    assert all("refused" in p for p in problems)
    assert blobs.health.warning("outputs") is not None
    (tmp_path / "packs").unlink()
    (tmp_path / "packs").mkdir()
    [upload] = small_uploads(blobs, [b"a"])
    assert blobs.commit_many([(upload, 1, sha(b"a"))]) == [""]
    assert blobs.health.warning("outputs") is None


def test_what_a_killed_runner_left_unindexed_is_removed_and_the_blobs_kept(
    tmp_path: Path,
) -> None:
    """A runner killed between writing small uploads and indexing them leaves packs no index
    file names (and maybe an index file never published): the next leader removes them as it
    starts, once they are UNNAMED_GRACE old, and nothing else; an index file naming a pack
    that is gone is ignored."""
    blobs = BlobStore(tmp_path)
    [kept] = small_uploads(blobs, [b"kept"])
    assert blobs.commit_many([(kept, 4, sha(b"kept"))]) == [""]
    small_uploads(blobs, [b"one", b"two"])  # written, never indexed: the runner "dies" here
    [staged] = small_uploads(blobs, [b"three"])
    blobs.stage_index([(0, staged)])  # and here, before publishing that index
    (tmp_path / "packs" / "gone.idx").write_text(f"{sha(b'gone')} gone.pack 0 4\nnot a line\n")
    assert len(temporaries(tmp_path)) == 3
    (tmp_path / "notes").write_text("not a blob directory")
    again = BlobStore(tmp_path)
    # young: perhaps named by an index file this listing does not show yet (NFS)
    assert again.remove_partial_uploads() == 1  # (the index file never published)
    assert len(temporaries(tmp_path)) == 2 and not again.has(sha(b"one"))
    long_ago = time.time() - UNNAMED_GRACE - 1
    for pack in temporaries(tmp_path):
        os.utime(pack, (long_ago, long_ago))
    assert again.remove_partial_uploads() == 2
    assert temporaries(tmp_path) == []
    assert again.packed(sha(b"kept")) == b"kept"
    assert not again.has(sha(b"one")) and not again.has(sha(b"three"))
    assert not again.has(sha(b"gone"))


def test_the_small_uploads_an_earlier_version_left_beside_the_blobs_are_removed(
    tmp_path: Path,
) -> None:
    blobs = BlobStore(tmp_path)
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / ".upload-s1234-0").write_bytes(b"half")
    (tmp_path / "ab" / ("ab" + "0" * 62)).write_bytes(b"a blob")
    assert blobs.remove_partial_uploads() == 1
    assert [p.name for p in (tmp_path / "ab").iterdir()] == ["ab" + "0" * 62]


def test_many_blobs_are_read_one_after_the_other_a_run_of_a_pack_at_a_time(
    tmp_path: Path,
) -> None:
    blobs = BlobStore(tmp_path)
    first = [f"first {i}\n".encode() for i in range(5)]
    second = [f"second {i}\n".encode() for i in range(3)]
    for datas in (first, second):
        uploads = small_uploads(blobs, datas)
        batch = [(u, len(d), sha(d)) for u, d in zip(uploads, datas, strict=True)]
        assert blobs.commit_many(batch) == [""] * len(datas)
    large = BlobStore(tmp_path).begin("large")  # (a file of its own)
    blobs.append(large, 0, b"L" * 100, eof=True)
    blobs.commit(large, 100, sha(b"L" * 100))
    wanted = [first[0], first[1], second[2], b"L" * 100, first[3], first[4], second[0]]
    pieces = blobs.read_many([sha(d) for d in wanted], 10_000)
    assert pieces is not None and b"".join(pieces) == b"".join(wanted)
    # adjacent ones in one pack are one piece
    assert pieces[:2] == [first[0] + first[1], second[2]] and len(pieces) == 5
    assert blobs.read_many([sha(d) for d in wanted], 149) is None  # (they hold 150)
    with pytest.raises(BlobError, match="no file"):
        blobs.read_many([sha(first[0]), sha(b"not here")], 10_000)


def test_a_large_upload_is_written_and_read_back_around_the_page_cache_intact(
    tmp_path: Path,
) -> None:
    """A streamed upload goes through ``DirectFile`` (``O_DIRECT`` where the file system
    allows it) and is read back by ``read_direct`` for reads of ``DIRECT_READ_MIN`` or more:
    whatever the chunking of the upload and the offsets of the reads, the bytes are the
    ones uploaded, cut into the pieces asked for."""
    data = os.urandom(3 * (1 << 20) + 4_321)
    blobs = BlobStore(tmp_path)
    upload = blobs.begin("out/big")
    offset = 0
    for step in itertools.cycle([65_536, 65_536, 1_000, 300_000]):
        chunk = data[offset : offset + step]
        blobs.append(upload, offset, chunk, eof=offset + len(chunk) == len(data))
        offset += len(chunk)
        if offset == len(data):
            break
    blobs.commit(upload, len(data), sha(data))
    for start, length in (
        (0, 1 << 20),
        (1 << 20, 1 << 20),
        (12_345, DIRECT_READ_MIN),
        (3 << 20, 1 << 20),
        (len(data) + 5, 1 << 20),
    ):
        pieces, eof = blobs.read_pieces(sha(data), start, length, 65_536)
        end = min(start + length, len(data))
        expected = [data[at : min(at + 65_536, end)] for at in range(start, end, 65_536)]
        assert pieces == (expected or [b""]), (start, length)
        assert eof == (end >= len(data))
