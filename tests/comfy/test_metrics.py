"""A fleet for real: Debian's Prometheus scrapes two ComfyUI workers (the oldest and newest full-suite versions, 0.3.52 and 0.33.0) at /telemetry/metrics.

Prompts succeed, fail and are interrupted on both; the test then asks Prometheus's HTTP API until the sums by outcome,
marker state, worker and node class match what ran, and runs every Grafana panel's query against the same Prometheus.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.comfy import ComfyServer, free_port, wait_until
from tests.comfy import workflows as wf
from tests.conftest import VERSIONS, make_server
from tests.unit.test_metrics import DASHBOARD, check_dashboard_metric_names, check_dashboard_structure

pytestmark = pytest.mark.comfy

PROMETHEUS = Path("/usr/bin/prometheus")
METRICS_PATH = "/telemetry/metrics"


@dataclass
class Prometheus:
    """A Prometheus process of the test's own on loopback."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        """GET an HTTP API path; the ``data`` of a successful answer."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def by(self, expr: str, label: str) -> dict[str, float]:
        """``{label value: sample value}`` of an instant query."""
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(expr)}

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
        return True

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL if it does not stop."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def scrape_config(targets: list[str]) -> str:
    """The fleet guide's scrape config, pointed at the test's workers."""
    listed = ", ".join(f'"{t}"' for t in targets)
    return (
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: comfyui\n"
        f"    metrics_path: {METRICS_PATH}\n"
        "    static_configs:\n"
        f"      - targets: [{listed}]\n"
    )


