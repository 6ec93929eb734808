"""The upload path under hostile and odd input (issue 20), against the real service (its
aiohttp server, RabbitMQ, SQLite, an .eml outbox or a real SMTP server): a spreadsheet's
CSV is read as CSV, the errors CSV carries no formulas, a file name or an address cannot
reach a mail header or an SMTP command, a malformed form is a 4xx, and a report that can
never go fails at once without holding up the uploads after it."""

from __future__ import annotations

import csv
import json
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select
from structlog.testing import capture_logs

from pipelines.db import tickets
from pipelines.mail import Email
from pipelines.smtp import SmtpConnection
from tests.integration.service import (
    RunningService,
    local_service,
    publish_from_ui,
    run_cli,
    smtp_server,
)
from tests.integration.uploads import (
    TOKEN,
    attachment_rows,
    booked_events,
    errors_csv,
    finished,
    multipart,
    post_raw,
    report_text,
    reports,
    upload,
)
from tests.support import Broker, eventually, free_port

pytestmark = pytest.mark.integration  # a real broker, like tests/integration

# A report is tried again after 1, 5, 15 and 60 s: one that ends within this, mailed or
# failed, was not held up by retries.
AT_ONCE_S = 15.0


def nothing_kept(spool: Path) -> bool:
    return not spool.is_dir() or not list(spool.glob("u*"))


# -- 1. an uploaded CSV is read as CSV ------------------------------------------------

# A spreadsheet's export: quoted fields, a doubled quote, a comma and a line break inside
# quotes, a row that does not parse. The line each row starts on, its text, and the event
# it books (None: it fails).
EXPORT = [
    (2, '"cinema",1', "cinema"),
    (3, '"cin""ema",2', 'cin"ema'),
    (4, '"opera, gala",3', "opera, gala"),
    (5, '"musi\ncal",1', None),  # two lines, one row: an event has no line break
    (7, 'musical,"2"', "musical"),
    (8, '"cinema"x,1', None),  # text after a closing quote: not CSV
    (9, "cinema,1", "cinema"),
]


@pytest.mark.parametrize("end", ["\r\n", "\n", "\r"], ids=["crlf", "lf", "cr"])
async def test_an_uploaded_spreadsheet_export_is_read_as_csv(
    service: RunningService, tmp_path: Path, end: str
) -> None:
    text = end.join(["event,user_id", *(row for _, row, _ in EXPORT)]) + end
    code, answer = await upload(service, text.encode())
    assert code == 202, answer
    assert answer["rows"] == len(EXPORT)  # rows, not the file's 8 lines

    result = await finished(service, answer["id"])
    assert (result["successful"], result["failed"]) == (5, 2)
    assert sorted(event for _, event in await booked_events(service, answer["id"])) == sorted(
        event for _, _, event in EXPORT if event is not None
    )
    assert f"{answer['id']}.csv:7" in [i for i, _ in await booked_events(service, answer["id"])]
    rows = await errors_csv(service, answer["id"])
    assert [(int(line), row) for line, row, _ in rows[1:]] == [
        (line, row) for line, row, event in EXPORT if event is None
    ]
    assert rows[1][2] == "event must be a name of 1 to 100 printable characters"
    assert rows[2][2] == "not a CSV row: ',' expected after '\"'"
    (report,) = reports(tmp_path / "outbox")
    assert "Rows:   7\n" in report_text(report)


async def test_a_booking_from_the_broker_is_one_csv_row_too(
    broker: Broker, service: RunningService
) -> None:
    queue = service.settings.pipeline("bookings").queue
    assert queue is not None
    assert publish_from_ui(broker, queue, '"cin""ema",1', message_id="quoted")
    assert publish_from_ui(broker, queue, "musical, 2", message_id="typed")
    db = service.hosted["bookings"].pipeline.handlers.db  # type: ignore[attr-defined]

    async def booked() -> dict[str, str]:
        async with db.engine.connect() as connection:
            rows = await connection.execute(select(tickets.c.message_id, tickets.c.event))
            return dict(rows.all())

    async def both() -> bool:
        return len(await booked()) == 2

    await eventually(both, timeout=20)
    assert await booked() == {"quoted": 'cin"ema', "typed": "musical"}


