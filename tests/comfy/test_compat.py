"""Newer ComfyUI behaviour on the real servers of the matrix: executor exceptions, the jobs API, core's answers."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.comfy import ComfyServer, wait_until
from tests.comfy import workflows as wf
from tests.conftest import make_server

pytestmark = pytest.mark.comfy


def wait_record(server: ComfyServer, prompt_id: str, timeout: float = 120) -> dict:
    """The wait route's final record (200), failing the test on 202/404."""
    status, body = server.request("GET", f"/telemetry/prompts/{prompt_id}/wait?timeout={timeout}", timeout=timeout + 10)
    assert status == 200, (status, body)
    return body


@pytest.fixture
def own_server() -> Iterator[ComfyServer]:
    """A server of its own (the newest full-suite version): the test ends its prompt worker thread."""
    server = make_server()
    server.start()
    yield server
    server.stop()
    if not os.environ.get("RT_KEEP_SERVERS"):
        shutil.rmtree(server.base_dir, ignore_errors=True)


def test_prompt_ended_by_a_base_exception_is_interrupted_and_gets_its_failed(own_server: ComfyServer) -> None:
    # asyncio.CancelledError is a BaseException: ComfyUI's executor does not catch it, and newer ComfyUI raises it
    # out of PromptExecutor.execute when its event loop is cancelled. The prompt must still be recorded and marked.
    prefix = f"cancel-{uuid.uuid4().hex[:6]}"
    pid = own_server.queue(wf.with_cancel(wf.frames(prefix)))
    rec = wait_record(own_server, pid, timeout=60)
    assert rec["Outcome"] == "interrupted", rec
    assert rec["Error"]["ExceptionType"] == "CancelledError"
    assert "cancelled by the test node" in rec["Error"]["Message"]
    failed = json.loads((own_server.output_dir / f"{prefix}.failed").read_text())
    assert failed["PromptId"] == pid and failed["Outcome"] == "interrupted"
    assert not (own_server.output_dir / f"{prefix}.done").exists()
    assert rec["Markers"][0]["State"] == "failed"


def test_jobs_api_cancel_of_a_running_prompt_is_an_interrupt(comfy: ComfyServer, tmp_path: Path) -> None:
    status, _ = comfy.request("GET", "/api/jobs")
    if status == 404:
        pytest.skip(f"ComfyUI {comfy.install.version} has no jobs API")
    started = tmp_path / "started"
    prefix = f"jobcancel-{uuid.uuid4().hex[:6]}"
    pid = comfy.queue(wf.with_sleep(wf.frames(prefix), 60, started_file=str(started)))
    wait_until(started.exists, 60, what="the sleep node to start")
    status, body = comfy.request("POST", f"/api/jobs/{pid}/cancel", {})
    assert (status, body) == (200, {"cancelled": True})
    rec = wait_record(comfy, pid, timeout=60)
    assert rec["Outcome"] == "interrupted" and rec["Error"]["NodeType"] == "RTTestSleep"
    assert rec["DurationSeconds"] < 30
    failed = json.loads((comfy.output_dir / f"{prefix}.failed").read_text())
    assert failed["PromptId"] == pid and failed["Outcome"] == "interrupted"
    # ComfyUI's own job view agrees.
    job = comfy.get(f"/api/jobs/{pid}")
    assert job.get("status") in ("cancelled", "interrupted", "failed", "error"), job


def test_core_refusal_of_a_prompt_id_passes_through_unchanged(comfy: ComfyServer) -> None:
    # Newer ComfyUI refuses a client-chosen prompt_id that is not a canonical lowercase UUID (400) and, on newest
    # master, one already queued (409). The package's POST /prompt check must hand core's answer back untouched
    # and record nothing for the refused prompt; older ComfyUI accepts any string.
    bad_id = "Not-A-UUID-" + uuid.uuid4().hex[:6]
    body = {"prompt": wf.frames(f"pid-{uuid.uuid4().hex[:6]}", marker=False), "prompt_id": bad_id}
    body["extra_data"] = {"telemetry": {"run_id": "pid-check"}}
    status, answer = comfy.request("POST", "/prompt", body)
    if status == 200:
        assert answer["prompt_id"] == bad_id
        wait_record(comfy, bad_id)
        pytest.skip(f"ComfyUI {comfy.install.version} accepts any prompt_id")
    assert status == 400, (status, answer)
    assert answer["error"]["type"] == "invalid_prompt_id", answer  # core's, not the package's invalid_telemetry
    assert answer["node_errors"] == {}
    assert comfy.request("GET", f"/telemetry/prompts/{bad_id}")[0] == 404
    # The same id in canonical form is taken, and recorded.
    good_id = str(uuid.uuid4())
    body["prompt_id"] = good_id
    status, answer = comfy.request("POST", "/prompt", body)
    assert (status, answer["prompt_id"]) == (200, good_id)
    assert wait_record(comfy, good_id)["Outcome"] == "success"


