"""Message and record types: round trips, shape checks on received maps, version rules."""

from __future__ import annotations

import copy
from typing import Any

import attrs
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hydra_trio.protocol import messages as m
from hydra_trio.protocol.errors import RemoteProtocolError
from hydra_trio.protocol.validators import MAX_STRING, is_relative_path

from .helpers.strategies import EXAMPLES, FAST, MESSAGES, RECORDS, SHA_EMPTY, any_message

PLAIN = (dict, list, str, bytes, int, float, bool, type(None))

#: The message type that carries each record, and how to wrap one record in it.
CARRIERS: dict[type[Any], Any] = {
    m.BuildRef: lambda r: m.Ping(seq=0, running=(r,)),
    m.FileInfo: lambda r: attrs.evolve(EXAMPLES[m.Result], outputs=(r,)),
    m.InputSpec: lambda r: attrs.evolve(EXAMPLES[m.Assign], inputs=(r,)),
    m.Limits: lambda r: attrs.evolve(EXAMPLES[m.Assign], limits=r),
}


def wire(cls: type[Any], **changes: Any) -> dict[str, Any]:
    """The wire map of ``cls``'s example, with some keys replaced (a deep copy)."""
    raw = copy.deepcopy(m.to_wire(EXAMPLES[cls]))
    raw.update(changes)
    return raw


