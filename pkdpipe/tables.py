"""Reading tabular data files into columns: CSV, TSV, JSON lines, JSON arrays and parquet.

The lowest layer of data loading: no tasks, no labels, just rows and where each came from (for
messages that name a file and line). `pkdpipe.data` builds examples from these tables;
`pkdpipe.tasks` reads a task file's label column to infer its labels.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pkdpipe.errors import DataError


@dataclass
class Table:
    """The rows of one source file or hub split, columnar, before any checks."""

    source: str  # the file path (or hub dataset and split), for messages
    columns: dict[str, list[Any]]  # column name -> one value per row
    lines: list[int] | None  # 1-based line where each row starts, for text files; None otherwise

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def where(self, row: int) -> str:
        """The place of a row, for messages: 'file line 12' or 'file row 10'."""
        if self.lines is not None:
            return f"{self.source} line {self.lines[row]}"
        return f"{self.source} row {row}"

    def column(self, name: str) -> list[Any]:
        """The values of column `name`; DataError listing the columns present when there is none."""
        if name not in self.columns:
            present = ", ".join(repr(c) for c in self.columns) or "none"
            raise DataError(f"{self.source}: no column '{name}' (columns present: {present})")
        return self.columns[name]


def read_table(path: Path) -> Table:
    """Any supported data file (.csv, .tsv with CSV quoting, .jsonl, .json, .parquet) as a table."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return read_json(path)
    if suffix in (".csv", ".tsv"):
        return read_delimited(path, "," if suffix == ".csv" else "\t", csv.QUOTE_MINIMAL)
    raise DataError(f"{path}: unsupported file type '{suffix}' (use .csv, .tsv, .jsonl, .json or .parquet)")


def read_delimited(
    path: Path, delimiter: str, quoting: int, column_names: tuple[str, ...] | None = None
) -> Table:
    """A CSV/TSV file with a header row (or the given column names); every row must fill every column."""
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting, strict=True)
            header = list(column_names) if column_names else next(reader, [])
            previous_end = reader.line_num
            for row in reader:
                start, previous_end = previous_end + 1, reader.line_num
                if not row:
                    continue  # blank line
                if len(row) != len(header):
                    raise DataError(
                        f"{path} line {start}: {len(row)} fields where the header has {len(header)} "
                        f"({', '.join(header)})"
                    )
                rows.append(row)
                lines.append(start)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: {e}") from e
    if not rows:
        raise DataError(f"{path} has no data rows")
    columns = {name: list(values) for name, values in zip(header, zip(*rows, strict=True), strict=True)}
    return Table(str(path), columns, lines)


def read_json(path: Path) -> Table:
    """A JSON array of objects, or JSON lines (one object a line; what `Dataset.to_json` writes)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from e
        return records_table(path, records, lines=None)
    records, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: not valid JSON ({e.msg})") from e
        lines.append(number)
    return records_table(path, records, lines)


def records_table(path: Path, records: Any, lines: list[int] | None) -> Table:
    """A table from a list of JSON objects; a key missing from an object reads as None."""
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} has no data rows (expected JSON objects)")
    for row, record in enumerate(records):
        if not isinstance(record, dict):
            where = f"line {lines[row]}" if lines is not None else f"row {row}"
            raise DataError(f"{path} {where}: expected a JSON object, got {type(record).__name__}")
    names = dict.fromkeys(key for record in records for key in record)
    columns = {name: [record.get(name) for record in records] for name in names}
    return Table(str(path), columns, lines)


def read_parquet(path: Path) -> Table:
    """A parquet file, every column."""
    import pyarrow.parquet as pq  # installed with datasets

    try:
        columns = pq.read_table(path).to_pydict()
    except Exception as e:  # pyarrow raises several types for a damaged or foreign file
        raise DataError(f"{path} cannot be read as parquet: {e}") from e
    table = Table(str(path), columns, lines=None)
    if len(table) == 0:
        raise DataError(f"{path} has no data rows")
    return table


def read_label_values(path: Path, label_field: str) -> list[str]:
    """The raw values of one column of a task-file data file, as strings ('' when missing)."""
    table = read_table(path)
    return [value_text(value) for value in table.column(label_field)]


def value_text(value: Any) -> str:
    """A raw cell as stripped text: None -> '', 1.0 -> '1' (parquet/JSON may store labels as floats)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()
