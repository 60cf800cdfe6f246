"""The marker rule on real ComfyUI, case by case (shared/cases M1-M5 and their kinds).

For every prefix a submitted workflow declares (by literal or by link), exactly one of ``<prefix>.done`` or
``<prefix>.failed`` for that prompt, and a ``.done`` only when every output node ran and every listed file is
complete on disk.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from harness.comfy import ComfyServer, new_client_id, wait_until
from tests.comfy import workflows as wf

pytestmark = pytest.mark.comfy


def wait_record(server: ComfyServer, prompt_id: str, timeout: float = 120) -> dict:
    status, body = server.request("GET", f"/telemetry/prompts/{prompt_id}/wait?timeout={timeout}", timeout=timeout + 10)
    assert status == 200, (status, body)
    return body


def read(server: ComfyServer, prefix: str, kind: str) -> dict:
    return json.loads((server.output_dir / f"{prefix}.{kind}").read_text())


def uniq(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def image(prompt: dict, node: str = "1", *, count: int = 1, size: int = 32) -> None:
    prompt[node] = {
        "class_type": "EmptyImage",
        "inputs": {"width": size, "height": size, "batch_size": count, "color": 0x123456},
    }


# --- M1: inputs by link ---


def test_prefix_linked_from_a_primitive_string_gets_its_done(comfy: ComfyServer) -> None:
    """shared/cases m1-linked-prefix.json: one PrimitiveString feeds SaveImage and the marker."""
    prefix = f"{uniq('linked')}/scene-07"
    prompt = json.loads((Path("/work/shared/cases/m1-linked-prefix.json")).read_text())
    prompt["5"]["inputs"]["value"] = prefix
    status, body = comfy.request("POST", "/prompt", {"prompt": prompt})
    assert status == 200 and body["node_errors"] == {}, body
    rec = wait_record(comfy, body["prompt_id"])
    marker = read(comfy, prefix, "done")
    assert marker["PromptId"] == body["prompt_id"] and marker["Prefix"] == prefix
    saved = [o["Filename"] for o in marker["Outputs"]]
    assert len(saved) == 1 and saved[0].startswith("scene-07_") and not marker["Outputs"][0]["Missing"]
    assert rec["Markers"][0]["State"] == "written"


def test_prefix_known_only_at_run_time_still_gets_failed_and_stale_clearing(comfy: ComfyServer) -> None:
    """A prefix from a node the package cannot read statically: the early error still leaves a .failed there."""
    prefix = f"{uniq('runtime')}/frame"

    def prompt(fail: bool) -> dict:
        p: dict = {"9": {"class_type": "RTTestText", "inputs": {"text": prefix}}}
        image(p)
        src = ["1", 0]
        if fail:  # the raising node needs the text first, so the text node has run when the prompt fails
            p["11"] = {"class_type": "RTTestRaise", "inputs": {"image": ["1", 0], "message": ["9", 0]}}
            src = ["11", 0]
        p["3"] = {"class_type": "SaveImage", "inputs": {"images": src, "filename_prefix": ["9", 0]}}
        p["4"] = {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": ["9", 0], "images": src}}
        return p

    ok = comfy.queue(prompt(False))
    assert wait_record(comfy, ok)["Markers"][0]["State"] == "written"
    assert read(comfy, prefix, "done")["PromptId"] == ok
    bad = comfy.queue(prompt(True))
    rec = wait_record(comfy, bad)
    assert rec["Outcome"] == "error"
    failed = read(comfy, prefix, "failed")
    assert failed["PromptId"] == bad and failed["Outcome"] == "error" and failed["NodeType"] == "RTTestRaise"
    assert not (comfy.output_dir / f"{prefix}.done").exists()


def test_prefix_by_link_is_checked_when_the_node_runs(comfy: ComfyServer) -> None:
    """ComfyUI validates a linked prefix as None; an unusable value that arrives at run time fails the prompt."""
    p: dict = {"9": {"class_type": "RTTestText", "inputs": {"text": "  "}}}
    image(p)
    p["4"] = {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": ["9", 0], "images": ["1", 0]}}
    status, body = comfy.request("POST", "/prompt", {"prompt": p})
    assert status == 200 and body["node_errors"] == {}, body
    rec = wait_record(comfy, body["prompt_id"])
    assert rec["Outcome"] == "error" and rec["Error"]["NodeId"] == "4", rec["Error"]
    assert "filename_prefix" in rec["Error"]["Message"] and "is empty" in rec["Error"]["Message"]


def test_capture_tags_by_link_are_applied_and_checked_at_run_time(comfy: ComfyServer) -> None:
    run_id = uniq("linked-run")
    p = wf.with_capture(wf.frames(uniq("tagged"), count=1))
    p["20"] = {"class_type": "PrimitiveString", "inputs": {"value": run_id}}
    p["21"] = {"class_type": "RTTestText", "inputs": {"text": "scene-by-link"}}
    p["12"]["inputs"]["run_id"] = ["20", 0]
    p["12"]["inputs"]["scene_id"] = ["21", 0]
    rec = wait_record(comfy, comfy.queue(p))
    assert (rec["Outcome"], rec["RunId"], rec["SceneId"]) == ("success", run_id, "scene-by-link")
    p["21"]["inputs"]["text"] = "../outside"
    rec = wait_record(comfy, comfy.queue(p))
    assert rec["Outcome"] == "error" and rec["Error"]["NodeId"] == "12"
    assert "scene_id" in rec["Error"]["Message"]


# --- M2: whole-workflow truth ---


def test_output_node_dropped_by_partial_validation_gives_failed_validation(comfy: ComfyServer) -> None:
    """shared/cases m2-partial-validation.json: an invalid branch is dropped; no .done for a partial result."""
    prefix = f"{uniq('partial')}/frame"
    prompt = json.loads(Path("/work/shared/cases/m2-partial-validation.json").read_text())
    prompt["2"]["inputs"]["filename_prefix"] = prefix
    prompt["3"]["inputs"]["filename_prefix"] = prefix
    status, body = comfy.request("POST", "/prompt", {"prompt": prompt})
    assert status == 200 and "4" in body["node_errors"], body
    rec = wait_record(comfy, body["prompt_id"])
    assert rec["Outcome"] == "success"  # ComfyUI ran what was left
    assert not (comfy.output_dir / f"{prefix}.done").exists()
    failed = read(comfy, prefix, "failed")
    assert failed["Outcome"] == "validation" and failed["PromptId"] == body["prompt_id"]
    assert [(d["NodeId"], d["ClassType"]) for d in failed["Dropped"]] == [("2", "SaveImage")]
    assert "upscale_method" in failed["Dropped"][0]["Reason"] and "ImageScale 4" in failed["Dropped"][0]["Reason"]
    assert rec["Markers"][0]["State"] == "failed" and rec["Markers"][0]["Outcome"] == "validation"
    assert any("did not run" in n for n in rec["FallbackNotes"])


def test_marker_node_itself_dropped_gives_failed_validation(comfy: ComfyServer) -> None:
    prefix = f"{uniq('dropped-marker')}/frame"
    p: dict = {}
    image(p)
    p["3"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}
    p["6"] = {"class_type": "ImageInvert", "inputs": {"image": ["1", 1]}}  # no output 1: invalid link
    p["4"] = {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": prefix, "images": ["6", 0]}}
    status, body = comfy.request("POST", "/prompt", {"prompt": p})
    assert status == 200 and body["node_errors"], body
    wait_record(comfy, body["prompt_id"])
    failed = read(comfy, prefix, "failed")
    assert failed["Outcome"] == "validation"
    assert [(d["NodeId"], d["ClassType"]) for d in failed["Dropped"]] == [("4", "WriteDoneMarker")]
    assert failed["Dropped"][0]["Reason"]


def test_output_nodes_left_out_by_partial_execution_are_not_dropped(comfy: ComfyServer) -> None:
    """Queueing selected output nodes (``partial_execution_targets``) asks only for them: a .done, not validation."""
    prefix = uniq("targets")
    p = wf.frames(prefix, count=1)
    p["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    p["6"] = {
        "class_type": "ImageScale",
        "inputs": {"image": ["1", 0], "upscale_method": "no-such-method", "width": 8, "height": 8, "crop": "disabled"},
    }
    p["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"{prefix}-other"}}
    status, body = comfy.request("POST", "/prompt", {"prompt": p, "partial_execution_targets": ["3", "4"]})
    assert status == 200, body
    rec = wait_record(comfy, body["prompt_id"])
    marker = read(comfy, prefix, "done")
    assert marker["PromptId"] == body["prompt_id"] and len(marker["Outputs"]) == 1
    assert rec["Markers"][0]["State"] == "written" and not (comfy.output_dir / f"{prefix}.failed").exists()


@pytest.mark.parametrize("how", ["literal", "link"])
def test_prefix_leaving_the_output_folder_refuses_the_whole_prompt(comfy: ComfyServer, how: str) -> None:
    safe = uniq("kept-out")
    p = wf.frames(safe, count=1)
    if how == "literal":
        p["4"]["inputs"]["filename_prefix"] = "../escape/frame"
    else:
        p["5"] = {"class_type": "PrimitiveString", "inputs": {"value": "../escape/frame"}}
        p["4"]["inputs"]["filename_prefix"] = ["5", 0]
    queue_before = comfy.get("/queue")
    status, body = comfy.request("POST", "/prompt", {"prompt": p})
    assert status == 400, body
    text = json.dumps(body)
    assert "4" in body["node_errors"] and "filename_prefix" in text and "leave the output folder" in text
    assert comfy.get("/queue") == queue_before
    assert not list(comfy.output_dir.glob(f"{safe}*")), "SaveImage ran although the prompt was refused"


def test_cached_output_node_files_are_listed_with_or_without_client_id(comfy: ComfyServer) -> None:
    """0.3.75 leaves a cached SaveImage out of the history without client_id; the marker lists it anyway."""
    prefix = uniq("cached")
    prompt = wf.frames(prefix, count=2, color=0x445566)
    listings = []
    for client in (None, None, new_client_id()):
        pid = comfy.queue(prompt, client_id=client)
        assert wait_record(comfy, pid)["Markers"][0]["State"] == "written"
        marker = read(comfy, prefix, "done")
        assert marker["PromptId"] == pid
        listings.append([(o["Filename"], o["Bytes"]) for o in marker["Outputs"]])
    assert len(listings[0]) == 2 and listings[0] == listings[1] == listings[2], listings


# --- M4: late files ---


PNG_END = b"IEND\xaeB`\x82"  # the last chunk of a complete PNG


def late_prompt(prefix: str, delay: float) -> dict:
    p: dict = {}
    image(p, count=2, size=128)
    p["2"] = {"class_type": "RTTestLateSave", "inputs": {"images": ["1", 0], "filename_prefix": prefix, "delay": delay}}
    p["3"] = {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": prefix, "images": ["1", 0]}}
    return p


@pytest.mark.parametrize("delay", [0.4, 1.0])  # 1.0: shared/cases m4, a writer pausing exactly one settle window
def test_late_files_are_waited_for_until_complete(comfy: ComfyServer, delay: float) -> None:
    prefix = f"{uniq('late')}/frame"
    pid = comfy.queue(late_prompt(prefix, delay))
    rec = wait_record(comfy, pid)
    marker = read(comfy, prefix, "done")
    assert [o["Missing"] for o in marker["Outputs"]] == [False, False]
    for o in marker["Outputs"]:
        data = (comfy.output_dir / o["Subfolder"] / o["Filename"]).read_bytes()
        assert len(data) == o["Bytes"] and data.endswith(PNG_END), "the marker listed a file still being written"
    assert rec["Telemetry"]["HistoryExitReason"] == "success"
    assert comfy.get("/telemetry")["Policy"]["output_settle_seconds"] == 1.0  # the window in force, shown
    assert rec["Markers"][0]["WaitSeconds"] >= 3 * delay  # both halves of both files, then the settle window


def test_files_still_incomplete_at_the_timeout_give_failed_outputs_incomplete(comfy: ComfyServer) -> None:
    prefix = f"{uniq('too-late')}/frame"
    policy = {"post_execution_timeout_seconds": 2, "output_settle_seconds": 0.3}
    extra = {"telemetry": {"run_id": uniq("late-run"), "policy": policy}}
    pid = comfy.queue(late_prompt(prefix, 4.0), extra_data=extra)
    rec = wait_record(comfy, pid)
    assert rec["Outcome"] == "success"
    assert not (comfy.output_dir / f"{prefix}.done").exists()
    failed = read(comfy, prefix, "failed")
    assert failed["Outcome"] == "outputsIncomplete" and failed["PromptId"] == pid
    assert len(failed["Incomplete"]) == 2 and all(o["Missing"] for o in failed["Incomplete"])
    assert rec["Telemetry"]["HistoryExitReason"] == "postExecution"
    assert any("post-execution timeout" in n for n in rec["FallbackNotes"])
    # Let the node's writer thread finish, so its files do not land in other tests' output snapshots.
    paths = [comfy.output_dir / o["Subfolder"] / o["Filename"] for o in failed["Incomplete"]]
    sizes: dict = {}

    def quiet() -> bool:
        now = {p: p.stat().st_size if p.exists() else -1 for p in paths}
        still, sizes_before = now == sizes and -1 not in now.values(), dict(sizes)
        sizes.clear()
        sizes.update(now)
        return still and bool(sizes_before)

    wait_until(quiet, 30, what="the late writer to finish", interval=0.5)


# --- M5 lists, tokens, output types ---


def test_list_of_batches_counts_every_frame(comfy: ComfyServer) -> None:
    """shared/cases m5-list-frames.json: 10 frames as a list of batches [4, 4, 2]."""
    prefix = f"{uniq('listed')}/frame"
    prompt = json.loads(Path("/work/shared/cases/m5-list-frames.json").read_text())
    prompt["2"]["inputs"]["filename_prefix"] = prefix
    prompt["3"]["inputs"]["filename_prefix"] = prefix
    rec = wait_record(comfy, comfy.queue(prompt))
    marker = read(comfy, prefix, "done")
    assert marker["FrameCount"] == 10 and len(marker["Outputs"]) == 10
    assert rec["Markers"][0]["FrameCount"] == 10


def test_prefix_tokens_put_the_marker_beside_the_frames(comfy: ComfyServer) -> None:
    stem = uniq("tokens")
    text = f"{stem}/%year%-%month%/w%width%/frame"
    p = wf.frames(text, count=1, size=48)
    rec = wait_record(comfy, comfy.queue(p))
    frames = list((comfy.output_dir / stem).rglob("frame_*.png"))
    assert len(frames) == 1
    done = frames[0].parent / "frame.done"
    assert done.exists(), sorted(str(x) for x in (comfy.output_dir / stem).rglob("*"))
    marker = json.loads(done.read_text())
    now = time.localtime()
    assert marker["Prefix"] == f"{stem}/{now.tm_year}-{now.tm_mon:02d}/w48/frame"
    assert rec["Markers"][0]["Prefix"] == marker["Prefix"]


def test_temp_outputs_are_measured_in_the_temp_folder(comfy: ComfyServer) -> None:
    prefix = uniq("preview")
    p: dict = {}
    image(p, count=2)
    p["3"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    p["4"] = {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": prefix, "images": ["1", 0]}}
    wait_record(comfy, comfy.queue(p))
    marker = read(comfy, prefix, "done")
    assert [o["Type"] for o in marker["Outputs"]] == ["temp", "temp"]
    for o in marker["Outputs"]:
        assert not o["Missing"]
        assert (comfy.base_dir / "temp" / o["Subfolder"] / o["Filename"]).stat().st_size == o["Bytes"]


# --- interrupts ---


def test_interrupt_names_the_node_that_was_executing(comfy: ComfyServer, tmp_path: Path) -> None:
    """A node deaf to interrupts feeds a TelemetryCapture: ComfyUI blames the capture, the marker names the node."""
    prefix = uniq("interrupted")
    started = tmp_path / "started"
    p: dict = {}
    image(p)
    p["10"] = {"class_type": "RTTestBusy", "inputs": {"image": ["1", 0], "seconds": 1.5, "started_file": str(started)}}
    p["12"] = {
        "class_type": "TelemetryCapture",
        "inputs": {"value": ["10", 0], "run_id": "", "scene_id": "", "label": "busy", "frame_floor": 0},
    }
    p["3"] = {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": prefix}}
    p["4"] = {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": prefix, "trigger": ["12", 0]}}
    pid = comfy.queue(p)
    wait_until(started.exists, 60, what="RTTestBusy to start", interval=0.02)
    comfy.interrupt()
    rec = wait_record(comfy, pid)
    assert rec["Outcome"] == "interrupted"
    failed = read(comfy, prefix, "failed")
    assert (failed["Outcome"], failed["Node"], failed["NodeType"]) == ("interrupted", "10", "RTTestBusy")
    assert rec["Error"]["NodeId"] == "10"


# --- M3: ordering and stale markers ---


def test_stale_marker_is_cleared_when_the_next_prompt_is_accepted(comfy: ComfyServer, tmp_path: Path) -> None:
    """Prefix P rendered by A; while the queue is busy, P is queued again (B): A's .done is gone at once."""
    prefix = f"{uniq('rerender')}/frame"
    a = comfy.queue(wf.frames(prefix, count=1))
    wait_record(comfy, a)
    assert read(comfy, prefix, "done")["PromptId"] == a
    started = tmp_path / "blocker-started"
    blocker = comfy.queue(wf.with_sleep(wf.frames(uniq("blocker"), count=1), 1.5, started_file=str(started)))
    wait_until(started.exists, 60, what="the blocking prompt to start", interval=0.02)
    b = comfy.queue(wf.frames(prefix, count=1))
    # B is accepted and still queued behind the blocker: nothing at P may pass for B's result.
    assert comfy.get(f"/telemetry/prompts/{b}")["Outcome"] == "queued"
    assert not (comfy.output_dir / f"{prefix}.done").exists()
    wait_record(comfy, blocker)
    wait_record(comfy, b)
    assert read(comfy, prefix, "done")["PromptId"] == b


