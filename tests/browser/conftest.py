"""Browser fixtures: Debian's chromium, driven by Playwright, on the ComfyUI frontend each harness server ships.

Frontends 1.25.10 (ComfyUI 0.3.52), 1.32.9 (0.3.75), 1.49.6 (0.33.0) and 1.53.6 (overlaid on 0.33.0) render the same
things differently (1.53.6 drops the sidebar button's CSS class for a ``data-testid``; 1.49.6 shows a node error
as a notice, not a dialog), so the frontend's elements are found by role, accessible name or ``data-testid``
only, never by its CSS classes. The package's own panel keeps its own ``rt-`` classes and ``data-rt-`` attributes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Error, Locator, Page, Route, sync_playwright

from harness.comfy import ComfyServer
from tests.conftest import PACKAGE_FOLDER, REPO

CHROMIUM = Path(os.environ.get("RT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts" / "browser"
TAB_ID = "run-telemetry"
# The tab's tooltip (web/rt_sidebar.js) is its button's accessible name on every frontend.
TAB_LABEL = "Run Telemetry: device memory, recent prompts, runs"
TAB_BUTTON = f'button[aria-label="{TAB_LABEL}"]'  # the same, for page.click and document.querySelector
PANEL = ".rt-panel"
LOAD_TIMEOUT_MS = 90_000
UI_TIMEOUT_MS = 30_000
VIEWPORT = {"width": 1500, "height": 1000}

# The frontend is ready when the app, its extension manager and our tab button exist.
READY_JS = f"""() => !!(window.app && window.app.graph && window.app.extensionManager
    && document.querySelector('{TAB_BUTTON}'))"""


def is_package_message(text: str, url: str = "") -> bool:
    """A console line that comes from this package's scripts (its folder, or our own log prefix)."""
    return PACKAGE_FOLDER in text or PACKAGE_FOLDER in url or "[Run Telemetry]" in text


