"""Field validators for the message classes: the single place where field shapes are checked.

Each validator raises ``ValueError("<field>: <what is wrong>")``; ``messages.from_wire`` turns
that into a ``RemoteProtocolError`` naming the message too.  Types are checked exactly (``type(x)
is int``, so ``True`` is not an integer and a subclass cannot sneak in).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import attrs

# Limits against abuse: a peer cannot make us hold arbitrarily large structures even inside one
# frame (the frame size limit bounds bytes, these bound the count of items we build objects for).
MAX_STRING = 64 * 1024
MAX_LIST = 100_000

Validator = Callable[[object, "attrs.Attribute[Any]", object], None]


def type_name(value: object) -> str:
    return type(value).__name__


def check_str(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not str:
        raise ValueError(f"{attr.name}: expected a string, got {type_name(value)}")
    if len(value) > MAX_STRING:
        raise ValueError(f"{attr.name}: string longer than {MAX_STRING} characters")
    if not value.isascii() and not encodable(value):
        raise ValueError(f"{attr.name}: not valid Unicode text (a lone surrogate)")


def encodable(text: str) -> bool:
    """Whether ``text`` is UTF-8 encodable: no lone surrogates, as ``os.fsdecode`` makes from
    file names that are not UTF-8, or JSON ``"\\ud800"`` can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_nonempty_str(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    check_str(inst, attr, value)
    if not value:
        raise ValueError(f"{attr.name}: must not be empty")


def check_relative_path(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    """A path inside a build's ``$OUT``/``$IN``: relative, ``/``-separated, already normalised,
    with no ``..``, ``.`` or empty component and no NUL.  Files from builders are untrusted;
    this keeps every path under the directory it is placed in."""
    check_nonempty_str(inst, attr, value)
    assert isinstance(value, str)
    if not is_relative_path(value):
        raise ValueError(f"{attr.name}: {value!r} is not a normalised relative path")


def is_relative_path(value: str) -> bool:
    """Whether ``value`` is a non-empty, relative, normalised ``/``-separated path: no
    ``..``, ``.`` or empty component (so not absolute and no ``//``) and no NUL.  Joined to a
    directory, such a path names something inside it, unless one of its components there is
    a symbolic link (which the code that places files must refuse to go through)."""
    if not value or "\0" in value:
        return False
    # each component between slashes, with a slash each side: an empty, "." or ".." one shows
    # as "//", "/./" or "/../" (substring searches in C: every path of a listing comes here)
    framed = f"/{value}/"
    return "//" not in framed and "/./" not in framed and "/../" not in framed


def is_path_component(value: str) -> bool:
    """Whether ``value`` is one normalised path component: a file name, never a path."""
    return "/" not in value and is_relative_path(value)


def tree_conflict(paths: Iterable[str]) -> str | None:
    """Why ``paths`` cannot all be placed in one directory as files (or links), or None.

    Each must be a normalised relative path (``is_relative_path``), none may appear twice,
    and none may be inside another: a path used as a file and as a directory would make the
    code placing them write through whatever the first one is (a link, above all).  Runs in
    time linear in the total length of the paths, whatever their shape."""
    root: dict[str, Any] = {}
    for path in paths:
        if not is_relative_path(path):
            return f"{path[:200]!r} is not a normalised relative path"
        node = root
        parts = path.split("/")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is _LEAF:
                inside = "/".join(parts[: depth + 1])
                return f"{path[:200]!r} is inside {inside[:200]!r}, which is a file or link"
            node = child
        if parts[-1] in node:
            what = "listed twice" if node[parts[-1]] is _LEAF else "both a file and a directory"
            return f"{path[:200]!r} is {what}"
        node[parts[-1]] = _LEAF
    return None


#: marks a file (or link) in ``tree_conflict``'s tree of directories.
_LEAF = object()


def check_bytes(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not bytes:
        raise ValueError(f"{attr.name}: expected bytes, got {type_name(value)}")


#: Bounds on a challenge nonce: long enough never to repeat, short enough to be cheap.
NONCE_MIN, NONCE_MAX = 16, 64


def check_nonce(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    check_bytes(inst, attr, value)
    assert isinstance(value, bytes)
    if not NONCE_MIN <= len(value) <= NONCE_MAX:
        raise ValueError(
            f"{attr.name}: expected {NONCE_MIN} to {NONCE_MAX} bytes, got {len(value)}"
        )


def check_bool(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not bool:
        raise ValueError(f"{attr.name}: expected a boolean, got {type_name(value)}")


def check_count(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    """A non-negative integer (sizes, sequence numbers, attempts)."""
    if type(value) is not int:
        raise ValueError(f"{attr.name}: expected an integer, got {type_name(value)}")
    if value < 0:
        raise ValueError(f"{attr.name}: must not be negative, got {value}")
    if value >= 2**63:
        raise ValueError(f"{attr.name}: too large")


def check_int_or_none(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if type(value) is not int:
        raise ValueError(f"{attr.name}: expected an integer or nil, got {type_name(value)}")
    if not -(2**31) <= value < 2**31:
        raise ValueError(f"{attr.name}: out of range")


def check_seconds(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    """A finite, non-negative number of seconds (int or float on the wire)."""
    if type(value) is not float and type(value) is not int:
        raise ValueError(f"{attr.name}: expected a number, got {type_name(value)}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{attr.name}: must be a finite non-negative number, got {value}")


def check_seconds_or_none(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        check_seconds(inst, attr, value)


def check_positive_number(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    check_seconds(inst, attr, value)
    if value == 0:
        raise ValueError(f"{attr.name}: must be positive")


def check_positive_int(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    check_count(inst, attr, value)
    if value == 0:
        raise ValueError(f"{attr.name}: must be positive")


def check_count_or_none(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        check_count(inst, attr, value)


def check_list(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not tuple:
        raise ValueError(f"{attr.name}: expected a list, got {type_name(value)}")
    if len(value) > MAX_LIST:
        raise ValueError(f"{attr.name}: more than {MAX_LIST} items")


def check_str_tuple(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    check_list(inst, attr, value)
    assert isinstance(value, tuple)
    for item in value:
        if type(item) is not str or len(item) > MAX_STRING:
            raise ValueError(f"{attr.name}: every item must be a string, got {type_name(item)}")
        if not item.isascii() and not encodable(item):
            raise ValueError(f"{attr.name}: not valid Unicode text (a lone surrogate)")


def check_str_map(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not dict:
        raise ValueError(f"{attr.name}: expected a map, got {type_name(value)}")
    if len(value) > MAX_LIST:
        raise ValueError(f"{attr.name}: more than {MAX_LIST} entries")
    for k, v in value.items():
        if type(k) is not str or type(v) is not str:
            raise ValueError(f"{attr.name}: keys and values must be strings")
        if not (k.isascii() and v.isascii()) and not (encodable(k) and encodable(v)):
            raise ValueError(f"{attr.name}: not valid Unicode text (a lone surrogate)")


def check_float_map(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not dict:
        raise ValueError(f"{attr.name}: expected a map, got {type_name(value)}")
    if len(value) > MAX_LIST:
        raise ValueError(f"{attr.name}: more than {MAX_LIST} entries")
    for k, v in value.items():
        if type(k) is not str or not (type(v) is float or type(v) is int):
            raise ValueError(f"{attr.name}: keys must be strings and values numbers")
        if not math.isfinite(v):
            raise ValueError(f"{attr.name}: values must be finite")


def records_of(record: type[Any]) -> Validator:
    def check(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
        if type(value) is not tuple or len(value) > MAX_LIST:
            check_list(inst, attr, value)  # raises, saying which
        assert isinstance(value, tuple)
        for item in value:
            if type(item) is not record:
                raise ValueError(f"{attr.name}: every item must be a {record.__name__}")

    return check


def exactly(kind: type[Any]) -> Validator:
    """A value of exactly this type (a record or an enum)."""

    def check(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
        if type(value) is not kind:
            raise ValueError(f"{attr.name}: expected a {kind.__name__}")

    return check


def sha256_hex(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    check_str(inst, attr, value)
    assert isinstance(value, str)
    if not is_sha256(value):
        raise ValueError(f"{attr.name}: expected 64 lowercase hex digits")


def is_sha256(value: str) -> bool:
    """Whether ``value`` is a SHA-256 as the protocol writes it: 64 lowercase hex digits."""
    return len(value) == 64 and not value.strip("0123456789abcdef")


def check_sha256_tuple(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    check_list(inst, attr, value)
    assert isinstance(value, tuple)
    for item in value:
        if type(item) is not str or not is_sha256(item):
            raise ValueError(f"{attr.name}: every item must be 64 lowercase hex digits")


def check_path_tuple(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    check_list(inst, attr, value)
    assert isinstance(value, tuple)
    for item in value:
        if type(item) is not str or len(item) > MAX_STRING or not is_relative_path(item):
            raise ValueError(f"{attr.name}: every item must be a normalised relative path")
        if not item.isascii() and not encodable(item):
            raise ValueError(f"{attr.name}: not valid Unicode text (a lone surrogate)")


def check_bytes_tuple(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    check_list(inst, attr, value)
    assert isinstance(value, tuple)
    for item in value:
        if type(item) is not bytes:
            raise ValueError(f"{attr.name}: every item must be bytes, got {type_name(item)}")


def as_tuple(value: Any) -> Any:
    """Converter: lists become tuples, so frozen messages are deeply immutable and hashable."""
    return tuple(value) if type(value) is list else value
