"""Inputs are fetched once: ``$IN`` entries are read-only links of the verified cache (small
ones: files of their own, their bytes kept in packs), a tampered entry is found and fetched
again, and many small files are fetched pipelined."""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import stat
import weakref
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from hydra_trio.builder.cache import InputCache
from hydra_trio.builder.fetch import (
    CACHE_BATCH,
    FILES_PER_REQUEST,
    FILES_REQUEST_BYTES,
    SMALL_WINDOW,
    InputFetcher,
    _SmallFetch,
)
from hydra_trio.builder.inputs import FetchError, place_inputs
from hydra_trio.builder.packs import PACKED_MAX, InputPacks
from hydra_trio.protocol.codec import TRANSFER_FRAME
from hydra_trio.protocol.messages import (
    Assign,
    FetchData,
    FetchFiles,
    FetchRequest,
    FileInfo,
    InputSpec,
    Message,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Runner:
    """The runner's end of fetches, answering each request from ``blobs`` in its own task
    (after a checkpoint, so requests sent together are in flight together)."""

    def __init__(self, nursery: trio.Nursery, blobs: dict[str, bytes]) -> None:
        self.nursery = nursery
        self.blobs = blobs
        self.fetcher: InputFetcher | None = None
        self.requests: list[FetchRequest] = []
        #: (1.7) the FetchFiles requests.
        self.many: list[FetchFiles] = []
        self.in_flight = 0
        self.most_in_flight = 0
        #: sha256s never answered (a stalled runner), and when each was asked for.
        self.silent_for: set[str] = set()
        self.asked_at: dict[str, float] = {}

    async def send(self, message: Message) -> None:
        if isinstance(message, FetchFiles):
            self.many.append(message)
            self.nursery.start_soon(self._answer_files, message)
            return
        assert isinstance(message, FetchRequest)
        self.requests.append(message)
        self.asked_at[message.sha256] = trio.current_time()
        if message.sha256 in self.silent_for:
            return
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.nursery.start_soon(self._answer, message)

    async def send_all(self, messages: list[Message]) -> None:
        for message in messages:
            await self.send(message)

    async def _answer_files(self, msg: FetchFiles) -> None:
        """(1.7) The files' bytes one after the other, in frames, the last with eof."""
        await trio.lowlevel.checkpoint()
        assert self.fetcher is not None
        data = b"".join(self.blobs[sha256] for sha256 in msg.files)
        pieces = [data[i : i + TRANSFER_FRAME] for i in range(0, len(data), TRANSFER_FRAME)]
        pieces = pieces or [b""]
        for index, piece in enumerate(pieces):
            frame = FetchData(request_id=msg.request_id, data=piece, eof=index == len(pieces) - 1)
            assert self.fetcher.deliver(frame)

    async def _answer(self, msg: FetchRequest) -> None:
        await trio.lowlevel.checkpoint()
        assert self.fetcher is not None
        data = self.blobs[msg.sha256][msg.offset : msg.offset + msg.length]
        eof = msg.offset + len(data) >= len(self.blobs[msg.sha256])
        pieces = [data[i : i + TRANSFER_FRAME] for i in range(0, len(data), TRANSFER_FRAME)]
        pieces = pieces or [b""]
        self.in_flight -= 1
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            frame = FetchData(request_id=msg.request_id, data=piece, eof=eof and last)
            assert self.fetcher.deliver(frame)


def fetcher_for(runner: Runner, cache: Path, timeout: float = 600.0) -> InputFetcher:
    fetcher = InputFetcher(
        cache=cache, send=runner.send, fetch_timeout=timeout, send_all=runner.send_all
    )
    runner.fetcher = fetcher
    return fetcher


def assign_of(files: dict[str, bytes], executable: frozenset[str] = frozenset()) -> Assign:
    infos = tuple(
        FileInfo(path=path, size=len(data), sha256=sha(data), executable=path in executable)
        for path, data in files.items()
    )
    return Assign(
        build_id="b",
        attempt=1,
        command=("true",),
        inputs=(InputSpec(name="dep", build_id="d", files=infos),),
    )


#: contents too large to be packed: entries of their own, linked.
LARGE = PACKED_MAX + 1


async def test_inputs_are_read_only_links_of_the_verified_cache(tmp_path: Path) -> None:
    """Each $IN file above ``PACKED_MAX`` is the cache entry itself (a hard link: same inode;
    a reflink where the file system has them), read-only: 0444, or 0555 for an executable
    input."""
    files = {"a": b"a" * LARGE, "sub/b": b"b" * LARGE, "tool": b"#!/bin/sh\n" + b" " * LARGE}
    assign = assign_of(files, executable=frozenset({"tool"}))
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery, {sha(d): d for d in files.values()})
        fetcher = fetcher_for(runner, tmp_path / "cache")
        await place_inputs(assign, tmp_path / "in", fetcher)
    for path, data in files.items():
        target = tmp_path / "in" / "dep" / path
        assert target.read_bytes() == data
        mode = stat.S_IMODE(os.lstat(target).st_mode)
        assert mode == (0o555 if path == "tool" else 0o444)
        entry = fetcher.entries.path_of(sha(data), executable=path == "tool")
        same = os.lstat(entry).st_ino == os.lstat(target).st_ino
        assert same or fetcher.entries.reflinks
    assert os.lstat(tmp_path / "in" / "dep" / "a").st_nlink >= 2 or fetcher.entries.reflinks