class Editor:
    """One ComfyUI editor page and what its console said about this package."""

    def __init__(self, server: ComfyServer, page: Page) -> None:
        self.server = server
        self.page = page
        self.version = server.install.version
        self.package_errors: list[str] = []
        self.watch(page)

    def watch(self, page: Page) -> None:
        """Collect console errors and page errors of ``page`` that name the package."""

        def on_console(msg: ConsoleMessage) -> None:
            if msg.type != "error":
                return
            url = (msg.location or {}).get("url", "")
            if is_package_message(msg.text, url):
                self.package_errors.append(f"console: {msg.text} ({url})")

        def on_page_error(err: Error) -> None:
            text = f"{err.message}\n{err.stack or ''}"
            if is_package_message(text):
                self.package_errors.append(f"pageerror: {text}")

        page.on("console", on_console)
        page.on("pageerror", on_page_error)

    def load(self) -> None:
        """(Re)load the editor and wait until the frontend and our tab button are up."""
        self.page.goto(self.server.url + "/")
        self.page.wait_for_function(READY_JS, timeout=LOAD_TIMEOUT_MS)

    def tab_open(self) -> bool:
        return self.page.locator(PANEL).count() > 0 and self.page.locator(PANEL).first.is_visible()

    def open_tab(self) -> None:
        """Open the Telemetry tab (a click on its sidebar button) and wait for the device section."""
        if not self.tab_open():
            self.tab_button().click()
        self.page.wait_for_selector(f"{PANEL} [data-rt-device]", timeout=UI_TIMEOUT_MS)

    def close_tab(self) -> None:
        """Close the tab (the same button toggles it) and wait until the panel is gone."""
        if self.tab_open():
            self.tab_button().click()
        self.page.wait_for_selector(PANEL, state="detached", timeout=UI_TIMEOUT_MS)

    def dismiss_dialogs(self) -> None:
        """Close modal dialogs (the frontend's execution-error dialog after a failing editor prompt)."""
        dialogs = self.page.get_by_role("dialog")
        for _ in range(5):
            if not dialogs.count():
                return
            close = dialogs.get_by_role("button", name="Close")
            if close.count() and close.first.is_visible():
                close.first.click()
            else:
                self.page.keyboard.press("Escape")
            try:
                dialogs.first.wait_for(state="detached", timeout=5_000)
            except Error:
                pass  # another try below, then give up: the next test names what blocks it
        assert not dialogs.count(), "a modal dialog would not close"

    def tab_button(self) -> Locator:
        """The Telemetry tab's sidebar button, by role and accessible name."""
        return self.page.get_by_role("button", name=TAB_LABEL, exact=True)

    def toast(self, text: str) -> Locator:
        """Toast messages (role ``alert``) containing ``text``."""
        return self.page.get_by_role("alert").filter(has_text=text)

    def error_notice(self, text: str) -> Locator:
        """The frontend's own report of a failed prompt: a dialog with the error ``text`` (up to 1.4x), or from 1.49
        on a notice (role ``status``) saying a node threw an error, without the message."""
        return (
            self.page.get_by_role("dialog")
            .filter(has_text=text)
            .or_(self.page.get_by_role("status").filter(has_text=re.compile(r"threw an error", re.I)))
        )

    def js(self, expression: str, arg: Any = None) -> Any:
        """Evaluate in the page."""
        return self.page.evaluate(expression, arg)

    def wait_js(self, expression: str, arg: Any = None, timeout_ms: int = UI_TIMEOUT_MS) -> Any:
        """Wait until a page function returns a truthy value; return that value."""
        return self.page.wait_for_function(expression, arg=arg, timeout=timeout_ms).json_value()

    def setting(self, key: str, value: Any) -> None:
        """Set a frontend setting through the extension manager."""
        self.js("([k, v]) => window.app.extensionManager.setting.set(k, v)", [key, value])

    def shot(self, name: str, *, panel_only: bool = False) -> Path:
        """Save a screenshot under test-artifacts/browser/<version>/ (every run)."""
        folder = ARTIFACTS / self.server.install.label
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        # Finished animations: a toast that is still fading in is in the picture at full strength.
        if panel_only:
            self.page.locator(PANEL).screenshot(path=str(path), animations="disabled")
        else:
            self.page.screenshot(path=str(path), animations="disabled")
        return path

    def assert_clean(self) -> None:
        """No console or page error named the package so far."""
        assert not self.package_errors, "errors from the package's scripts:\n" + "\n".join(self.package_errors)


def prepare_server(server: ComfyServer) -> None:
    """Skip the first-run template dialog, which would cover the sidebar."""
    status, body = server.request("POST", "/settings/Comfy.TutorialCompleted", True)
    assert status == 200, (status, body)


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless, with a fresh profile (Playwright makes a new one per launch)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/dev.sh test installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="package")
def editor(comfy: ComfyServer, browser: Browser) -> Iterator[Editor]:
    """One editor page per ComfyUI version, shared by that version's browser tests."""
    prepare_server(comfy)
    context = browser.new_context(viewport=VIEWPORT, locale="en-US")
    ed = Editor(comfy, context.new_page())
    ed.load()
    yield ed
    context.close()


@pytest.fixture
def ed(editor: Editor, request: pytest.FixtureRequest) -> Iterator[Editor]:
    """The shared editor for one test: a screenshot at the end, and no package errors may appear during it."""
    before = len(editor.package_errors)
    yield editor
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    try:
        editor.shot(name)
    except Error:
        pass  # a crashed page: the test's own failure says more
    try:
        editor.dismiss_dialogs()  # a dialog one test left open must not block the next one's clicks
    except (Error, AssertionError):
        pass
    new = editor.package_errors[before:]
    assert not new, "errors from the package's scripts during the test:\n" + "\n".join(new)


def only_our_scripts(keep: set[str]) -> Callable[[Route], None]:
    """A route handler for GET /extensions that keeps, of this package's scripts, only ``keep``."""

    def handle(route: Route) -> None:
        response = route.fetch()
        scripts = json.loads(response.text())
        ours = f"/extensions/{PACKAGE_FOLDER}/"
        kept = [s for s in scripts if ours not in s or s.split(ours, 1)[1] in keep]
        route.fulfill(response=response, json=kept)

    return handle
