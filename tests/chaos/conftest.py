"""The level-2 reliability suite (``make chaos``, docs/reliability.md).

Skipped unless ``HYDRA_TRIO_CHAOS=1``: it runs for about a quarter of an hour, needs root, and
changes the network (in namespaces of its own).  ``HYDRA_TRIO_CHAOS_NET`` picks the network:
``netns`` (namespaces, veth pairs, iptables, tc: fails if they cannot be created), ``proxy``
(the fault proxy, ``faultproxy.py``), or ``auto`` (the default: ``netns`` where permitted, else
``proxy``, saying so).  Each scenario records what it measured; the end of the run prints them
as a table, and writes them as JSON to ``HYDRA_TRIO_CHAOS_REPORT`` when that is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .network import IPTABLES, cleanup_leftovers, netns_problem

ENABLED = os.environ.get("HYDRA_TRIO_CHAOS") == "1"
SKIP_REASON = "the chaos suite runs with HYDRA_TRIO_CHAOS=1 (make chaos)"
#: What each scenario measured, in the order they ran (printed at the end of the run).
RESULTS: list[dict[str, Any]] = []
#: The network backend the run used, and why.
CHOSEN: dict[str, str] = {}

COLUMNS = [
    ("scenario", "scenario"),
    ("mechanism", "fault injected with"),
    ("runner_detected_by", "runner detected it by"),
    ("runner_detect_s", "runner detect (s)"),
    ("builder_detected_by", "builder detected it by"),
    ("builder_detect_s", "builder detect (s)"),
    ("reschedule_s", "detect -> runs elsewhere (s)"),
    ("elsewhere_s", "fault -> runs elsewhere (s)"),
    ("lost", "lost"),
    ("double_committed", "double-committed"),
    ("notes", "notes"),
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: level-2 reliability scenarios (real processes, kernel faults)"
    )


@pytest.fixture(scope="session")
def backend() -> Iterator[str]:
    """``netns`` or ``proxy`` (see the module docstring); deletes leftovers at the end."""
    wanted = os.environ.get("HYDRA_TRIO_CHAOS_NET", "auto")
    if wanted not in ("auto", "netns", "proxy"):
        pytest.fail(f"HYDRA_TRIO_CHAOS_NET={wanted}: use auto, netns or proxy")
    if wanted == "proxy":
        CHOSEN.update(backend="proxy", why="HYDRA_TRIO_CHAOS_NET=proxy")
    else:
        problem = netns_problem()
        if problem is None:
            CHOSEN.update(backend="netns", why=f"network namespaces permitted; {IPTABLES}")
        elif wanted == "netns":
            pytest.fail(f"HYDRA_TRIO_CHAOS_NET=netns, but: {problem}")
        else:
            CHOSEN.update(backend="proxy", why=f"FALLBACK: no network namespaces ({problem})")
    try:
        yield CHOSEN["backend"]
    finally:
        left = cleanup_leftovers()
        if left:
            print(f"deleted leftover namespaces/links: {left}")


@pytest.fixture
def report(request: pytest.FixtureRequest, backend: str) -> Callable[..., None]:
    """``report(**measured)``: record this scenario's row of the table."""

    def record(**measured: Any) -> None:
        row = {"scenario": request.node.name.removeprefix("test_"), "backend": backend}
        row.update(measured)
        print("CHAOS " + json.dumps(row))
        RESULTS.append(row)

    return record


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ENABLED:
        return
    write = terminalreporter.write_line
    terminalreporter.section("chaos results")
    write(f"network: {CHOSEN.get('backend', '(not chosen)')}: {CHOSEN.get('why', '')}")
    if RESULTS:
        write("| " + " | ".join(title for _, title in COLUMNS) + " |")
        write("|" + "---|" * len(COLUMNS))
        for row in RESULTS:
            write("| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |")
    destination = os.environ.get("HYDRA_TRIO_CHAOS_REPORT")
    if destination:
        Path(destination).write_text(json.dumps({"network": CHOSEN, "results": RESULTS}, indent=1))
        write(f"results written to {destination}")