async def test_a_file_run_books_csv_rows_and_names_each_failed_row_by_its_first_line(
    tmp_path: Path,
) -> None:
    # `ingest run --file`: the same producer, no broker. A line break inside quotes
    # makes a row of two lines; a row that is not UTF-8 is a failed row like any other.
    source = tmp_path / "bookings.csv"
    source.write_bytes(
        b'"cin""ema",1\r\n"musi\ncal",2\r\ncaf\xe9,3\r\n"opera, gala",3\r\n=1+1,42\r\n'
    )
    code, output = await run_cli(
        "run",
        "--pipeline",
        "bookings",
        "--file",
        str(source),
        INGEST_AMQP_URL="amqp://guest:guest@127.0.0.1:1/%2F",
        INGEST_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/tickets.db",
        INGEST_MAIL_OUTBOX=str(tmp_path / "outbox"),
        INGEST_HTTP_PORT="0",
    )
    assert code == 0, output
    with (tmp_path / "bookings.errors.csv").open(newline="", encoding="utf-8") as file:
        assert list(csv.reader(file)) == [
            ["line", "row", "reason"],
            ["2", '"musi\ncal",2', "event must be a name of 1 to 100 printable characters"],
            ["4", "caf\\udce9,3", "payload is not valid UTF-8 (byte 3)"],
            ["6", "'=1+1,42", "unknown user 42"],
        ]
    notified = (tmp_path / "bookings.notifications.jsonl").read_text().splitlines()
    assert sorted((n["booking"], n["event"]) for n in map(json.loads, notified)) == [
        ("bookings.csv:1", 'cin"ema'),
        ("bookings.csv:5", "opera, gala"),
    ]


# -- 2. no spreadsheet formulas in the errors CSV ---------------------------------------

FORMULAS = [
    "=1+1,42",
    '=HYPERLINK("http://example.com/x","click"),42',
    "+cmd|' /C calc'!A0,42",
    "-2+3,42",
    "@SUM(1+1),42",
    "\t=1+1,42",
]


async def test_failed_rows_come_back_without_spreadsheet_formulas(
    service: RunningService, tmp_path: Path
) -> None:
    code, answer = await upload(service, ("\n".join(["event,user_id", *FORMULAS]) + "\n").encode())
    assert code == 202, answer
    assert (await finished(service, answer["id"]))["failed"] == len(FORMULAS)

    served = await errors_csv(service, answer["id"])
    (report,) = reports(tmp_path / "outbox")
    for rows in (served, attachment_rows(report)):
        assert [row for _, row, _ in rows[1:]] == [f"'{formula}" for formula in FORMULAS]
        cells = [cell for row in rows for cell in row]
        assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]


# -- 4. a file name the email cannot carry; a report that can never go ------------------


