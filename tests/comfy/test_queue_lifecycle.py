"""A prompt's life in ComfyUI's queue, on real ComfyUI: known from acceptance, cancelled unrun, lost to a restart."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from harness.comfy import ComfyServer, wait_until
from tests.comfy.workflows import frames, with_sleep
from tests.conftest import VERSIONS, make_server

pytestmark = pytest.mark.comfy


def uniq(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@contextmanager
def busy_queue(server: ComfyServer, tmp: Path) -> Iterator[str]:
    """A long prompt running on the worker, so prompts queued meanwhile stay queued; interrupted at the end."""
    started = tmp / uniq("started")
    pid = server.queue(with_sleep(frames(uniq("blocker"), count=1, marker=False), 120, started_file=str(started)))
    wait_until(started.exists, 60, what="the blocking prompt to start", interval=0.02)
    try:
        yield pid
    finally:
        server.request("POST", "/queue", {"clear": True})
        server.interrupt()
        status, _ = server.request("GET", f"/telemetry/prompts/{pid}/wait?timeout=60", timeout=70)
        assert status == 200


def tagged(run_id: str, scene_id: str | None = None) -> dict[str, Any]:
    tags: dict[str, Any] = {"run_id": run_id}
    if scene_id is not None:
        tags["scene_id"] = scene_id
    return {"telemetry": tags}


class Waiter(threading.Thread):
    """GET /telemetry/prompts/{id}/wait in a thread; records the answer and how long it took."""

    def __init__(self, server: ComfyServer, prompt_id: str, timeout: float = 60) -> None:
        super().__init__(daemon=True)
        self.server, self.prompt_id, self.timeout = server, prompt_id, timeout
        self.answer: tuple[int, Any] | None = None
        self.seconds = 0.0

    def run(self) -> None:
        t0 = time.monotonic()
        self.answer = self.server.request(
            "GET", f"/telemetry/prompts/{self.prompt_id}/wait?timeout={self.timeout}", timeout=self.timeout + 10
        )
        self.seconds = time.monotonic() - t0


def record(server: ComfyServer, prompt_id: str) -> dict[str, Any]:
    status, body = server.request("GET", f"/telemetry/prompts/{prompt_id}")
    assert status == 200, (prompt_id, status, body)
    return body


def test_accepted_prompt_is_known_queued_with_its_tags(comfy: ComfyServer, tmp_path: Path) -> None:
    run_id = uniq("queued")
    with busy_queue(comfy, tmp_path):
        pid = comfy.queue(frames(uniq("q/frame"), count=1), extra_data=tagged(run_id, "4"))
        rec = record(comfy, pid)  # at once: no wait for the store or the worker
        assert rec["Outcome"] == "queued" and rec["RunId"] == run_id and rec["SceneId"] == "4", rec
        assert rec["QueuedAt"] and rec["StartedAt"] is None
        listed = {p["PromptId"]: p for p in comfy.get("/telemetry?limit=50")["Prompts"]}
        assert listed[pid]["Outcome"] == "queued" and listed[pid]["RunId"] == run_id


def test_deleted_and_cleared_prompts_are_cancelled(comfy: ComfyServer, tmp_path: Path) -> None:
    run_id = uniq("cancel")
    prefixes = [uniq("cancel/a"), uniq("cancel/b"), uniq("cancel/c")]
    with busy_queue(comfy, tmp_path):
        ids = [comfy.queue(frames(p, count=1), extra_data=tagged(run_id, str(i))) for i, p in enumerate(prefixes)]
        waiter = Waiter(comfy, ids[0])
        waiter.start()
        status, _ = comfy.request("POST", "/queue", {"delete": [ids[0]]})
        assert status == 200
        waiter.join(30)
        assert waiter.answer is not None and waiter.seconds < 10, "the waiter returned at once"
        status, rec = waiter.answer
        assert status == 200 and rec["Outcome"] == "cancelled", rec
        assert "removed from the queue" in rec["Error"]["Message"]
        # The two others go with a clear of the queue.
        status, _ = comfy.request("POST", "/queue", {"clear": True})
        assert status == 200
        for pid in ids[1:]:
            wait_until(lambda p=pid: record(comfy, p)["Outcome"] == "cancelled", 10, what=f"{pid} cancelled")
            assert "queue was cleared" in record(comfy, pid)["Error"]["Message"]
    for pid, prefix in zip(ids, prefixes, strict=True):
        rec = record(comfy, pid)
        assert rec["StartedAt"] is None and rec["Nodes"] == [], rec
        assert [m["State"] for m in rec["Markers"]] == ["failed"], rec["Markers"]
        failed = json.loads((comfy.output_dir / f"{prefix}.failed").read_text())
        assert failed["Outcome"] == "cancelled" and failed["PromptId"] == pid, failed
        assert not (comfy.output_dir / f"{prefix}.done").exists()
    runs = {r["RunId"]: r for r in comfy.get("/telemetry/runs")["Runs"]}
    assert runs[run_id]["Failed"] == 3 and runs[run_id]["Status"] == "failed", runs[run_id]
    status, meta = comfy.request("GET", f"/telemetry/runs/{run_id}")
    assert status == 200 and [s["Success"] for s in meta["Scenes"]] == [False, False, False]
    assert all(s["AttemptsRun"] == 1 and not s["Requeued"] for s in meta["Scenes"]), meta["Scenes"]


def stored_outcome(server: ComfyServer, prompt_id: str) -> str | None:
    db = server.user_dir / "telemetry" / "telemetry.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        row = conn.execute("SELECT outcome FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
    return row[0] if row else None


@pytest.mark.parametrize("version", VERSIONS)
def test_prompts_queued_at_a_kill_are_lost_after_restart(version: str, tmp_path: Path) -> None:
    server = make_server(version)
    run_id = uniq("lost")
    prefix = uniq("lost/frame")
    try:
        server.start()
        started = tmp_path / "started"
        blocker = server.queue(with_sleep(frames(uniq("lost/blocker"), count=1), 120, started_file=str(started)))
        wait_until(started.exists, 60, what="the blocking prompt to start", interval=0.02)
        pid = server.queue(frames(prefix, count=1), extra_data=tagged(run_id, "1"))
        wait_until(lambda: stored_outcome(server, pid) == "queued", 30, what="the queued row", interval=0.02)
        server.kill9()
        server.start()
        rec = record(server, pid)
        assert rec["Outcome"] == "lost" and rec["RunId"] == run_id, rec
        assert "still queued" in rec["Error"]["Message"]
        # Its waiters answer at once, once the .failed is on disk; the running one was cut off (crashed), not lost.
        status, waited = server.request("GET", f"/telemetry/prompts/{pid}/wait?timeout=30", timeout=40)
        assert status == 200 and waited["Outcome"] == "lost", waited
        failed = json.loads((server.output_dir / f"{prefix}.failed").read_text())
        assert failed["Outcome"] == "lost" and failed["PromptId"] == pid
        assert record(server, blocker)["Outcome"] == "crashed"
        runs = {r["RunId"]: r for r in server.get("/telemetry/runs")["Runs"]}
        assert runs[run_id]["Status"] == "failed" and runs[run_id]["Failed"] == 1
        status, fin = server.request("POST", f"/telemetry/runs/{run_id}/finalize", {})
        assert status == 200, fin
        meta = json.loads(Path(fin["MetadataPath"]).read_text())
        scene = meta["Scenes"][0]
        assert scene["Success"] is False and scene["HistoryRetrieved"] is False, scene
        assert any("lost" in e for e in scene["HistoryErrors"]), scene
    finally:
        server.stop()
