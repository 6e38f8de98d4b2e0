"""Reading a local data file, JSONL, CSV or Parquet, into records (one dict per example).

The format is chosen by the file's suffix: ``.jsonl`` (or ``.ndjson``), ``.csv``, ``.parquet``.
Only local files are read (no download, no hub). Each record comes with where it is, for
errors of the form ``FILE:ROW: problem``: for JSONL and CSV the line on which the record
starts (a CSV header is line 1), for Parquet the row counting from 1. Errors never quote a
record's text: it may be private.

CSV holds the prompt/response form only (columns ``prompt``, ``response``, optional ``system``
and ``reasoning``; other columns are ignored): a chat of many turns is JSON inside a cell,
which spreadsheet tools mangle, so chats go in JSONL or Parquet (a ``messages`` column of
``{role, content}`` structs).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedtune.common.errors import FedtuneError, unreadable

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
CSV_COLUMNS = ("prompt", "response", "system", "reasoning")
# A CSV field longer than this many characters is refused (Python's default is 128 Ki, too
# short for long reasoning traces); the work a long field causes is bounded later anyway.
CSV_FIELD_LIMIT = 64 * 1024 * 1024
# A Parquet file whose columns declare more than this many bytes uncompressed is refused
# before any is decompressed: a small file can hold gigabytes of repeated text.
PARQUET_MAX_UNCOMPRESSED = 4 * 1024**3
_PARQUET_BATCH_ROWS = 256

Record = tuple[str, Any]  # (where: "FILE:ROW", the parsed record)


class DataError(FedtuneError, ValueError):
    """A data file is missing, malformed, or too small for the configured training."""


def data_format(path: Path) -> str:
    """``"jsonl"``, ``"csv"`` or ``"parquet"``, by the file's suffix."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown data file type '{path.suffix}': name it .jsonl, .ndjson, .csv "
            "or .parquet (the suffix chooses the format)"
        )
    return kind


def first_jsonl_record(path: Path) -> Any:
    """The first non-blank record of the JSONL file ``path``, parsed; None when the file is
    not JSONL by its suffix, holds no record, or cannot be read or parsed (the loader that
    reads it then says what is wrong). For telling which kind of data a file holds."""
    if path.suffix.lower() not in {".jsonl", ".ndjson"}:
        return None
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    return json.loads(line)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return None


def read_records(path: Path) -> Iterator[Record]:
    """The records of a local data file, each with where it is; blank lines are skipped."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    kind = data_format(path)
    try:
        if kind == "jsonl":
            yield from _jsonl(path)
        elif kind == "csv":
            yield from _csv(path)
        else:
            yield from _parquet(path)
    except UnicodeDecodeError:
        # Decoding runs ahead of the lines: the line number would not be exact.
        raise DataError(f"{path}: not UTF-8 text (a binary file?)") from None
    except OSError as exc:
        raise DataError(unreadable(path, exc)) from None


def _jsonl(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON: {exc.msg}") from None
            yield f"{path}:{number}", record


def _csv(path: Path) -> Iterator[Record]:
    csv.field_size_limit(CSV_FIELD_LIMIT)  # process-wide; only fedtune's reading uses csv
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        start = 1
        try:
            header = next(reader, None)
            if header is None:
                return
            columns = _csv_header(path, [name.strip() for name in header])
            while True:
                start = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    return
                if not any(field.strip() for field in row):
                    continue
                if len(row) != len(columns):
                    raise DataError(
                        f"{path}:{start}: {len(row)} fields, but the header names {len(columns)}"
                    )
                record = {
                    name: value
                    for name, value in zip(columns, row, strict=True)
                    if name in CSV_COLUMNS and (value or name in ("prompt", "response"))
                }
                yield f"{path}:{start}", record
        except csv.Error as exc:
            raise DataError(f"{path}:{start}: malformed CSV: {exc}") from None


def _csv_header(path: Path, columns: list[str]) -> list[str]:
    if "messages" in columns:
        raise DataError(
            f"{path}:1: a CSV file holds prompt and response columns; write chat conversations "
            "as JSONL or Parquet"
        )
    for required in ("prompt", "response"):
        if required not in columns:
            raise DataError(
                f"{path}:1: missing column '{required}' (CSV columns: prompt, response, "
                "and optionally system, reasoning)"
            )
    repeated = sorted({name for name in columns if name and columns.count(name) > 1})
    if repeated:
        raise DataError(f"{path}:1: column '{repeated[0]}' appears more than once")
    return columns


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, ValueError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({_short(exc)})") from None
    metadata = parquet.metadata
    declared = sum(
        metadata.row_group(group).column(column).total_uncompressed_size
        for group in range(metadata.num_row_groups)
        for column in range(metadata.num_columns)
    )
    if declared > PARQUET_MAX_UNCOMPRESSED:
        raise DataError(
            f"{path}: the Parquet file unpacks to {declared} bytes, more than the "
            f"{PARQUET_MAX_UNCOMPRESSED} fedtune reads"
        )
    names = set(parquet.schema_arrow.names)
    if "messages" not in names and not {"prompt", "response"} <= names:
        missing = sorted({"prompt", "response"} - names)
        raise DataError(
            f"{path}: missing column '{missing[0]}' (Parquet columns: messages, or prompt and "
            "response with optional system, reasoning)"
        )
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:{row}", {k: v for k, v in record.items() if v is not None}
    except (pa.ArrowException, ValueError) as exc:
        raise DataError(f"{path}:{row + 1}: unreadable Parquet data ({_short(exc)})") from None


def _short(exc: Exception) -> str:
    """An Arrow error's first line, bounded (they describe structure, not content)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