async def test_a_file_name_is_cleaned_and_its_upload_reported_without_holding_up_the_next(
    service: RunningService, tmp_path: Path
) -> None:
    # A browser percent-encodes a line break in a file name; aiohttp decodes it again.
    name = b"a%0D%0ABcc%3A%20evil%40example.com%01%E2%80%AE%09.csv"
    body = multipart(
        "B0undary",
        (b'Content-Disposition: form-data; name="email"', b"me@example.com"),
        (b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''" + name, b"cinema,1"),
    )
    code, answer = await post_raw(service, body, "multipart/form-data; boundary=B0undary")
    assert code == 202, answer
    assert answer["filename"] == "a Bcc: evil@example.com .csv"
    code, long = await upload(service, b"musical,2\n", filename="y" * 300 + ".csv")
    assert (code, long["filename"]) == (202, "y" * 196 + ".csv")

    assert (await finished(service, answer["id"], AT_ONCE_S))["state"] == "done"
    assert (await finished(service, long["id"], AT_ONCE_S))["state"] == "done"
    (report,) = [r for r in reports(tmp_path / "outbox") if "evil" in str(r["Subject"])]
    assert report["Bcc"] is None
    assert str(report["Subject"]).startswith("Your upload a Bcc: evil@example.com .csv: 1 booked")


class RefusingInbox:
    """An SMTP server's handler that refuses one recipient for good (550) and takes the
    others' mail."""

    def __init__(self, refused: str) -> None:
        self.refused = refused
        self.attempts: list[str] = []
        self.accepted: list[str] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.attempts.append(address)
        if address == self.refused:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.accepted.extend(envelope.rcpt_tos)
        return "250 OK"


@contextmanager
def refusing_smtp_server(refused: str) -> Iterator[tuple[RefusingInbox, int]]:
    inbox, port = RefusingInbox(refused), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


async def test_a_report_refused_for_good_fails_at_once_and_the_next_upload_goes_on(
    broker: Broker, queue_name: str, tmp_path: Path
) -> None:
    with refusing_smtp_server("refused@example.com") as (inbox, port), capture_logs() as logs:
        async with local_service(
            broker,
            queue_name,
            tmp_path,
            admin_token=TOKEN,
            upload_dir=tmp_path / "uploads",
            smtp_url=f"smtp://127.0.0.1:{port}",
        ) as running:
            first = (await upload(running, b"cinema,42\n", "refused@example.com"))[1]["id"]
            second = (await upload(running, b"cinema,42\n", "me@example.com"))[1]["id"]
            refused = await finished(running, first, AT_ONCE_S)
            assert (refused["state"], refused["mailed"]) == ("failed", False)
            assert "550" in refused["report_error"]
            assert (await finished(running, second, AT_ONCE_S))["mailed"]
    assert inbox.attempts.count("refused@example.com") == 1
    assert inbox.accepted == ["me@example.com"]
    assert [e["upload"] for e in logs if e["event"] == "upload report cannot be sent"] == [first]


async def test_a_report_the_email_cannot_carry_fails_at_once_after_a_restart(
    broker: Broker, queue_name: str, tmp_path: Path
) -> None:
    # An upload received before file names were cleaned, interrupted while reporting.
    spool = tmp_path / "uploads"
    spool.mkdir()
    old = {
        "id": "u20250101000000-0badf11e",
        "pipeline": "bookings",
        "filename": "a\r\nBcc: evil@example.com.csv",
        "email": "me@example.com",
        "size": 9,
        "rows": 1,
        "header": False,
        "created": time.time() - 60,
        "state": "reporting",
        "successful": 1,
    }
    (spool / f"{old['id']}.json").write_text(json.dumps(old))
    (spool / f"{old['id']}.csv").write_text("cinema,1\n")
    async with local_service(
        broker, queue_name, tmp_path, admin_token=TOKEN, upload_dir=spool
    ) as running:
        result = await finished(running, str(old["id"]), AT_ONCE_S)
        assert (result["state"], result["mailed"]) == ("failed", False)
        assert "linefeed" in result["report_error"]
        code, answer = await upload(running, b"cinema,1\n")
        assert code == 202
        assert (await finished(running, answer["id"], AT_ONCE_S))["state"] == "done"


# -- 5. a malformed form is a 4xx with its reason, never a 500 --------------------------

FILE = b'Content-Disposition: form-data; name="file"; filename="b.csv"'
EMAIL = (b'Content-Disposition: form-data; name="email"', b"me@example.com")
FORM = "multipart/form-data; boundary=B0undary"


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        pytest.param(
            multipart("B0undary", EMAIL, (FILE[:-7] + b'a\x00.csv"', b"cinema,1")),
            FORM,
            "not a valid multipart/form-data body",
            id="nul-in-a-part-header",
        ),
        pytest.param(
            multipart("B0undary", EMAIL, (FILE + b"\r\nX-Note\x00: 1", b"cinema,1")),
            FORM,
            "not a valid multipart/form-data body",
            id="nul-in-a-header-name",
        ),
        pytest.param(
            multipart("B0undary", EMAIL, (b"Content-Disposition form-data", b"cinema,1")),
            FORM,
            "not a valid multipart/form-data body",
            id="header-without-colon",
        ),
        pytest.param(
            multipart("B0undary", EMAIL, (FILE, b"cinema,1")),
            "multipart/form-data",
            "boundary",
            id="missing-boundary",
        ),
        pytest.param(
            multipart("B0undary", EMAIL, (FILE, b"cinema,1\nmusical,2"))[:-30],
            FORM,
            "not a valid multipart/form-data body",
            id="truncated-body",
        ),
        pytest.param(
            b"cinema,1\n", FORM, "not a valid multipart/form-data body", id="no-parts-at-all"
        ),
        pytest.param(
            multipart(
                "B0undary",
                EMAIL,
                (b'Content-Disposition: form-data; filename="a.csv"', b"cinema,1"),
                (FILE, b"cinema,1"),
            ),
            FORM,
            "a part without a name",
            id="part-without-a-name",
        ),
        pytest.param(
            multipart("B0undary", EMAIL, (FILE, b"cinema,1"), (FILE, b"musical,2")),
            FORM,
            "one file",
            id="two-files",
        ),
        pytest.param(
            multipart("B0undary", (EMAIL[0], b"me@example.com" + b" " * 400), (FILE, b"cinema,1")),
            FORM,
            "longer than",
            id="huge-email-field",
        ),
    ],
)
async def test_a_malformed_form_is_refused_with_its_reason(
    service: RunningService, tmp_path: Path, body: bytes, content_type: str, reason: str
) -> None:
    code, answer = await post_raw(service, body, content_type)
    assert 400 <= code < 500, answer
    assert reason in answer["error"]
    assert nothing_kept(tmp_path / "uploads")


