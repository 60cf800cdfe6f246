"""The Prometheus metrics: counts from records, bounded label sets, scrape-time VRAM, the route, the Grafana dashboard."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from telemetry.atomic import atomic_write
from telemetry.metrics import NOTE_SOURCES, OTHER, TelemetryMetrics, note_source
from telemetry.policy import apply_overrides, policy_from_env
from telemetry.probes import NvidiaSmiProvider, NvmlProvider, ProbeChain, TorchCudaProvider
from telemetry.recorder import Recorder
from telemetry.records import MarkerState, NodeTiming, PeakVramInfo, PromptError, PromptRecord
from telemetry.store import Store
from telemetry.writer import Writer
from tests.pkg import sub

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "run-telemetry.grafana.json"
GIB = 1 << 30

Series = set[tuple[str, frozenset[tuple[str, str]]]]


def gpu_snapshot(free: int = 20 * GIB) -> dict[str, Any]:
    """A snapshot shaped like the probe chain's: two GPUs, the second one computing."""
    gpu0 = {"Name": "NVIDIA RTX A6000", "Type": "cuda", "Index": 0, "VramTotal": 48 * GIB, "VramFree": 47 * GIB}
    gpu1 = {"Name": "NVIDIA RTX A6000", "Type": "cuda", "Index": 1, "CudaIndex": 0, "VramTotal": 48 * GIB}
    gpu1["VramFree"] = free
    return {"Source": "nvml", "Device": gpu1, "Devices": [gpu0, gpu1], "FallbackNotes": []}


def record(
    prompt_id: str | None = None,
    outcome: str = "success",
    *,
    duration: float | None = 1.5,
    wait: float | None = 0.25,
    nodes: Iterable[tuple[str, float, bool]] = (("EmptyImage", 0.02, False), ("SaveImage", 0.3, False)),
    markers: Iterable[str] = (),
    notes: Iterable[str] = (),
    peak: int | None = None,
    run_id: str | None = None,
) -> PromptRecord:
    """A finished record as the recorder builds one."""
    pid = prompt_id or uuid.uuid4().hex
    return PromptRecord(
        PromptId=pid,
        RunId=run_id,
        SceneId="1" if run_id else None,
        Tags={"run_id": run_id} if run_id else {},
        Outcome=outcome,
        Error=None if outcome == "success" else PromptError(NodeId="11", NodeType="RTTestRaise", Message=f"boom {pid}"),
        DurationSeconds=duration,
        QueueWaitSeconds=wait,
        Nodes=[
            NodeTiming(
                NodeId=str(i), ClassType=ct, Seconds=0.0 if cached else s, Calls=0 if cached else 1, Cached=cached
            )
            for i, (ct, s, cached) in enumerate(nodes)
        ],
        Markers=[MarkerState(NodeId=f"m{i}", Prefix=f"renders/{pid}/frame", State=st) for i, st in enumerate(markers)],
        FallbackNotes=list(notes),
        PeakVram=PeakVramInfo(Bytes=peak, MB=None if peak is None else peak / 1048576, Method="nvml" if peak else "x"),
    )


def parse(text: str | bytes) -> dict[str, Any]:
    """Families by name, through prometheus_client's own parser."""
    if isinstance(text, bytes):
        text = text.decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(m: TelemetryMetrics, sample: str, **labels: str) -> float | None:
    """The value of one sample in the exposition, or None when it is absent."""
    for family in parse(m.exposition()).values():
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def series(text: str | bytes) -> Series:
    """Every (sample name, label set) in an exposition."""
    return {(s.name, frozenset(s.labels.items())) for f in parse(text).values() for s in f.samples}


def label_values(text: str | bytes, label: str, sample_prefix: str = "") -> set[str]:
    """Values one label takes across the exposition (optionally only for samples starting with a prefix)."""
    return {dict(lbl)[label] for name, lbl in series(text) if name.startswith(sample_prefix) and label in dict(lbl)}