async def test_small_inputs_are_read_only_files_of_their_own_kept_in_packs(
    tmp_path: Path,
) -> None:
    """An input of at most ``PACKED_MAX`` bytes is a new read-only file at each target (0444,
    or 0555 executable; one inode each, so nothing a build does to it reaches the cache), and
    its bytes are kept in a pack: a second build places it from there with no fetch, and an
    entry of its own (for a Nix import) is made from there too."""
    files = {"a": b"alpha\n", "sub/b": b"beta\n", "tool": b"#!/bin/sh\n", "empty": b""}
    files["same"] = files["a"]
    files["edge"] = b"e" * PACKED_MAX
    assign = assign_of(files, executable=frozenset({"tool"}))
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery, {sha(d): d for d in files.values()})
        fetcher = fetcher_for(runner, tmp_path / "cache")
        await place_inputs(assign, tmp_path / "in1", fetcher)
        asked = len(runner.requests)
        await place_inputs(assign, tmp_path / "in2", fetcher)
        # a Nix import needs a file: made from the pack, not fetched
        [info] = [i for i in assign.inputs[0].files if i.path == "sub/b"]
        entry = await fetcher.fetch(assign, info)
        assert entry.read_bytes() == files["sub/b"]
    assert asked == len(set(files.values())) and len(runner.requests) == asked
    inodes = set()
    for build in ("in1", "in2"):
        for path, data in files.items():
            target = tmp_path / build / "dep" / path
            assert target.read_bytes() == data
            st = os.lstat(target)
            assert stat.S_IMODE(st.st_mode) == (0o555 if path == "tool" else 0o444)
            assert st.st_nlink == 1
            inodes.add(st.st_ino)
    assert len(inodes) == 2 * len(files)
    packs = sorted(p.name for p in (tmp_path / "cache" / "packs").iterdir())
    assert packs == ["0.idx", "0.pack"]
    made = [d for d in files.values() if fetcher.entries.path_of(sha(d)).exists()]
    assert made == [files["sub/b"]]


