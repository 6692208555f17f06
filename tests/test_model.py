"""The runner's model: a machine's kept JSON encoding (``/status``) matches its fields."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from hydra_trio.runner.model import Machine, MachineState

texts = st.text(max_size=20)
counts = st.integers(min_value=0, max_value=2**40)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)


def compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


@given(
    hostnames=st.lists(texts, min_size=2, max_size=2),
    reasons=st.lists(texts, min_size=2, max_size=2),
    states=st.lists(st.sampled_from(MachineState), min_size=2, max_size=2),
    succeeded=counts,
    load=floats,
    features=st.frozensets(texts, max_size=3),
    now=st.floats(min_value=0, max_value=1e9),
)
def test_to_json_text_is_the_encoding_of_to_json_before_and_after_changes(
    hostnames: list[str],
    reasons: list[str],
    states: list[MachineState],
    succeeded: int,
    load: float,
    features: frozenset[str],
    now: float,
) -> None:
    """to_json_text(now) is compact json.dumps(to_json(now)), also after fields change."""
    machine = Machine(
        machine_id="m",
        hostname=hostnames[0],
        systems=("x86_64-linux",),
        supported_features=features,
        mandatory_features=frozenset(),
        max_jobs=2,
        speed_factor=1.5,
        state=states[0],
        disconnect_reason=reasons[0],
        last_ping_at=now / 2,
    )
    assert machine.to_json_text(now) == compact(machine.to_json(now))
    machine.hostname = hostnames[1]
    machine.disconnect_reason = reasons[1]
    machine.state = states[1]
    machine.succeeded_builds = succeeded
    machine.load = load
    machine.max_jobs = 3
    assert machine.to_json_text(now + 1) == compact(machine.to_json(now + 1))
