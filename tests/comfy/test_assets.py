"""ComfyUI's assets system (``--enable-assets``, 0.3x) indexes the whole output folder: the package's own files
(markers, run files) land there too, but never count as a prompt's outputs in anything the package reports."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from harness.comfy import ComfyServer, wait_until
from tests.comfy import workflows as wf
from tests.conftest import make_server

pytestmark = pytest.mark.comfy

FRAMES = 3


@pytest.fixture(scope="module")
def assets_server() -> Iterator[ComfyServer]:
    server = make_server(extra_args=["--enable-assets"])
    if not server.install.has_flag("--enable-assets"):
        pytest.skip(f"ComfyUI {server.install.version} has no assets system")
    server.start()
    yield server
    server.stop()
    if not os.environ.get("RT_KEEP_SERVERS"):
        shutil.rmtree(server.base_dir, ignore_errors=True)


def frame_counts(doc: Any) -> list[int]:
    """Every ``FrameCount`` anywhere in a JSON document."""
    if isinstance(doc, dict):
        out = [doc["FrameCount"]] if isinstance(doc.get("FrameCount"), int) else []
        return out + [n for v in doc.values() for n in frame_counts(v)]
    if isinstance(doc, list):
        return [n for v in doc for n in frame_counts(v)]
    return []


def assets(server: ComfyServer) -> list[dict]:
    status, body = server.request("GET", "/api/assets?limit=500")
    assert status == 200, (status, body)
    return body["assets"]


def test_markers_and_run_files_are_not_counted_as_outputs_with_assets_on(assets_server: ComfyServer) -> None:
    server = assets_server
    run = f"assets-{uuid.uuid4().hex[:6]}"
    prefix = f"{run}/frame"
    pngs = [f"frame_{i:05d}_.png" for i in range(1, FRAMES + 1)]
    pid = server.queue(wf.frames(prefix, count=FRAMES), extra_data={"telemetry": {"run_id": run, "scene_id": "1"}})
    status, rec = server.request("GET", f"/telemetry/prompts/{pid}/wait?timeout=60", timeout=70)
    assert status == 200 and rec["Outcome"] == "success", rec
    status, fin = server.request("POST", f"/telemetry/runs/{run}/finalize", {})
    assert status == 200 and fin["Valid"], fin

    # Core's scan of the output folder picks up everything, the package's own files included.
    # A scan ComfyUI started itself may still run: it answers 409 "already_running" until it ends, so ask again
    # until one scan starts after our files exist (one started before them could miss them).
    seeded: list[int] = []

    def seed_started() -> bool:
        status, _ = server.request("POST", "/api/assets/seed", {})
        seeded.append(status)
        return status in (200, 202)

    wait_until(seed_started, 120, what=f"core to start an asset scan (answers so far: {seeded[-5:]})", interval=0.5)
    ours = {"frame.done", "artifact-metadata.json", "run-summary.txt"}

    def indexed() -> bool:
        return ours <= {a["name"] for a in assets(server)}

    wait_until(indexed, 60, what="core's asset scan to index the marker and the run files")
    by_name = {a["name"]: a for a in assets(server)}
    # Only the frames are the prompt's outputs in core's eyes too; the package's files belong to no prompt.
    assert sorted(n for n, a in by_name.items() if a.get("prompt_id") == pid) == pngs
    assert all(not by_name[n].get("prompt_id") for n in ours), {n: by_name[n] for n in ours}

    # Everything the package reports, read again after the scan: frames only.
    rec = server.get(f"/telemetry/prompts/{pid}")
    assert sorted(o["Filename"] for o in rec["Outputs"]) == pngs
    done = json.loads((server.output_dir / f"{prefix}.done").read_text())
    assert sorted(o["Filename"] for o in done["Outputs"]) == pngs and done["FrameCount"] == FRAMES
    assert rec["Markers"][0]["State"] == "written"
    doc = server.get(f"/telemetry/runs/{run}")
    assert frame_counts(doc) and set(frame_counts(doc)) == {FRAMES}, frame_counts(doc)
    written = json.loads((server.output_dir / "telemetry" / "runs" / run / "artifact-metadata.json").read_text())
    assert set(frame_counts(written)) == {FRAMES}