async def test_a_tampered_cache_entry_is_fetched_again_not_linked(tmp_path: Path) -> None:
    """A build that chmods and rewrites its $IN file (so the shared cache entry) does not
    poison the next build: the entry's changed ctime has it rehashed, found wrong, discarded
    and fetched again; an entry that was only linked and unlinked is rehashed and kept."""
    files = {"f": b"hello\n" * LARGE, "g": b"other\n" * LARGE}
    assign = assign_of(files)
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery, {sha(d): d for d in files.values()})
        fetcher = fetcher_for(runner, tmp_path / "cache")
        await place_inputs(assign, tmp_path / "in1", fetcher)
        tampered = tmp_path / "in1" / "dep" / "f"
        os.chmod(tampered, 0o644)
        tampered.write_bytes(b"evil!\n")
        os.chmod(tampered, 0o444)
        runner.requests.clear()
        await place_inputs(assign, tmp_path / "in2", fetcher)
    assert {r.sha256 for r in runner.requests} == {sha(files["f"])}
    assert fetcher.entries.discarded == 1
    for path, data in files.items():
        assert (tmp_path / "in2" / "dep" / path).read_bytes() == data
    assert fetcher.entries.path_of(sha(files["f"])).read_bytes() == files["f"]


async def test_a_small_input_changed_in_its_pack_is_fetched_again(tmp_path: Path) -> None:
    """A build that rewrites its small $IN file changes only its own copy; a packed blob
    changed in the pack (or a pack cut short) fails its hash when read: forgotten, fetched
    again, placed right."""
    files = {"f": b"hello\n", "g": b"other\n"}
    assign = assign_of(files)
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery, {sha(d): d for d in files.values()})
        fetcher = fetcher_for(runner, tmp_path / "cache")
        await place_inputs(assign, tmp_path / "in1", fetcher)
        mine = tmp_path / "in1" / "dep" / "f"
        os.chmod(mine, 0o644)
        mine.write_bytes(b"evil!\n")
        runner.requests.clear()
        await place_inputs(assign, tmp_path / "in2", fetcher)
        assert runner.requests == [] and fetcher.entries.packs.discarded == 0
        pack = tmp_path / "cache" / "packs" / "0.pack"
        os.chmod(pack, 0o644)
        with pack.open("r+b") as file:  # "hello" -> "jello", whichever blob is first
            file.write(b"j")
        await place_inputs(assign, tmp_path / "in3", fetcher)
    assert len(runner.requests) == 1 and fetcher.entries.packs.discarded == 1
    for path, data in files.items():
        assert (tmp_path / "in2" / "dep" / path).read_bytes() == data
        assert (tmp_path / "in3" / "dep" / path).read_bytes() == data


def test_packs_are_found_by_the_next_process_and_crash_leftovers_removed(tmp_path: Path) -> None:
    """A new process reads the index files: its packed blobs are there; a pack whose index
    was never written (a crash between the two) and an index without its pack are removed,
    a cut last line is skipped, and new packs never reuse a number."""
    root = tmp_path / "packs"
    first = InputPacks(root)
    blobs = [(sha(b"%d" % i), b"%d" % i) for i in range(5)]
    first.add(blobs[:3])
    first.add(blobs[3:])
    (root / "7.pack").write_bytes(b"orphan")
    (root / "8.idx").write_text(f"{blobs[0][0]} 0 1\n")
    (root / "².pack").write_bytes(b"")  # not a number of ours, nor the rest: left alone
    (root / "3.idx").mkdir()
    (root / "notes.txt").write_text("x")
    with (root / "1.idx").open("a") as index:
        index.write(f"{sha(b'cut')} 2")  # no newline: the write was cut
    again = InputPacks(root)
    assert all(again.has(sha256, len(data)) for sha256, data in blobs)
    assert not again.has(sha(b"cut"), 2) and not again.has(blobs[0][0], 2)
    assert again.read([s for s, _ in blobs] + [sha(b"x")]) == dict(blobs)
    left = sorted(p.name for p in root.iterdir())
    assert left == ["0.idx", "0.pack", "1.idx", "1.pack", "3.idx", "notes.txt", "².pack"]
    again.add([(sha(b"new"), b"new")])
    assert (root / "9.pack").read_bytes() == b"new"