# -- 6. an address is validated, and never reaches an SMTP command as it is not ----------


@pytest.mark.parametrize(
    "email",
    [
        "a,b@example.com",
        "<me@example.com>",
        "me@example.com>",
        '"me"@example.com',
        "me@example",
        "me@exa_mple.com",
        "me@example.com\r\nRCPT TO:<evil@example.com>",
    ],
)
async def test_an_odd_email_address_is_refused_with_its_reason(
    service: RunningService, tmp_path: Path, email: str
) -> None:
    code, answer = await upload(service, b"cinema,1\n", email)
    assert code == 400, answer
    assert answer["error"].startswith("not a valid email address in the field 'email': ")
    assert nothing_kept(tmp_path / "uploads")


async def test_an_email_address_is_kept_normalised(service: RunningService) -> None:
    code, answer = await upload(service, b"cinema,1\n", " Me@EXAMPLE.com ")
    assert (code, answer["email"]) == (202, "Me@example.com")


@pytest.mark.parametrize(
    "recipient",
    ["a,b@example.com", "a@example.com\r\nRCPT TO:<evil@example.com>", "a@example.com>"],
    ids=["comma", "crlf", "bracket"],
)
async def test_an_address_that_would_change_an_smtp_command_never_reaches_one(
    recipient: str,
) -> None:
    with pytest.raises(ValueError, match="SMTP"):
        Email("tickets@example.com", recipient, "<x@example.com>", b"Subject: x\r\n\r\nx\r\n")
    async with smtp_server() as mail:
        connection = await SmtpConnection.open("127.0.0.1", mail.port, local_hostname="test")
        try:
            with pytest.raises(ValueError, match="SMTP"):
                await connection.send("tickets@example.com", recipient, b"Subject: x\r\n\r\nx\r\n")
            await connection.send("tickets@example.com", "ok@example.com", b"Subject: y\r\n\r\ny")
        finally:
            await connection.quit()
    assert [str(m["Subject"]) for m in mail.inbox.messages] == ["y"]


# -- risks: who may read what was uploaded; a log that a bad file does not flood ----------


async def test_uploaded_files_and_manifests_are_readable_by_the_service_only(
    service: RunningService, tmp_path: Path
) -> None:
    spool = tmp_path / "uploads"
    code, answer = await upload(service, b"event,user_id\ncinema,1\ncinema,42\n")
    assert code == 202, answer
    await finished(service, answer["id"])
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    kept = [path for path in spool.iterdir() if path.name != ".lock"]
    assert {path.suffix for path in kept} >= {".csv", ".json"}
    for path in kept:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path.name


async def test_a_file_of_bad_rows_logs_a_few_lines_not_one_per_row(
    service: RunningService,
) -> None:
    bad = 2_500
    with capture_logs() as logs:
        code, answer = await upload(
            service, ("event,user_id\n" + "cinema,42\n" * bad + "cinema,1\n").encode()
        )
        assert code == 202, answer
        assert (await finished(service, answer["id"]))["failed"] == bad
    each = [line for line in logs if line["event"] == "message failed"]
    sampled = [line for line in logs if line["event"] == "messages failed (sampled)"]
    assert len(each) == 10  # the first ones in full
    assert 1 <= len(sampled) <= 3
    assert len(each) + sum(line["failed"] for line in sampled) == bad
    assert sampled[-1]["failed_in_all"] == bad
    assert sampled[-1]["reasons"] == {"unknown user 42": sampled[-1]["failed"]}
