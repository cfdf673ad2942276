"""Index tables (CSV) as the data adapters read them: BOM-tolerant, with row numbers for every error.

Spreadsheets often save CSV with a UTF-8 byte-order mark, which a plain reader glues onto the first column name
(``\\ufefffile``); :func:`read_table` decodes with ``utf-8-sig`` and strips spaces around column names, so the
header is what a person sees. Rows keep the line number an editor shows (the header is line 1), and
:func:`row_error` wraps any error met while reading a row into one line naming the file and the line.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import DataError

__all__ = ["Table", "read_table", "row_error"]


@dataclass(frozen=True)
class Table:
    """A CSV file: its path, column names and rows as ``(line number, {column: stripped cell})``."""

    path: Path
    columns: tuple[str, ...]
    rows: list[tuple[int, dict[str, str]]]

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"


def read_table(path: str | Path, *, required: Iterable[str] = (), allow_empty: bool = False) -> Table:
    """Read a CSV index table.

    Args:
        path: the CSV file.
        required: columns that must exist.
        allow_empty: a table with a header and no rows is fine.

    Raises:
        DataError: a missing or undecodable file, missing columns (listing the ones present), a row with more
            cells than the header, or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such index file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file (no header row)")
            columns = tuple(h.strip() for h in header)
            rows: list[tuple[int, dict[str, str]]] = []
            for rec in reader:
                line = reader.line_num
                if not any(c.strip() for c in rec):
                    continue  # blank line
                if len(rec) > len(columns):
                    raise DataError(f"{path}:{line}: {len(rec)} cells but the header has {len(columns)}")
                rows.append((line, {c: (rec[i].strip() if i < len(rec) else "") for i, c in enumerate(columns)}))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the table as UTF-8 CSV") \
            from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV: {exc}") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing} (have {list(columns)})")
    if not rows and not allow_empty:
        raise DataError(f"{path}: no rows")
    return Table(path, columns, rows)


def row_error(table: Table, line: int, exc: Exception) -> DataError:
    """One error naming the table, the line and what went wrong (kept as is when it already names the line)."""
    msg = str(exc)
    where = table.where(line)
    kind = type(exc) if isinstance(exc, DataError) else DataError
    return kind(msg if msg.startswith(where) else f"{where}: {msg}")