def test_small_inputs_have_their_mode_whatever_the_umask(tmp_path: Path) -> None:
    """A build user reads its inputs as "other": an input placed by a builder running under
    a restrictive umask is still 0444 (0555 executable), small (a file of its own) or not
    (a link of its cache entry)."""
    data = b"contents\n"
    cache = InputCache(tmp_path / "cache")
    old = os.umask(0o077)
    try:
        cache.keep(
            [(sha(data), len(data), [data], [(False, tmp_path / "a"), (True, tmp_path / "x")])]
        )
        assert cache.place_packed([(sha(data), len(data), False, tmp_path / "b")]) == []
        large = b"L" * LARGE
        cache.reflinks = False
        cache.keep([(sha(large), len(large), [large], [(False, tmp_path / "l")])])
    finally:
        os.umask(old)
    names = ("a", "x", "b", "l")
    modes = {name: stat.S_IMODE(os.lstat(tmp_path / name).st_mode) for name in names}
    assert modes == {"a": 0o444, "x": 0o555, "b": 0o444, "l": 0o444}


def test_a_full_disk_while_small_inputs_are_kept_leaves_no_part_written_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk as a pack is written leaves neither it nor its index, and records nothing
    as packed; as a target is written, leaves no target: whatever ``close`` says."""
    cache = InputCache(tmp_path / "cache")
    data = b"contents\n"
    real_write, real_close = os.write, os.close
    failing = "packs"

    def write(fd: int, what: Any) -> int:
        if failing in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, what)

    def close(fd: int) -> None:
        where = os.readlink(f"/proc/self/fd/{fd}")
        real_close(fd)
        if failing in where:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "close", close)
    with pytest.raises(OSError, match="No space"):
        cache.keep([(sha(data), len(data), [data], [(False, tmp_path / "t")])])
    assert (tmp_path / "t").read_bytes() == data  # placed (in the build dir) before the pack
    assert list((tmp_path / "cache" / "packs").iterdir()) == []
    assert not cache.packs.has(sha(data), len(data))
    failing = "target"
    with pytest.raises(OSError, match="No space"):
        cache.keep([(sha(data), len(data), [data], [(False, tmp_path / "target")])])
    assert not (tmp_path / "target").exists()
    assert not cache.packs.has(sha(data), len(data))


async def test_an_unchanged_cache_entry_is_linked_without_rehashing(tmp_path: Path) -> None:
    """Placing the same inputs twice in one process links the verified entries again with
    no fetch and no rehash (its identity still matches)."""
    files = {f"f{i}": f"{i}\n".encode() for i in range(5)}
    assign = assign_of(files)
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery, {sha(d): d for d in files.values()})
        fetcher = fetcher_for(runner, tmp_path / "cache")
        await place_inputs(assign, tmp_path / "in1", fetcher)
        requests = len(runner.requests)
        await place_inputs(assign, tmp_path / "in2", fetcher)
    assert requests == 5 and len(runner.requests) == 5
    assert fetcher.entries.rehashed == 0


async def test_an_entry_left_part_written_by_a_killed_builder_is_written_anew(
    tmp_path: Path,
) -> None:
    """A small entry is written where it stays (no rename from ``tmp``): one a builder killed
    mid-write left there is not trusted by the next process: rehashed, removed and fetched
    again, whether it is found before the fetch or only as the entry is created."""
    files = {"f": b"complete contents\n", "g": b"other contents\n"}
    cache = InputCache(tmp_path / "cache")
    for data in files.values():
        entry = cache.path_of(sha(data))
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_bytes(data[:5])
        entry.chmod(0o444)
    assign = assign_of({"f": files["f"]})
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery, {sha(d): d for d in files.values()})
        fetcher = fetcher_for(runner, tmp_path / "cache")
        await place_inputs(assign, tmp_path / "in", fetcher)
    assert (tmp_path / "in" / "dep" / "f").read_bytes() == files["f"]
    assert [r.sha256 for r in runner.requests] == [sha(files["f"])]
    # found only as the entry is created (fetched while another process wrote it)
    data = files["g"]
    target = tmp_path / "g"
    cache.write(sha(data), len(data), [data], [(False, target)])
    assert target.read_bytes() == data == cache.path_of(sha(data)).read_bytes()
    assert cache.discarded == 1 and stat.S_IMODE(os.lstat(target).st_mode) == 0o444


def test_a_failed_write_of_a_small_entry_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (``write`` fails, and then ``close`` too, as it may on a full disk) removes
    the part-written entry: nothing is left for a later build to trust, nothing is placed."""
    real_close = os.close

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(fd: int) -> None:
        real_close(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = InputCache(tmp_path / "cache")
    data = b"contents\n"
    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(os, "close", close)
    with pytest.raises(OSError, match="No space"):
        cache.write(sha(data), len(data), [data], [(False, tmp_path / "t")])
    monkeypatch.undo()
    assert not cache.path_of(sha(data)).exists() and not (tmp_path / "t").exists()


async def test_a_pipelined_fetch_of_many_small_files_ends_with_all_of_them(
    tmp_path: Path,
) -> None:
    """3,000 small files (some sharing their contents) are fetched with several requests in
    flight, never more than the window, each content once, and every file is placed."""
    files = {f"d{i % 7}/f{i}": (b"%d\n" % (i % 2500)) * (i % 50) for i in range(3000)}
    assign = assign_of(files)
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery, {sha(d): d for d in files.values()})
        fetcher = fetcher_for(runner, tmp_path / "cache")
        with trio.fail_after(600):
            await place_inputs(assign, tmp_path / "in", fetcher)
    assert 1 < runner.most_in_flight <= SMALL_WINDOW
    assert len(runner.requests) == len(set(files.values()))
    for path, data in files.items():
        assert (tmp_path / "in" / "dep" / path).read_bytes() == data
    assert not list((tmp_path / "cache" / "tmp").glob("*"))


