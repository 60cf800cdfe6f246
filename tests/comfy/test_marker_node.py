"""WriteDoneMarker on real ComfyUI: written after every frame, atomically, rewritten, failed, refused, disk full."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from harness.comfy import ComfyServer
from tests.comfy import workflows as wf
from tests.conftest import make_server

pytestmark = pytest.mark.comfy


def wait_record(server: ComfyServer, prompt_id: str, timeout: float = 120) -> dict:
    status, body = server.request("GET", f"/telemetry/prompts/{prompt_id}/wait?timeout={timeout}", timeout=timeout + 10)
    assert status == 200, (status, body)
    return body


def tree_snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.smoke
def test_done_marker_lists_and_counts_every_frame(comfy: ComfyServer) -> None:
    prefix = f"scene-{uuid.uuid4().hex[:6]}/frame"
    pid = comfy.queue(wf.frames(prefix, count=4))
    rec = wait_record(comfy, pid)
    done = comfy.output_dir / f"{prefix}.done"
    # The wait route answers only once the marker is on disk.
    marker = json.loads(done.read_text())
    assert marker["Kind"] == "done" and marker["PromptId"] == pid and marker["Prefix"] == prefix
    assert marker["FrameCount"] == 4
    assert len(marker["Outputs"]) == 4
    for out in marker["Outputs"]:
        path = comfy.output_dir / out["Subfolder"] / out["Filename"]
        assert path.stat().st_size == out["Bytes"] > 0
    assert marker["Telemetry"]["Gpu"] and marker["Telemetry"]["DurationSeconds"] > 0
    assert not (comfy.output_dir / f"{prefix}.failed").exists()
    tel = rec["Telemetry"]
    assert tel["DoneMarkerDetected"] is True and tel["DoneMarkerPath"] == str(done)
    assert 0 <= tel["DoneMarkerWaitSeconds"] < 5
    assert rec["Markers"][0]["State"] == "written"
    # No temp file left beside it.
    assert [p.name for p in done.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_requeued_identical_workflow_rewrites_the_marker(comfy: ComfyServer) -> None:
    prefix = f"requeue-{uuid.uuid4().hex[:6]}"
    prompt = wf.frames(prefix, count=2)
    first = comfy.queue(prompt)
    wait_record(comfy, first)
    second = comfy.queue(prompt)
    rec = wait_record(comfy, second)
    marker = json.loads((comfy.output_dir / f"{prefix}.done").read_text())
    assert marker["PromptId"] == second != first
    assert rec["Markers"][0]["State"] == "written"


@pytest.mark.smoke
def test_failing_prompt_leaves_failed_and_no_done(comfy: ComfyServer) -> None:
    prefix = f"fail-{uuid.uuid4().hex[:6]}"
    ok = comfy.queue(wf.frames(prefix))
    wait_record(comfy, ok)
    assert (comfy.output_dir / f"{prefix}.done").exists()
    bad = comfy.queue(wf.with_raise(wf.frames(prefix), "render exploded"))
    rec = wait_record(comfy, bad)
    assert rec["Outcome"] == "error"
    # The previous run's .done was removed when this prompt started; the marker node never ran, yet .failed exists.
    assert not (comfy.output_dir / f"{prefix}.done").exists()
    failed = json.loads((comfy.output_dir / f"{prefix}.failed").read_text())
    assert failed["Kind"] == "failed" and failed["PromptId"] == bad and failed["Outcome"] == "error"
    assert failed["NodeType"] == "RTTestRaise" and "render exploded" in failed["Message"]
    assert rec["Markers"][0]["State"] == "failed"


ESCAPING = [
    "../outside",
    "a/../../outside",
    "a\\..\\..\\outside",
    "/tmp/absolute",
    "C:\\Windows\\x",
    "C:relative",
    "\\\\server\\share\\x",
    "bad\x00name",
    "",
    "trailing/",
]


@pytest.mark.parametrize("prefix", ESCAPING, ids=[repr(p) for p in ESCAPING])
def test_escaping_prefix_is_refused_and_nothing_is_written(comfy: ComfyServer, prefix: str) -> None:
    outer = comfy.base_dir
    before = tree_snapshot(outer / "output") | {p for p in os.listdir(outer)}
    prompt = wf.frames(f"safe-{uuid.uuid4().hex[:6]}", count=1)
    prompt["4"]["inputs"]["filename_prefix"] = prefix
    status, body = comfy.request("POST", "/prompt", {"prompt": prompt})
    errors = body["node_errors"] if status == 200 else body.get("node_errors", body)
    assert "filename_prefix" in json.dumps(errors) and "4" in errors, body
    if status == 200:  # ComfyUI still runs the valid outputs (SaveImage), without the refused marker node
        rec = wait_record(comfy, body["prompt_id"])
        assert all(m["State"] != "written" for m in rec["Markers"])
        assert "4" not in [n["NodeId"] for n in rec["Nodes"]]
    after = tree_snapshot(outer / "output") | {p for p in os.listdir(outer)}
    assert {p for p in after - before if p.endswith((".done", ".failed"))} == set()
    assert {p for p in after - before if not p.startswith("safe-")} == set(), after - before
    assert not Path("/tmp/absolute.done").exists()


def test_symlink_inside_output_that_points_out_is_refused(comfy: ComfyServer, tmp_path: Path) -> None:
    link = comfy.output_dir / f"escape-{uuid.uuid4().hex[:6]}"
    link.symlink_to(tmp_path, target_is_directory=True)
    prompt = wf.frames(f"safe-{uuid.uuid4().hex[:6]}", count=1)
    prompt["4"]["inputs"]["filename_prefix"] = f"{link.name}/frame"
    status, body = comfy.request("POST", "/prompt", {"prompt": prompt})
    assert "filename_prefix" in json.dumps(body["node_errors"])
    if status == 200:
        wait_record(comfy, body["prompt_id"])
    assert list(tmp_path.iterdir()) == []


def test_full_disk_keeps_the_prompt_and_notes_the_marker_failure(tmp_path: Path) -> None:
    """A tiny tmpfs as the output folder: the frames fit, the marker does not; the prompt still succeeds."""
    out = tmp_path / "tiny-output"
    out.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(out)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here (tests run as root): {mounted.stderr.decode()}")
    server = make_server(extra_args=["--output-directory", str(out)])
    try:
        server.start()
        filler = out / "filler.bin"
        prefix = "full/frame"
        # Fill the disk so that frames (tiny PNGs) may still land in the last blocks but the marker cannot.
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 1024):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        pid = server.queue(wf.frames(prefix, count=1, size=8))
        rec = wait_record(server, pid)
        marker_state = rec["Markers"][0]
        if rec["Outcome"] == "success":
            assert marker_state["State"] == "error"
        else:  # SaveImage itself hit the full disk: the prompt failed, and so did the .failed marker
            assert marker_state["State"] == "error"
        assert any("could not be written" in n for n in rec["FallbackNotes"])
        assert not (out / f"{prefix}.done").exists()
        leftovers = [p.name for p in (out / "full").glob("*")] if (out / "full").exists() else []
        assert not [n for n in leftovers if n.endswith((".done", ".failed", ".tmp"))], leftovers
        # The server is still healthy: free space and the next prompt writes its marker.
        filler.unlink()
        rec2 = wait_record(server, server.queue(wf.frames(prefix, count=1, size=8)))
        assert rec2["Outcome"] == "success" and (out / f"{prefix}.done").exists()
    finally:
        server.stop()
        subprocess.run(["umount", str(out)], check=False)
