"""The live page under its Content-Security-Policy, in a real browser: it is served with
the policy, works (figures, topology, the in-flight bar, actions, uploads) and the
browser reports no violation of it. Saves a screenshot under var/artifacts/."""

from __future__ import annotations

from playwright.async_api import Browser, ConsoleMessage, FilePayload, expect

from tests.browser.conftest import screenshot
from tests.integration.service import RunningService
from tests.integration.uploads import TOKEN

# Collects what the browser refuses under the policy, from before the page's first script.
RECORD_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", event => {
  window.cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""


async def test_the_page_works_under_its_policy_without_a_violation(
    browser: Browser, service: RunningService
) -> None:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.add_init_script(RECORD_VIOLATIONS)
    console: list[str] = []

    def record(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            console.append(message.text)

    page.on("console", record)
    answer = await page.goto(service.http + "/")
    assert answer is not None
    policy = await answer.header_value("content-security-policy")
    assert policy is not None
    assert "script-src 'self'" in policy
    assert "style-src 'self'" in policy

    # The script runs: the stream is live and the cards are drawn.
    await expect(page.locator("#stream")).to_have_text("live", timeout=10_000)
    bookings = page.locator('[data-pipeline="bookings"]')
    await expect(bookings.locator("svg[aria-label^='topology'] g.stage")).not_to_have_count(0)
    # The style applies: from the stylesheet, and set by the script through the CSSOM.
    assert await bookings.evaluate("e => getComputedStyle(e).borderRadius") == "8px"
    limit = bookings.locator(".bar > .limit")
    await expect(limit).to_have_count(1)
    assert await limit.evaluate("e => e.style.left") != ""
    assert await limit.evaluate("e => getComputedStyle(e).left") != "auto"

    # The actions and the upload form work (fetch, form submission by script).
    await page.fill("#token", TOKEN)
    await page.press("#token", "Enter")  # the token's form is never submitted
    await bookings.locator('button[data-action="pause"]').click()
    await expect(bookings.locator("[data-health]")).to_have_text("paused", timeout=5_000)
    await bookings.locator('button[data-action="resume"]').click()
    await expect(bookings.locator("[data-health]")).to_have_text("running", timeout=5_000)
    await page.fill("#upload-email", "me@example.com")
    empty = FilePayload(name="empty.csv", mimeType="text/csv", buffer=b"")
    await page.set_input_files("#upload-file", files=[empty])
    await page.click("#upload-button")
    await expect(page.locator("#upload-out")).to_contain_text("empty.csv refused")
    assert page.url == service.http + "/"
    await screenshot(page, "content-security-policy")

    assert await page.evaluate("window.cspViolations") == []
    assert [text for text in console if "Content Security Policy" in text] == []
