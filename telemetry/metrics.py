"""Prometheus metrics of one worker, kept in a registry of the package's own and fed by finished prompt records.

Names are ``comfyui_telemetry_…`` in base units (seconds, bytes). Every label set is bounded by construction, so a
fleet's series count does not grow with the number of prompts: no prompt, run or scene id is ever a label value (those
live in each worker's ``/telemetry`` records); node class types are capped at ``max_class_types`` distinct values per
process, the rest counted as ``"other"``; fallback notes are reduced to a small fixed vocabulary of sources.

:meth:`TelemetryMetrics.observe` runs on the recorder's writer thread after each record is stored, never on ComfyUI's
prompt worker; it only increments counters and observes histograms. VRAM gauges are read at scrape time from the
snapshot callable handed in (the probe chain behind a short cache in the route module).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .records import FINAL_OUTCOMES, PromptRecord

__all__ = [
    "DEFAULT_MAX_CLASS_TYPES",
    "MARKER_STATES",
    "NOTE_SOURCES",
    "OTHER",
    "OUTCOMES",
    "PREFIX",
    "TelemetryMetrics",
    "note_source",
]

logger = logging.getLogger("run_telemetry.metrics")

PREFIX = "comfyui_telemetry"
OTHER = "other"
DEFAULT_MAX_CLASS_TYPES = 100
_MAX_CLASS_TYPE_CHARS = 128
_DEDUPE_SIZE = 4096

OUTCOMES: tuple[str, ...] = ("success", "error", "interrupted", "crashed", "cancelled", "lost")
HEALTH_STATUSES: tuple[str, ...] = ("ok", "degraded", "down")
MARKER_STATES: tuple[str, ...] = ("written", "failed", "error", "skipped", "pending")
NOTE_SOURCES: tuple[str, ...] = (
    "nvml",
    "torch-cuda",
    "nvidia-smi",
    "probe",
    "marker",
    "store",
    "policy",
    "retry",
    "hook",
    OTHER,
)

WEBHOOK_EVENTS: tuple[str, ...] = ("prompt.ended", "run.finalized", "health.changed")
WEBHOOK_REASONS: frozenset[str] = frozenset(
    ("timeout", "connection", "http_429", "http_5xx", "http_4xx", "http_3xx", "outbox_full", OTHER)
)

_GIB = 1 << 30
PROMPT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
# Fewer buckets here: this histogram is the only one multiplied by a label (up to max_class_types + 1 values).
NODE_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
PEAK_VRAM_BUCKETS = tuple(float(g * _GIB) for g in (0.5, 1, 2, 4, 6, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 192))

# (pattern on the lower-cased note, source): first match wins. The wordings are this package's own (probes, markers,
# recorder, store, policy), so a new kind of note lands in "other" until a rule names it.
_NOTE_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), source)
    for pattern, source in (
        (r"^nvml failed", "nvml"),
        (r"^torch-cuda failed", "torch-cuda"),
        (r"^nvidia-smi failed", "nvidia-smi"),
        (r"^snapshot failed|^memory before came from", "probe"),
        (r"^scene retry failed|retry budget|^retry of ", "retry"),
        (r"marker|^renaming onto", "marker"),
        (r"^store write failed|^comfyui stopped|^telemetry store |^record reduced", "store"),
        (r"polic|^invalid (scene_|run_telemetry_)|^run_telemetry_", "policy"),
        (r"^start hook|^contract telemetry failed| not installed \(", "hook"),
    )
)


def note_source(note: str) -> str:
    """The fixed-vocabulary source of a fallback note (one of ``NOTE_SOURCES``), derived from its wording."""
    text = note.lower()
    for pattern, source in _NOTE_RULES:
        if pattern.search(text):
            return source
    return OTHER


def _device_label(dev: Mapping[str, Any]) -> str:
    index = dev.get("Index")
    if isinstance(index, int):
        return str(index)
    cuda = dev.get("CudaIndex")
    if isinstance(cuda, int):
        return f"cuda:{cuda}"
    return str(dev.get("Type") or "cpu")


class _VramCollector(Collector):
    """Scrape-time gauges from the probe snapshot: memory per device and the probe source that answered."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        # Empty on purpose: registering must not run the probe chain.
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self._snapshot() or {}
        except Exception as exc:  # a failing probe must not fail the scrape; the other metrics still count
            logger.debug("metrics: snapshot failed: %s", exc)
            return
        labels = ["device", "name", "type"]
        total = GaugeMetricFamily(
            f"{PREFIX}_vram_total_bytes",
            "Total memory per device (system RAM when no GPU probe answers).",
            labels=labels,
        )
        free = GaugeMetricFamily(
            f"{PREFIX}_vram_free_bytes",
            "Free memory per device, read at scrape time (cached about 1 s).",
            labels=labels,
        )
        devices = list(snap.get("Devices") or []) or ([snap["Device"]] if snap.get("Device") else [])
        seen: set[tuple[str, str, str]] = set()
        for dev in devices:
            if not isinstance(dev, Mapping):
                continue
            key = (_device_label(dev), str(dev.get("Name") or "unknown"), str(dev.get("Type") or "unknown"))
            if key in seen:
                continue
            seen.add(key)
            if isinstance(dev.get("VramTotal"), int | float):
                total.add_metric(list(key), float(dev["VramTotal"]))
            if isinstance(dev.get("VramFree"), int | float):
                free.add_metric(list(key), float(dev["VramFree"]))
        yield total
        yield free
        source = GaugeMetricFamily(
            f"{PREFIX}_probe_source", "1 for the probe that answered the last snapshot.", labels=["source"]
        )
        if snap.get("Source"):
            source.add_metric([str(snap["Source"])], 1.0)
        yield source


