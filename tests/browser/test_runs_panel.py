"""The runs part of the Telemetry tab: scenes and their badges, retries, queue policy, finalize, the run's files."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import ARTIFACTS, PANEL, UI_TIMEOUT_MS, Editor
from tests.comfy import workflows as wf

pytestmark = [pytest.mark.comfy, pytest.mark.browser]


def uniq(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def with_flaky(prompt: dict, counter: Path, failures: int = 1) -> dict:
    """Insert an RTTestFlaky (fails ``failures`` times, then passes) between the image source and its consumer."""
    p = json.loads(json.dumps(prompt))
    p["13"] = {
        "class_type": "RTTestFlaky",
        "inputs": {"image": ["1", 0], "counter_file": str(counter), "failures": failures},
    }
    p["2"]["inputs"]["image"] = ["13", 0]
    return p


def test_run_scenes_retries_policy_finalize_and_files(ed: Editor, tmp_path: Path) -> None:
    status, body = ed.server.request("GET", "/telemetry/runs")
    assert status == 200, (
        f"GET /telemetry/runs answered {status}: the runs routes this test covers are missing ({body})"
    )
    ed.open_tab()
    run = uniq("ui-run")
    titles = {"1": "Harbour at dawn", "2": "Storm over the pier"}
    tags = {s: {"telemetry": {"run_id": run, "scene_id": s, "title": t}} for s, t in titles.items()}
    prefix2 = f"{run}/s2/frame"
    ed.server.queue(
        wf.with_capture(wf.with_sleep(wf.frames(f"{run}/s1/frame", count=3), 0.4), run_id=run, scene_id="1"),
        extra_data=tags["1"],
    )
    # Scene 2 fails once: the package requeues it (retry budget 1) and the second attempt succeeds.
    ed.server.queue(
        with_flaky(wf.with_capture(wf.frames(prefix2, count=2), run_id=run, scene_id="2"), tmp_path / "counter"),
        extra_data=tags["2"],
    )
    # Scene 3 is queued again by hand (both attempts succeed): two attempts, but no retry and not requeued.
    for _ in range(2):
        ed.server.queue(
            wf.with_capture(wf.frames(f"{run}/s3/frame", count=1), run_id=run, scene_id="3"),
            extra_data={"telemetry": {"run_id": run, "scene_id": "3"}},
        )
    head = ed.page.locator(f'{PANEL} [data-rt-run="{run}"] .rt-run-head')
    expect(head).to_be_visible(timeout=UI_TIMEOUT_MS)
    head.click()
    runcard = ed.page.locator(f'{PANEL} [data-rt-run="{run}"]')
    scene1 = runcard.locator('[data-rt-scene="1"]')
    scene2 = runcard.locator('[data-rt-scene="2"]')
    expect(scene2.locator('[data-rt-outcome="success"]')).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(scene1.locator('[data-rt-outcome="success"]')).to_be_visible()
    expect(scene1).to_contain_text(titles["1"])
    expect(scene1).to_contain_text("3 frames")
    expect(scene1).to_contain_text("1 attempt")
    expect(scene2).to_contain_text("2 attempts \u00b7 1 retry")
    expect(scene2.locator(".rt-badge", has_text="requeued")).to_be_visible()
    scene3 = runcard.locator('[data-rt-scene="3"]')
    expect(scene3).to_contain_text("2 attempts", timeout=UI_TIMEOUT_MS)
    expect(scene3).not_to_contain_text("retry")
    expect(scene3.locator(".rt-badge", has_text="requeued")).to_have_count(0)
    expect(runcard.locator(".rt-run-head [class*=rt-b-]")).to_have_text("complete", timeout=UI_TIMEOUT_MS)
    # The retried attempt left no .failed (its marker is "skipped"), so no toast either.
    expect(ed.toast(prefix2)).to_have_count(0)

    meta = ed.server.get(f"/telemetry/runs/{run}")
    gpu = meta["Scenes"][0]["Telemetry"]["GPU"]
    delta = scene1.locator("[data-rt-delta]")
    assert float(delta.get_attribute("data-rt-delta")) == pytest.approx(gpu["VramDeltaMB"], abs=0.01)
    policy = runcard.locator('[data-rt-policy="run"]')
    expect(policy).to_contain_text("Retry budget")
    expect(policy).to_contain_text(f"{meta['QueueConfig']['HistoryMaxWaitSeconds']} s")

    # Before finalize: the files are not there, and the links say so.
    for name in ("artifact-metadata.json", "run-summary.txt"):
        assert ed.server.request("GET", f"/telemetry/runs/{run}/{name}")[0] == 404
        expect(runcard.locator(f'span.rt-disabled[data-rt-file="{name}"]')).to_be_visible()
    runcard.locator(f'[data-rt-finalize="{run}"]').click()
    result = runcard.locator("[data-rt-finalize-result]")
    expect(result).to_be_visible(timeout=UI_TIMEOUT_MS)
    link = runcard.locator('a[data-rt-file="artifact-metadata.json"]')
    expect(link).to_be_visible(timeout=UI_TIMEOUT_MS)
    served = ed.page.request.get(link.evaluate("(a) => a.href"))
    assert served.status == 200
    on_disk = served.json()
    assert on_disk["RunId"] == run and len(on_disk["Scenes"]) == 3
    summary = ed.page.request.get(runcard.locator('a[data-rt-file="run-summary.txt"]').evaluate("(a) => a.href"))
    assert summary.status == 200 and run in summary.text()
    # The UI shows the validator's verdict on the files it wrote.
    problems = ed.server.request("POST", f"/telemetry/runs/{run}/finalize", {})[1]
    expect(result).to_have_attribute("data-rt-finalize-result", "valid" if problems["Valid"] else "invalid")
    expect(runcard.locator(".rt-run-sub")).to_contain_text("finalized")
    ed.shot("run-finalized", panel_only=True)


def test_readme_screenshot(ed: Editor) -> None:
    """A tall, wide view of the tab with a run open, for docs/screenshots (kept under test-artifacts)."""
    page = ed.page
    ed.open_tab()
    page.set_viewport_size({"width": 1500, "height": 1900})
    try:
        # Widen the sidebar as a user would, by dragging the splitter.
        gutter = page.get_by_role("separator").first
        box = gutter.bounding_box()
        assert box, "no splitter gutter"
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 200)
        page.mouse.down()
        page.mouse.move(box["x"] + 120, box["y"] + 200, steps=5)
        page.mouse.up()
        runs = page.locator(f"{PANEL} .rt-run")
        expect(runs.first).to_be_visible(timeout=UI_TIMEOUT_MS)
        if runs.first.get_attribute("class") and "rt-open" not in runs.first.get_attribute("class"):
            runs.first.locator(".rt-run-head").click()
        expect(runs.first.locator(".rt-scene").first).to_be_visible(timeout=UI_TIMEOUT_MS)
        ed.setting("RunTelemetry.Sidebar.PromptsShown", 4)
        ed.wait_js(
            "() => { const n = document.querySelectorAll('.rt-panel .rt-prompt').length; return n >= 1 && n <= 4; }"
        )
        page.locator(PANEL).evaluate("(el) => el.closest('.sidebar-content-container')?.scrollTo(0, 0)")
        path = ed.shot("telemetry-sidebar", panel_only=True)
        assert path.stat().st_size > 10_000
        assert re.search(r"test-artifacts", str(path)) and path.is_relative_to(ARTIFACTS)
    finally:
        ed.setting("RunTelemetry.Sidebar.PromptsShown", 20)
        page.set_viewport_size({"width": 1500, "height": 1000})