@pytest.mark.parametrize("many", [False, True])
async def test_the_first_small_fetches_go_out_before_every_content_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, many: bool
) -> None:
    """Which contents the cache lacks is checked a batch at a time as the fetches need more:
    with 3 batches to check, requests are in flight before the last batch is checked (not
    after 100,000 checks), one file per request or (1.7) many."""
    files = {f"f{i}": b"%d\n" % i for i in range(3 * CACHE_BATCH)}
    events: list[str] = []
    lacking = InputFetcher._lacking

    def checking(self: InputFetcher, contents: list[FileInfo]) -> list[FileInfo]:
        events.append("check")
        return lacking(self, contents)

    monkeypatch.setattr(InputFetcher, "_lacking", checking)
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery, {sha(d): d for d in files.values()})
        send = runner.send

        async def sending(message: Message) -> None:
            events.append("request")
            await send(message)

        runner.send = sending  # type: ignore[method-assign]
        fetcher = fetcher_for(runner, tmp_path / "cache")
        fetcher.many = many
        await place_inputs(assign_of(files), tmp_path / "in", fetcher)
    assert events.count("check") == 3
    assert events.index("request") < len(events) - 1 - events[::-1].index("check")
    for path, data in files.items():
        assert (tmp_path / "in" / "dep" / path).read_bytes() == data


async def test_a_runner_of_1_7_is_asked_for_many_small_files_per_request(tmp_path: Path) -> None:
    """(1.7) With a runner that takes ``FetchFiles``, 3,000 small files (some sharing their
    contents, some empty, one of 100 KiB) are asked for a group at a time, each group within
    the bounds, each content once, and every file is placed; bytes that do not match their
    hash fail the fetch."""
    files = {f"d{i % 7}/f{i}": (b"%d\n" % (i % 2500)) * (i % 50) for i in range(3000)}
    files["large"] = b"L" * (100 * 1024)
    assign = assign_of(files)
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery, {sha(d): d for d in files.values()})
        fetcher = fetcher_for(runner, tmp_path / "cache")
        fetcher.many = True
        with trio.fail_after(600):
            await place_inputs(assign, tmp_path / "in", fetcher)
    distinct = len(set(files.values()))
    assert not runner.requests
    assert distinct // FILES_PER_REQUEST <= len(runner.many) < distinct // 10
    asked = [sha256 for request in runner.many for sha256 in request.files]
    assert sorted(asked) == sorted(set(sha(d) for d in files.values()))
    by_sha = {sha(d): d for d in files.values()}
    for request in runner.many:
        size = sum(len(by_sha[sha256]) for sha256 in request.files)
        assert len(request.files) <= FILES_PER_REQUEST
        assert size <= FILES_REQUEST_BYTES or len(request.files) == 1
    for path, data in files.items():
        assert (tmp_path / "in" / "dep" / path).read_bytes() == data

    wrong = {"a": b"one\n", "b": b"two\n"}
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery, {sha(b"one\n"): b"two\n", sha(b"two\n"): b"one\n"})
        fetcher = fetcher_for(runner, tmp_path / "cache2")
        fetcher.many = True
        with pytest.raises(FetchError, match="sha256"):
            await place_inputs(assign_of(wrong), tmp_path / "in2", fetcher)
    assert not (tmp_path / "in2" / "dep" / "a").exists()


