"""The upload spool: what it keeps, what it refuses and says why, and what it works on
first."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ingest.exceptions import UploadRejected
from ingest.service.spool import Spool, Upload
from ingest.service.upload_form import UploadForm
from pipelines.bookings import UPLOADS


async def chunks(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
    """`data` in small pieces: a multi-byte character may be cut between two."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def receive(spool: Spool, data: bytes, filename: str = "mine.csv") -> Upload:
    return await spool.receive("bookings", filename, "me@example.com", chunks(data), shape=UPLOADS)


async def test_a_file_is_spooled_whole_with_its_rows_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1000)
    data = "cinema,1\n\nmusical,2\r\nfestivalé,3\n".encode()
    upload = await receive(spool, data)
    assert spool.file(upload).read_bytes() == data
    assert (upload.rows, upload.header, upload.size) == (3, False, len(data))
    assert upload.filename == "mine.csv"
    assert spool.get(upload.id) is None  # not in the spool until saved
    spool.save(upload)
    assert Spool(tmp_path, 1000).get(upload.id) == upload  # read back from its manifest


async def test_a_header_row_and_a_byte_order_mark_are_not_rows(tmp_path: Path) -> None:
    upload = await receive(Spool(tmp_path, 1000), b"\xef\xbb\xbfEvent, User_ID\ncinema,1\n")
    assert (upload.rows, upload.header) == (1, True)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"cinema,1\ncaf\xe9,2\n", "not UTF-8: line 2 ", id="latin-1"),
        pytest.param(b"cinema,1\n\x00\x01\x02", "binary data", id="binary"),
        pytest.param(b"", "the file is empty", id="empty"),
        pytest.param(b"\n \n\r\n", "the file is empty", id="blank-lines"),
        pytest.param(b"event,user_id\n", "no rows under its header", id="header-only"),
        pytest.param(b"hello\nworld\n", "not a CSV of bookings", id="one-column"),
    ],
)
async def test_a_bad_file_is_refused_with_its_reason_and_nothing_kept(
    tmp_path: Path, data: bytes, reason: str
) -> None:
    with pytest.raises(UploadRejected, match=reason) as refused:
        await receive(Spool(tmp_path, 1000), data)
    assert not refused.value.too_large
    assert os.listdir(tmp_path) == []


async def test_a_file_over_the_limit_is_refused_as_too_large(tmp_path: Path) -> None:
    with pytest.raises(UploadRejected, match="larger than the limit of 100 bytes") as refused:
        await receive(Spool(tmp_path, 100), b"cinema,1\n" * 12)
    assert refused.value.too_large
    assert os.listdir(tmp_path) == []


async def test_json_lines_count_as_bookings(tmp_path: Path) -> None:
    upload = await receive(Spool(tmp_path, 1000), b'{"event": "cinema", "user_id": 1}\n')
    assert upload.rows == 1


async def test_a_browser_path_is_cut_to_the_file_name(tmp_path: Path) -> None:
    upload = await receive(Spool(tmp_path, 1000), b"cinema,1\n", "C:\\fakepath\\mine.csv")
    assert upload.filename == "mine.csv"


async def test_interrupted_work_comes_before_queued_uploads(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1000)
    first, second, third = [await receive(spool, b"cinema,1\n") for _ in range(3)]
    for upload in (first, second, third):
        spool.save(upload)
    assert spool.next_pending({"bookings"}) == first  # the oldest queued
    third.state = "processing"
    spool.save(third)
    assert spool.next_pending({"bookings"}) == third
    second.state = "reporting"
    spool.save(second)
    assert spool.next_pending({"bookings"}) == second
    assert spool.next_pending({"notifications"}) is None  # another pipeline's uploads


async def test_an_unreadable_manifest_is_left_alone(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1000)
    spool.save(await receive(spool, b"cinema,1\n"))
    (tmp_path / "u2026-broken.json").write_text("{not json")
    assert len(Spool(tmp_path, 1000).all()) == 1


def test_one_process_at_a_time_owns_a_spool(tmp_path: Path) -> None:
    first, second = Spool(tmp_path, 1000), Spool(tmp_path, 1000)
    assert first.claim()
    assert first.claim()  # still its own
    assert not second.claim()  # as another worker sharing the directory sees it
    first.release()
    assert second.claim()  # once the owner stopped
    second.release()


@pytest.mark.parametrize(
    ("form", "data", "reason"),
    [
        pytest.param(
            UploadForm("orders", ("sku", "quantity", "shop")),
            b"a,1\n",
            r"not a CSV of orders: none of the first 10 rows has three columns "
            r"\(sku,quantity,shop\)",
            id="too-few-columns",
        ),
        pytest.param(
            UploadForm("codes", ("code",), fits=lambda row: row.text.isdigit()),
            b"abc\n",
            r"not a CSV of codes: none of the first 10 rows has one column \(code\)",
            id="own-row-check",
        ),
    ],
)
async def test_a_file_is_refused_in_the_words_of_the_pipelines_form(
    tmp_path: Path, form: UploadForm, data: bytes, reason: str
) -> None:
    with pytest.raises(UploadRejected, match=reason):
        await Spool(tmp_path, 1000).receive(
            "orders", "x.csv", "me@example.com", chunks(data), shape=form
        )


async def test_the_forms_columns_make_a_header(tmp_path: Path) -> None:
    fitting = await Spool(tmp_path, 1000).receive(
        "orders",
        "x.csv",
        "me@example.com",
        chunks(b"SKU,Quantity,Shop\nb,2,north\n"),
        shape=UploadForm("orders", ("sku", "quantity", "shop")),
    )
    assert (fitting.rows, fitting.header) == (1, True)
