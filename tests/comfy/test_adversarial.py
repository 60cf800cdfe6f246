"""Variants of the marker and run cases (issues 17 and 18) that broke main, on real ComfyUI.

Each test is a variant of a kind the field cases stand for: an escaping prefix refused whole (with SaveImage's
``%width%`` token in it), a prefix no file system can hold a marker for, a cancelled prompt's waiters answered
before its ``.failed`` is on disk, and an interrupt aimed at another prompt cancelling a run's pending retry.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from harness.comfy import ComfyServer, wait_until
from tests.comfy import workflows as wf
from tests.conftest import make_server

pytestmark = pytest.mark.comfy


def uniq(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def wait_record(server: ComfyServer, prompt_id: str, timeout: float = 60) -> dict:
    status, body = server.request("GET", f"/telemetry/prompts/{prompt_id}/wait?timeout={timeout}", timeout=timeout + 10)
    assert status == 200, (status, body)
    return body


def preview_and_marker(prefix: object) -> dict:
    """EmptyImage -> PreviewImage, and a marker at ``prefix``: the preview runs whenever ComfyUI runs anything."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 7}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "4": {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": prefix, "images": ["1", 0]}},
    }


def blocker(server: ComfyServer, tmp: Path, seconds: float = 120) -> tuple[str, Path]:
    started = tmp / uniq("started")
    prompt = wf.with_sleep(wf.frames(uniq("blk"), count=1, marker=False), seconds, started_file=str(started))
    pid = server.queue(prompt)
    wait_until(started.exists, 60, what="the blocking prompt to start", interval=0.02)
    return pid, started


# --- a prefix that would leave the output folder, or can never be a marker's file name: refused whole ---


@pytest.mark.parametrize("text", ["x/../../../escape/%width%", "../%height%/escape"])
def test_escaping_prefix_with_size_tokens_refuses_the_whole_prompt(comfy: ComfyServer, text: str) -> None:
    """``%width%``/``%height%`` are known only once frames exist, but the '..' parts are known at submission."""
    queue_before = comfy.get("/queue")
    status, body = comfy.request("POST", "/prompt", {"prompt": preview_and_marker(text)})
    assert status == 400, body
    assert "4" in body["node_errors"] and "filename_prefix" in json.dumps(body), body
    assert comfy.get("/queue") == queue_before


@pytest.mark.parametrize("name", ["a" * 240, "\u00e9" * 120])
def test_prefix_too_long_for_a_marker_file_refuses_the_whole_prompt(comfy: ComfyServer, name: str) -> None:
    """SaveImage can save ``<name>_00001_.png`` (255 bytes fit), but ``<name>.failed`` and its temp file cannot."""
    prefix = f"{uniq('long')}/{name}"
    status, body = comfy.request("POST", "/prompt", {"prompt": preview_and_marker(prefix)})
    assert status == 400, body
    text = json.dumps(body)
    assert "4" in body["node_errors"] and "filename_prefix" in text and "bytes" in text, body


@pytest.mark.parametrize("text", ["sur\udcffx/frame", "scene/\ud800"])
def test_prefix_with_a_lone_surrogate_refuses_the_whole_prompt(comfy: ComfyServer, text: str) -> None:
    """Field case I2 in a prefix: no file can be named by it, so nothing runs, and every route still answers."""
    queue_before = comfy.get("/queue")
    status, body = comfy.request("POST", "/prompt", {"prompt": preview_and_marker(text)})
    assert status == 400, body
    assert "4" in body["node_errors"] and "lone surrogate" in json.dumps(body), body
    assert comfy.get("/queue") == queue_before
    for path in ("/telemetry", "/telemetry/runs", "/telemetry/health", "/telemetry/metrics"):
        assert comfy.request("GET", path)[0] == 200, path


# --- ComfyUI's output folder not made yet: a .failed all the same ---


