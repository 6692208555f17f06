"""Who may be a builder: the token's challenge-response, and TLS (mutual with ``--tls-ca``).

All in virtual time over the in-process network of ``sim``; TLS runs the real ``ssl`` handshake
over those links, with certificates made by trustme.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trustme

from hydra_trio import auth, net
from hydra_trio.builder.daemon import BuilderConfig, BuilderState, run_builder
from hydra_trio.builder.state import SessionEnd
from hydra_trio.protocol import codec
from hydra_trio.protocol.connection import Connection
from hydra_trio.protocol.errors import HydraTrioError
from hydra_trio.protocol.messages import (
    PROTOCOL_VERSION,
    Challenge,
    Hello,
    Reject,
    Role,
)
from hydra_trio.runner.daemon import RunnerConfig
from hydra_trio.runner.handshake import HandshakeGate
from hydra_trio.runner.model import MachineState
from hydra_trio.runner.session import serve_builder

from .helpers.common import SYSTEM, builder_config, wait_until
from .helpers.sim import Farmlet, Link

TOKEN = b"correct horse battery staple"
RUNNER = RunnerConfig(builder_timeout=30.0, http=None, default_system=SYSTEM, token=TOKEN)
RUNNER_NAME = "runner.example"


async def start_builder(
    farm: Farmlet,
    nursery: trio.Nursery,
    name: str,
    config: BuilderConfig,
    *,
    tls: ssl.SSLContext | None = None,
) -> BuilderState:
    """A builder on ``farm``'s network (wrapped in TLS as a client when ``tls`` is given),
    without waiting for it to be accepted."""
    plain = farm.network.connector(name)

    async def connect() -> trio.abc.Stream:
        stream = await plain()
        if tls is None:
            return stream
        return await net.start_tls(stream, tls, server_hostname=RUNNER_NAME)

    config = attrs.evolve(config, hostname=name)
    state = BuilderState(config=config, machine_id=f"machine-{name}")
    await nursery.start(functools.partial(run_builder, config, connect=connect, state=state))
    return state


def connected(farm: Farmlet, name: str) -> Callable[[], bool]:
    def check() -> bool:
        machine = farm.farm.machines.get(f"machine-{name}")
        return machine is not None and machine.state is MachineState.CONNECTED

    return check


def capture(link: Link) -> bytes:
    """Everything that went over ``link`` so far, both ways (what a passive listener saw)."""
    return bytes(link.to_runner.buffer) + bytes(link.to_builder.buffer)


# -- the token ------------------------------------------------------------------------------


@attrs.define
class _Tap(trio.abc.Stream):
    """The runner's end of a link, keeping a copy of every byte either way."""

    inner: trio.abc.Stream
    sent: bytearray = attrs.field(factory=bytearray)
    received: bytearray = attrs.field(factory=bytearray)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        self.received += data
        return bytes(data)

    async def aclose(self) -> None:
        await self.inner.aclose()


def tap(farm: Farmlet) -> list[_Tap]:
    """From now on, copy what every new connection carries (what a passive listener sees)."""
    taps: list[_Tap] = []
    handler = farm.network.handler

    async def tapped(stream: trio.abc.Stream) -> None:
        taps.append(_Tap(stream))
        await handler(taps[-1])

    farm.network.handler = tapped
    return taps


async def receive_one(stream: trio.abc.Stream, conn: Connection) -> object:
    while True:
        data = await stream.receive_some()
        if not data:
            return None
        messages = conn.receive_data(data, trio.current_time())
        if messages:
            [message] = messages
            return message


async def test_a_builder_with_the_token_is_accepted_and_the_token_never_crosses_the_wire(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        taps = tap(farm)
        await start_builder(farm, nursery, "a", builder_config(tmp_path, "a", token=TOKEN))
        await wait_until(connected(farm, "a"))
        await trio.sleep(60)  # a few pings
        assert farm.farm.machines["machine-a"].state is MachineState.CONNECTED
        [wire] = taps
        assert TOKEN not in wire.sent + wire.received
        assert farm.farm.metrics.handshakes_rejected == {}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("token", "why"), [(b"not the token", "wrong token"), (None, "no token given")]
)
async def test_a_wrong_or_missing_token_is_rejected_and_the_builder_backs_off(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    token: bytes | None,
    why: str,
) -> None:
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        config = builder_config(tmp_path, "a", token=token, reconnect_max=60.0)
        state = await start_builder(farm, nursery, "a", config)
        await trio.sleep(600)
        assert "machine-a" not in farm.farm.machines
        assert state.sessions == 0
        rejections = [
            e.reason
            for e in state.events
            if e.end is SessionEnd.REJECTED and "auth-failed" in e.reason
        ]
        assert rejections and why in rejections[0]
        # Backing off, not hammering: full-jitter delays growing to a 60 s cap average 30 s
        # once there, so 10 minutes hold about 20 attempts (the bound leaves room for jitter).
        attempts = farm.network.connect_times["a"]
        assert 5 <= len(attempts) <= 40
        assert max(b - a for a, b in itertools.pairwise(attempts)) > 20
        assert farm.farm.metrics.handshakes_rejected["auth-failed"] == len(attempts)
        assert f"auth-failed: {why}" in caplog.text  # the runner says who and why
        if token is None:
            assert "requires a token: give this builder --token-file" in caplog.text
        nursery.cancel_scope.cancel()