HEALTH_REPORT = {
    "Status": "degraded",
    "Checks": [
        {"Name": "prompt_worker", "Status": "ok", "Detail": "alive", "Since": None},
        {"Name": "store", "Status": "degraded", "Detail": "locked", "Since": "2026-11-29T18:00:00.000Z"},
    ],
}


def fed_metrics(**kw: Any) -> TelemetryMetrics:
    """Metrics that have seen one of everything, so every family has samples."""
    kw.setdefault("health", lambda: HEALTH_REPORT)
    kw.setdefault("store", lambda: {"Ok": False, "Mode": "file"})
    m = TelemetryMetrics(snapshot=gpu_snapshot, version="9.9.9", **kw)
    m.observe(record(markers=["written"], peak=6 * GIB, notes=["nvml failed: x; used torch-cuda instead"]))
    m.observe(record(outcome="error", nodes=[("EmptyImage", 0.0, True), ("RTTestRaise", 0.01, False)]))
    m.observe(record(outcome="interrupted", markers=["failed"]))
    m.record_retry()
    m.record_crashed(1)
    return m


# --- counts -----------------------------------------------------------------------------------------------------------


def test_outcomes_durations_queue_wait_and_nodes() -> None:
    m = TelemetryMetrics(version="1.2.3")
    m.observe(record(duration=0.4, wait=0.02))
    m.observe(record(duration=3.0, wait=12.0, nodes=[("EmptyImage", 0.0, True), ("SaveImage", 0.7, False)]))
    m.observe(record(outcome="error", duration=0.2, wait=None))
    m.observe(record(outcome="interrupted", duration=None))
    assert value(m, "comfyui_telemetry_prompts_total", outcome="success") == 2
    assert value(m, "comfyui_telemetry_prompts_total", outcome="error") == 1
    assert value(m, "comfyui_telemetry_prompts_total", outcome="interrupted") == 1
    assert value(m, "comfyui_telemetry_prompts_total", outcome="crashed") == 0
    assert value(m, "comfyui_telemetry_prompt_duration_seconds_count", outcome="success") == 2
    assert value(m, "comfyui_telemetry_prompt_duration_seconds_sum", outcome="success") == pytest.approx(3.4)
    assert value(m, "comfyui_telemetry_prompt_duration_seconds_bucket", outcome="success", le="0.5") == 1
    assert value(m, "comfyui_telemetry_prompt_duration_seconds_count", outcome="interrupted") == 0  # no duration
    assert value(m, "comfyui_telemetry_queue_wait_seconds_count") == 3
    assert value(m, "comfyui_telemetry_queue_wait_seconds_sum") == pytest.approx(12.27)
    # Only nodes that ran are timed; cached ones are counted apart.
    assert value(m, "comfyui_telemetry_node_duration_seconds_count", class_type="EmptyImage") == 3
    assert value(m, "comfyui_telemetry_node_duration_seconds_count", class_type="SaveImage") == 4
    assert value(m, "comfyui_telemetry_node_duration_seconds_sum", class_type="SaveImage") == pytest.approx(1.6)
    assert value(m, "comfyui_telemetry_nodes_cached_total", class_type="EmptyImage") == 1
    assert value(m, "comfyui_telemetry_build_info", version="1.2.3") == 1


def test_queued_running_and_repeated_records_are_not_counted() -> None:
    m = TelemetryMetrics()
    rec = record("p-1")
    for outcome in ("queued", "running"):
        m.observe(rec.model_copy(update={"Outcome": outcome}))
    assert value(m, "comfyui_telemetry_prompts_total", outcome="success") == 0
    m.observe(rec)
    m.observe(rec)  # published twice: counted once
    assert value(m, "comfyui_telemetry_prompts_total", outcome="success") == 1
    assert value(m, "comfyui_telemetry_node_duration_seconds_count", class_type="SaveImage") == 1