def test_failed_marker_is_written_before_comfyui_made_its_output_folder() -> None:
    """A fresh ComfyUI makes its output folder at the first save: a prompt that fails before it still gets .failed."""
    server = make_server()
    try:
        server.start()
        assert not server.output_dir.exists()  # nothing saved yet
        prefix = f"{uniq('first')}/frame"
        rec = wait_record(server, server.queue(wf.with_raise(wf.frames(prefix, count=1), "fails first")))
        assert rec["Outcome"] == "error"
        assert [m["State"] for m in rec["Markers"]] == ["failed"], (rec["Markers"], rec["FallbackNotes"])
        failed = json.loads((server.output_dir / f"{prefix}.failed").read_text())
        assert failed["PromptId"] == rec["PromptId"] and failed["Message"].strip() == "fails first"
    finally:
        server.stop()


# --- a cancelled prompt: its waiters answer once its .failed is on disk ---


def test_cleared_prompts_answer_their_waiters_after_their_failed_markers(comfy: ComfyServer, tmp_path: Path) -> None:
    run_id = uniq("cleared")
    comfy.output_dir.mkdir(exist_ok=True)  # as after any save (a missing one is the test below)
    block, _ = blocker(comfy, tmp_path)
    try:
        scenes = [f"s{i}" for i in range(8)]
        tags = [{"telemetry": {"run_id": run_id, "scene_id": s}} for s in scenes]
        ids = [
            comfy.queue(wf.frames(f"{run_id}/{s}", count=1), extra_data=t) for s, t in zip(scenes, tags, strict=True)
        ]
        status, _ = comfy.request("POST", "/queue", {"clear": True})
        assert status == 200
        missing = []
        for scene, pid in zip(scenes, ids, strict=True):
            rec = wait_record(comfy, pid, 10)
            assert rec["Outcome"] == "cancelled", rec
            # The answer is final: the .failed a consumer of the prefix reads next is already there.
            if not (comfy.output_dir / run_id / f"{scene}.failed").exists():
                missing.append(scene)
        assert not missing, f"waiters answered 'cancelled' before the .failed of {missing} was written"
        assert all(wait_record(comfy, pid)["Markers"][0]["State"] == "failed" for pid in ids)
    finally:
        comfy.interrupt()
    assert wait_record(comfy, block)["Outcome"] == "interrupted"


# --- an interrupt aimed at another prompt is no interrupt of the run's retries ---


def test_interrupt_naming_a_prompt_that_is_not_running_keeps_pending_retries(
    comfy: ComfyServer, tmp_path: Path
) -> None:
    """0.3.75 ignores ``POST /interrupt {"prompt_id": X}`` unless X runs; 0.3.52 interrupts whatever runs."""
    run_id = uniq("aimed")
    failing = comfy.queue(wf.with_capture(wf.with_raise(wf.frames(uniq("aimed/frame"), count=1)), run_id=run_id))
    block, _ = blocker(comfy, tmp_path, seconds=3)
    retry = wait_record(comfy, failing)["RetriedBy"]
    assert retry, "the failing scene was not retried"
    status, _ = comfy.request("POST", "/interrupt", {"prompt_id": str(uuid.uuid4())})
    assert status == 200
    interrupted = wait_record(comfy, block)["Outcome"] == "interrupted"  # 0.3.52: a global interrupt
    rec = wait_record(comfy, retry)
    if interrupted:
        assert rec["Outcome"] == "cancelled", rec
    else:
        assert rec["Outcome"] == "error" and rec["Attempt"] == 2, (rec["Outcome"], rec["FallbackNotes"])


# --- a kill -9 while the marker waits for late files: the prefix is answered after the restart ---


