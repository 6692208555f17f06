"""How long a builder waits before its next connection attempt, by how the last one ended
(several runners, a standby, a runner stopping on purpose); virtual time."""

from __future__ import annotations

import random

import trio

from hydra_trio.builder.backoff import Backoff
from hydra_trio.builder.config import BuilderConfig
from hydra_trio.builder.session import STOPPING_WINDOW, _next_delay
from hydra_trio.builder.state import BuilderState, Ended, SessionEnd
from hydra_trio.net import HostPort

A, B = HostPort("a", 1), HostPort("b", 1)


def setup(*servers: HostPort) -> tuple[BuilderConfig, BuilderState, Backoff]:
    config = BuilderConfig(servers=servers, ping_interval=1.0)  # ping timeout 3 s
    state = BuilderState(config=config, machine_id="m")
    backoff = Backoff(base=1.0, cap=60.0, floor=0.1, rng=random.Random(1))
    return config, state, backoff


FAILED = Ended(SessionEnd.CONNECT_FAILED, "refused")


async def test_a_restart_after_runner_stopping_does_not_grow_the_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After Goodbye runner-stopping, refused connections pause at most reconnect_base and
    leave the backoff alone, for STOPPING_WINDOW ping timeouts; then they back off again."""
    config, state, backoff = setup(A)
    stopping = Ended(SessionEnd.RUNNER_STOPPING, "the runner said goodbye (runner-stopping)")
    assert _next_delay(config, state, stopping, True, backoff) <= config.reconnect_base
    for _ in range(5):
        await trio.sleep(1)
        assert _next_delay(config, state, FAILED, False, backoff) <= config.reconnect_base
    assert backoff.failures == 0
    await trio.sleep(STOPPING_WINDOW * config.effective_ping_timeout)
    _next_delay(config, state, FAILED, False, backoff)
    assert backoff.failures == 1


async def test_without_a_stop_refused_connections_back_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A runner that went away without saying so: every refused round grows the backoff."""
    config, state, backoff = setup(A)
    for expected in range(1, 4):
        _next_delay(config, state, FAILED, False, backoff)
        assert backoff.failures == expected


async def test_the_next_runner_of_the_list_is_tried_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With two runners, a refused one sends the builder to the other at once; a standby
    naming the leader sends it there; only a whole failed round backs off."""
    config, state, backoff = setup(A, B)
    assert _next_delay(config, state, FAILED, False, backoff) == 0.0
    assert state.servers.current == B
    standby = Ended(SessionEnd.STANDBY, "standby", leader="a:1")
    assert _next_delay(config, state, standby, False, backoff) <= config.reconnect_base
    assert state.servers.current == A
    assert backoff.failures == 0
