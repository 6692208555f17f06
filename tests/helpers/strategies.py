"""Hypothesis strategies for every record and message type, shared by the protocol tests.

Written by hand per class (the validators' rules are not visible in the type hints);
``test_messages`` checks that ``RECORDS`` and ``MESSAGES`` cover every type the protocol defines.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

from hydra_trio.protocol import messages as m
from hydra_trio.protocol.validators import NONCE_MAX, NONCE_MIN

#: Enough examples to find shape bugs while keeping the suite at a few seconds; set
#: HYDRA_TRIO_EXAMPLES=5000 for a longer fuzzing run.
FAST = settings(max_examples=int(os.environ.get("HYDRA_TRIO_EXAMPLES", "60")), deadline=None)

text = st.text(max_size=12)
nonempty = st.text(min_size=1, max_size=12)
texts = st.lists(text, max_size=4)
counts = st.integers(0, 2**63 - 1)
small_counts = st.integers(0, 1000)
positive_ints = st.integers(1, 2**63 - 1)
#: seconds travel as msgpack ints or floats; both must survive the round trip unchanged.
seconds = st.floats(0, 1e9, allow_nan=False) | st.integers(0, 10**6)
positive = st.floats(1e-3, 1e9) | st.integers(1, 10**6)
#: normalised relative paths: no empty, "." or ".." component, no NUL.
paths = st.lists(
    st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=6).filter(
        lambda part: part not in (".", "..")
    ),
    min_size=1,
    max_size=3,
).map("/".join)
sha256 = st.text("0123456789abcdef", min_size=64, max_size=64)
data = st.binary(max_size=64)
str_maps = st.dictionaries(text, text, max_size=3)
float_maps = st.dictionaries(text, st.floats(-1e9, 1e9) | st.integers(-100, 100), max_size=3)

build_refs = st.builds(m.BuildRef, build_id=nonempty, attempt=small_counts)
file_infos = st.builds(
    m.FileInfo,
    path=paths,
    size=counts,
    sha256=sha256,
    executable=st.booleans(),
    link=text,
)
input_specs = st.builds(
    m.InputSpec,
    name=nonempty,
    build_id=nonempty,
    files=st.lists(file_infos, max_size=2),
    listed=st.booleans(),
)
limits = st.builds(
    m.Limits,
    timeout=st.none() | seconds,
    max_silent=st.none() | seconds,
    max_log_bytes=st.none() | counts,
    max_output_bytes=st.none() | counts,
)

RECORDS: dict[type[Any], st.SearchStrategy[Any]] = {
    m.BuildRef: build_refs,
    m.FileInfo: file_infos,
    m.InputSpec: input_specs,
    m.Limits: limits,
}

MESSAGES: dict[type[Any], st.SearchStrategy[Any]] = {
    m.Challenge: st.builds(
        m.Challenge,
        protocol_version=nonempty,
        nonce=st.binary(min_size=NONCE_MIN, max_size=NONCE_MAX),
        token_required=st.booleans(),
    ),
    m.Hello: st.builds(
        m.Hello,
        protocol_version=nonempty,
        machine_id=nonempty,
        hostname=nonempty,
        systems=texts,
        supported_features=texts,
        mandatory_features=texts,
        max_jobs=positive_ints,
        speed_factor=positive,
        ping_interval=positive,
        credentials=data,
    ),
    m.Welcome: st.builds(
        m.Welcome, protocol_version=nonempty, session_id=nonempty, builder_timeout=positive
    ),
    m.Reject: st.builds(m.Reject, code=nonempty, reason=text),
    m.Ping: st.builds(
        m.Ping,
        seq=counts,
        load=seconds,
        disk_free=counts,
        running=st.lists(build_refs, max_size=3),
    ),
    m.Pong: st.builds(m.Pong, seq=counts),
    m.Assign: st.builds(
        m.Assign,
        build_id=nonempty,
        attempt=counts,
        name=text,
        command=st.lists(text, min_size=1, max_size=4),
        env=str_maps,
        inputs=st.lists(input_specs, max_size=2),
        limits=limits,
    ),
    m.Abort: st.builds(m.Abort, build_id=nonempty, attempt=counts, reason=text),
    m.Progress: st.builds(
        m.Progress, build_id=nonempty, attempt=counts, phase=st.sampled_from(m.Phase)
    ),
    m.LogChunk: st.builds(m.LogChunk, build_id=nonempty, attempt=counts, data=data),
    m.Result: st.builds(
        m.Result,
        build_id=nonempty,
        attempt=counts,
        status=st.sampled_from(m.BuildStatus),
        exit_code=st.none() | st.integers(-(2**31), 2**31 - 1),
        timings=float_maps,
        outputs=st.lists(file_infos, max_size=2),
        error=text,
        listed_outputs=counts,
    ),
    m.Drain: st.builds(m.Drain, reason=text),
    m.Goodbye: st.builds(m.Goodbye, reason=text),
    m.FetchRequest: st.builds(
        m.FetchRequest,
        request_id=counts,
        build_id=nonempty,
        attempt=counts,
        sha256=sha256,
        offset=counts,
        length=positive_ints,
    ),
    m.FetchFiles: st.builds(
        m.FetchFiles,
        request_id=counts,
        build_id=nonempty,
        attempt=counts,
        files=st.lists(sha256, min_size=1, max_size=8).map(tuple),
    ),
    m.FetchData: st.builds(
        m.FetchData, request_id=counts, data=data, eof=st.booleans(), error=text
    ),
    m.UploadData: st.builds(
        m.UploadData,
        build_id=nonempty,
        attempt=counts,
        path=paths,
        offset=counts,
        data=data,
        eof=st.booleans(),
    ),
    m.UploadFiles: st.lists(st.tuples(paths, data), min_size=1, max_size=8).map(
        lambda files: m.UploadFiles(
            build_id="b1",
            attempt=2,
            paths=tuple(path for path, _ in files),
            data=tuple(content for _, content in files),
        )
    ),
    m.ListRequest: st.builds(
        m.ListRequest,
        request_id=counts,
        build_id=nonempty,
        attempt=counts,
        of=nonempty,
        start=counts,
    ),
    m.ListData: st.builds(
        m.ListData,
        request_id=counts,
        files=st.lists(file_infos, max_size=2),
        end=st.booleans(),
        error=text,
    ),
    m.OutputList: st.builds(
        m.OutputList, build_id=nonempty, attempt=counts, files=st.lists(file_infos, max_size=2)
    ),
}

#: Any valid message of any type.
any_message: st.SearchStrategy[m.Message] = st.one_of(*MESSAGES.values())


def messages_from(role: m.Role) -> st.SearchStrategy[m.Message]:
    """Any valid message that ``role`` may send (by ``SENDERS``)."""
    return st.one_of(*(s for cls, s in MESSAGES.items() if role in cls.SENDERS))


SHA_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

#: One valid instance of every message type, with every field set (used by table tests).
EXAMPLES: dict[type[Any], Any] = {
    m.Challenge: m.Challenge(protocol_version="1.0", nonce=bytes(range(32)), token_required=True),
    m.Hello: m.Hello(
        protocol_version="1.0",
        machine_id="m1",
        hostname="host1",
        systems=("x86_64-linux",),
        supported_features=("kvm",),
        mandatory_features=(),
        max_jobs=2,
        speed_factor=1.5,
        ping_interval=10.0,
        credentials=b"\x01\x02",
    ),
    m.Welcome: m.Welcome(protocol_version="1.0", session_id="s1", builder_timeout=30.0),
    m.Reject: m.Reject(code="auth-failed", reason="bad token"),
    m.Ping: m.Ping(
        seq=3, load=0.5, disk_free=1024, running=(m.BuildRef(build_id="b1", attempt=2),)
    ),
    m.Pong: m.Pong(seq=3),
    m.Assign: m.Assign(
        build_id="b1",
        attempt=2,
        name="hello",
        command=("sh", "-c", "echo hi > $OUT/x"),
        env={"A": "1"},
        inputs=(
            m.InputSpec(
                name="dep",
                build_id="b0",
                files=(m.FileInfo(path="x", size=0, sha256=SHA_EMPTY),),
            ),
        ),
        limits=m.Limits(timeout=60.0, max_silent=10, max_log_bytes=1000, max_output_bytes=None),
    ),
    m.Abort: m.Abort(build_id="b1", attempt=2, reason="cancelled"),
    m.Progress: m.Progress(build_id="b1", attempt=2, phase=m.Phase.BUILDING),
    m.LogChunk: m.LogChunk(build_id="b1", attempt=2, data=b"hi\n"),
    m.Result: m.Result(
        build_id="b1",
        attempt=2,
        status=m.BuildStatus.SUCCESS,
        exit_code=0,
        timings={"build": 0.25},
        outputs=(m.FileInfo(path="x", size=0, sha256=SHA_EMPTY, executable=True),),
        error="",
    ),
    m.Drain: m.Drain(reason="shutdown"),
    m.Goodbye: m.Goodbye(reason="bye"),
    m.FetchRequest: m.FetchRequest(
        request_id=1, build_id="b1", attempt=2, sha256=SHA_EMPTY, offset=0, length=65536
    ),
    m.FetchFiles: m.FetchFiles(request_id=2, build_id="b1", attempt=2, files=(SHA_EMPTY,)),
    m.FetchData: m.FetchData(request_id=1, data=b"abc", eof=True, error=""),
    m.UploadData: m.UploadData(
        build_id="b1", attempt=2, path="bin/x", offset=0, data=b"abc", eof=True
    ),
    m.UploadFiles: m.UploadFiles(
        build_id="b1", attempt=2, paths=("bin/x", "bin/y"), data=(b"abc", b"")
    ),
    m.ListRequest: m.ListRequest(request_id=3, build_id="b1", attempt=2, of="b0", start=1000),
    m.ListData: m.ListData(
        request_id=3, files=(m.FileInfo(path="x", size=0, sha256=SHA_EMPTY),), end=True
    ),
    m.OutputList: m.OutputList(
        build_id="b1", attempt=2, files=(m.FileInfo(path="y", size=0, sha256=SHA_EMPTY),)
    ),
}