async def test_a_replayed_handshake_is_rejected(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A listener who recorded a builder's valid hello cannot log in with it: the next
    connection's challenge has another nonce."""
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        taps = tap(farm)
        await start_builder(farm, nursery, "a", builder_config(tmp_path, "a", token=TOKEN))
        await wait_until(connected(farm, "a"))
        recorded = bytes(taps[0].received)
        recorded = recorded[: 4 + int.from_bytes(recorded[:4], "big")]  # the hello frame
        [hello] = codec.FrameDecoder().feed(recorded)
        assert isinstance(hello, Hello) and hello.credentials

        stream = await farm.network.connector("eve")()
        conn = Connection(Role.BUILDER, now=trio.current_time(), peer_timeout=1e9)
        challenge = await receive_one(stream, conn)
        assert isinstance(challenge, Challenge) and challenge.token_required
        assert conn.send(hello) == recorded
        await stream.send_all(recorded)  # the recorded bytes, verbatim
        reply = await receive_one(stream, conn)
        assert isinstance(reply, Reject) and reply.code == "auth-failed"
        assert farm.farm.metrics.handshakes_rejected["auth-failed"] == 1
        # ... while the same hello, proven for this connection's nonce, would have passed:
        assert auth.verify(
            TOKEN,
            challenge.nonce,
            hello.machine_id,
            auth.prove(TOKEN, challenge.nonce, hello.machine_id),
        )
        assert farm.farm.machines["machine-a"].state is MachineState.CONNECTED
        nursery.cancel_scope.cancel()


# -- TLS ----------------------------------------------------------------------------------


@attrs.frozen
class Pki:
    ca: trustme.CA
    ca_file: Path
    tmp: Path

    def client(self, name: str, ca: trustme.CA | None = None, **kw: object) -> ssl.SSLContext:
        """A builder's context: trusts our CA, presents a certificate from ``ca``."""
        leaf = (ca or self.ca).issue_cert(f"{name}.builders.example", **kw)  # type: ignore[arg-type]
        cert, key = self.tmp / f"{name}.pem", self.tmp / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return net.client_tls_context(self.ca_file, cert, key)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca, ca_file, tmp_path)


def tls_runner(pki: Pki, *, mutual: bool = True) -> RunnerConfig:
    server = pki.ca.issue_cert(RUNNER_NAME)
    cert, key = pki.tmp / "runner.pem", pki.tmp / "runner.key"
    server.private_key_and_cert_chain_pem.write_to_path(str(cert))
    server.private_key_pem.write_to_path(str(key))
    return attrs.evolve(RUNNER, tls_cert=cert, tls_key=key, tls_ca=pki.ca_file if mutual else None)


async def test_mutual_tls_with_a_certificate_from_the_runners_ca_connects(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, pki: Pki
) -> None:
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, tls_runner(pki), tmp_path / "runner")
        taps = tap(farm)
        config = builder_config(tmp_path, "a", token=TOKEN)
        await start_builder(farm, nursery, "a", config, tls=pki.client("a"))
        await wait_until(connected(farm, "a"))
        await trio.sleep(60)
        assert farm.farm.machines["machine-a"].state is MachineState.CONNECTED
        assert b"machine-a" not in taps[0].received  # encrypted on the wire
        nursery.cancel_scope.cancel()


BAD_CLIENTS: dict[str, dict[str, Any]] = {
    "another CA": {"ca": trustme.CA()},
    "expired": {"not_after": datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)},
}


@pytest.mark.parametrize("case", ["another CA", "expired", "no certificate"])
async def test_mutual_tls_refuses_builders_without_a_valid_client_certificate(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    caplog.set_level(logging.INFO)
    if case == "no certificate":
        client = net.client_tls_context(pki.ca_file)
    else:
        client = pki.client("a", **BAD_CLIENTS[case])
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, tls_runner(pki), tmp_path / "runner")
        state = await start_builder(
            farm, nursery, "a", builder_config(tmp_path, "a", token=TOKEN), tls=client
        )
        await trio.sleep(120)
        assert "machine-a" not in farm.farm.machines and state.sessions == 0
        assert "TLS handshake failed" in caplog.text
        assert len(farm.network.connect_times["a"]) >= 2  # it retries, with backoff
        nursery.cancel_scope.cancel()


async def test_a_builder_refuses_a_runner_whose_certificate_it_cannot_verify(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, pki: Pki
) -> None:
    other = trustme.CA()
    other_file = tmp_path / "other-ca.pem"
    other.cert_pem.write_to_path(str(other_file))
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, tls_runner(pki, mutual=False), tmp_path / "runner")
        state = await start_builder(
            farm,
            nursery,
            "a",
            builder_config(tmp_path, "a", token=TOKEN),
            tls=net.client_tls_context(other_file),
        )
        await trio.sleep(30)
        assert state.sessions == 0
        failures = [
            e
            for e in state.events
            if e.end is SessionEnd.CONNECT_FAILED and "certificate verification failed" in e.reason
        ]
        assert failures, state.events
        nursery.cancel_scope.cancel()