def test_markers_peak_vram_retries_and_crashed() -> None:
    m = TelemetryMetrics()
    m.observe(record(markers=["written", "written"], peak=5 * GIB))
    m.observe(record(outcome="error", markers=["failed"], peak=None))
    m.observe(record(markers=["error"], peak=30 * GIB))
    assert value(m, "comfyui_telemetry_done_markers_total", state="written") == 2
    assert value(m, "comfyui_telemetry_done_markers_total", state="failed") == 1
    assert value(m, "comfyui_telemetry_done_markers_total", state="error") == 1
    assert value(m, "comfyui_telemetry_prompt_peak_vram_bytes_count") == 2
    assert value(m, "comfyui_telemetry_prompt_peak_vram_bytes_sum") == 35 * GIB
    six = [
        s
        for s in parse(m.exposition())["comfyui_telemetry_prompt_peak_vram_bytes"].samples
        if s.name.endswith("_bucket") and float(s.labels["le"]) == 6 * GIB
    ]
    assert [s.value for s in six] == [1]
    assert value(m, "comfyui_telemetry_retries_total") == 0
    m.record_retry()
    m.record_retry()
    assert value(m, "comfyui_telemetry_retries_total") == 2
    m.record_crashed(3)
    assert value(m, "comfyui_telemetry_prompts_total", outcome="crashed") == 3
    assert value(m, "comfyui_telemetry_prompts_cut_off") == 3


def test_own_registry_and_no_created_series() -> None:
    before = set(prometheus_client.REGISTRY._names_to_collectors)
    a, b = fed_metrics(), fed_metrics()  # two instances in one process must not clash
    assert set(prometheus_client.REGISTRY._names_to_collectors) == before
    assert not any(n.startswith("comfyui_telemetry") for n in prometheus_client.REGISTRY._names_to_collectors)
    assert a.registry is not b.registry
    names = {name for name, _ in series(a.exposition())}
    assert names and all(n.startswith("comfyui_telemetry_") for n in names)
    assert not any(n.endswith("_created") for n in names)


# --- bounded labels ---------------------------------------------------------------------------------------------------


def test_label_sets_do_not_grow_with_prompt_ids() -> None:
    m = TelemetryMetrics(snapshot=gpu_snapshot, version="9.9.9")
    ids: list[str] = []
    outcomes = ("success", "error", "interrupted", "success")
    marker_states = ("written", "failed", "error", "written")

    def batch(start: int, count: int) -> None:
        for i in range(start, start + count):
            pid, run = f"prompt-{uuid.uuid4()}", f"run-{uuid.uuid4().hex}"
            ids.extend([pid, run])
            m.observe(
                record(
                    pid,
                    outcomes[i % 4],
                    run_id=run,
                    # Every prompt brings a class type never seen before, plus a common one.
                    nodes=[(f"CustomNode{i}", 0.01 * (i % 7), False), ("SaveImage", 0.2, i % 3 == 0)],
                    markers=[marker_states[i % 4]],
                    notes=[
                        f"nvml failed: GPU is lost ({pid}); used torch-cuda instead",
                        f"marker for prefix 'renders/{pid}' could not be written: disk full",
                        f"something new about {run}",
                    ],
                    peak=(i % 50) * GIB,
                    duration=0.1 * i,
                    wait=0.01 * i,
                )
            )

    batch(0, 150)  # past the class-type cap: the label set is now at its largest
    first = m.exposition()
    batch(150, 300)
    second = m.exposition()
    assert series(second) == series(first), "a label set grew with the prompts"
    values = {v for _, labels in series(second) for _, v in labels}
    leaked = [i for i in ids if any(i in v for v in values)]
    assert not leaked, f"prompt or run ids in label values: {leaked[:3]}"
    classes = label_values(second, "class_type")
    assert len(classes) == m.max_class_types + 1 and OTHER in classes and "SaveImage" in classes
    assert label_values(second, "source", "comfyui_telemetry_fallback_notes") == set(NOTE_SOURCES)
    # 100 class types each with 10 buckets + Inf + sum + count, plus cached counters: bounded by the cap, not prompts.
    assert len(series(second)) < 2000


