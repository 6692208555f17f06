"""The runner's Prometheus metrics (``GET /metrics``), every one named ``hydra_trio_*``.

Theory of operation
-------------------
Two sources:

- What the farm's state already holds (machines by state, each machine's ping age and jobs,
  builds by state, the plain counters of ``FarmMetrics`` that ``/status`` shows too) is read
  at scrape time into metric families: nothing is counted twice, so /metrics and /status
  cannot disagree.
- What the state does not remember is recorded when it happens, into the histograms and
  counters of ``FarmMetrics``: the farm observes dispatch latency and build duration, the
  builder session counts bytes moved, protocol errors and refused hellos.  They live in
  the farm's own ``CollectorRegistry``, never prometheus-client's global default one: tests
  and embedders run many farms in one process, and each must expose only its own.

``FarmMetrics`` is made first and given to ``Farm`` at construction (``Farm(metrics=...)``);
this module reads the farm only through ``FarmView``, so it imports neither ``farm`` nor
anything that does.

A scrape is ``collect_metrics`` (a snapshot of both, taken on the event loop, where the farm
cannot change meanwhile) then ``format_metrics`` (text from the snapshot alone, so it may run
in a worker thread).

Label values are bounded against a hostile or buggy peer: states and statuses are enums,
protocol errors are sorted into the fixed ``PROTOCOL_ERROR_KINDS``, and the per-machine gauges
carry one series per connected machine (machine ids are only admitted by a handshake).

Times are the farm's clock (``trio.current_time()`` in the daemon): ``now`` comes in as an
argument, so this module imports no trio.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hydra_trio.protocol.errors import ProtocolError
from hydra_trio.protocol.messages import BuildStatus, RejectCode
from hydra_trio.runner.health import FAULT_KINDS, Health
from hydra_trio.runner.model import Machine, MachineState

#: Dispatch latency buckets (seconds): a free machine takes a build in milliseconds; a busy
#: farm makes builds wait minutes to hours.
DISPATCH_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.05, 0.1, 0.5),
    *(1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0),
)
#: Build duration buckets (seconds): from `true` to a day-long build.
DURATION_BUCKETS = (
    *(1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0),
    *(3600.0, 2 * 3600.0, 4 * 3600.0, 8 * 3600.0, 24 * 3600.0),
)

#: The kinds a protocol error is counted under (the ``kind`` label), each for what ended
#: the connection:
PROTOCOL_ERROR_KINDS = (
    #: a frame larger than the negotiated limit (announced by the builder, or one the runner
    #: was about to send).
    "frame-too-large",
    #: bytes that are not a frame: not msgpack, not a map, or cut off by the end of the stream.
    "bad-frame",
    #: a well-formed frame that is not a valid message: unknown type, missing or invalid field.
    "bad-message",
    #: a valid message that the protocol does not allow here (before the hello, a second hello,
    #: one only the other role sends, anything after goodbye).
    "wrong-order",
    #: an attempt's uploads went past what a result could list (bytes, files, interleaving).
    "upload-limit",
    #: anything else (a new error message this list has not learned yet).
    "other",
)

# Matched in order against the error's message: the protocol's errors carry no code, and
# their messages are what tests/test_metrics.py checks against this list.
_KIND_PATTERNS = (
    ("frame-too-large", re.compile(r"bytes announced, the limit is|-byte limit")),
    (
        "bad-frame",
        re.compile(r"not valid msgpack|^frame is an? .*, not a map|in the middle of a frame"),
    ),
    ("upload-limit", re.compile(r": uploaded more than |: started .* before finishing ")),
    (
        "wrong-order",
        re.compile(
            r"does not receive|after the handshake|after the connection was closed"
            r"|^expected \S+ (after|first|or)|before our hello|^cannot send|^a \S+ cannot send"
            r"|only builders ping|only valid during the handshake"
        ),
    ),
    # "<message or record>: missing field 'x'", "unknown message type 'x'", "<tag>.<field>: why"
    ("bad-message", re.compile(r"^unknown message type |: missing field |^[A-Za-z][\w-]*\.\w")),
)


#: The label values ``FarmMetrics.frames_rejected`` and ``.handshakes_rejected`` use, listed at 0
#: before they first happen.
_FRAME_KINDS = ("progress", "log", "result", "upload", "fetch", "list", "outputs")
_HANDSHAKE_REJECTIONS = tuple(sorted(code.value for code in RejectCode))


def protocol_error_kind(exc: ProtocolError) -> str:
    """The ``kind`` label for ``exc``: one of ``PROTOCOL_ERROR_KINDS``."""
    text = str(exc)
    for kind, pattern in _KIND_PATTERNS:
        if pattern.search(text):
            return kind
    return "other"


@attrs.define(eq=False)
class FarmMetrics:
    """The counters and event metrics of one farm: plain counters that ``/status`` shows too,
    and histograms and counters in that farm's own Prometheus registry (``registry``)."""

    #: frames about a build rejected because their sender does not run it under that attempt.
    stale_rejected: int = 0
    #: the same frames by kind (``progress``, ``log``, ``result``, ``upload``, ``fetch``).
    frames_rejected: collections.Counter[str] = attrs.field(factory=collections.Counter)
    builders_lost_idle: int = 0
    builders_lost_busy: int = 0
    #: attempts requeued after an infrastructure failure, by status.
    requeued: collections.Counter[str] = attrs.field(factory=collections.Counter)
    #: builds finished, by status.
    finished: collections.Counter[str] = attrs.field(factory=collections.Counter)
    #: hellos refused, by ``Reject`` code (``auth-failed``, ``incompatible-version``).
    handshakes_rejected: collections.Counter[str] = attrs.field(factory=collections.Counter)
    registry: CollectorRegistry = attrs.field(
        factory=lambda: CollectorRegistry(auto_describe=True), init=False
    )
    dispatch_latency: Histogram = attrs.field(init=False)
    build_duration: Histogram = attrs.field(init=False)
    uploaded_bytes: Counter = attrs.field(init=False)
    fetched_bytes: Counter = attrs.field(init=False)
    protocol_errors: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.dispatch_latency = Histogram(
            "hydra_trio_dispatch_latency_seconds",
            "Seconds from a build becoming runnable (submitted with its dependencies done, its "
            "last dependency succeeded, or its retry delay over) to its Assign being sent.",
            buckets=DISPATCH_BUCKETS,
            registry=self.registry,
        )
        self.build_duration = Histogram(
            "hydra_trio_build_duration_seconds",
            "Seconds from an attempt's Assign to its committed Result, whatever the status.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.uploaded_bytes = Counter(
            "hydra_trio_uploaded_bytes",
            "Output bytes builders uploaded that the runner accepted (current attempts only).",
            registry=self.registry,
        )
        self.fetched_bytes = Counter(
            "hydra_trio_fetched_bytes",
            "Input bytes the runner sent to builders in answer to their fetches.",
            registry=self.registry,
        )
        self.protocol_errors = Counter(
            "hydra_trio_protocol_errors",
            "Builder connections ended by a protocol error, by kind.",
            ["kind"],
            registry=self.registry,
        )
        for kind in PROTOCOL_ERROR_KINDS:  # every kind listed from the start, at 0
            self.protocol_errors.labels(kind=kind)

    def protocol_error(self, exc: ProtocolError) -> None:
        """Count a connection ended by ``exc``."""
        self.protocol_errors.labels(kind=protocol_error_kind(exc)).inc()

    def handshake_rejected(self, code: str) -> None:
        """Count a hello refused with the ``Reject`` code ``code``."""
        self.handshakes_rejected[code] += 1

    def counters_json(self) -> dict[str, object]:
        """The counters as ``/status`` shows them (``counters``)."""
        return {
            "staleResultsRejected": self.stale_rejected,
            "buildersLostIdle": self.builders_lost_idle,
            "buildersLostWhileBuilding": self.builders_lost_busy,
            "requeued": dict(self.requeued),
            "framesRejected": dict(self.frames_rejected),
            "handshakesRejected": dict(self.handshakes_rejected),
        }