async def test_tls_without_client_certificates_accepts_a_verifying_builder(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, pki: Pki
) -> None:
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, tls_runner(pki, mutual=False), tmp_path / "runner")
        config = builder_config(tmp_path, "a", token=TOKEN)
        await start_builder(farm, nursery, "a", config, tls=net.client_tls_context(pki.ca_file))
        await wait_until(connected(farm, "a"))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("sends_hello", [False, True])
async def test_a_plain_tcp_client_on_the_tls_port_is_closed(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, pki: Pki, sends_hello: bool
) -> None:
    """Silent, it is closed at the handshake timeout; speaking our protocol in the clear, it
    is closed at once (that is not a TLS ClientHello)."""
    async with trio.open_nursery() as nursery:
        config = tls_runner(pki)
        farm = Farmlet(nursery, config, tmp_path / "runner")
        stream = await farm.network.connector("plain")()
        start = trio.current_time()
        if sends_hello:
            hello = Hello(
                protocol_version=PROTOCOL_VERSION, machine_id="m", hostname="h", systems=("s",)
            )
            await stream.send_all(codec.encode(hello))
        received = b""
        while data := await stream.receive_some():
            received += data
        elapsed = trio.current_time() - start
        if sends_hello:
            assert elapsed < 1.0
        else:
            assert elapsed == pytest.approx(config.handshake_timeout)
            assert received == b""
        assert b"challenge" not in received  # nothing of ours was ever sent in the clear
        nursery.cancel_scope.cancel()


async def test_the_handshake_gate_closes_connections_past_its_limit(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """With ``max_unauthenticated`` connections already silent in their handshake, the next
    is closed at once; a builder gets in again once they have timed out."""
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        gate = HandshakeGate(3)
        farm.network.handler = functools.partial(
            serve_builder, farm.farm, RUNNER.session_config(), farm.storage, gate=gate
        )
        silent = [await farm.network.connector(f"idle{i}")() for i in range(3)]
        await trio.sleep(1)
        assert gate.pending == 3
        extra = await farm.network.connector("extra")()
        assert await extra.receive_some() == b""  # closed without a byte
        assert gate.refused == 1
        await start_builder(farm, nursery, "a", builder_config(tmp_path, "a", token=TOKEN))
        await wait_until(connected(farm, "a"))
        assert trio.current_time() >= RUNNER.handshake_timeout  # only after the silent ones left
        assert gate.pending == 0
        for stream in silent:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_hellos_are_admitted_through_the_gate_s_limiter_which_slow_peers_cannot_hold(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A builder whose hello has arrived is attached only with a slot of ``admitting``; peers
    that connect and send nothing, or half a hello, hold no slot: with one slot and such peers
    waiting, a builder is still admitted at once."""
    async with trio.open_nursery() as nursery:
        farm = Farmlet(nursery, RUNNER, tmp_path / "runner")
        gate = HandshakeGate(8, admitting=trio.CapacityLimiter(1))
        farm.network.handler = functools.partial(
            serve_builder, farm.farm, RUNNER.session_config(), farm.storage, gate=gate
        )
        silent = await farm.network.connector("idle")()
        halfway = await farm.network.connector("half")()
        assert await halfway.receive_some()  # the challenge
        frame = codec.encode(
            Hello(
                protocol_version=PROTOCOL_VERSION,
                machine_id="half",
                hostname="half",
                systems=(SYSTEM,),
                max_jobs=1,
            )
        )
        await halfway.send_all(frame[: len(frame) // 2])
        await trio.sleep(1)
        assert gate.pending == 2
        assert gate.admitting.borrowed_tokens == 0

        holder = object()
        await gate.admitting.acquire_on_behalf_of(holder)  # every slot taken
        await start_builder(farm, nursery, "a", builder_config(tmp_path, "a", token=TOKEN))
        await trio.sleep(1)
        assert not connected(farm, "a")()  # its hello is in, waiting for a slot
        assert gate.pending == 2  # it left the handshake count: it is past its hello
        gate.admitting.release_on_behalf_of(holder)
        await wait_until(connected(farm, "a"))
        assert trio.current_time() < 3  # not after the silent peers' handshake timeout
        assert gate.admitting.borrowed_tokens == 0
        for stream in (silent, halfway):
            await stream.aclose()
        nursery.cancel_scope.cancel()


def test_token_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = tmp_path / "token"
    good.write_bytes(b"  s3cret \n")
    good.chmod(0o600)
    assert auth.load_token(good) == b"s3cret"
    assert "can be read by others" not in caplog.text
    good.chmod(0o644)
    assert auth.load_token(good) == b"s3cret"
    assert "can be read by others (mode 644); chmod 600 it" in caplog.text
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n \n")
    for path, why in [
        (empty, "empty"),
        (tmp_path / "missing", "No such file"),
        (tmp_path, "not a regular file"),
    ]:
        with pytest.raises(HydraTrioError, match=why):
            auth.load_token(path)