HOOKS = {
    "prompt executor",
    "node timings",
    "prompt validation",
    "interrupt attribution",
    "submission handler",
    "queue events",
    "routes",
    "finishers",
    "runs",
    "webhooks",
    "lost prompts",
    "queued time",
}


@pytest.mark.smoke
def test_status_names_comfyui_version_and_how_each_hook_is_wired(comfy: ComfyServer) -> None:
    body = comfy.get("/telemetry")
    assert body["ComfyUI"]["Version"] == comfy.install.version
    hooks = body["ComfyUI"]["Hooks"]
    assert set(hooks) == HOOKS
    assert not [h for h, how in hooks.items() if how.startswith("degraded")], hooks
    # ComfyUI's own create_time (0.3.6x on) is the official source of the queued time; 0.3.52 has none.
    has_create_time = "create_time" in (comfy.install.dir / "server.py").read_text()
    assert hooks["queued time"].startswith("ComfyUI's") == has_create_time, hooks["queued time"]
    check = next(c for c in comfy.get("/telemetry/health")["Checks"] if c["Name"] == "comfyui_hooks")
    assert check["Status"] == "ok" and f"ComfyUI {comfy.install.version}" in check["Detail"], check


PATCHER = """
import execution

_original = execution.PromptExecutor.execute


def execute(self, *args, **kwargs):  # another package's wrapper that hides the argument names
    return _original(self, *args, **kwargs)


execution.PromptExecutor.execute = execute
NODE_CLASS_MAPPINGS = {}
"""


def test_a_hook_that_degrades_is_listed_with_the_comfyui_version(tmp_path: Path) -> None:
    # Another package wraps PromptExecutor.execute with (*args, **kwargs) before this one loads (from its
    # prestartup script, which ComfyUI runs before importing any custom node): the prompt executor hook cannot find
    # its arguments and degrades; prompts still run, and GET /telemetry says so.
    patcher = tmp_path / "patcher"
    patcher.mkdir()
    (patcher / "prestartup_script.py").write_text(PATCHER)
    (patcher / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    server = make_server()
    server.packages = {**server.packages, "patcher": patcher}
    server.start()
    try:
        body = server.get("/telemetry")
        version = server.install.version
        assert body["ComfyUI"]["Version"] == version
        assert body["ComfyUI"]["Hooks"]["prompt executor"].startswith("degraded: LookupError"), body["ComfyUI"]
        assert body["ComfyUI"]["Hooks"]["node timings"] == "wraps execution.execute"
        notes = [n for n in body["FallbackNotes"] if n.startswith("prompt executor not installed")]
        assert notes and f"on ComfyUI {version}" in notes[0], body["FallbackNotes"]
        status, health = server.request("GET", "/telemetry/health")
        check = next(c for c in health["Checks"] if c["Name"] == "comfyui_hooks")
        assert status == 200 and health["Status"] == "degraded", health
        assert check["Status"] == "degraded" and f"ComfyUI {version}" in check["Detail"], check
        assert "prompt executor: degraded: LookupError" in check["Detail"], check
        pid = server.queue(wf.frames(f"degraded-{uuid.uuid4().hex[:6]}", marker=False))
        assert server.wait_history(pid, timeout=60)["status"]["status_str"] == "success"
    finally:
        server.stop()
        if not os.environ.get("RT_KEEP_SERVERS"):
            shutil.rmtree(server.base_dir, ignore_errors=True)
