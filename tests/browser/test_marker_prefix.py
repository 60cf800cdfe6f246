"""The marker's prefix gets the frontend's text replacements (%date:…%), as SaveImage's does: side by side."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.browser.conftest import Editor
from tests.comfy import workflows as wf

pytestmark = [pytest.mark.comfy, pytest.mark.browser]


def test_date_token_in_the_editor_puts_the_marker_beside_the_frames(ed: Editor) -> None:
    stem = f"editor-tokens-{uuid.uuid4().hex[:6]}"
    prompt = wf.frames(f"{stem}/%date:yyyy%/frame", count=1)
    ed.js("async (p) => { await window.app.loadApiJson(p, 'rt-marker-prefix.json'); }", prompt)
    ed.wait_js("() => !!window.app.graph.getNodeById(4)")
    with ed.page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as answer:
        ed.js("() => window.app.queuePrompt(0, 1)")
    pid = answer.value.json()["prompt_id"]
    status, rec = ed.server.request("GET", f"/telemetry/prompts/{pid}/wait?timeout=60", timeout=70)
    assert status == 200 and rec["Outcome"] == "success", rec
    year = time.strftime("%Y")
    frames = list((ed.server.output_dir / stem / year).glob("frame_*.png"))
    assert len(frames) == 1, list((ed.server.output_dir / stem).rglob("*"))
    marker = json.loads((ed.server.output_dir / stem / year / "frame.done").read_text())
    assert marker["PromptId"] == pid and marker["Prefix"] == f"{stem}/{year}/frame"
