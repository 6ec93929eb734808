"""The page of `ingest run --workers 2` in a real browser (Debian's Chromium, through
Playwright), from the supervisor's one address: both workers' health, the figures summed
over them, and an upload passed on to worker 0 shown on its pipeline's card. A screenshot
of each under var/artifacts/."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, expect

from tests.browser.conftest import screenshot
from tests.integration.test_tickets_cli import ingest
from tests.integration.test_workers_page import TOKEN, Workers, workers_running
from tests.integration.uploads import BAD_ROWS, bookings_csv
from tests.support import Broker

BOOKINGS = 300


@pytest.fixture
async def workers(broker: Broker, queue_name: str, tmp_path: Path) -> AsyncIterator[Workers]:
    async with workers_running(broker, queue_name, tmp_path) as running:
        yield running


async def test_the_page_shows_both_workers_health_and_their_figures_summed(
    browser: Browser, workers: Workers
) -> None:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(workers.base + "/")
    await expect(page.locator("#stream")).to_have_text("live", timeout=10_000)
    await expect(page.locator("#workers")).to_be_visible()
    for index in (0, 1):
        row = page.locator(f'tr[data-worker="{index}"]')
        await expect(row.locator("[data-worker-health]")).to_have_text("ready", timeout=10_000)
    bookings = page.locator('[data-pipeline="bookings"]')
    await expect(bookings.locator("[data-health]")).to_have_text("running")
    await expect(bookings.locator("[data-consumer]")).to_have_count(2)  # one per worker

    code, _, err = await ingest(
        "publish", "bookings", "--count", str(BOOKINGS), environment=workers.environment
    )
    assert code == 0, err
    await expect(bookings.locator('[data-figure="received"]')).to_have_text(
        str(BOOKINGS), timeout=20_000
    )
    each = [
        await page.locator(f'tr[data-worker="{i}"] [data-worker-figures="bookings"]').inner_text()
        for i in (0, 1)
    ]
    received = [int(text.split(" / ")[0]) for text in each]
    assert sum(received) == BOOKINGS, each
    await screenshot(page, "workers-page")


async def test_an_upload_through_the_one_address_shows_on_its_pipelines_card(
    browser: Browser, workers: Workers
) -> None:
    rows = 200
    form = aiohttp.FormData()
    form.add_field("email", "me@example.com")
    form.add_field("file", bookings_csv(rows), filename="bookings.csv", content_type="text/csv")
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{workers.base}/uploads/bookings",
            data=form,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as response,
    ):
        assert response.status == 202, await response.text()
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(workers.base + "/")
    bookings = page.locator('[data-pipeline="bookings"]')
    await expect(bookings.locator('[data-figure="upload"]')).to_have_text(
        f"{rows} / {rows}", timeout=30_000
    )
    await expect(bookings.locator('[data-figure="upload-failed"]')).to_have_text(str(len(BAD_ROWS)))
    await screenshot(page, "workers-page-upload")
