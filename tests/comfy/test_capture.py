"""In-process capture on real ComfyUI: every prompt is recorded, with the right outcome, timings and tags."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import uuid
from pathlib import Path

import aiohttp
import pytest

from harness.comfy import ComfyServer, wait_until
from telemetry.models import Telemetry
from tests.comfy import workflows as wf
from tests.conftest import make_server

pytestmark = pytest.mark.comfy


def wait_record(server: ComfyServer, prompt_id: str, timeout: float = 120) -> dict:
    """The wait route's final record (200), failing the test on 202/404."""
    status, body = server.request("GET", f"/telemetry/prompts/{prompt_id}/wait?timeout={timeout}", timeout=timeout + 10)
    assert status == 200, (status, body)
    return body


def stored_outcome(server: ComfyServer, prompt_id: str) -> str | None:
    """The outcome in the server's SQLite store (read-only), as a crash would leave it."""
    db = server.user_dir / "telemetry" / "telemetry.sqlite3"
    if not db.exists():
        return None
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        row = conn.execute("SELECT outcome FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
    return row[0] if row else None


def uniq(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.mark.smoke
def test_prompt_without_client_id_is_recorded(comfy: ComfyServer) -> None:
    pid = comfy.queue(wf.with_sleep(wf.frames(uniq("nocid"), marker=False), 0.3))
    rec = wait_record(comfy, pid)
    assert rec["Outcome"] == "success"
    assert rec["ClientId"] is None
    assert rec["DurationSeconds"] >= 0.3
    assert rec["QueueWaitSeconds"] is not None and rec["QueueWaitSeconds"] >= 0
    assert rec["QueuedAt"] <= rec["StartedAt"] <= rec["EndedAt"]
    sleep = [n for n in rec["Nodes"] if n["ClassType"] == "RTTestSleep"]
    assert sleep and sleep[0]["Seconds"] >= 0.3 and sleep[0]["Cached"] is False
    assert rec["DurationSeconds"] >= sleep[0]["Seconds"]
    assert {n["ClassType"] for n in rec["Nodes"]} >= {"EmptyImage", "ImageInvert", "SaveImage", "RTTestSleep"}
    assert len(rec["Outputs"]) == 3 and all(o["Type"] == "output" for o in rec["Outputs"])
    # The contract block validates, and its figures come from this prompt.
    tel = Telemetry.model_validate(rec["Telemetry"])
    assert tel.duration_seconds == pytest.approx(rec["DurationSeconds"])
    assert tel.gpu.name.strip() and tel.execution_success_detected is True
    assert tel.gpu.vram_delta_mb == pytest.approx(tel.gpu.vram_after_mb - tel.gpu.vram_before_mb, abs=0.02)
    listed = comfy.get("/telemetry?limit=50")["Prompts"]
    assert pid in [p["PromptId"] for p in listed]


def test_prompt_with_client_id_and_extra_data_tags(comfy: ComfyServer) -> None:
    run, scene = uniq("run"), "3"
    pid = comfy.queue(
        wf.frames(uniq("cid"), marker=False),
        client_id=uuid.uuid4().hex,
        extra_data={"telemetry": {"run_id": run, "scene_id": scene, "title": "Harbour at dawn"}},
    )
    rec = wait_record(comfy, pid)
    assert rec["Outcome"] == "success"
    assert rec["ClientId"]
    assert (rec["RunId"], rec["SceneId"]) == (run, scene)
    assert rec["Tags"]["title"] == "Harbour at dawn"
    assert len(rec["Outputs"]) == 3


def test_tags_and_span_from_the_capture_node(comfy: ComfyServer) -> None:
    run = uniq("noderun")
    prompt = wf.with_capture(wf.with_sleep(wf.frames(uniq("span"), marker=False), 0.25), run_id=run, scene_id="7")
    rec = wait_record(comfy, comfy.queue(prompt))
    assert (rec["RunId"], rec["SceneId"]) == (run, "7")
    spans = rec["Spans"]
    assert len(spans) == 1 and spans[0]["Label"] == "render" and spans[0]["NodeId"] == "12"
    # The span opens before its input (ImageInvert <- RTTestSleep) is evaluated: it covers the sleep.
    assert spans[0]["Seconds"] >= 0.25
    assert spans[0]["VramDeltaMB"] == pytest.approx(spans[0]["VramAfterMB"] - spans[0]["VramBeforeMB"], abs=0.02)


@pytest.mark.smoke
def test_failing_node_is_recorded_as_error(comfy: ComfyServer) -> None:
    message = uniq("kaboom")
    pid = comfy.queue(wf.with_raise(wf.frames(uniq("err"), marker=False), message))
    rec = wait_record(comfy, pid)
    assert rec["Outcome"] == "error"
    assert rec["Error"]["NodeId"] == "11" and rec["Error"]["NodeType"] == "RTTestRaise"
    assert message in rec["Error"]["Message"]
    assert rec["Telemetry"]["ExecutionSuccessDetected"] is False
    assert comfy.history(pid)["status"]["status_str"] == "error"


def test_interrupted_prompt_is_recorded(comfy: ComfyServer, tmp_path: Path) -> None:
    started = tmp_path / "started"
    pid = comfy.queue(wf.with_sleep(wf.frames(uniq("intr"), marker=False), 60, started_file=str(started)))
    wait_until(started.exists, 60, what="the sleep node to start")
    running = comfy.get(f"/telemetry/prompts/{pid}")
    assert running["Outcome"] == "running"
    comfy.interrupt()
    rec = wait_record(comfy, pid, timeout=60)
    assert rec["Outcome"] == "interrupted"
    assert rec["Error"]["NodeType"] == "RTTestSleep"
    assert rec["DurationSeconds"] < 30


def test_fully_cached_prompt_is_recorded(comfy: ComfyServer) -> None:
    prompt = wf.frames(uniq("cache"), marker=False)
    first = wait_record(comfy, comfy.queue(prompt))
    rec = wait_record(comfy, comfy.queue(prompt))
    assert rec["Outcome"] == "success"
    assert rec["Nodes"] and all(n["Cached"] for n in rec["Nodes"]), rec["Nodes"]
    # A cached output node writes no new file; the record lists what it produced, as the first run did (0.3.75's
    # history leaves it out when the prompt has no client_id).
    assert sorted(o["Filename"] for o in rec["Outputs"]) == sorted(o["Filename"] for o in first["Outputs"])
    assert len(first["Outputs"]) == 3


def test_unknown_ids_and_bad_parameters(comfy: ComfyServer) -> None:
    for path in ("/telemetry/prompts/no-such-prompt", "/telemetry/prompts/no-such-prompt/wait?timeout=1"):
        status, body = comfy.request("GET", path)
        assert status == 404 and "no-such-prompt" in body["error"]
    for path, param in (
        ("/telemetry?limit=abc", "limit"),
        ("/telemetry?limit=-1", "limit"),
        ("/telemetry/prompts/x/wait?timeout=-5", "timeout"),
        ("/telemetry/prompts/x/wait?timeout=1e9", "timeout"),
        ("/telemetry/prompts/x/wait?timeout=nan", "timeout"),
    ):
        status, body = comfy.request("GET", path)
        assert status == 400 and body["parameter"] == param, (path, status, body)
        assert param in body["error"]


@pytest.mark.smoke
def test_wait_route_times_out_with_202_while_running(comfy: ComfyServer, tmp_path: Path) -> None:
    started = tmp_path / "started"
    pid = comfy.queue(wf.with_sleep(wf.frames(uniq("slow"), marker=False), 3, started_file=str(started)))
    wait_until(started.exists, 60, what="the sleep node to start")
    status, body = comfy.request("GET", f"/telemetry/prompts/{pid}/wait?timeout=0.2")
    assert status == 202 and body["Outcome"] == "running" and body["TimedOut"] is True
    assert wait_record(comfy, pid)["Outcome"] == "success"


def test_websocket_event_when_a_prompt_ends(comfy: ComfyServer) -> None:
    client_id = uuid.uuid4().hex

    async def scenario() -> dict:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{comfy.url}/ws?clientId={client_id}") as ws:
                pid = await asyncio.to_thread(comfy.queue, wf.frames(uniq("ws"), marker=False), client_id=client_id)
                async with asyncio.timeout(60):
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue
                        data = json.loads(msg.data)
                        if data.get("type") == "telemetry.prompt" and data["data"]["PromptId"] == pid:
                            if data["data"]["Outcome"] == "success":
                                return data["data"]
        raise AssertionError("no telemetry.prompt event")

    summary = asyncio.run(scenario())
    assert summary["DurationSeconds"] > 0 and summary["Gpu"]


def test_routes_stay_correct_under_concurrent_reads(comfy: ComfyServer) -> None:
    stop = threading.Event()
    errors: list[str] = []
    reads = [0]
    pids: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            status, body = comfy.request("GET", "/telemetry?limit=20")
            if status != 200 or not isinstance(body.get("Prompts"), list):
                errors.append(f"/telemetry -> {status}")
            for pid in list(pids):
                status, rec = comfy.request("GET", f"/telemetry/prompts/{pid}")
                if status != 200 or rec.get("PromptId") != pid:
                    errors.append(f"{pid} -> {status}")
            reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        for i in range(5):
            pids.append(comfy.queue(wf.with_sleep(wf.frames(uniq(f"conc{i}"), marker=False), 0.1)))
        recs = [wait_record(comfy, pid) for pid in pids]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    assert reads[0] > 5
    assert [r["Outcome"] for r in recs] == ["success"] * 5
    assert len({r["PromptId"] for r in recs}) == 5


def test_record_survives_kill9_and_cut_off_prompt_is_marked(tmp_path: Path) -> None:
    server = make_server()
    try:
        server.start()
        done_id = server.queue(wf.frames(uniq("durable"), marker=False))
        assert wait_record(server, done_id)["Outcome"] == "success"
        started = tmp_path / "started"
        cut_id = server.queue(wf.with_sleep(wf.frames(uniq("cut"), marker=False), 120, started_file=str(started)))
        wait_until(started.exists, 60, what="the long prompt to start")
        # Running is visible at once from memory; the row that survives a kill is stored a moment later.
        wait_until(lambda: stored_outcome(server, cut_id) == "running", 10, what="the stored running record")
        server.kill9()
        server.start()
        status, rec = server.request("GET", f"/telemetry/prompts/{done_id}")
        assert status == 200 and rec["Outcome"] == "success" and len(rec["Outputs"]) == 3
        status, rec = server.request("GET", f"/telemetry/prompts/{cut_id}")
        assert status == 200 and rec["Outcome"] == "crashed"
        assert any("stopped" in n for n in rec["FallbackNotes"])
    finally:
        server.stop()
