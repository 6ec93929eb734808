"""The live page in a real browser (Debian's Chromium, driven by Playwright): both
pipelines and their topology, counters and sparklines that move as bookings go through,
pausing a pipeline from the page, replaying a dead letter from it into a ticket, and
uploading a CSV from it to the end of its report. Each
test saves a screenshot under var/artifacts/; with INGEST_UPDATE_SCREENSHOT=1 the first
also writes docs/dashboard.png, the README's picture."""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiormq
import pytest
from playwright.async_api import Browser, expect
from sqlalchemy import insert, select

from ingest.rabbitmq import PUBLISHED_AT_HEADER
from pipelines.db import tickets, users
from tests.browser.conftest import ROOT, screenshot
from tests.integration.service import RunningService, local_service, publish_from_ui
from tests.integration.uploads import BAD_ROWS, attachment_rows, bookings_csv, reports
from tests.support import Broker, eventually

TOKEN = "page-admin-token"


@pytest.fixture
async def service(broker: Broker, queue_name: str, tmp_path: Any) -> AsyncIterator[RunningService]:
    async with local_service(
        broker,
        queue_name,
        tmp_path,
        admin_token=TOKEN,
        queue_depth_interval=0.5,
        upload_dir=tmp_path / "uploads",
    ) as running:
        yield running


async def test_the_page_shows_both_pipelines_and_moves_with_the_bookings(
    browser: Browser, queue_name: str, service: RunningService, amqp: aiormq.abc.AbstractChannel
) -> None:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(service.http + "/")
    await expect(page.locator("#stream")).to_have_text("live", timeout=10_000)
    for name in ("bookings", "notifications"):
        card = page.locator(f'[data-pipeline="{name}"]')
        await expect(card.locator("svg[aria-label^='topology'] g.stage")).not_to_have_count(0)
    bookings = page.locator('[data-pipeline="bookings"]')
    await expect(
        bookings.locator("svg[aria-label^='topology'] text", has_text="batcher cinema")
    ).to_have_count(1)
    await expect(bookings.locator("[data-health]")).to_have_text("running")
    await expect(bookings.locator('[data-consumer="0"]')).to_have_text("● consuming")
    await expect(bookings.locator(".bar > .limit")).to_have_count(1)  # where batches close

    # Over AMQP, without blocking the event loop the service runs in.
    for n in range(200):
        await amqp.basic_publish(
            f"cinema,{n % 3 + 1}".encode(),
            routing_key=f"{queue_name}-bookings",
            properties=aiormq.spec.Basic.Properties(
                delivery_mode=2,
                message_id=f"page-{n}",
                headers={PUBLISHED_AT_HEADER: int(time.time() * 1000)},  # as Publisher stamps
            ),
        )
    await expect(bookings.locator('[data-figure="successful"]')).to_have_text("200", timeout=20_000)
    # The stages that worked are shaded by how busy they were.
    for stage in ("processors", "batch processors cinema"):
        busy = await bookings.locator(f'g.stage[data-stage="{stage}"]').get_attribute("data-busy")
        assert busy is not None
        assert float(busy) > 0, stage
    await expect(bookings.locator('[data-figure="latency"]')).to_have_text(
        re.compile(r"^[\d.]+ / [\d.]+ / [\d.]+ ms$")
    )
    # The sparkline of received messages has a peak now.
    peak = await bookings.locator("svg.sparkline").first.get_attribute("aria-label")
    assert peak is not None
    assert peak != "peak 1 a second"
    await screenshot(page, "live-page")
    if os.environ.get("INGEST_UPDATE_SCREENSHOT"):
        await page.screenshot(path=str(ROOT / "docs" / "dashboard.png"), full_page=True)


