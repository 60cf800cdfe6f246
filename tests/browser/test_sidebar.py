"""The Telemetry sidebar tab in the real ComfyUI frontends of the matrix (1.25.10, 1.32.9, 1.49.6, 1.53.6)."""

from __future__ import annotations

import re
import uuid

import pytest
from playwright.sync_api import Request, Route, expect

from harness.comfy import ComfyServer
from tests.browser.conftest import PANEL, TAB_ID, UI_TIMEOUT_MS, Editor
from tests.comfy import workflows as wf

pytestmark = [pytest.mark.comfy, pytest.mark.browser]

STATUS_ROUTE = re.compile(r"/api/telemetry\?")
ANY_ROUTE = re.compile(r"/api/telemetry(/|\?|$)")


def uniq(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def wait_record(server: ComfyServer, prompt_id: str, timeout: float = 120) -> dict:
    """The final record from the wait route."""
    status, body = server.request("GET", f"/telemetry/prompts/{prompt_id}/wait?timeout={timeout}", timeout=timeout + 10)
    assert status == 200, (status, body)
    return body


def card(ed: Editor, prompt_id: str):
    return ed.page.locator(f'{PANEL} [data-rt-prompt="{prompt_id}"]')


def watch_events(ed: Editor) -> None:
    """Record every telemetry.prompt event in window.__rtSeen (through the frontend's own api object)."""
    ed.js(
        """() => {
            if (window.__rtSeen) return;
            window.__rtSeen = [];
            window.comfyAPI.api.api.addEventListener('telemetry.prompt', (e) => window.__rtSeen.push(e.detail));
        }"""
    )


def wait_event(ed: Editor, prompt_id: str, outcome: str) -> None:
    ed.wait_js(
        "([id, o]) => (window.__rtSeen || []).some((s) => s.PromptId === id && s.Outcome === o)",
        [prompt_id, outcome],
    )


@pytest.mark.smoke
def test_tab_is_registered_and_opens(ed: Editor) -> None:
    tabs = ed.js("() => window.app.extensionManager.getSidebarTabs().map((t) => [t.id, t.title, t.type])")
    assert [TAB_ID, "Telemetry", "custom"] in tabs
    ed.open_tab()
    status = ed.server.get("/telemetry")
    snap = status["Snapshot"]
    device = ed.page.locator(f"{PANEL} [data-rt-device]")
    expect(device).to_have_text(snap["Device"]["Name"])
    expect(ed.page.locator(f"{PANEL} [data-rt-source]")).to_have_attribute("data-rt-source", snap["Source"])
    # Used / total as a bar: its value is the used share of the device's memory.
    bar = ed.page.locator(f"{PANEL} .rt-bar")
    expect(bar).to_have_attribute("aria-valuenow", re.compile(r"^\d+$"))
    dev = snap["Device"]
    used_pct = 100 * (dev["VramTotal"] - dev["VramFree"]) / dev["VramTotal"]
    assert abs(int(bar.get_attribute("aria-valuenow")) - used_pct) < 10
    notes = ed.page.locator(f"{PANEL} .rt-device .rt-warn")
    expect(notes).to_have_count(len(set(status["FallbackNotes"]) | set(snap["FallbackNotes"])))
    ed.shot("tab-open", panel_only=True)


def test_api_prompt_appears_live_with_its_badges(ed: Editor) -> None:
    ed.open_tab()
    blocked: list[str] = []

    def block(route: Route) -> None:
        blocked.append(route.request.url)
        route.abort()

    # With GET /telemetry refused, the row can only come from the websocket events.
    ed.page.route(STATUS_ROUTE, block)
    try:
        run, scene, prefix = uniq("live"), "4", uniq("live") + "/frame"
        prompt = wf.with_capture(wf.with_sleep(wf.frames(prefix, count=2), 1.5), run_id=run, scene_id=scene)
        pid = ed.server.queue(prompt)
        row = card(ed, pid)
        expect(row.locator('[data-rt-outcome="running"]')).to_be_visible(timeout=UI_TIMEOUT_MS)
        expect(row.locator('[data-rt-outcome="success"]')).to_be_visible(timeout=UI_TIMEOUT_MS)
        rec = wait_record(ed.server, pid)
    finally:
        ed.page.unroute(STATUS_ROUTE, block)
    assert ed.page.locator(f"{PANEL} .rt-prompt").first.get_attribute("data-rt-prompt") == pid, "newest first"
    expect(row).to_contain_text(f"{rec['DurationSeconds']:.2f} s")
    expect(row).to_contain_text(f"wait {rec['QueueWaitSeconds']:.2f} s")
    expect(row.locator(".rt-tag").first).to_have_text(re.compile(re.escape(run)))
    expect(row).to_contain_text(f"scene {scene}")
    expect(row.locator('[data-rt-marker-state="written"]')).to_have_text("\u2713 .done written")
    gpu = rec["Telemetry"]["GPU"]
    delta = row.locator(".rt-vram [data-rt-delta]")
    assert float(delta.get_attribute("data-rt-delta")) == pytest.approx(gpu["VramDeltaMB"], abs=0.01)
    taken = "rt-taken" in (delta.get_attribute("class") or "")
    assert taken == (gpu["VramDeltaMB"] <= -0.5), "red exactly when memory was taken"
    span = rec["Spans"][0]
    expect(row.locator(".rt-span")).to_contain_text(f"render: {span['Seconds']:.2f} s")
    expect(ed.page.locator(f'{PANEL} .rt-timeline g[data-prompt="{pid}"]')).to_have_count(1)


def test_failing_prompt_with_a_marker_raises_a_toast(ed: Editor) -> None:
    ed.close_tab()  # toasts do not need the tab
    prefix = uniq("fail") + "/frame"
    pid = ed.server.queue(wf.with_raise(wf.frames(prefix), "paint ran out"))
    toast = ed.toast(f"{prefix}.failed")
    expect(toast).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(toast).to_contain_text("RTTestRaise #11: paint ran out")
    assert (ed.server.output_dir / f"{prefix}.failed").is_file()
    ed.shot("toast")
    ed.open_tab()
    row = card(ed, pid)
    expect(row.locator('[data-rt-outcome="error"]')).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(row.locator('[data-rt-marker-state="failed"]')).to_be_visible()
    expect(row.locator(".rt-err-line")).to_contain_text("paint ran out")
    for close in toast.get_by_role("button", name="Close").all():
        if close.is_visible():
            close.click()


def test_marker_that_could_not_be_written_raises_a_toast(ed: Editor) -> None:
    # A full disk is what leaves State "error"; the server side of that is covered in tests/comfy. Here the
    # frontend gets the event the server sends in that case, through the frontend's own api object.
    ed.open_tab()
    pid, prefix = uniq("nodisk"), uniq("nodisk") + "/frame"
    summary = {
        "PromptId": pid,
        "RunId": None,
        "SceneId": None,
        "Outcome": "success",
        "QueuedAt": None,
        "StartedAt": None,
        "EndedAt": None,
        "QueueWaitSeconds": 0.01,
        "DurationSeconds": 0.5,
        "VramBeforeMB": 1000.0,
        "VramAfterMB": 900.0,
        "VramDeltaMB": -100.0,
        "Gpu": "cpu",
        "Error": None,
        "Markers": [
            {"NodeId": "4", "Prefix": prefix, "State": "error", "Path": None, "Error": "No space left on device"}
        ],
        "Spans": [],
        "FallbackNotes": [f"marker for prefix {prefix!r} could not be written: No space left on device"],
    }
    ed.js("(s) => window.comfyAPI.api.api.dispatchCustomEvent('telemetry.prompt', s)", summary)
    toast = ed.toast(f"Done marker not written: {prefix}")
    expect(toast).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(toast).to_contain_text("No space left on device")
    row = card(ed, pid)
    expect(row.locator('[data-rt-marker-state="error"]')).to_have_text("\u2717 not written")
    expect(row.locator(".rt-warn")).to_contain_text("could not be written")
    expect(row.locator(".rt-vram .rt-delta")).to_have_class(re.compile(r"\brt-taken\b"))


def test_toasts_can_be_turned_off(ed: Editor) -> None:
    ed.open_tab()
    ed.setting("RunTelemetry.Notifications.Toasts", False)
    try:
        prefix = uniq("quiet") + "/frame"
        pid = ed.server.queue(wf.with_raise(wf.frames(prefix), "no toast please"))
        # The toast would be added in the same event handler that feeds this row.
        expect(card(ed, pid).locator('[data-rt-marker-state="failed"]')).to_be_visible(timeout=UI_TIMEOUT_MS)
        expect(ed.toast(prefix)).to_have_count(0)
    finally:
        ed.setting("RunTelemetry.Notifications.Toasts", True)


def test_settings_change_units_and_prompt_count(ed: Editor) -> None:
    while len(ed.server.get("/telemetry?limit=3")["Prompts"]) < 3:
        wait_record(ed.server, ed.server.queue(wf.frames(uniq("fill"), marker=False)))
    ed.open_tab()
    mem = ed.page.locator(f"{PANEL} .rt-dev-mem")
    expect(mem).to_contain_text("MiB")
    ed.setting("RunTelemetry.Sidebar.Units", "GiB")
    ed.setting("RunTelemetry.Sidebar.PromptsShown", 2)
    try:
        expect(mem).to_contain_text("GiB")
        expect(ed.page.locator(f"{PANEL} .rt-prompt")).to_have_count(2)
        expect(ed.page.locator(f"{PANEL} .rt-timeline")).to_have_attribute("data-count", re.compile(r"^[12]$"))
        ed.shot("settings-gib", panel_only=True)
    finally:
        ed.setting("RunTelemetry.Sidebar.Units", "MiB")
        ed.setting("RunTelemetry.Sidebar.PromptsShown", 20)
    expect(mem).to_contain_text("MiB")
    ed.wait_js("() => document.querySelectorAll('.rt-panel .rt-prompt').length >= 3")
    defs = ed.js(
        """() => Object.values(window.app.extensionManager.setting.settings)
            .filter((s) => s.id.startsWith('RunTelemetry.'))
            .map((s) => ({id: s.id, category: s.category, tooltip: s.tooltip}))"""
    )
    assert {d["id"] for d in defs} >= {
        "RunTelemetry.Sidebar.PromptsShown",
        "RunTelemetry.Sidebar.Units",
        "RunTelemetry.Notifications.Toasts",
    }
    for d in defs:
        assert d["category"][0] == "Run Telemetry" and len(d["category"]) == 3 and d["tooltip"], d


def test_no_requests_while_the_tab_is_closed(ed: Editor) -> None:
    watch_events(ed)
    ed.open_tab()
    ed.close_tab()
    seen: list[str] = []

    def on_request(req: Request) -> None:
        if ANY_ROUTE.search(req.url):
            seen.append(req.url)

    ed.page.on("request", on_request)
    try:
        first = ed.server.queue(wf.with_capture(wf.frames(uniq("closed"), marker=False), run_id=uniq("closed-run")))
        wait_event(ed, first, "success")
        # A second, slower prompt keeps the tab closed well past the refresh an event would schedule when open.
        second = ed.server.queue(wf.with_sleep(wf.frames(uniq("closed"), marker=False), 1.0))
        wait_event(ed, second, "success")
    finally:
        ed.page.remove_listener("request", on_request)
    assert seen == [], f"requests while the tab was closed: {seen}"
    # Opening it fetches at once, and shows what happened while it was closed.
    with ed.page.expect_request(STATUS_ROUTE):
        ed.open_tab()
    expect(card(ed, second)).to_be_visible()


def test_runs_section_hides_when_the_server_has_no_runs_route(ed: Editor) -> None:
    ed.close_tab()

    def missing(route: Route) -> None:
        route.fulfill(status=404, json={"error": "Not Found"})

    ed.page.route(re.compile(r"/api/telemetry/runs$"), missing)
    try:
        ed.open_tab()
        expect(ed.page.locator(f"{PANEL} .rt-runs")).to_be_hidden()
        expect(ed.page.locator(f"{PANEL} .rt-prompts")).to_be_visible()
    finally:
        ed.page.unroute(re.compile(r"/api/telemetry/runs$"), missing)
    ed.page.click(f"{PANEL} .rt-header .rt-icon-btn")  # refresh: the route answers again
    expect(ed.page.locator(f"{PANEL} .rt-runs .rt-h")).to_be_visible()


def test_page_reload_leaves_no_errors_from_the_package(ed: Editor) -> None:
    ed.load()
    ed.open_tab()
    expect(ed.page.locator(f"{PANEL} .rt-prompt").first).to_be_visible(timeout=UI_TIMEOUT_MS)
    ed.assert_clean()


LOCKER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
con.execute("BEGIN EXCLUSIVE")
con.execute("INSERT OR REPLACE INTO runs(run_id, created_at, updated_at, info) VALUES ('locker', 0, 0, '{}')")
open(sys.argv[2], "w").write("locked")
time.sleep(120)
"""


def test_store_trouble_shows_a_warning_and_the_health_line(ed: Editor, tmp_path) -> None:
    """A real store problem (another process holds the store's lock) shows as the store warning, then goes away."""
    import subprocess
    import sys

    from harness.comfy import wait_until

    ed.open_tab()
    health = ed.page.locator(f"{PANEL} [data-rt-health]")
    expect(health).to_have_attribute("data-rt-health", "ok")
    warn = ed.page.locator(f"{PANEL} .rt-store-warn")
    expect(warn).to_have_count(0)
    ready = tmp_path / "locked"
    store = ed.server.user_dir / "telemetry" / "telemetry.sqlite3"
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(store), str(ready)])
    try:
        wait_until(ready.exists, 20, what="the other process to hold the store's lock")
        wait_record(ed.server, ed.server.queue(wf.frames(uniq("locked"), count=1)))
        expect(warn).to_be_visible(timeout=30_000)
        expect(warn).to_contain_text("locked by another process")
        expect(warn).to_have_attribute("role", "alert")
        expect(health).to_have_attribute("data-rt-health", "degraded", timeout=30_000)
        ed.shot("store-warning", panel_only=True)
    finally:
        locker.kill()
        locker.wait(10)
    # The lock is gone: the held-up write goes through and the warning leaves.
    expect(warn).to_have_count(0, timeout=30_000)
    expect(health).to_have_attribute("data-rt-health", "ok", timeout=30_000)