class _HealthCollector(Collector):
    """Scrape-time gauges from the health report (``telemetry.health``) and the store's state."""

    def __init__(
        self, health: Callable[[], Mapping[str, Any]] | None, store: Callable[[], Mapping[str, Any]] | None
    ) -> None:
        self._health = health
        self._store = store

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self._store is not None:
            try:
                ok = bool(self._store().get("Ok"))
            except Exception as exc:
                logger.debug("metrics: store health failed: %s", exc)
                ok = False
            yield GaugeMetricFamily(
                f"{PREFIX}_store_ok",
                "1 while the telemetry store writes to its file without trouble; 0 when it is damaged (moved aside), "
                "unwritable or full (memory-only), or locked by another process (see GET /telemetry/health).",
                value=1.0 if ok else 0.0,
            )
        if self._health is None:
            return
        try:
            report = self._health()
        except Exception as exc:
            logger.debug("metrics: health failed: %s", exc)
            return
        status = GaugeMetricFamily(
            f"{PREFIX}_health_status", "1 for the worker's overall health status now.", labels=["status"]
        )
        for name in HEALTH_STATUSES:
            status.add_metric([name], 1.0 if report.get("Status") == name else 0.0)
        yield status
        ok = GaugeMetricFamily(
            f"{PREFIX}_health_check_ok", "1 when a health check passes, 0 when degraded or down.", labels=["check"]
        )
        down = GaugeMetricFamily(
            f"{PREFIX}_health_check_down", "1 when a health check says ComfyUI will not run prompts.", labels=["check"]
        )
        since = GaugeMetricFamily(
            f"{PREFIX}_health_check_failing_since_seconds",
            "Unix time a failing health check started failing; 0 while it passes.",
            labels=["check"],
        )
        for check in report.get("Checks") or []:
            name = str(check.get("Name"))
            ok.add_metric([name], 1.0 if check.get("Status") == "ok" else 0.0)
            down.add_metric([name], 1.0 if check.get("Status") == "down" else 0.0)
            since.add_metric([name], _epoch(check.get("Since")))
        yield ok
        yield down
        yield since
        worker = next((c for c in report.get("Checks") or [] if c.get("Name") == "prompt_worker"), None)
        if worker is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_prompt_worker_up",
                "1 while ComfyUI's prompt worker thread is alive and not stuck, 0 otherwise.",
                value=0.0 if worker.get("Status") == "down" else 1.0,
            )


def _epoch(value: Any) -> float:
    if not isinstance(value, str):
        return 0.0
    from datetime import datetime

    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