def assert_plain(value: object) -> None:
    assert isinstance(value, PLAIN), value
    if isinstance(value, dict):
        for k, item in value.items():
            assert type(k) is str
            assert_plain(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain(item)


def required(cls: type[Any]) -> list[str]:
    return [f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING]


def test_strategies_cover_every_type() -> None:
    """The strategies and examples cover exactly the protocol's message and record types."""
    assert set(MESSAGES) == set(m.MESSAGE_TYPES) == set(EXAMPLES)
    assert set(RECORDS) == set(m.RECORD_TYPES) == set(CARRIERS)
    assert set(m.BY_TAG) == {cls.TAG for cls in m.MESSAGE_TYPES}
    assert len(m.BY_TAG) == len(m.MESSAGE_TYPES)


@FAST
@given(any_message)
def test_every_message_round_trips(message: m.Message) -> None:
    """from_wire(to_wire(msg)) == msg for arbitrary valid instances of every message type."""
    raw = m.to_wire(message)
    assert raw["type"] == message.TAG
    assert type(m.from_wire(raw)) is type(message)
    assert m.from_wire(raw) == message


@FAST
@given(any_message)
def test_wire_map_is_plain_msgpack(message: m.Message) -> None:
    """to_wire yields only plain msgpack types and survives a real msgpack round trip."""
    raw = m.to_wire(message)
    assert_plain(raw)
    packed = msgpack.packb(raw, use_bin_type=True)
    assert m.from_wire(msgpack.unpackb(packed, raw=False)) == message


@FAST
@given(st.data())
def test_every_record_round_trips(data: st.DataObject) -> None:
    """Every record type round-trips nested inside the message that carries it."""
    kind = data.draw(st.sampled_from(sorted(RECORDS, key=lambda c: c.__name__)))
    record = data.draw(RECORDS[kind])
    message = CARRIERS[kind](record)
    assert m.from_wire(m.to_wire(message)) == message


@pytest.mark.parametrize("cls", m.MESSAGE_TYPES, ids=lambda c: c.TAG)
def test_example_round_trips(cls: type[Any]) -> None:
    """The fully populated example of every type round-trips."""
    assert m.from_wire(m.to_wire(EXAMPLES[cls])) == EXAMPLES[cls]


@pytest.mark.parametrize(
    ("cls", "name"),
    [(cls, name) for cls in m.MESSAGE_TYPES for name in required(cls)],
    ids=lambda x: x if isinstance(x, str) else x.TAG,
)
def test_missing_required_field_is_named(cls: type[Any], name: str) -> None:
    """A frame without a required field is refused, naming the message and the field."""
    raw = wire(cls)
    del raw[name]
    with pytest.raises(RemoteProtocolError, match=f"^{cls.TAG}: missing field '{name}'$"):
        m.from_wire(raw)


@pytest.mark.parametrize("cls", m.MESSAGE_TYPES, ids=lambda c: c.TAG)
def test_optional_fields_take_their_defaults(cls: type[Any]) -> None:
    """A frame carrying only the required fields decodes with every default applied."""
    raw = {"type": cls.TAG, **{n: v for n, v in wire(cls).items() if n in required(cls)}}
    assert m.from_wire(raw) == cls(**{n: getattr(EXAMPLES[cls], n) for n in required(cls)})


@pytest.mark.parametrize(
    ("cls", "name"),
    [(cls, f.name) for cls in m.MESSAGE_TYPES for f in attrs.fields(cls)],
    ids=lambda x: x if isinstance(x, str) else x.TAG,
)
def test_wrong_type_is_named(cls: type[Any], name: str) -> None:
    """A field of the wrong type (a list of floats fits no field) is refused, naming it."""
    with pytest.raises(RemoteProtocolError, match=rf"^{cls.TAG}\.{name}: "):
        m.from_wire(wire(cls, **{name: [1.5]}))


SHAPES = [
    ("negative-attempt", m.Assign, {"attempt": -1}, "assign.attempt: must not be negative"),
    ("negative-seq", m.Ping, {"seq": -5}, "ping.seq: must not be negative"),
    ("negative-offset", m.UploadData, {"offset": -1}, "upload.offset: must not be negative"),
    ("count-too-large", m.Pong, {"seq": 2**63}, "pong.seq: too large"),
    ("str-for-bytes", m.LogChunk, {"data": "hi"}, "log.data: expected bytes, got str"),
    ("str-for-credentials", m.Hello, {"credentials": "t"}, "hello.credentials: expected bytes"),
    ("bytes-for-str", m.Hello, {"machine_id": b"m1"}, "hello.machine_id: expected a string"),
    ("short-nonce", m.Challenge, {"nonce": bytes(15)}, "challenge.nonce: expected 16 to 64"),
    ("long-nonce", m.Challenge, {"nonce": bytes(65)}, "challenge.nonce: expected 16 to 64"),
    ("str-for-nonce", m.Challenge, {"nonce": "n" * 32}, "challenge.nonce: expected bytes"),
    ("int-for-flag", m.Challenge, {"token_required": 1}, "challenge.token_required: expected a"),
    ("bool-for-int", m.Ping, {"seq": True}, "ping.seq: expected an integer, got bool"),
    ("bool-for-attempt", m.Abort, {"attempt": False}, "abort.attempt: expected an integer"),
    ("bool-for-number", m.Hello, {"speed_factor": True}, "hello.speed_factor: expected a number"),
    ("int-for-bool", m.FetchData, {"eof": 1}, "fetch-data.eof: expected a boolean, got int"),
    ("float-for-int", m.Hello, {"max_jobs": 2.0}, "hello.max_jobs: expected an integer"),
    ("zero-max-jobs", m.Hello, {"max_jobs": 0}, "hello.max_jobs: must be positive"),
    ("zero-timeout", m.Welcome, {"builder_timeout": 0}, "welcome.builder_timeout: must be pos"),
    ("nan-load", m.Ping, {"load": float("nan")}, "ping.load: must be a finite"),
    ("inf-interval", m.Hello, {"ping_interval": float("inf")}, "hello.ping_interval: must be"),
    ("empty-id", m.Abort, {"build_id": ""}, "abort.build_id: must not be empty"),
    ("empty-command", m.Assign, {"command": []}, "assign.command: must not be empty"),
    ("int-in-command", m.Assign, {"command": ["sh", 1]}, "assign.command: every item must be"),
    ("unknown-phase", m.Progress, {"phase": "compiling"}, "progress.phase: expected a Phase"),
    ("unknown-status", m.Result, {"status": "ok"}, "result.status: expected a BuildStatus"),
    ("exit-code-range", m.Result, {"exit_code": 2**40}, "result.exit_code: out of range"),
    ("env-int-value", m.Assign, {"env": {"A": 1}}, "assign.env: keys and values must be strings"),
    ("env-not-map", m.Assign, {"env": ["A"]}, "assign.env: expected a map, got list"),
    ("timing-str", m.Result, {"timings": {"build": "1"}}, "result.timings: keys must be strings"),
    ("bad-sha", m.FetchRequest, {"sha256": "ABC"}, "fetch.sha256: expected 64 lowercase hex"),
    ("upper-sha", m.FetchRequest, {"sha256": "A" * 64}, "fetch.sha256: expected 64 lowercase"),
    ("no-paths", m.UploadFiles, {"paths": [], "data": []}, "upload-files.paths: from 1 to 256"),
    ("bad-path", m.UploadFiles, {"paths": ["../x"], "data": [b""]}, "upload-files.paths: every"),
    (
        "short-data",
        m.UploadFiles,
        {"paths": ["a", "b"], "data": [b""]},
        "upload-files.data: 1 items",
    ),
    ("no-files", m.FetchFiles, {"files": []}, "fetch-files.files: from 1 to 256 hashes, got 0"),
    ("bad-files", m.FetchFiles, {"files": ["ab"]}, "fetch-files.files: every item must be 64"),
    ("many-files", m.FetchFiles, {"files": ["0" * 64] * 257}, "fetch-files.files: from 1 to 256"),
    ("limits-not-map", m.Assign, {"limits": 5}, "assign.limits: expected a Limits"),
    ("limits-field", m.Assign, {"limits": {"timeout": -1}}, "Limits.timeout: must be a finite"),
    ("record-not-map", m.Ping, {"running": [1]}, "ping.running: every item must be a BuildRef"),
    ("records-not-list", m.Ping, {"running": {}}, "ping.running: expected a list, got dict"),
    (
        "record-missing",
        m.Ping,
        {"running": [{"build_id": "b"}]},
        "BuildRef: missing field 'attempt'",
    ),
    (
        "record-negative-size",
        m.Result,
        {"outputs": [{"path": "x", "size": -1, "sha256": SHA_EMPTY}]},
        "FileInfo.size: must not be negative",
    ),
    (
        "record-in-record",
        m.Assign,
        {"inputs": [{"name": "n", "build_id": "b", "files": [{"path": "x", "size": 1}]}]},
        "FileInfo: missing field 'sha256'",
    ),
    (
        "record-bool-link",
        m.Result,
        {"outputs": [{"path": "x", "size": 1, "sha256": SHA_EMPTY, "link": True}]},
        "FileInfo.link: expected a string, got bool",
    ),
]


@pytest.mark.parametrize(
    ("cls", "changes", "message"), [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES]
)
def test_wrong_shape_is_named(cls: type[Any], changes: dict[str, Any], message: str) -> None:
    """A field of the wrong shape is refused with a message naming the field."""
    with pytest.raises(RemoteProtocolError) as info:
        m.from_wire(wire(cls, **changes))
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "frame is a list, not a map"),
        (7, "frame is a int, not a map"),
        (None, "frame is a NoneType, not a map"),
        (b"ping", "frame is a bytes, not a map"),
        ({}, "unknown message type None"),
        ({"seq": 1}, "unknown message type None"),
        ({"type": "pang", "seq": 1}, "unknown message type 'pang'"),
        ({"type": b"pong", "seq": 1}, "unknown message type b'pong'"),
        ({"type": ["pong"], "seq": 1}, "unknown message type ['pong']"),
        ({"type": "Pong", "seq": 1}, "unknown message type 'Pong'"),
    ],
    ids=[
        "list",
        "int",
        "nil",
        "bytes",
        "empty",
        "no-tag",
        "unknown",
        "bin-tag",
        "list-tag",
        "case",
    ],
)
def test_bad_frame_or_tag_is_refused(raw: object, message: str) -> None:
    """A frame that is not a map, or has no known string tag, is refused."""
    with pytest.raises(RemoteProtocolError) as info:
        m.from_wire(raw)
    assert str(info.value) == message