def test_class_types_past_the_cap_count_as_other() -> None:
    m = TelemetryMetrics(max_class_types=2)
    m.observe(record(nodes=[("A", 1.0, False), ("B", 1.0, False), ("C", 1.0, False), ("D", 2.0, False)]))
    m.observe(record(nodes=[("A", 1.0, False), ("C", 1.0, True)]))
    assert m.class_types() == {"A", "B"}
    assert value(m, "comfyui_telemetry_node_duration_seconds_count", class_type="A") == 2
    assert value(m, "comfyui_telemetry_node_duration_seconds_count", class_type=OTHER) == 2
    assert value(m, "comfyui_telemetry_node_duration_seconds_sum", class_type=OTHER) == 3.0
    assert value(m, "comfyui_telemetry_nodes_cached_total", class_type=OTHER) == 1
    assert value(m, "comfyui_telemetry_node_duration_seconds_count", class_type="C") is None


# --- fallback note sources --------------------------------------------------------------------------------------------


def _missing(what: str) -> Callable[[], Any]:
    def loader() -> Any:
        raise ImportError(f"No module named {what!r}")

    return loader


def test_note_sources_from_the_notes_the_package_writes(tmp_path: Path) -> None:
    chain = ProbeChain(
        [
            NvmlProvider(loader=_missing("pynvml"), env={}),
            TorchCudaProvider(loader=_missing("torch")),
            NvidiaSmiProvider(which=lambda _name: None, env={}),
        ]
    )
    probe_notes = chain.snapshot().fallback_notes
    assert [note_source(n) for n in probe_notes] == ["nvml", "torch-cuda", "nvidia-smi"], probe_notes

    def refuse(_src: Any, _dst: Any) -> None:
        raise PermissionError(13, "Access is denied")

    written = atomic_write(tmp_path / "shot.done", b"{}", replace=refuse, sleep=lambda _s: None, retries=1)
    assert written.fallback_note and note_source(written.fallback_note) == "marker"
    _, env_notes = policy_from_env({"SCENE_MAX_WAIT_SECONDS": "soon"})
    _, run_notes = apply_overrides(policy_from_env({})[0], {"max_wait_seconds": -1, "colour": "red"})
    assert env_notes and run_notes
    assert {note_source(n) for n in [*env_notes, *run_notes]} == {"policy"}
    # The runs code's wording (hooks/runs.py), as it stands in records after a scene failed.
    assert note_source("scene 2 failed after 2 attempt(s); retry budget exhausted") == "retry"
    assert note_source("retry of scene 2 could not be queued: HTTP Error 400") == "retry"
    assert note_source("a brand new kind of note") == OTHER
    assert all(note_source(n) in NOTE_SOURCES for n in [*probe_notes, *env_notes, "", "x"])


def test_recorder_notes_reach_the_counters_through_the_listener(tmp_path: Path) -> None:
    """The real recorder and writer: a failing snapshot, start hook and finishers leave notes; the listener counts them."""
    writer = Writer()
    calls = {"n": 0}

    def snapshot() -> dict[str, Any]:
        calls["n"] += 1
        raise RuntimeError("probe exploded")

    def bad_hook(_rec: Any, _prompt: Any) -> None:
        raise ValueError("hook exploded")

    def bad_finisher(_rec: Any) -> None:
        raise OSError("finisher exploded")

    recorder = Recorder(Store(tmp_path / "t.sqlite3"), writer, snapshot)
    recorder.add_start_hook(bad_hook)
    recorder.add_finisher("done marker", bad_finisher)
    recorder.add_finisher("contract telemetry", bad_finisher)
    m = TelemetryMetrics(lookup=recorder.get)
    recorder.add_listener(m.observe)
    # Started and ended back to back: the running record may be published after ended(); only the finished record
    # may count (its marker and contract notes included).
    recorder.started(
        "p-notes",
        {"1": {"class_type": "EmptyImage", "inputs": {}}},
        {"create_time": time.time() * 1000, "telemetry": {"run_id": "r-1"}},
    )
    recorder.node_called("p-notes", "1", "EmptyImage", 0.05)
    recorder.ended("p-notes", [["execution_success", {"timestamp": time.time() * 1000}]], {"outputs": {}})
    assert writer.flush(10)
    writer.stop()
    assert value(m, "comfyui_telemetry_prompts_total", outcome="success") == 1
    assert value(m, "comfyui_telemetry_fallback_notes_total", source="probe") == 1  # one note, however many snapshots
    assert value(m, "comfyui_telemetry_fallback_notes_total", source="hook") == 2  # start hook + contract finisher
    assert value(m, "comfyui_telemetry_fallback_notes_total", source="marker") == 1
    assert value(m, "comfyui_telemetry_fallback_notes_total", source=OTHER) == 0
    assert value(m, "comfyui_telemetry_node_duration_seconds_count", class_type="EmptyImage") == 1


