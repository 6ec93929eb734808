"""UploadForm: what a pipeline says of the CSV files it takes as uploads (their columns,
how a row is recognised, what a row is called): the spool checks files with it and the
page shows it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ingest.producers.csv_file import CsvRow

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class UploadForm:
    """The rows a pipeline takes in an uploaded file::

        UploadForm("orders", ("sku", "quantity"))

    `rows` names them, plural ("not a CSV of orders"); `columns` are their columns in
    order (a first row naming them, in any case, is a header and no row); `fits(row)` says
    whether a row looks like one (by default: a JSON object, or at least as many fields as
    columns). A file none of whose first rows fits is refused."""

    rows: str
    columns: tuple[str, ...]
    fits: Callable[[CsvRow], bool] | None = None

    def __post_init__(self) -> None:
        if not self.rows or not self.columns:
            raise ValueError(
                f"an upload form names its rows and columns, e.g. "
                f"UploadForm('orders', ('sku', 'quantity')); got {self.rows!r}, {self.columns!r}"
            )

    def is_header(self, row: CsvRow) -> bool:
        return [f.strip().lower() for f in row.fields or []] == list(self.columns)

    def fitting(self, row: CsvRow) -> bool:
        if self.fits is not None:
            return self.fits(row)
        return row.text.lstrip().startswith("{") or len(row.fields or []) >= len(self.columns)

    def misfit(self, lines: int) -> str:
        """Why a file is refused when none of its first `lines` rows fits."""
        count = len(self.columns)
        number = _NUMBERS[count] if count < len(_NUMBERS) else str(count)
        return (
            f"not a CSV of {self.rows}: none of the first {lines} rows has {number} "
            f"column{'s' if count != 1 else ''} ({','.join(self.columns)})"
        )

    def view(self) -> dict[str, Any]:
        """As the page shows it (`/api/snapshot`'s `upload_forms`)."""
        return {"rows": self.rows, "columns": list(self.columns)}
