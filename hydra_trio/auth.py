"""The shared secret: reading a token file, and the challenge-response that proves it.

A builder never sends the token itself.  The runner opens every connection with a
``Challenge`` carrying a fresh random nonce; the builder answers in its ``Hello`` with
``HMAC-SHA256(token, DOMAIN || nonce || machine id)``.  A passive listener on a plain-TCP link
sees only a nonce and an HMAC bound to that nonce: replaying it on another connection fails,
because that connection has another nonce.  The runner compares in constant time.

HTTP clients send the token itself as ``Authorization: Bearer <token>``; over a link that is
not trusted, put the HTTP port behind TLS (docs/deploy.md).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from hydra_trio.protocol.errors import HydraTrioError

log = logging.getLogger("hydra_trio.auth")

#: Binds the proof to this use, so an HMAC computed with the same token for anything else can
#: never pass as a builder's proof.
DOMAIN = b"hydra-trio builder auth v1\x00"
NONCE_BYTES = 32
#: Longer token files are refused: a token is a line, and this keeps a wrong path (a log, a
#: disk image) from being read whole.
MAX_TOKEN_BYTES = 4096


class TokenFileError(HydraTrioError):
    """A token file that cannot be used, with a message that says why."""


def load_token(path: str | os.PathLike[str]) -> bytes:
    """The secret in ``path``: its first line, without surrounding whitespace.

    Warns when the file can be read by its group or others (the token is a password).
    Raises ``TokenFileError`` for a missing, unreadable, oversized or empty file.
    """
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise TokenFileError(f"token file {path}: not a regular file")
        if info.st_size > MAX_TOKEN_BYTES:
            raise TokenFileError(f"token file {path}: larger than {MAX_TOKEN_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise TokenFileError(f"token file {path}: {exc.strerror or exc}") from None
    lines = data.strip().splitlines()
    token = lines[0].strip() if lines else b""
    if not token:
        raise TokenFileError(f"token file {path}: empty")
    if not (token.isascii() and token.decode("ascii").isprintable()):
        # HTTP clients send it in a header, which carries printable ASCII only.
        raise TokenFileError(f"token file {path}: the token must be printable ASCII")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "token file %s can be read by others (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(info.st_mode),
        )
    return token


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def prove(token: bytes, nonce: bytes, machine_id: str) -> bytes:
    """The builder's answer to a challenge: proves it knows ``token`` on this connection."""
    message = DOMAIN + nonce + machine_id.encode("utf-8", "surrogatepass")
    return hmac.new(token, message, hashlib.sha256).digest()


def verify(token: bytes, nonce: bytes, machine_id: str, proof: bytes) -> bool:
    """Whether ``proof`` answers this connection's ``nonce`` for ``token`` (constant time)."""
    return hmac.compare_digest(prove(token, nonce, machine_id), proof)


def bearer_ok(token: bytes, header: str | None) -> bool:
    """Whether an HTTP ``Authorization`` header carries ``token`` (constant time)."""
    if header is None:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"), token)
