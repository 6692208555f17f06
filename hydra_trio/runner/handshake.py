"""The admission gate of the builder port: which connections become sessions.

A connection is admitted in three steps, all within the handshake timeout (the caller's
deadline): TLS when configured (``accept_tls``, through ``net.start_tls``), the runner's
``Challenge``, then the builder's ``Hello`` (``admit``), checked for a compatible protocol
version and, with a token, for the proof that the builder knows it.  A refused hello is
answered with a ``Reject`` whose code is a ``RejectCode`` and counted in
``FarmMetrics.handshakes_rejected``.  ``HandshakeGate`` bounds how many connections may be in
these steps at once.
"""

from __future__ import annotations

import logging
import ssl

import attrs
import trio

from hydra_trio import auth, net
from hydra_trio.net import FramedChannel
from hydra_trio.protocol.messages import (
    PROTOCOL_VERSION,
    Challenge,
    Hello,
    Reject,
    RejectCode,
    compatible,
)
from hydra_trio.runner.metrics import FarmMetrics

log = logging.getLogger("hydra_trio.runner")


#: Hellos admitted (checked, attached to the farm, welcomed) in one scheduler pass at most.
ADMITTING = 16


@attrs.define
class HandshakeGate:
    """Bounds the connections that have not completed their handshake.

    Each costs a task and buffers until it is accepted or times out; without a bound, a
    client opening connections and sending nothing (slowloris) could hold any number of
    them.  Past the limit a new connection is closed at once, without a byte sent.

    ``admitting`` bounds, separately, the connections whose hello has arrived and is being
    admitted (attached to the farm, welcomed): after a runner restart 2,000 hellos can arrive
    in one read of the event loop, and admitting them all in one scheduler pass holds up
    every other task (``/status``, pings) for that whole pass.  A slot is taken only once the
    hello is in, and given back before anything waits on the peer, so slow peers cannot hold
    one.
    """

    limit: int
    pending: int = 0
    refused: int = 0
    admitting: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(ADMITTING))

    def enter(self) -> bool:
        if self.pending >= self.limit:
            self.refused += 1
            return False
        self.pending += 1
        return True

    def leave(self) -> None:
        self.pending -= 1


async def accept_tls(
    stream: trio.abc.Stream, context: ssl.SSLContext
) -> trio.SSLStream[trio.abc.Stream]:
    """The server side of TLS on a builder connection (raises ``ConnectionLost``)."""
    return await net.start_tls(stream, context, server_side=True)


async def admit(channel: FramedChannel, token: bytes | None, metrics: FarmMetrics) -> Hello | None:
    """Challenge, hello, and the checks on it; None when the builder was rejected."""
    challenge = Challenge(
        protocol_version=PROTOCOL_VERSION,
        nonce=auth.new_nonce(),
        token_required=token is not None,
    )
    await channel.send(challenge)
    hello = await channel.receive()
    assert isinstance(hello, Hello)  # the Connection allows nothing else first
    refusal = _refusal(hello, challenge, token)
    if refusal is None:
        return hello
    code, why = refusal
    metrics.handshake_rejected(code.value)
    log.warning(
        "rejected builder %s (%s): %s: %s", hello.hostname, hello.machine_id, code.value, why
    )
    await channel.send(Reject(code=code.value, reason=why))
    return None


def _refusal(
    hello: Hello, challenge: Challenge, token: bytes | None
) -> tuple[RejectCode, str] | None:
    """Why ``hello`` is refused, None if it is not."""
    if not compatible(PROTOCOL_VERSION, hello.protocol_version):
        return (
            RejectCode.INCOMPATIBLE_VERSION,
            f"runner speaks protocol {PROTOCOL_VERSION}, builder speaks {hello.protocol_version}",
        )
    if token is not None and not auth.verify(
        token, challenge.nonce, hello.machine_id, hello.credentials
    ):
        why = "no token given" if not hello.credentials else "wrong token"
        return (
            RejectCode.AUTH_FAILED,
            f"{why}: give the builder the runner's token (--token-file)",
        )
    return None
