"""Badges on Telemetry Capture and Write Done Marker nodes after a prompt queued from the editor."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import UI_TIMEOUT_MS, Editor
from tests.comfy import workflows as wf

pytestmark = [pytest.mark.comfy, pytest.mark.browser]

CAPTURE_ID = "12"  # wf.with_capture
MARKER_ID = "4"  # wf.frames(marker=True)

BADGE_TEXT_JS = """(id) => {
    const node = window.app.graph.getNodeById(+id);
    return node && node.__rtBadge ? node.__rtBadge.text : null;
}"""


def wait_badge(ed: Editor, node_id: str, contains: str) -> str:
    """Wait until the node's badge text contains ``contains``; return the text."""
    return ed.wait_js(
        f"([id, want]) => {{ const t = ({BADGE_TEXT_JS})(id); return t && t.includes(want) ? t : null; }}",
        [node_id, contains],
    )


def uniq(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def queue_from_editor(ed: Editor, prompt: dict[str, Any]) -> str:
    """Load an API prompt into the editor (its node ids kept), queue it with the editor's Run, return the prompt id."""
    ed.js("async (p) => { await window.app.loadApiJson(p, 'rt-browser-test.json'); }", prompt)
    ed.wait_js(f"() => !!window.app.graph.getNodeById({CAPTURE_ID}) && !!window.app.graph.getNodeById({MARKER_ID})")
    with ed.page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as answer:
        ed.js("() => window.app.queuePrompt(0, 1)")
    body = answer.value.json()
    assert "prompt_id" in body, body
    return str(body["prompt_id"])


def center_on(ed: Editor, *node_ids: str) -> None:
    """Scroll the canvas (scale 1) so the nodes are in view: badges are only drawn for nodes on screen."""
    ed.js(
        """(ids) => {
            const c = window.app.canvas;
            const nodes = ids.map((id) => window.app.graph.getNodeById(+id));
            const x0 = Math.min(...nodes.map((n) => n.pos[0]));
            const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
            const y0 = Math.min(...nodes.map((n) => n.pos[1] - 60));
            const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
            c.ds.scale = 1;
            c.ds.offset[0] = c.canvas.clientWidth / 2 - (x0 + x1) / 2;
            c.ds.offset[1] = c.canvas.clientHeight / 2 - (y0 + y1) / 2;
            c.setDirty(true, true);
        }""",
        list(node_ids),
    )


def painted(ed: Editor, *texts: str) -> None:
    """Wait until the canvas has drawn every one of ``texts`` (fillText is watched during the wait)."""
    ed.js(
        """() => {
            const proto = CanvasRenderingContext2D.prototype;
            if (!proto.__rtOrigFillText) {
                proto.__rtOrigFillText = proto.fillText;
                proto.fillText = function (t, ...rest) {
                    (window.__rtPainted ||= new Set()).add(String(t));
                    return proto.__rtOrigFillText.call(this, t, ...rest);
                };
            }
            window.__rtPainted = new Set();
            window.app.canvas.setDirty(true, true);
        }"""
    )
    try:
        ed.wait_js("(want) => want.every((t) => window.__rtPainted && window.__rtPainted.has(t))", list(texts))
    finally:
        ed.js(
            """() => {
                const proto = CanvasRenderingContext2D.prototype;
                if (proto.__rtOrigFillText) {
                    proto.fillText = proto.__rtOrigFillText;
                    delete proto.__rtOrigFillText;
                }
            }"""
        )


def test_span_and_marker_badges_render_on_the_nodes(ed: Editor) -> None:
    ed.close_tab()
    prefix = uniq("badge") + "/frame"
    prompt = wf.with_capture(wf.with_sleep(wf.frames(prefix, count=2), 0.3), run_id=uniq("badge-run"), scene_id="1")
    pid = queue_from_editor(ed, prompt)
    marker_text = wait_badge(ed, MARKER_ID, ".done")
    span_text = wait_badge(ed, CAPTURE_ID, "render")
    status, rec = ed.server.request("GET", f"/telemetry/prompts/{pid}")
    assert status == 200 and rec["Outcome"] == "success", rec
    span = next(s for s in rec["Spans"] if s["NodeId"] == CAPTURE_ID)
    assert span_text.startswith(f"render {span['Seconds']:.2f} s \u00b7 VRAM "), span_text
    assert marker_text == "\u2713 marker .done written"
    center_on(ed, CAPTURE_ID, MARKER_ID)
    painted(ed, span_text, marker_text)
    ed.shot("node-badges")

    # A prompt queued by someone else (the API, no client id) with the same node ids leaves the badges alone.
    other = uniq("other") + "/frame"
    ed.server.queue(wf.with_capture(wf.with_raise(wf.frames(other), "not this editor's"), label="other"))
    expect(ed.toast(f"{other}.failed")).to_be_visible(timeout=UI_TIMEOUT_MS)
    assert ed.js(BADGE_TEXT_JS, MARKER_ID) == marker_text
    assert ed.js(BADGE_TEXT_JS, CAPTURE_ID) == span_text


def test_failed_marker_badge_after_a_failing_editor_prompt(ed: Editor) -> None:
    ed.close_tab()
    prefix = uniq("badge-fail") + "/frame"
    queue_from_editor(ed, wf.with_capture(wf.with_raise(wf.frames(prefix), "editor boom")))
    text = wait_badge(ed, MARKER_ID, ".failed")
    assert text == "\u2717 marker .failed written"
    # The frontend's own error report for this editor's failing prompt (a dialog, or a notice from 1.49 on).
    expect(ed.error_notice("editor boom").first).to_be_visible(timeout=UI_TIMEOUT_MS)
    ed.dismiss_dialogs()
    center_on(ed, CAPTURE_ID, MARKER_ID)
    painted(ed, text)
    # Badges follow the setting.
    ed.setting("RunTelemetry.Nodes.Badges", False)
    try:
        ed.wait_js(
            f"""() => {{
                const n = window.app.graph.getNodeById({MARKER_ID});
                return n.badges.includes(n.__rtBadgeFn) && n.__rtBadgeFn().text === '';
            }}"""
        )
    finally:
        ed.setting("RunTelemetry.Nodes.Badges", True)
