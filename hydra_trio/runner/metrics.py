"""Prometheus text exposition of the farm's state (names prefixed ``hydra_trio_``)."""

from __future__ import annotations

from hydra_trio.runner.farm import Farm
from hydra_trio.runner.model import MachineState


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(farm: Farm, now: float) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP hydra_trio_{name} {help_text}")
        lines.append(f"# TYPE hydra_trio_{name} {kind}")
        for labels, value in samples:
            lines.append(f"hydra_trio_{name}{labels} {value:g}")

    by_state = {s: 0 for s in MachineState}
    for machine in farm.machines.values():
        by_state[machine.state] += 1
    family(
        "builders",
        "gauge",
        "Builder machines by state.",
        [(f'{{state="{s.value}"}}', n) for s, n in by_state.items()],
    )
    family(
        "builder_seconds_since_last_ping",
        "gauge",
        "Seconds since each builder's last ping.",
        [
            (
                f'{{machine="{_escape(m.hostname)}",machine_id="{_escape(m.machine_id)}"}}',
                round(now - m.last_ping_at, 3),
            )
            for m in farm.machines.values()
            if m.state is not MachineState.DISCONNECTED
        ],
    )
    family(
        "builder_jobs",
        "gauge",
        "Job slots in use per connected builder.",
        [
            (
                f'{{machine="{_escape(m.hostname)}",machine_id="{_escape(m.machine_id)}"}}',
                len(m.running),
            )
            for m in farm.machines.values()
            if m.state is not MachineState.DISCONNECTED
        ],
    )
    family(
        "builds",
        "gauge",
        "Builds by state.",
        [(f'{{state="{s}"}}', n) for s, n in farm.queue_counts().items()],
    )
    family(
        "builds_finished_total",
        "counter",
        "Builds finished, by status.",
        [(f'{{status="{s}"}}', n) for s, n in sorted(farm.finished.items())],
    )
    family(
        "builds_requeued_total",
        "counter",
        "Attempts requeued after an infrastructure failure, by reason.",
        [(f'{{reason="{s}"}}', n) for s, n in sorted(farm.requeued.items())],
    )
    family(
        "builders_lost_total",
        "counter",
        "Builder sessions lost, idle or while building.",
        [
            ('{while="idle"}', farm.builders_lost_idle),
            ('{while="building"}', farm.builders_lost_busy),
        ],
    )
    family(
        "stale_results_rejected_total",
        "counter",
        "Frames about a build rejected because their attempt was not current.",
        [("", farm.stale_rejected)],
    )
    family(
        "frames_rejected_total",
        "counter",
        "Frames about a build not this connection's to speak for, by kind.",
        [(f'{{kind="{s}"}}', n) for s, n in sorted(farm.frames_rejected.items())],
    )
    family(
        "handshakes_rejected_total",
        "counter",
        "Builder hellos refused, by reason (auth-failed, incompatible-version).",
        [(f'{{reason="{s}"}}', n) for s, n in sorted(farm.handshakes_rejected.items())],
    )
    return "\n".join(lines) + "\n"