async def test_an_answer_to_fetch_files_longer_than_the_files_is_refused() -> None:
    """(1.7) The builder knows the files' sizes from its listing: an answer carrying more
    bytes than they add up to is refused (the session ends: a protocol violation), one that
    adds up is taken, and ends with its eof."""
    infos = [
        FileInfo(path=name, size=len(data), sha256=sha(data), executable=False)
        for name, data in (("a", b"one\n"), ("b", b"two\n"))
    ]
    arrived, _ = trio.open_memory_channel[Any](10)
    group = _SmallFetch(infos, 1, arrived, many=True)
    assert not group.deliver(FetchData(request_id=1, data=b"one\ntwo\n!", eof=True))
    assert group.deliver(FetchData(request_id=1, data=b"one\n"))
    assert not group.ended
    assert group.deliver(FetchData(request_id=1, data=b"two\n", eof=True))
    assert group.ended and [b"".join(c) for _, c in group.files()] == [b"one\n", b"two\n"]


async def test_a_fetched_small_file_is_not_held_in_memory_once_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a small file's answer brought is let go once its batch is in the cache, not kept
    until the last of the build's files has arrived (100,000 inputs of up to 256 KiB each
    would otherwise all be in the builder's memory at the end)."""
    files = {f"f{i}": b"%d\n" % i * 100 for i in range(2000)}
    written: list[weakref.ref[object]] = []
    held_after_writing: list[int] = []
    keep_small = InputFetcher._keep_small

    def keep_and_count(self: InputFetcher, batch: list[Any], targets: Any) -> None:
        gc.collect()
        held_after_writing.append(sum(ref() is not None for ref in written))
        keep_small(self, batch, targets)
        written.extend(weakref.ref(small) for small in batch)

    monkeypatch.setattr(InputFetcher, "_keep_small", keep_and_count)
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery, {sha(d): d for d in files.values()})
        fetcher = fetcher_for(runner, tmp_path / "cache")
        with trio.fail_after(600):
            await place_inputs(assign_of(files), tmp_path / "in", fetcher)
    assert len(held_after_writing) > 3
    # of the files already written, at most one is still referenced (the receiving loop's
    # variable for the last answer it took)
    assert max(held_after_writing) <= 1, held_after_writing
    assert (tmp_path / "in" / "dep" / "f1999").read_bytes() == files["f1999"]


async def test_a_stalled_small_fetch_times_out(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A small file whose answer never comes fails the fetch exactly ``fetch_timeout`` after
    it was asked for (nothing else runs meanwhile: no thread races the virtual deadline)."""
    files = {"stuck": b"never sent\n"}
    async with trio.open_nursery() as nursery:
        runner = Runner(nursery, {})
        runner.silent_for.add(sha(files["stuck"]))
        fetcher = fetcher_for(runner, tmp_path / "cache", timeout=30.0)
        with pytest.raises(FetchError, match="nothing received for 30 s"):
            await place_inputs(assign_of(files), tmp_path / "in", fetcher)
        assert trio.current_time() - runner.asked_at[sha(files["stuck"])] == pytest.approx(30.0)
    assert fetcher.deliver(FetchData(request_id=0, data=b"late", eof=True))  # dropped
    assert not list((tmp_path / "cache" / "tmp").glob("*"))