# --- scrape-time VRAM -------------------------------------------------------------------------------------------------


def test_vram_gauges_are_read_at_scrape_time() -> None:
    free = {"now": 20 * GIB}
    m = TelemetryMetrics(snapshot=lambda: gpu_snapshot(free["now"]))
    assert value(m, "comfyui_telemetry_vram_free_bytes", device="1", name="NVIDIA RTX A6000") == 20 * GIB
    assert value(m, "comfyui_telemetry_vram_total_bytes", device="0", type="cuda") == 48 * GIB
    free["now"] = 3 * GIB
    assert value(m, "comfyui_telemetry_vram_free_bytes", device="1") == 3 * GIB
    assert value(m, "comfyui_telemetry_probe_source", source="nvml") == 1


def test_cpu_snapshot_and_a_failing_probe() -> None:
    cpu = {"Name": "cpu", "Type": "cpu", "VramTotal": 8 * GIB, "VramFree": 5 * GIB}
    m = TelemetryMetrics(snapshot=lambda: {"Source": "system-ram", "Device": cpu, "Devices": []})
    assert value(m, "comfyui_telemetry_vram_free_bytes", device="cpu", type="cpu") == 5 * GIB
    assert value(m, "comfyui_telemetry_probe_source", source="system-ram") == 1

    def broken() -> dict[str, Any]:
        raise RuntimeError("driver gone")

    m = TelemetryMetrics(snapshot=broken)
    m.observe(record())
    text = m.exposition()  # the scrape still answers with everything else
    assert value(m, "comfyui_telemetry_prompts_total", outcome="success") == 1
    assert "comfyui_telemetry_vram_free_bytes" not in {n for n, _ in series(text)}


# --- the route, mounted on a bare aiohttp application -----------------------------------------------------------------