@FAST
@given(
    any_message,
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.none() | st.integers() | st.text(max_size=4) | st.lists(st.integers(), max_size=2),
        max_size=4,
    ),
)
def test_unknown_keys_are_ignored(message: m.Message, extra: dict[str, Any]) -> None:
    """Keys a receiver does not know are ignored (a newer minor version may add fields)."""
    raw = m.to_wire(message)
    known = set(raw)
    raw.update({k: val for k, val in extra.items() if k not in known})
    assert m.from_wire(raw) == message


def test_unknown_keys_in_records_are_ignored() -> None:
    """Unknown keys inside a nested record are ignored too."""
    raw = wire(m.Ping, running=[{"build_id": "b", "attempt": 1, "priority": 9}])
    decoded = m.from_wire(raw)
    assert isinstance(decoded, m.Ping)
    assert decoded.running == (m.BuildRef(build_id="b", attempt=1),)


def test_local_construction_checks_fields() -> None:
    """Building a message locally with a bad field raises ValueError naming the field."""
    with pytest.raises(ValueError, match=r"^attempt: must not be negative"):
        m.Abort(build_id="b", attempt=-1)
    with pytest.raises(ValueError, match=r"^running: every item must be a BuildRef"):
        m.Ping(seq=0, running=({"build_id": "b", "attempt": 0},))


def test_lists_become_tuples() -> None:
    """List fields given as lists are stored as tuples, so a decoded message is immutable."""
    decoded = m.from_wire(wire(m.Hello, systems=["a", "b"]))
    assert isinstance(decoded, m.Hello)
    assert decoded.systems == ("a", "b")
    assert m.Ping(seq=1, running=[m.BuildRef(build_id="b", attempt=0)]).running == (
        m.BuildRef(build_id="b", attempt=0),
    )