def _stored_outcome(store: Path, prompt_id: str) -> str | None:
    """The outcome column of a prompt's row in the package's SQLite store, read by a connection of the test's own."""
    try:
        with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)) as c:
            row = c.execute("SELECT outcome FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def test_kill_while_a_marker_settles_leaves_failed_after_restart() -> None:
    server = make_server()
    try:
        server.start()
        prefix = f"{uniq('kill-settle')}/frame"
        p: dict = {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 3}}
        }
        p["2"] = {"class_type": "RTTestLateSave", "inputs": {"images": ["1", 0], "filename_prefix": prefix, "delay": 5}}
        p["3"] = {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": prefix, "images": ["1", 0]}}
        pid = server.queue(p)
        server.wait_history(pid, 60)  # ComfyUI is done with it; the marker waits for the late files
        assert server.get(f"/telemetry/prompts/{pid}")["Outcome"] == "running"
        # The row the package stores before any marker (on its store thread, a moment after the prompt ended) is on
        # disk before the kill: a kill before it is the known limit "unknown after restart", not this case.
        store = server.user_dir / "telemetry" / "telemetry.sqlite3"
        wait_until(lambda: _stored_outcome(store, pid) == "running", 30, what="the running row in the store")
        server.kill9()
        server.start()
        rec = server.get(f"/telemetry/prompts/{pid}")
        assert rec["Outcome"] == "crashed"
        assert not (server.output_dir / f"{prefix}.done").exists()
        failed = json.loads((server.output_dir / f"{prefix}.failed").read_text())
        assert failed["PromptId"] == pid and failed["Outcome"] == "error" and "stopped" in failed["Message"], failed
        assert [(m["State"], m["Outcome"]) for m in rec["Markers"]] == [("failed", "error")], rec["Markers"]
    finally:
        server.stop()


# --- ordering at a prefix known only at run time (M3 with a linked prefix) ---


def test_prefix_known_at_run_time_keeps_acceptance_order(comfy: ComfyServer, tmp_path: Path) -> None:
    """B (prefix P from a node's output) is accepted before C (P as text); C is still queued when B ends.

    With both prefixes as text, C's clear runs right after B's write, so nothing at P passes for C's result while C
    is queued. The same must hold when B's prefix is known only once B runs.
    """
    prefix = f"{uniq('order-linked')}/frame"
    first = tmp_path / "first-started"
    between = tmp_path / "between-started"
    block0 = comfy.queue(wf.with_sleep(wf.frames(uniq("blk"), count=1, marker=False), 1.5, started_file=str(first)))
    wait_until(first.exists, 60, what="the first blocker to start", interval=0.02)
    b: dict = {"9": {"class_type": "RTTestText", "inputs": {"text": prefix}}}
    b["1"] = {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 5}}
    b["3"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": ["9", 0]}}
    b["4"] = {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": ["9", 0], "images": ["1", 0]}}
    pid_b = comfy.queue(b)
    block1 = comfy.queue(wf.with_sleep(wf.frames(uniq("blk"), count=1, marker=False), 2.0, started_file=str(between)))
    pid_c = comfy.queue(wf.frames(prefix, count=1))
    wait_until(between.exists, 60, what="the second blocker to start", interval=0.02)
    rec_b = wait_record(comfy, pid_b)
    assert rec_b["Markers"][0]["State"] == "written"
    assert comfy.get(f"/telemetry/prompts/{pid_c}")["Outcome"] == "queued"
    done = comfy.output_dir / f"{prefix}.done"
    assert not done.exists(), f"while C is queued, P holds {json.loads(done.read_text())['PromptId']} (B is {pid_b})"
    for pid in (block0, block1):
        wait_record(comfy, pid)
    wait_record(comfy, pid_c)
    assert json.loads(done.read_text())["PromptId"] == pid_c


# --- SaveImage's size tokens in a marker that has no frames to take the size from ---


def test_size_tokens_in_a_marker_without_images_are_refused(comfy: ComfyServer) -> None:
    """SaveImage expands %width% from its frames; a marker hung on ``trigger`` would expand it to 0, elsewhere."""
    stem = uniq("size-trigger")
    p = wf.frames(f"{stem}/w%width%/frame", count=1, size=48)
    p["4"] = {
        "class_type": "WriteDoneMarker",
        "inputs": {"filename_prefix": f"{stem}/w%width%/frame", "trigger": ["2", 0]},
    }
    status, body = comfy.request("POST", "/prompt", {"prompt": p})
    assert status == 400, body
    assert "4" in body["node_errors"] and "images" in json.dumps(body), body
    # By link, known only when it runs: the marker node fails the prompt, naming the input, instead of a marker at w0.
    p["9"] = {"class_type": "RTTestText", "inputs": {"text": f"{stem}/w%width%/frame"}}
    p["4"]["inputs"]["filename_prefix"] = ["9", 0]
    rec = wait_record(comfy, comfy.queue(p))
    assert rec["Outcome"] == "error" and rec["Error"]["NodeId"] == "4" and "images" in rec["Error"]["Message"]
    assert not list((comfy.output_dir / stem).rglob("*.done"))