class FarmView(Protocol):
    """What a scrape reads of a farm (``farm.Farm`` is one)."""

    @property
    def machines(self) -> Mapping[str, Machine]: ...

    @property
    def metrics(self) -> FarmMetrics: ...

    def queue_counts(self) -> dict[str, int]: ...


def collect_metrics(farm: FarmView, now: float) -> list[Metric]:
    """Every family at ``now``: a snapshot, taken where the farm cannot change meanwhile (on
    the event loop).  About 10 ms for 2,000 connected machines."""
    return [*_state_families(farm, now), *farm.metrics.registry.collect()]


def health_family(health: Health) -> Metric:
    """``hydra_trio_dependency_faults_total{kind}``: faults of the database and the disk
    (``runner.health``), every kind listed even at 0 so an alert can watch its rate."""
    family = CounterMetricFamily(
        "hydra_trio_dependency_faults",
        "Writes the database or the disk refused (connection lost, disk full), by kind.",
        labels=["kind"],
    )
    for kind in FAULT_KINDS:
        family.add_metric([kind], health.faults[kind])
    return family


def format_metrics(families: Iterable[Metric]) -> bytes:
    """The Prometheus text exposition (``CONTENT_TYPE_LATEST``) of a snapshot.  It reads only
    the snapshot, so it may run in a worker thread: about 30 ms for 2,000 machines."""
    return generate_latest(_Families(families))