def start_prometheus(config: str, folder: Path) -> Prometheus:
    """Start /usr/bin/prometheus on a free loopback port with its own storage; return once it is ready."""
    if not PROMETHEUS.exists():
        pytest.fail("Debian's prometheus is missing: run scripts/dev.sh test, or apt-get install -y prometheus")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "prometheus.yml"
    cfg.write_text(config)
    port = free_port()
    log = folder / "prometheus.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={cfg}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    prom = Prometheus(proc, port, log)

    def ready() -> bool:
        prom.alive()
        try:
            with urllib.request.urlopen(prom.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    try:
        wait_until(ready, 60, what=f"prometheus on port {port} to be ready")
    except BaseException:
        prom.stop()
        raise
    return prom


@dataclass
class Fleet:
    workers: list[ComfyServer]
    prom: Prometheus

    def instance(self, server: ComfyServer) -> str:
        return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two real workers (one of each ComfyUI version) and a Prometheus scraping both every second."""
    workers = [make_server(v) for v in VERSIONS]
    errors: list[BaseException] = []

    def start(server: ComfyServer) -> None:
        try:
            server.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in workers]
    prom: Prometheus | None = None
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        folder = tmp_path_factory.mktemp("prometheus")
        prom = start_prometheus(scrape_config([f"127.0.0.1:{s.port}" for s in workers]), folder)
        yield Fleet(workers, prom)
    finally:
        if prom is not None:
            prom.stop()
        for s in workers:
            s.stop()
            if not os.environ.get("RT_KEEP_SERVERS"):
                shutil.rmtree(s.base_dir, ignore_errors=True)


def final_record(server: ComfyServer, prompt_id: str, timeout: float = 120) -> dict[str, Any]:
    status, body = server.request("GET", f"/telemetry/prompts/{prompt_id}/wait?timeout={timeout}", timeout=timeout + 10)
    assert status == 200, (status, body)
    return body


def uniq(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def run_prompts(server: ComfyServer, tmp: Path, *, ok: int, failing: int, interrupted: int) -> list[dict[str, Any]]:
    """Successes, failures (a node raises) and interrupts, each with a WriteDoneMarker; their final records."""
    records = []
    for _ in range(ok):
        records.append(final_record(server, server.queue(wf.frames(uniq("ok"), count=2))))
    for _ in range(failing):
        records.append(final_record(server, server.queue(wf.with_raise(wf.frames(uniq("fail"), count=2)))))
    for _ in range(interrupted):
        started = tmp / uniq("started")
        pid = server.queue(wf.with_sleep(wf.frames(uniq("intr"), count=2), 120, started_file=str(started)))
        wait_until(started.exists, 60, what="the sleep node to start")
        server.interrupt()
        records.append(final_record(server, pid, timeout=60))
    return records


def run_retried_scene(server: ComfyServer, tmp: Path) -> list[dict[str, Any]]:
    """A run's scene whose first attempt fails once (RTTestFlaky): the runs code requeues it; both final records."""
    p = wf.frames(uniq("scene"), count=2)
    p["13"] = {
        "class_type": "RTTestFlaky",
        "inputs": {"image": ["1", 0], "counter_file": str(tmp / uniq("counter")), "failures": 1},
    }
    p["2"]["inputs"]["image"] = ["13", 0]
    tags = {"run_id": uniq("fleet"), "scene_id": "1"}
    first = final_record(server, server.queue(p, extra_data={"telemetry": tags}))
    assert first["Outcome"] == "error" and first.get("RetriedBy"), first
    return [first, final_record(server, first["RetriedBy"])]


def eventually(prom: Prometheus, check: Callable[[], Any], expected: Any, what: str, timeout: float = 60) -> None:
    """Wait until ``check()`` equals ``expected`` (Prometheus scrapes every second); name both on timeout."""
    seen: list[Any] = []

    def cond() -> bool:
        prom.alive()
        seen[:] = [check()]
        return seen[0] == expected

    try:
        wait_until(cond, timeout, what=what, interval=0.25)
    except TimeoutError as exc:
        targets = prom.api("/api/v1/targets")["activeTargets"]
        health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
        raise AssertionError(f"{exc}: expected {expected}, last saw {seen}; targets {health}") from None


def scrape(server: ComfyServer) -> tuple[str, str]:
    """GET /telemetry/metrics directly: (content type, body)."""
    with urllib.request.urlopen(server.url + METRICS_PATH, timeout=10) as r:
        return r.headers["Content-Type"], r.read().decode()


def panel_query(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in as Grafana would."""
    return expr.replace("$instance", ".*").replace("$__rate_interval", "1m").replace("$__range", "10m")


def test_prometheus_scrapes_two_workers_and_sums_match(fleet: Fleet, tmp_path: Path) -> None:
    a, b = fleet.workers
    prom = fleet.prom
    eventually(
        prom,
        lambda: prom.by('up{job="comfyui"}', "instance"),
        {fleet.instance(a): 1.0, fleet.instance(b): 1.0},
        "both workers to be scraped (up == 1)",
    )
    plan = [(a, {"ok": 3, "failing": 1, "interrupted": 1}), (b, {"ok": 2, "failing": 2, "interrupted": 0})]
    records = [(server, run_prompts(server, tmp_path, **counts)) for server, counts in plan]
    records[1][1].extend(run_retried_scene(b, tmp_path))  # one retry, on the older ComfyUI
    every = [r for _, rs in records for r in rs]
    outcomes = {"success": 0, "error": 0, "interrupted": 0, "crashed": 0, "cancelled": 0, "lost": 0}
    for r in every:
        outcomes[r["Outcome"]] += 1
    expected = {"success": 6, "error": 4, "interrupted": 1, "crashed": 0, "cancelled": 0, "lost": 0}
    assert outcomes == expected, outcomes

    eventually(
        prom,
        lambda: prom.by("sum by (outcome) (comfyui_telemetry_prompts_total)", "outcome"),
        {k: float(v) for k, v in outcomes.items()},
        "Prometheus's sums by outcome to match the prompts run",
    )
    eventually(
        prom,
        lambda: prom.by("sum by (instance) (comfyui_telemetry_prompts_total)", "instance"),
        {fleet.instance(s): float(len(rs)) for s, rs in records},
        "the sums by worker",
    )
    markers = {"written": 0.0, "failed": 0.0, "error": 0.0, "skipped": 0.0}
    for r in every:
        for m in r["Markers"]:
            markers[m["State"]] += 1
    # .done for each success, .failed for each failure and interrupt, none yet for the attempt that was retried.
    assert markers == {"written": 6.0, "failed": 4.0, "error": 0.0, "skipped": 1.0}, markers
    eventually(
        prom,
        lambda: prom.by("sum by (state) (comfyui_telemetry_done_markers_total)", "state"),
        markers,
        "done markers by state",
    )
    eventually(
        prom,
        lambda: prom.by("sum by (outcome) (comfyui_telemetry_prompt_duration_seconds_count)", "outcome"),
        {k: float(v) for k, v in outcomes.items()},
        "prompt duration histogram counts by outcome",
    )
    eventually(
        prom,
        lambda: prom.by("sum(comfyui_telemetry_queue_wait_seconds_count)", ""),
        {"": float(len(every))},
        "queue wait histogram count",
    )
    eventually(
        prom,
        lambda: prom.by("sum by (instance) (comfyui_telemetry_retries_total)", "instance"),
        {fleet.instance(a): 0.0, fleet.instance(b): 1.0},
        "retries by worker",
    )
    ran = {"SaveImage": 0.0, "RTTestSleep": 0.0}
    for r in every:
        for n in r["Nodes"]:
            if n["ClassType"] in ran and not n["Cached"] and n["Calls"] > 0:
                ran[n["ClassType"]] += 1
    assert ran["SaveImage"] == 6 and ran["RTTestSleep"] == 1, ran
    eventually(
        prom,
        lambda: {
            k: v
            for k, v in prom.by(
                "sum by (class_type) (comfyui_telemetry_node_duration_seconds_count)", "class_type"
            ).items()
            if k in ran
        },
        ran,
        "node durations by class type",
    )
    # Scrape-time gauges: every worker reports its device memory, its probe and its version.
    vram = prom.query("comfyui_telemetry_vram_total_bytes")
    assert {s["metric"]["instance"] for s in vram} == {fleet.instance(a), fleet.instance(b)}
    assert all(float(s["value"][1]) > 0 for s in vram)
    assert set(prom.by("count by (instance) (comfyui_telemetry_probe_source)", "instance").values()) == {1.0}
    assert set(prom.by("sum by (instance) (comfyui_telemetry_build_info)", "instance").values()) == {1.0}

    # The exposition itself: its content type, prometheus_client's parser, and no prompt or run id in any label.
    ids = [r["PromptId"] for r in every]
    names: set[str] = set()
    for server in (a, b):
        content_type, text = scrape(server)
        assert content_type == prometheus_client.CONTENT_TYPE_LATEST
        families = list(text_string_to_metric_families(text))
        assert families and all(f.name.startswith("comfyui_telemetry_") for f in families)
        names |= {s.name for f in families for s in f.samples}
        values = {v for f in families for s in f.samples for v in s.labels.values()}
        assert not [i for i in ids if any(i in v for v in values)]
        assert not [i for i in ids if i in text]

    # The dashboard: structure, names from this real scrape, and every panel's query answered by this Prometheus.
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    check_dashboard_structure(dash)
    check_dashboard_metric_names(dash, names)
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = panel_query(target["expr"])
            assert not re.search(r"\$\w", expr), expr
            eventually(
                prom,
                lambda expr=expr: bool(prom.query(expr)),
                True,
                f"panel {panel['title']!r} to show data ({expr})",
                timeout=30,
            )
    assert "/telemetry/metrics" in a.get("/telemetry/openapi.json")["paths"]
