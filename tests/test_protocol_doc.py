"""docs/protocol.md stays true: its hex test vectors and message tables match the code."""

from __future__ import annotations

import ast
import hashlib
import hmac
import re
from pathlib import Path
from typing import Any

import attrs
import msgpack
import pytest

from hydra_trio import auth
from hydra_trio.protocol import codec
from hydra_trio.protocol import messages as m

DOC = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text(encoding="utf-8")

VECTOR = re.compile(
    r"^### Vector: (?P<name>\w+)\n.*?"
    r"```python\n(?P<wire>.*?)```\n.*?"
    r"```hex\n(?P<hex>.*?)```",
    re.DOTALL | re.MULTILINE,
)
VECTORS = {
    v["name"]: (ast.literal_eval(v["wire"]), bytes.fromhex(v["hex"])) for v in VECTOR.finditer(DOC)
}
PROOF_VECTOR = re.compile(
    r"^### Proof vector\n.*?```python\n(?P<inputs>.*?)```\n.*?```hex\n(?P<hex>.*?)```",
    re.DOTALL | re.MULTILINE,
)


def section(heading: str) -> str:
    """The text from a ``### `` heading that starts with ``heading`` to the next heading."""
    match = re.search(rf"^### {re.escape(heading)}.*?$(.*?)(?=^##)", DOC, re.DOTALL | re.MULTILINE)
    assert match is not None, f"docs/protocol.md has no section {heading!r}"
    return match.group(1)


def test_vectors_present() -> None:
    """The doc has vectors for Challenge, Hello, Welcome, Ping, Pong, Assign and Result."""
    assert set(VECTORS) >= {"Challenge", "Hello", "Welcome", "Ping", "Pong", "Assign", "Result"}


def test_proof_vector() -> None:
    """The documented proof is HMAC-SHA256(token, domain || nonce || machine id) of its
    documented inputs, the domain is auth.DOMAIN, and auth.prove computes the same bytes."""
    match = PROOF_VECTOR.search(DOC)
    assert match is not None, "docs/protocol.md has no proof vector"
    inputs = ast.literal_eval(match["inputs"])
    proof = bytes.fromhex(match["hex"])
    assert inputs["domain"] == auth.DOMAIN
    message = inputs["domain"] + inputs["nonce"] + inputs["machine_id"].encode("utf-8")
    assert hmac.new(inputs["token"], message, hashlib.sha256).digest() == proof
    assert auth.prove(inputs["token"], inputs["nonce"], inputs["machine_id"]) == proof
    assert inputs["nonce"] == VECTORS["Challenge"][0]["nonce"]  # "the challenge above"


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_decodes_to_documented_message(name: str) -> None:
    """Each hex frame decodes to the message its wire map documents, of the named type."""
    wire, frame = VECTORS[name]
    decoder = codec.FrameDecoder()
    (decoded,) = decoder.feed(frame)
    assert decoder.buffered == 0
    assert type(decoded).__name__ == name
    assert decoded == m.from_wire(wire)
    assert msgpack.unpackb(frame[4:], raw=False) == wire
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_reencodes_to_the_same_bytes(name: str) -> None:
    """Encoding the documented message gives exactly the documented bytes."""
    wire, frame = VECTORS[name]
    assert codec.encode(m.from_wire(wire)) == frame
    assert m.to_wire(m.from_wire(wire)) == wire


@pytest.mark.parametrize("cls", m.MESSAGE_TYPES, ids=lambda c: c.TAG)
def test_every_message_documented(cls: type[m.Message]) -> None:
    """Each message has a section naming its tag, class and direction, listing every field."""
    text = section(f"`{cls.TAG}` (`{cls.__name__}`)")
    heading = re.search(rf"^### `{re.escape(cls.TAG)}` \(`{cls.__name__}`\): (\S+)$", DOC, re.M)
    assert heading is not None
    direction = {
        frozenset({m.Role.BUILDER}): "B→R",
        frozenset({m.Role.RUNNER}): "R→B",
        frozenset({m.Role.BUILDER, m.Role.RUNNER}): "both",
    }[cls.SENDERS]
    assert heading.group(1) == direction
    documented = re.findall(r"^\| `(\w+)` \|", text, re.M)
    assert documented == [f.name for f in attrs.fields(cls)]
    for row in re.findall(r"^\| `\w+` \|.*$", text, re.M):
        field = attrs.fields_dict(cls)[row.split("`")[1]]
        # | field | type | default | meaning |, where a type may hold an escaped "\|"; only the
        # default column counts (a field may be named `token_required`)
        default = re.split(r"(?<!\\)\|", row)[3]
        assert ("required" in default) == (field.default is attrs.NOTHING), row


@pytest.mark.parametrize("cls", m.RECORD_TYPES, ids=lambda c: c.__name__)
def test_every_record_documented(cls: type[Any]) -> None:
    """Each record has a section listing its fields in order."""
    text = section(f"`{cls.__name__}`")
    assert re.findall(r"^\| `(\w+)` \|", text, re.M) == [f.name for f in attrs.fields(cls)]


def test_enumerations_documented() -> None:
    """Every Phase and BuildStatus value appears in the doc; infrastructure ones are marked."""
    for phase in m.Phase:
        assert f"`{phase.value}`" in DOC
    for status in m.BuildStatus:
        row = re.search(rf"^\| `{re.escape(status.value)}` \|.*\|(.*)\|$", DOC, re.M)
        assert row is not None, status
        assert ("yes" in row.group(1)) == status.is_infrastructure


def test_version_documented() -> None:
    """The doc's title names the protocol version the code speaks."""
    assert DOC.startswith(f"# The hydra-trio wire protocol, version {m.PROTOCOL_VERSION}\n")
