"""Every script under web/ is loaded by ComfyUI on its own: each must work, or do nothing, without the others."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Browser, Response, expect

from tests.browser.conftest import PANEL, TAB_LABEL, UI_TIMEOUT_MS, VIEWPORT, Editor, only_our_scripts
from tests.conftest import PACKAGE_FOLDER, REPO

pytestmark = [pytest.mark.comfy, pytest.mark.browser]

# Scripts kept (of this package's) -> extensions they register.
CASES: dict[tuple[str, ...], set[str]] = {
    ("rt_common.js", "rt_timeline.js"): set(),
    ("run_telemetry.js",): {"RunTelemetry.Core"},
    ("rt_sidebar.js",): {"RunTelemetry.Sidebar"},
    ("rt_nodes.js",): {"RunTelemetry.NodeBadges"},
    ("rt_marker_prefix.js",): {"RunTelemetry.MarkerPrefix"},
}


def test_the_cases_cover_every_script() -> None:
    scripts = {p.name for p in (REPO / "web").glob("*.js")}
    assert scripts == {s for case in CASES for s in case}


@pytest.mark.parametrize("scripts", sorted(CASES), ids=lambda c: "+".join(c))
def test_script_loaded_alone(editor: Editor, browser: Browser, scripts: tuple[str, ...]) -> None:
    context = browser.new_context(viewport=VIEWPORT, locale="en-US")
    try:
        page = context.new_page()
        alone = Editor(editor.server, page)
        page.route(re.compile(r"/api/extensions(\?|$)"), only_our_scripts(set(scripts)))
        ours = f"/extensions/{PACKAGE_FOLDER}/"
        loaded: dict[str, int] = {}

        def on_response(r: Response) -> None:
            if ours in r.url:
                loaded[r.url.split("?")[0].rsplit("/", 1)[-1]] = r.status

        page.on("response", on_response)
        page.goto(editor.server.url + "/")
        # The frontend imports every extension script before it builds the graph.
        page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager", timeout=90_000)
        scripts_loaded = {name for name, status in loaded.items() if name.endswith(".js") and status == 200}
        # Only the kept scripts and what they import.
        assert set(scripts) <= scripts_loaded <= set(scripts) | {"rt_common.js", "rt_timeline.js"}, loaded
        registered = set(
            alone.js("() => window.app.extensions.map((e) => e.name).filter((n) => n.startsWith('RunTelemetry.'))")
        )
        assert registered == CASES[scripts]
        if "rt_sidebar.js" in scripts:
            # Without the settings module the tab uses the defaults.
            page.get_by_role("button", name=TAB_LABEL, exact=True).click()
            expect(page.locator(f"{PANEL} [data-rt-device]")).to_be_visible(timeout=UI_TIMEOUT_MS)
            expect(page.locator(f"{PANEL} .rt-dev-mem")).to_contain_text("MiB")
        else:
            expect(page.get_by_role("button", name=TAB_LABEL, exact=True)).to_have_count(0)
        alone.assert_clean()
    finally:
        context.close()