def test_senders_are_one_direction_except_drain_and_goodbye() -> None:
    """Only Drain and Goodbye may travel both ways; every other message has one sender."""
    both = {cls for cls in m.MESSAGE_TYPES if len(cls.SENDERS) == 2}
    assert both == {m.Drain, m.Goodbye}
    assert {m.Role.BUILDER} == m.Hello.SENDERS
    assert {m.Role.RUNNER} == m.Assign.SENDERS


def test_infrastructure_statuses() -> None:
    """Exactly the four farm-caused statuses count as infrastructure failures."""
    infra = {s for s in m.BuildStatus if s.is_infrastructure}
    assert infra == {
        m.BuildStatus.BUILDER_LOST,
        m.BuildStatus.FETCH_FAILED,
        m.BuildStatus.UPLOAD_FAILED,
        m.BuildStatus.INTERNAL_ERROR,
    }


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("1.0", (1, 0)),
        ("2.17", (2, 17)),
        ("01.002", (1, 2)),
        ("1", None),
        ("1.", None),
        (".1", None),
        ("1.0.0", None),
        ("1.x", None),
        (" 1.0", None),
        ("-1.0", None),
        ("v1.0", None),
        ("", None),
        ("\u00b2.0", None),  # superscript two: isdigit() but not a number int() reads
        ("\u0661.0", None),  # Arabic-Indic one
        ("1" * 5000 + ".0", None),  # past int()'s digit limit
    ],
)
def test_parse_version(text: str, parsed: tuple[int, int] | None) -> None:
    """parse_version accepts only ASCII MAJOR.MINOR and never raises."""
    assert m.parse_version(text) == parsed


@pytest.mark.parametrize(
    ("ours", "theirs", "ok"),
    [
        ("1.0", "1.0", True),
        ("1.0", "1.9", True),
        ("1.5", "1.0", True),
        ("1.0", "2.0", False),
        ("2.0", "1.0", False),
        ("1.0", "1", False),
        ("1.0", "one.zero", False),
        ("1.0", "\u00b2.0", False),
    ],
)
def test_compatible(ours: str, theirs: str, ok: bool) -> None:
    """Versions are compatible exactly when both parse and their majors are equal."""
    assert m.compatible(ours, theirs) is ok


@FAST
@given(st.text(max_size=12), st.text(max_size=12))
def test_compatible_never_raises_and_is_symmetric(a: str, b: str) -> None:
    """compatible() never raises on any peer string, and is symmetric."""
    assert m.compatible(a, b) == m.compatible(b, a)
    pa, pb = m.parse_version(a), m.parse_version(b)
    assert m.compatible(a, b) == (pa is not None and pb is not None and pa[0] == pb[0])


@FAST
@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_same_major_is_compatible(major: int, minor_a: int, minor_b: int) -> None:
    """Any two versions with the same major are compatible; a different major is not."""
    assert m.compatible(f"{major}.{minor_a}", f"{major}.{minor_b}")
    assert not m.compatible(f"{major}.{minor_a}", f"{major + 1}.{minor_a}")


def test_our_version_parses() -> None:
    """PROTOCOL_VERSION is itself a valid MAJOR.MINOR."""
    assert m.parse_version(m.PROTOCOL_VERSION) is not None
    assert m.compatible(m.PROTOCOL_VERSION, m.PROTOCOL_VERSION)


def _split_check(value: str) -> bool:
    """``is_relative_path`` as it was first written: the components, one by one."""
    parts = value.split("/")
    return bool(value) and "\0" not in value and not any(p in ("", ".", "..") for p in parts)


@FAST
@given(st.text(alphabet="a./\0é", max_size=14))
def test_the_relative_path_check_is_the_check_of_each_component(value: str) -> None:
    """The substring form of ``is_relative_path`` refuses exactly the paths with an empty,
    ``.`` or ``..`` component, or a NUL."""
    assert is_relative_path(value) == _split_check(value)


def test_a_file_info_found_by_a_scan_is_the_checked_one_or_refused() -> None:
    """``FileInfo.found`` (the builder's scan, validators skipped) makes the record the
    checked constructor makes; a path past the string limit is refused as it would be."""
    sha = "ab" * 32
    found = m.FileInfo.found("d/f", 3, sha, True)
    assert found == m.FileInfo(path="d/f", size=3, sha256=sha, executable=True)
    assert m._decode_record(m.FileInfo, msgpack.unpackb(msgpack.packb(m._to_plain(found)))) == found
    with pytest.raises(ValueError, match="longer than"):
        m.FileInfo.found("d/" + "x" * MAX_STRING, 3, sha, False)