async def test_pausing_from_the_page_pauses_the_pipeline(
    browser: Browser, service: RunningService
) -> None:
    page = await browser.new_page(viewport={"width": 390, "height": 844})  # a phone
    await page.goto(service.http + "/")
    bookings = page.locator('[data-pipeline="bookings"]')
    pause = bookings.locator('button[data-action="pause"]')
    await expect(pause).to_be_disabled()  # read-only without the token
    await page.fill("#token", TOKEN)
    await expect(pause).to_be_enabled()
    await pause.click()
    pipeline = service.hosted["bookings"].pipeline

    async def paused() -> bool:
        return pipeline.paused

    await eventually(paused, timeout=10)
    await expect(bookings.locator("[data-health]")).to_have_text("paused", timeout=5_000)
    await screenshot(page, "paused-on-a-phone")
    await bookings.locator('button[data-action="resume"]').click()
    await expect(bookings.locator("[data-health]")).to_have_text("running", timeout=5_000)
    assert not pipeline.paused


async def test_replaying_a_dead_letter_from_the_page_turns_it_into_a_ticket(
    browser: Browser, broker: Broker, queue_name: str, service: RunningService
) -> None:
    publish_from_ui(broker, f"{queue_name}-bookings", "cinema,999", "stranger-1")
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(service.http + "/")
    await page.fill("#token", TOKEN)
    bookings = page.locator('[data-pipeline="bookings"]')
    await expect(bookings.locator("td", has_text="unknown user 999")).to_have_count(
        1, timeout=15_000
    )  # among the last failures
    await bookings.locator('button[data-action="dlq"]').click()
    output = bookings.locator("output")
    await expect(output).to_contain_text("1 dead letter(s)")
    await expect(output).to_contain_text("stranger-1")
    db = service.hosted["bookings"].pipeline.handlers.db  # type: ignore[attr-defined]
    async with db.engine.begin() as connection:  # the cause is fixed: the user exists now
        await connection.execute(insert(users).values(id=999, email="new@email.com"))
    await bookings.locator('button[data-action="dlq/replay"]').click()
    await expect(output).to_contain_text('"replayed":1')
    await screenshot(page, "dead-letter-replayed")

    async def ticketed() -> bool:
        async with db.engine.connect() as connection:
            rows = await connection.execute(select(tickets.c.message_id))
            return "stranger-1" in set(rows.scalars())

    await eventually(ticketed, timeout=15)


async def test_an_upload_from_the_page_shows_its_progress_and_ends_in_a_report(
    browser: Browser, service: RunningService, tmp_path: Path
) -> None:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(service.http + "/")
    await page.fill("#token", TOKEN)
    await page.fill("#upload-email", "me@example.com")
    # What the form takes comes from the service (the page names no pipeline).
    await expect(page.locator("#uploads-title")).to_have_text("Upload bookings (CSV)")
    await expect(page.locator("#upload-columns")).to_have_text("event,user_id")
    await expect(page.locator("#upload-target-label")).to_be_hidden()  # one target

    # A bad file first: the page says why.
    await page.set_input_files(
        "#upload-file",
        files=[{"name": "latin.csv", "mimeType": "text/csv", "buffer": b"caf\xe9,1\n"}],
    )
    await page.click("#upload-button")
    await expect(page.locator("#upload-out")).to_contain_text("latin.csv refused: not UTF-8")

    await page.set_input_files(
        "#upload-file",
        files=[{"name": "bookings.csv", "mimeType": "text/csv", "buffer": bookings_csv(10_000)}],
    )
    await page.click("#upload-button")
    await expect(page.locator("#upload-out")).to_contain_text("bookings.csv accepted (10000 rows)")
    row = page.locator("tr[data-upload]").first
    await expect(row.locator("[data-upload-state]")).to_have_text(
        re.compile("processing|reporting|done"), timeout=10_000
    )
    await expect(row.locator("[data-upload-state]")).to_have_text("done", timeout=60_000)
    await expect(row.locator("[data-upload-done]")).to_have_text("10000 / 10000")
    await expect(row.locator("[data-upload-failed]")).to_have_text(str(len(BAD_ROWS)))
    await screenshot(page, "upload-done")

    (report,) = reports(tmp_path / "outbox")
    assert report["To"] == "me@example.com"
    assert {int(line): row for line, row, _ in attachment_rows(report)[1:]} == BAD_ROWS
