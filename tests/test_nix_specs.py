"""The pure parts of Nix builds, which need no Nix: drv submissions, store path checks, the
required features of a derivation and the order of a step's input closure."""

from __future__ import annotations

import json

import pytest

from hydra_trio.nixstore import export_label, is_store_path, label_path
from hydra_trio.protocol.messages import FileInfo
from hydra_trio.runner.farm import nix_store_paths
from hydra_trio.runner.model import Build, BuildSpec
from hydra_trio.runner.nix import _required_features
from hydra_trio.runner.specs import SpecError, parse_drv_request

DRV = "/nix/store/y55222rsy62v9d39j9nr24nvx6pwylni-c.drv"
SHA = "0" * 64


def test_a_drv_request_takes_priority_and_limits() -> None:
    """A valid body gives its drv, priority, timeout and max-silent."""
    request = parse_drv_request({"drv": DRV, "priority": 5, "timeout": 60, "maxSilent": 7.5})
    assert (request.drv, request.priority, request.timeout, request.max_silent) == (
        DRV,
        5,
        60.0,
        7.5,
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"drv": "/tmp/c.drv"}, "drv"),
        ({"drv": DRV.removesuffix(".drv")}, "drv"),
        ({"drv": "/nix/store/../etc/passwd.drv"}, "drv"),
        ({"drv": 3}, "drv"),
        ({"drv": DRV, "command": ["true"]}, "command"),
        ({"drv": DRV, "after": ["x"]}, "after"),
        ({"drv": DRV, "timeout": -1}, "timeout"),
        ({"drv": DRV, "priority": "high"}, "priority"),
    ],
)
def test_bad_drv_requests_name_the_field(body: dict[str, object], field: str) -> None:
    """Each mistake is a SpecError whose one line starts with the field."""
    with pytest.raises(SpecError) as error:
        parse_drv_request(body)
    assert str(error.value).startswith(f"{field}: ") and "\n" not in str(error.value)


def test_store_path_checks() -> None:
    """Only direct children of /nix/store with a hash-name are store paths; labels map back."""
    assert is_store_path(DRV)
    for bad in ("/nix/store/short", "/nix/store/" + "a" * 32 + "-x/y", "/nix/store", DRV + " x"):
        assert not is_store_path(bad)
    assert label_path(export_label(DRV)) == DRV
    assert export_label(DRV) == DRV[1:]


def test_required_features_plain_and_structured() -> None:
    """requiredSystemFeatures comes from the environment, or from __json (structured attrs)."""
    assert _required_features({"env": {"requiredSystemFeatures": "kvm big-parallel"}}) == {
        "kvm",
        "big-parallel",
    }
    structured = {"env": {"__json": json.dumps({"requiredSystemFeatures": ["kvm"]})}}
    assert _required_features(structured) == {"kvm"}
    assert _required_features({"env": {}}) == frozenset()


def _export(name: str) -> FileInfo:
    return FileInfo(path=f"nix/store/{'a' * 32}-{name}", size=1, sha256=SHA)


def test_a_steps_closure_lists_each_path_once_runner_exports_first() -> None:
    """The runner's exports come first, then each dependency's outputs, each path once."""
    shared, drv, lib, out1, out2 = map(_export, ("shared", "x.drv", "lib", "out1", "out2"))
    spec = BuildSpec(command=("nix-store",), system="x", drv=DRV, nix_inputs=(lib, drv))
    deps = [
        Build(id="d1", spec=spec, seq=1, submitted_at=0, outputs=(lib, shared, out1)),
        Build(id="d2", spec=spec, seq=2, submitted_at=0, outputs=(shared, out2)),
    ]
    assert nix_store_paths(spec, deps) == (lib, drv, shared, out1, out2)
