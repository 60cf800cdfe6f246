"""The sidebar's webhook line: shown while deliveries to an endpoint fail, gone once they succeed again."""

from __future__ import annotations

import uuid

import pytest
from playwright.sync_api import expect

from harness.comfy import wait_until
from tests.browser.conftest import PANEL, UI_TIMEOUT_MS, Editor
from tests.comfy import workflows as wf
from tests.receiver import Receiver

pytestmark = [pytest.mark.comfy, pytest.mark.browser]


def test_failing_webhook_deliveries_show_a_line_until_they_succeed(ed: Editor) -> None:
    failing = True
    receiver = Receiver(behaviour=lambda _id, _n: (500, {}) if failing else (204, {})).start()
    try:
        ed.open_tab()
        line = ed.page.locator(f"{PANEL} [data-rt-webhooks]")
        expect(line).to_have_count(0)
        prefix = f"hooked-{uuid.uuid4().hex[:6]}/frame"
        ed.server.queue(
            wf.frames(prefix, count=1, size=8), extra_data={"telemetry": {"webhook": {"url": receiver.url}}}
        )
        wait_until(lambda: receiver.requests, 60, what="the first delivery try")
        expect(line).to_be_visible(timeout=UI_TIMEOUT_MS)
        expect(line).to_contain_text(f"Webhook deliveries failing to {receiver.url}")
        expect(line).to_contain_text("HTTP 500")
        expect(line).to_contain_text("1 pending")
        ed.shot("webhooks-failing", panel_only=True)
        failing = False  # the next try (the production schedule: 5-10 s later) succeeds
        wait_until(lambda: any(r.answered == 204 for r in receiver.requests), 60, what="a successful retry")
        ed.page.click(f"{PANEL} button[aria-label='Refresh']")
        expect(line).to_have_count(0, timeout=UI_TIMEOUT_MS)
    finally:
        receiver.stop()