class _WithoutCreated(Collector):
    """The registry's families less their ``_created`` samples, which the text format turns into extra gauges."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            # Families are built afresh on every collect(), so trimming them here changes nothing stored.
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class TelemetryMetrics:
    """The package's metrics on a CollectorRegistry of its own (never the process-global one)."""

    def __init__(
        self,
        *,
        snapshot: Callable[[], Mapping[str, Any]] | None = None,
        version: str = "",
        max_class_types: int = DEFAULT_MAX_CLASS_TYPES,
        registry: CollectorRegistry | None = None,
        lookup: Callable[[str], PromptRecord | None] | None = None,
        health: Callable[[], Mapping[str, Any]] | None = None,
        store: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        """``snapshot`` feeds the VRAM gauges at scrape time; ``lookup`` (the recorder's ``get``) tells a finished
        record from one published while its finishing steps (markers, contract) have yet to run; ``health`` (the
        health report) and ``store`` (the store's state, ``StoreHealth.as_dict``) feed the health gauges."""
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._lookup = lookup
        self.max_class_types = max(0, int(max_class_types))
        self._lock = threading.Lock()
        self._class_types: set[str] = set()
        # Label children by raw class type: observe() runs once per node per prompt on the writer thread, and
        # prometheus_client's labels() (sorting, validation, a lock) costs several times the observation itself.
        self._node_children: dict[str, tuple[Any, Any]] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        r = self.registry
        self.prompts = Counter(f"{PREFIX}_prompts", "Prompts that ended, by outcome.", ["outcome"], registry=r)
        self.prompt_duration = Histogram(
            f"{PREFIX}_prompt_duration_seconds",
            "Execution time of a prompt, start to end, by outcome.",
            ["outcome"],
            buckets=PROMPT_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time a prompt waited in ComfyUI's queue before it started.",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.node_duration = Histogram(
            f"{PREFIX}_node_duration_seconds",
            f"Execution time of a node that ran (not cached), by class type; past {self.max_class_types} distinct "
            f"class types the rest count as {OTHER!r}.",
            ["class_type"],
            buckets=NODE_BUCKETS,
            registry=r,
        )
        self.nodes_cached = Counter(
            f"{PREFIX}_nodes_cached",
            "Nodes whose output ComfyUI took from its cache, by class type.",
            ["class_type"],
            registry=r,
        )
        self.peak_vram = Histogram(
            f"{PREFIX}_prompt_peak_vram_bytes",
            "Peak VRAM used during a prompt, where the probe could measure it.",
            buckets=PEAK_VRAM_BUCKETS,
            registry=r,
        )
        self.markers = Counter(
            f"{PREFIX}_done_markers",
            "WriteDoneMarker results: written (.done), failed (.failed for a failed prompt), error (could not be "
            "written), skipped (a retry follows, so no .failed yet).",
            ["state"],
            registry=r,
        )
        self.retries = Counter(f"{PREFIX}_retries", "Prompts requeued by a run's retry policy.", registry=r)
        self.fallback_notes = Counter(
            f"{PREFIX}_fallback_notes",
            "Fallback notes on finished prompts, by source (a fixed vocabulary derived from the note).",
            ["source"],
            registry=r,
        )
        self.cut_off = Gauge(
            f"{PREFIX}_prompts_cut_off",
            "Prompts the previous process left unfinished (crash or kill), found when this one started.",
            registry=r,
        )
        self.webhook_deliveries = Counter(
            f"{PREFIX}_webhook_deliveries",
            "Webhook deliveries that ended, by event and outcome (delivered, given_up).",
            ["event", "outcome"],
            registry=r,
        )
        self.webhook_failed_tries = Counter(
            f"{PREFIX}_webhook_failed_tries",
            "Webhook tries that failed, by event and reason (timeout, connection, http_429, http_5xx, http_4xx, "
            "http_3xx, outbox_full, other).",
            ["event", "reason"],
            registry=r,
        )
        self.webhook_pending = Gauge(
            f"{PREFIX}_webhook_pending", "Webhook deliveries in the outbox, not yet delivered nor given up.", registry=r
        )
        self.build_info = Gauge(
            f"{PREFIX}_build_info", "Run Telemetry version of this worker.", ["version"], registry=r
        )
        self.build_info.labels(version=version or "unknown").set(1)
        # Zero series up front: PromQL sums and rate() see a worker's 0 before its first event of that kind.
        for outcome in OUTCOMES:
            self.prompts.labels(outcome=outcome)
            self.prompt_duration.labels(outcome=outcome)
        for state in ("written", "failed", "error", "skipped"):
            self.markers.labels(state=state)
        for source in NOTE_SOURCES:
            self.fallback_notes.labels(source=source)
        for event in WEBHOOK_EVENTS:
            for result in ("delivered", "given_up"):
                self.webhook_deliveries.labels(event=event, outcome=result)
            for reason in ("timeout", "connection", "http_429", "http_5xx", "http_4xx"):
                self.webhook_failed_tries.labels(event=event, reason=reason)
        if snapshot is not None:
            self.registry.register(_VramCollector(snapshot))
        if health is not None or store is not None:
            self.registry.register(_HealthCollector(health, store))

    # --- updates ---

    def observe(self, record: PromptRecord) -> None:
        """Count a finished prompt (recorder listener); queued and running records, and repeats, are ignored."""
        if record.Outcome not in FINAL_OUTCOMES:
            return
        if self._lookup is not None:
            current = self._lookup(record.PromptId)
            if current is not None and current.Outcome not in FINAL_OUTCOMES:
                # The recorder still reports it running: this copy went out before the finishing steps ran (its
                # markers and notes are not final yet); the finished record is published after them.
                return
        with self._lock:
            if record.PromptId in self._seen:
                return
            self._seen[record.PromptId] = None
            if len(self._seen) > _DEDUPE_SIZE:
                self._seen.popitem(last=False)
        outcome = record.Outcome
        self.prompts.labels(outcome=outcome).inc()
        if record.DurationSeconds is not None:
            self.prompt_duration.labels(outcome=outcome).observe(max(0.0, record.DurationSeconds))
        if record.QueueWaitSeconds is not None:
            self.queue_wait.observe(max(0.0, record.QueueWaitSeconds))
        for node in record.Nodes:
            children = self._node_children.get(node.ClassType)
            if children is None:
                label = self._class_label(node.ClassType)
                children = (self.node_duration.labels(class_type=label), self.nodes_cached.labels(class_type=label))
                if len(self._node_children) < 4 * self.max_class_types + 64:  # bounded like the labels themselves
                    self._node_children[node.ClassType] = children
            if node.Cached:
                children[1].inc()
            elif node.Calls > 0:
                children[0].observe(max(0.0, node.Seconds))
        peak = record.PeakVram.Bytes
        if peak is not None and peak >= 0:
            self.peak_vram.observe(float(peak))
        for marker in record.Markers:
            state = marker.State if marker.State in MARKER_STATES else OTHER
            self.markers.labels(state=state).inc()
        for note in dict.fromkeys(record.FallbackNotes):
            self.fallback_notes.labels(source=note_source(note)).inc()

    def watch_webhooks(self, service: Any) -> None:
        """Count a WebhookService's deliveries and read its outbox size at scrape time."""
        self.webhook_pending.set_function(lambda: float(service.pending_count()))
        service.add_observer(self.observe_webhook)

    def observe_webhook(self, event: str, outcome: str, reason: str) -> None:
        """One webhook try ended (delivery thread): ``outcome`` delivered, retry or given_up."""
        event = event if event in WEBHOOK_EVENTS else OTHER
        if outcome in ("delivered", "given_up"):
            self.webhook_deliveries.labels(event=event, outcome=outcome).inc()
        if outcome != "delivered" and reason != "outbox_full":  # a delivery given up unsent had no failed try
            self.webhook_failed_tries.labels(event=event, reason=reason if reason in WEBHOOK_REASONS else OTHER).inc()

    def record_retry(self) -> None:
        """A run requeued a prompt (called by the runs routes)."""
        self.retries.inc()

    def record_crashed(self, count: int) -> None:
        """Prompts a previous process left unfinished, marked ``crashed`` by the store when this one started."""
        # Also a gauge: the counter starts above zero, and rate()/increase() never see a counter's first value.
        self.cut_off.set(max(0, count))
        if count > 0:
            self.prompts.labels(outcome="crashed").inc(count)

    # --- reads ---

    def exposition(self) -> bytes:
        """The Prometheus text exposition of this registry (runs the VRAM probe through its cache)."""
        return generate_latest(_WithoutCreated(self.registry))

    def class_types(self) -> frozenset[str]:
        """Class types that have a label of their own so far."""
        with self._lock:
            return frozenset(self._class_types)

    def _class_label(self, class_type: str) -> str:
        name = (class_type or "unknown")[:_MAX_CLASS_TYPE_CHARS]
        with self._lock:
            if name in self._class_types:
                return name
            if name != OTHER and len(self._class_types) < self.max_class_types:
                self._class_types.add(name)
                return name
        return OTHER