def test_earlier_prompt_marker_never_shows_while_the_next_one_runs(comfy: ComfyServer, tmp_path: Path) -> None:
    """A and B queued back to back at the same prefix: while B runs, no marker of A is left at P."""
    prefix = f"{uniq('back-to-back')}/frame"
    started = tmp_path / "b-started"
    a = comfy.queue(wf.with_sleep(wf.frames(prefix, count=1), 0.3))  # B is accepted while A still runs
    b = comfy.queue(wf.with_sleep(wf.frames(prefix, count=1), 1.0, started_file=str(started)))
    wait_until(started.exists, 60, what="prompt B to start", interval=0.01)
    rec_a = wait_record(comfy, a)
    assert rec_a["Markers"][0]["State"] == "written"  # A's marker was written (before B's clear)
    seen = []
    deadline = time.monotonic() + 0.8  # B sleeps 1.0 s after it started
    while time.monotonic() < deadline:
        path = comfy.output_dir / f"{prefix}.done"
        if path.exists():
            try:
                seen.append(json.loads(path.read_text())["PromptId"])
            except (OSError, ValueError):
                pass
        time.sleep(0.02)
    assert a not in seen, "A's .done was visible while B was running"
    wait_record(comfy, b)
    assert read(comfy, prefix, "done")["PromptId"] == b


def test_a_late_marker_of_an_earlier_prompt_never_overwrites_the_next_one(comfy: ComfyServer) -> None:
    """A's files settle for a while; B (same prefix) ends meanwhile: B's marker is written after A's, and stays."""
    prefix = f"{uniq('late-order')}/frame"
    a = comfy.queue(late_prompt(prefix, 0.3))
    b = comfy.queue(wf.frames(prefix, count=1))
    rec_a, rec_b = wait_record(comfy, a), wait_record(comfy, b)
    assert rec_a["Markers"][0]["State"] == rec_b["Markers"][0]["State"] == "written"
    assert read(comfy, prefix, "done")["PromptId"] == b