def render_metrics(farm: FarmView, now: float) -> bytes:
    """``format_metrics(collect_metrics(farm, now))``, in one step."""
    return format_metrics(collect_metrics(farm, now))


class _Families:
    """A snapshot as the ``Collector`` that ``generate_latest`` takes."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _labelled(
    family: CounterMetricFamily | GaugeMetricFamily, samples: Iterable[tuple[str, float]]
) -> CounterMetricFamily | GaugeMetricFamily:
    for label, value in samples:
        family.add_metric([label], value)
    return family


def _state_families(farm: FarmView, now: float) -> Iterator[Metric]:
    counters = farm.metrics
    by_state = dict.fromkeys(MachineState, 0)
    for machine in farm.machines.values():
        by_state[machine.state] += 1
    yield _labelled(
        GaugeMetricFamily("hydra_trio_builders", "Builder machines by state.", labels=["state"]),
        ((s.value, n) for s, n in by_state.items()),
    )
    connected = [m for m in farm.machines.values() if m.state is not MachineState.DISCONNECTED]
    ping = GaugeMetricFamily(
        "hydra_trio_builder_seconds_since_last_ping",
        "Seconds since each connected builder's last ping.",
        labels=["machine", "machine_id"],
    )
    jobs = GaugeMetricFamily(
        "hydra_trio_builder_jobs",
        "Job slots in use per connected builder.",
        labels=["machine", "machine_id"],
    )
    for machine in connected:
        labels = [machine.hostname, machine.machine_id]
        ping.add_metric(labels, round(max(0.0, now - machine.last_ping_at), 3))
        jobs.add_metric(labels, len(machine.running))
    yield ping
    yield jobs
    yield _labelled(
        GaugeMetricFamily("hydra_trio_builds", "Builds by state.", labels=["state"]),
        farm.queue_counts().items(),
    )
    # Every status is listed (at 0 until it happens), so a rate() over it has a series to
    # start from; the same for requeue reasons, the infrastructure statuses.
    finished = {s.value: counters.finished.get(s.value, 0) for s in BuildStatus}
    yield _labelled(
        CounterMetricFamily(
            "hydra_trio_builds_finished", "Builds finished, by status.", labels=["status"]
        ),
        sorted(finished.items()),
    )
    requeued = {s.value: 0 for s in BuildStatus if s.is_infrastructure} | counters.requeued
    yield _labelled(
        CounterMetricFamily(
            "hydra_trio_builds_requeued",
            "Attempts requeued after an infrastructure failure, by reason.",
            labels=["reason"],
        ),
        sorted(requeued.items()),
    )
    yield _labelled(
        CounterMetricFamily(
            "hydra_trio_builders_lost",
            "Builder sessions lost, idle or while building.",
            labels=["while"],
        ),
        [("idle", counters.builders_lost_idle), ("building", counters.builders_lost_busy)],
    )
    yield CounterMetricFamily(
        "hydra_trio_stale_results_rejected",
        "Frames about a build rejected because their attempt was not current.",
        value=counters.stale_rejected,
    )
    yield _labelled(
        CounterMetricFamily(
            "hydra_trio_frames_rejected",
            "Frames about a build not this connection's to speak for, by kind.",
            labels=["kind"],
        ),
        sorted((dict.fromkeys(_FRAME_KINDS, 0) | counters.frames_rejected).items()),
    )
    yield _labelled(
        CounterMetricFamily(
            "hydra_trio_handshakes_rejected",
            "Builder hellos refused, by reason (auth-failed, incompatible-version).",
            labels=["reason"],
        ),
        sorted((dict.fromkeys(_HANDSHAKE_REJECTIONS, 0) | counters.handshakes_rejected).items()),
    )