async def test_route_serves_the_exposition_and_attaches_rt_metrics(aiohttp_client: Any, tmp_path: Path) -> None:
    routes_module = sub("server_routes.metrics")
    openapi = sub("server_routes.openapi")
    # A previous process left a prompt running: the runtime's store marks it crashed when this one starts.
    data_dir = tmp_path / "user" / "telemetry"
    sub("telemetry.store").Store(data_dir / "telemetry.sqlite3").put(
        PromptRecord(PromptId="left-running", Outcome="running")
    )
    probes = {"n": 0}

    def snapshot() -> dict[str, Any]:
        probes["n"] += 1
        return gpu_snapshot()

    rt = sub("hooks.runtime").Runtime(
        user_dir=tmp_path / "user", output_dir=lambda: tmp_path / "output", snapshot=snapshot, env={}
    )
    assert rt.cut_off == ["left-running"]
    writer = rt.writer
    routes = web.RouteTableDef()
    routes_module.add_routes(routes, rt)
    app = web.Application()
    app.add_routes(routes)
    client = await aiohttp_client(app)

    rt.recorder.started(
        "p-route", {"1": {"class_type": "EmptyImage", "inputs": {}}}, {"telemetry": {"run_id": "run-route"}}
    )
    rt.recorder.node_called("p-route", "1", "EmptyImage", 0.01)
    rt.recorder.ended("p-route", [["execution_error", {"node_id": "1", "exception_message": "x"}]], {"outputs": {}})
    assert writer.flush(10)
    rt.metrics.record_retry()  # what the runs routes call when they requeue

    resp = await client.get("/telemetry/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST
    text = await resp.text()
    writer.stop()
    fams = parse(text)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert samples[("comfyui_telemetry_prompts_total", (("outcome", "error"),))] == 1
    assert samples[("comfyui_telemetry_prompts_total", (("outcome", "crashed"),))] == 1
    assert samples[("comfyui_telemetry_prompts_cut_off", ())] == 1
    assert samples[("comfyui_telemetry_retries_total", ())] == 1
    assert samples[("comfyui_telemetry_build_info", (("version", rt.version),))] == 1
    assert samples[("comfyui_telemetry_node_duration_seconds_count", (("class_type", "EmptyImage"),))] == 1
    assert fams["comfyui_telemetry_vram_free_bytes"].type == "gauge"
    for leaked in ("p-route", "run-route", "left-running"):
        assert leaked not in text
    # Scrapes in quick succession share one probe reading (the snapshot cache), not one each.
    before = probes["n"]
    for _ in range(10):
        assert (await client.get("/telemetry/metrics")).status == 200
    assert probes["n"] - before < 10
    assert "/telemetry/metrics" in openapi.build_openapi(rt.version)["paths"]


# --- the Grafana dashboard --------------------------------------------------------------------------------------------

SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{")
METRIC = re.compile(r"\bcomfyui_telemetry_[a-z0-9_]+")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    """Every target expression of every panel."""
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def check_dashboard_structure(dash: dict[str, Any]) -> None:
    """Grafana's dashboard model at the level a JSON import needs (shared with the real-server test)."""
    for key in ("title", "uid", "panels", "schemaVersion", "templating", "time"):
        assert key in dash, f"dashboard lacks {key!r}"
    assert isinstance(dash["title"], str) and dash["title"].strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dash["uid"]), dash["uid"]
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 30
    assert set(dash["time"]) >= {"from", "to"}
    variables = dash["templating"]["list"]
    assert {v["name"] for v in variables} >= {"datasource", "instance"}
    for v in variables:
        assert {"name", "type"} <= set(v) and v["type"] in {"datasource", "query", "custom", "interval", "constant"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        for key in ("id", "type", "title", "gridPos", "targets"):
            assert key in p, f"panel {p.get('title')!r} lacks {key!r}"
        assert p["type"] in {"timeseries", "stat", "bargauge", "table", "gauge", "piechart"}
        assert p.get("description"), f"panel {p['title']!r} should say which question it answers"
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("x", "y", "w", "h"))
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].strip() and t["expr"].count("(") == t["expr"].count(")"), t["expr"]


def check_dashboard_metric_names(dash: dict[str, Any], emitted: set[str]) -> None:
    """Every metric an expression selects is one the exposition really emits, and every family is on a panel."""
    used: set[str] = set()
    for expr in dashboard_exprs(dash):
        selected = set(SELECTOR.findall(expr))
        assert selected, f"no metric selector in {expr!r}"
        unknown = selected - emitted
        assert not unknown, f"{expr!r} selects metrics the exposition does not emit: {unknown}"
        assert 'instance=~"$instance"' in expr, f"{expr!r} ignores the worker filter"
        used |= set(METRIC.findall(expr))
    families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in emitted}
    shown = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}
    assert families <= shown, f"metrics without a panel: {families - shown}"


def test_dashboard_is_valid_grafana_json_over_emitted_metrics() -> None:
    dash = dashboard()
    check_dashboard_structure(dash)
    emitted = {name for name, _ in series(fed_metrics().exposition())}
    check_dashboard_metric_names(dash, emitted)


def test_health_gauges_follow_the_report() -> None:
    text = fed_metrics().exposition().decode()
    assert "comfyui_telemetry_store_ok 0.0" in text
    assert 'comfyui_telemetry_health_status{status="degraded"} 1.0' in text
    assert 'comfyui_telemetry_health_check_ok{check="store"} 0.0' in text
    assert 'comfyui_telemetry_health_check_ok{check="prompt_worker"} 1.0' in text
    assert 'comfyui_telemetry_health_check_failing_since_seconds{check="store"} 1.7959752e+09' in text
    assert "comfyui_telemetry_prompt_worker_up 1.0" in text
