"""Uploads over HTTP against the real service (broker, SQLite, outbox or a real SMTP
server): a CSV is answered at once, booked in the background and reported by email with
its errors attached; bad files are refused with their reason; an upload resumes after a
restart without booking twice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.service import RunningService, local_service, smtp_server
from tests.integration.uploads import (
    BAD_ROWS,
    TOKEN,
    attachment_rows,
    booked,
    bookings_csv,
    finished,
    reports,
    status,
    upload,
)
from tests.support import Broker, eventually


async def test_an_upload_is_booked_in_the_background_and_reported_with_its_errors(
    service: RunningService, tmp_path: Path
) -> None:
    code, answer = await upload(service, bookings_csv(2000))
    assert code == 202, answer
    assert (answer["rows"], answer["email"]) == (2000, "me@example.com")
    assert answer["state"] in ("queued", "processing")

    result = await finished(service, answer["id"])
    assert result["state"] == "done", result
    assert (result["successful"], result["failed"], result["mailed"]) == (1997, 3, True)
    ids = await booked(service, answer["id"])
    assert len(ids) == len(set(ids)) == 1997
    assert f"{answer['id']}.csv:2" in ids  # the first row after the header

    (report,) = reports(tmp_path / "outbox")
    assert report["To"] == "me@example.com"
    assert "1,997 booked, 3 failed" in str(report["Subject"])
    rows = attachment_rows(report)
    assert rows[0] == ["line", "row", "reason"]
    assert {int(line): row for line, row, _ in rows[1:]} == BAD_ROWS
    assert rows[1][2] == "unknown user 999"  # line 3, the first bad row


async def test_two_uploads_of_the_same_file_are_different_bookings(
    service: RunningService,
) -> None:
    data = bookings_csv(50)
    first = (await upload(service, data))[1]["id"]
    second = (await upload(service, data))[1]["id"]
    assert first != second
    for upload_id in (first, second):
        assert (await finished(service, upload_id))["successful"] == 47
        assert len(await booked(service, upload_id)) == 47


@pytest.mark.parametrize(
    ("data", "email", "token", "pipeline", "code", "error"),
    [
        pytest.param(
            b"cinema,1\n" * 200,
            "a@b.c",
            TOKEN,
            "bookings",
            413,
            "larger than the limit",
            id="too-large",
        ),
        pytest.param(
            "café,1\n".encode("latin-1"),
            "a@b.c",
            TOKEN,
            "bookings",
            422,
            "not UTF-8: line 1",
            id="not-utf8",
        ),
        pytest.param(
            b"\x00PK\x03\x04", "a@b.c", TOKEN, "bookings", 422, "binary data", id="binary"
        ),
        pytest.param(b"hello\nworld\n", "a@b.c", TOKEN, "bookings", 422, "not a CSV", id="not-csv"),
        pytest.param(b"event,user_id\n", "a@b.c", TOKEN, "bookings", 422, "empty", id="empty"),
        pytest.param(
            b"cinema,1\n", None, TOKEN, "bookings", 400, "email address is needed", id="no-email"
        ),
        pytest.param(
            b"cinema,1\n", "not an address", TOKEN, "bookings", 400, "email", id="bad-email"
        ),
        pytest.param(
            b"cinema,1\n", "a@b.c", "wrong", "bookings", 401, "admin token", id="wrong-token"
        ),
        pytest.param(
            b"cinema,1\n", "a@b.c", TOKEN, "notifications", 404, "takes no uploads", id="no-uploads"
        ),
    ],
)
async def test_a_bad_upload_is_refused_with_its_reason(
    broker: Broker,
    queue_name: str,
    tmp_path: Path,
    data: bytes,
    email: str | None,
    token: str,
    pipeline: str,
    code: int,
    error: str,
) -> None:
    spool = tmp_path / "uploads"
    async with local_service(
        broker, queue_name, tmp_path, admin_token=TOKEN, upload_dir=spool, upload_max_bytes=1000
    ) as running:
        answer = await upload(running, data, email, token=token, pipeline=pipeline)
    assert answer[0] == code
    assert error in answer[1]["error"]
    assert not list(spool.glob("u*")) if spool.is_dir() else True  # nothing kept


async def test_the_snapshot_says_which_pipelines_take_uploads_and_their_columns(
    service: RunningService,
) -> None:
    code, body = await service.get_async("/api/snapshot")
    assert code == 200
    assert json.loads(body)["upload_forms"] == {
        "bookings": {"rows": "bookings", "columns": ["event", "user_id"]}
    }


async def test_a_request_that_is_not_a_form_is_refused(service: RunningService) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{service.http}/uploads/bookings",
            data=b"cinema,1\n",
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/csv"},
        ) as response,
    ):
        assert response.status == 400
        assert "multipart/form-data" in (await response.json())["error"]


async def test_an_upload_interrupted_by_a_restart_resumes_without_booking_twice(
    broker: Broker, queue_name: str, tmp_path: Path
) -> None:
    settings: dict[str, Any] = {"admin_token": TOKEN, "upload_dir": tmp_path / "uploads"}
    async with local_service(broker, queue_name, tmp_path, **settings) as first:
        upload_id = (await upload(first, bookings_csv(20_000)))[1]["id"]

        async def under_way() -> bool:
            return (await status(first, upload_id))["successful"] >= 2000

        await eventually(under_way, timeout=30)
    # Stopped (drained) part way: the upload waits in the spool.
    interrupted = manifest(tmp_path / "uploads", upload_id)
    assert interrupted["state"] == "processing"
    assert 0 < interrupted["successful"] < 19_997

    async with local_service(broker, queue_name, tmp_path, **settings) as second:
        result = await finished(second, upload_id)
        assert (result["state"], result["attempts"]) == ("done", 2)
        assert (result["successful"], result["failed"]) == (19_997, 3)
        ids = await booked(second, upload_id)
        assert len(ids) == len(set(ids)) == 19_997
    assert len(reports(tmp_path / "outbox")) == 1


def manifest(spool: Path, upload_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads((spool / f"{upload_id}.json").read_text())
    return answer


async def test_a_report_the_mail_server_refused_goes_once_it_is_back(
    broker: Broker, queue_name: str, tmp_path: Path
) -> None:
    async with smtp_server() as mail:
        mail.stop()  # down when the upload ends
        async with local_service(
            broker,
            queue_name,
            tmp_path,
            admin_token=TOKEN,
            upload_dir=tmp_path / "uploads",
            smtp_url=f"smtp://127.0.0.1:{mail.port}",
        ) as running:
            upload_id = (await upload(running, bookings_csv(20)))[1]["id"]

            async def refused() -> bool:
                return (await status(running, upload_id))["report_error"] is not None

            await eventually(refused, timeout=30)
            assert (await status(running, upload_id))["state"] == "reporting"
            mail.start()
            result = await finished(running, upload_id, timeout=30)
            assert (result["state"], result["mailed"], result["report_error"]) == (
                "done",
                True,
                None,
            )
        (report,) = [m for m in mail.inbox.messages if str(m["Subject"]).startswith("Your upload")]
        assert report["To"] == "me@example.com"


async def test_a_second_process_sharing_the_upload_directory_refuses_uploads(
    broker: Broker, queue_name: str, tmp_path: Path, service: RunningService
) -> None:
    # `service` owns tmp_path/uploads; another worker started on the same directory:
    async with local_service(
        broker, queue_name, tmp_path / "other", admin_token=TOKEN, upload_dir=tmp_path / "uploads"
    ) as other:
        code, answer = await upload(other, bookings_csv(5))
    assert code == 409
    assert "another ingest process" in answer["error"]
    code, answer = await upload(service, bookings_csv(5))
    assert code == 202


async def test_an_upload_whose_file_is_gone_is_reported_as_failed(
    broker: Broker, queue_name: str, tmp_path: Path
) -> None:
    spool = tmp_path / "uploads"
    settings: dict[str, Any] = {"admin_token": TOKEN, "upload_dir": spool}
    async with local_service(broker, queue_name, tmp_path, **settings) as first:
        upload_id = (await upload(first, bookings_csv(20_000)))[1]["id"]
    # Stopped at once, the upload is left to resume; someone tidies the directory up.
    (spool / f"{upload_id}.csv").unlink()
    async with local_service(broker, queue_name, tmp_path, **settings) as second:
        result = await finished(second, upload_id)
    assert result["state"] == "failed"
    assert "cannot read the file" in result["error"]
    (report,) = reports(tmp_path / "outbox")
    assert "stopped" in str(report["Subject"])
