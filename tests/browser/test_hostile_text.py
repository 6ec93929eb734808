"""The live page against hostile text, in a real browser: failure reasons and message ids
carrying markup are shown as text and never run, and 60,000-character fields that fail
leave the page's updates small and the page responsive while they keep arriving, on a
CPU slowed down ten times (a slow laptop, a phone: 50 such failures once made each update
3.3 MB and froze Chromium). Each test saves a screenshot under var/artifacts/."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest
from playwright.async_api import Browser, Dialog, Page, expect

from ingest.text import TEXT_LIMIT
from tests.browser.conftest import screenshot
from tests.integration.service import RunningService, local_service
from tests.support import Broker, publish

MARKUP = (
    "<img src=x onerror=alert(1)>",
    "<script>alert(2)</script>",
    '"><svg onload=alert(3)>',
    "<iframe srcdoc='<script>parent.alert(4)</script>'>",
)
HUGE = 60_000
CPU_SLOWDOWN = 10
# A round trip into the page: typically under 0.5 s (about 0.02 s here with bounded
# failures, 1.2 s when each update carried the whole 60,000 characters), never over 3 s.
TYPICAL_ROUND_TRIP_S = 0.5
LONGEST_ROUND_TRIP_S = 3.0
UPDATE_LIMIT = 64 * 1024  # characters of one update of /events
# Records the size of each update the page receives, whatever script reads them.
MEASURE_UPDATES = """
window.__updates = [];
window.EventSource = class extends window.EventSource {
  constructor(...args) {
    super(...args);
    this.addEventListener("message", event => window.__updates.push(event.data.length));
  }
};
"""


@pytest.fixture
async def service(broker: Broker, queue_name: str, tmp_path: Any) -> AsyncIterator[RunningService]:
    async with local_service(broker, queue_name, tmp_path) as running:
        yield running


def notification(kind: str) -> bytes:
    """A notification of type `kind`: refused, its reason quoting the type."""
    return json.dumps({"type": kind, "recipient": "a@example.com"}).encode()


async def live_page(browser: Browser, service: RunningService, dialogs: list[str]) -> Page:
    """The page, live, every dialog it opens recorded (and dismissed)."""
    page = await browser.new_page(viewport={"width": 1280, "height": 900})

    async def dismiss(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", dismiss)
    await page.add_init_script(MEASURE_UPDATES)
    await page.goto(service.http + "/")
    await expect(page.locator("#stream")).to_have_text("live", timeout=10_000)
    return page


async def round_trip(page: Page) -> float:
    """Seconds for a call into the page to come back (the page's thread must be free)."""
    started = time.monotonic()
    await asyncio.wait_for(page.evaluate("() => document.readyState"), 30)
    return time.monotonic() - started


async def test_markup_in_failures_is_shown_as_text_and_never_runs(
    browser: Browser, service: RunningService, queue_name: str, amqp: aiormq.abc.AbstractChannel
) -> None:
    dialogs: list[str] = []
    page = await live_page(browser, service, dialogs)
    queue = f"{queue_name}-notifications"
    for n, markup in enumerate(MARKUP):
        await publish(amqp, queue, notification(markup), message_id=f"{markup}-{n}")
    failures = page.locator('[data-pipeline="notifications"] td')
    for markup in MARKUP:
        await expect(failures.filter(has_text=f"type {markup!r}")).to_have_count(1, timeout=15_000)
        await expect(failures.filter(has_text=markup).first).to_be_visible()
    await page.wait_for_timeout(2_000)  # an injected image would have failed to load by now
    assert dialogs == []
    injected = await page.evaluate(
        """() => document.querySelectorAll(
            "#pipelines img, #pipelines script, #pipelines iframe, #pipelines [onerror],"
            + " #pipelines [onload]").length"""
    )
    assert injected == 0
    await screenshot(page, "hostile-markup")


async def test_huge_failures_leave_the_page_responsive_while_updates_arrive(
    browser: Browser, service: RunningService, queue_name: str, amqp: aiormq.abc.AbstractChannel
) -> None:
    dialogs: list[str] = []
    page = await live_page(browser, service, dialogs)
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("Emulation.setCPUThrottlingRate", {"rate": CPU_SLOWDOWN})
    queue = f"{queue_name}-notifications"
    card = page.locator('[data-pipeline="notifications"]')
    waits = []
    for round_ in range(12):  # 120 failures, 60,000 characters each, over about 6 seconds
        kinds = [f"{MARKUP[n % len(MARKUP)]}{round_}-{n}-" + "x" * HUGE for n in range(10)]
        await publish(amqp, queue, *map(notification, kinds))
        waits.append(await round_trip(page))
        await asyncio.sleep(0.5)
    await expect(card.locator("h3", has_text="Last failures (50)")).to_be_visible(timeout=15_000)
    for _ in range(6):  # the updates keep arriving, once a second
        waits.append(await round_trip(page))
        await asyncio.sleep(0.5)
    assert statistics.median(waits) < TYPICAL_ROUND_TRIP_S, waits
    assert max(waits) < LONGEST_ROUND_TRIP_S, waits
    updates = await page.evaluate("() => window.__updates")
    assert len(updates) >= 5
    assert max(updates) < UPDATE_LIMIT
    reasons = await card.locator("td").all_text_contents()
    assert any(reason.startswith("unsupported notification type '<img") for reason in reasons)
    assert max(map(len, reasons)) <= TEXT_LIMIT
    assert dialogs == []
    await screenshot(page, "hostile-huge-fields")
