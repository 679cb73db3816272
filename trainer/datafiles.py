"""Labelled text files (tsv, csv, jsonl, json, parquet) read into texts and whole-number labels.

Every problem is a one-line ConfigError naming the file and the setting: bytes that are not UTF-8, an empty or
header-only file, a row with the wrong number of fields, a missing column (naming the columns found), a label that
is not a whole number. Read with the standard library (pyarrow for parquet) rather than ``datasets``: nothing is
cached on disk, SST-2's 65k rows read in about half a second without importing torch (``metadistil validate`` reads
every data file), and texts stay verbatim (pandas, under ``datasets``, reads the sentence "null" as a missing value).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError

FORMATS = (".tsv", ".csv", ".jsonl", ".json", ".parquet")


@dataclass
class TextSet:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: Collection[int]) -> TextSet:
        return TextSet([self.texts[i] for i in indices], [self.labels[i] for i in indices])


@dataclass(frozen=True)
class Keys:
    """The settings a file's problems are reported under: a trial config's keys, or ``metadistil evaluate``'s."""

    path: str = "data.path"
    text: str = "data.text_column"
    label: str = "data.label_column"


EVALUATE_KEYS = Keys("--data", "--text-column", "--label-column")


def read_labelled(file: Path, text_column: str, label_column: str, keys: Keys = Keys()) -> TextSet:
    """The whole file; refused unless it has at least one row, both columns and a whole-number label in every row.

    Labels may be negative here (GLUE marks hidden test labels -1); whoever uses them checks their range.
    """
    if not file.is_file():
        raise ConfigError(f"{keys.path}: {str(file)!r} " + ("is a folder, not a file" if file.is_dir() else
                                                            "does not exist"))
    if file.suffix not in FORMATS:
        raise ConfigError(f"{keys.path}: unsupported file type {file.suffix!r} of {str(file)!r} (allowed: "
                          f"{', '.join(FORMATS)})")
    columns, records = _parquet(file, keys) if file.suffix == ".parquet" else _text_records(file, keys)
    if not records:
        what = "a header but no rows" if columns else "no rows"
        raise ConfigError(f"{keys.path}: {file} has {what}; a labelled file needs at least one example")
    for key, column in ((keys.text, text_column), (keys.label, label_column)):
        if column not in columns:
            raise ConfigError(f"{key}: column {column!r} not in {file} (columns: {', '.join(map(str, columns))})")
    texts, labels = [], []
    for where, record in records:
        if text_column not in record or label_column not in record:  # a JSON object without one of the columns
            missing = text_column if text_column not in record else label_column
            raise ConfigError(f"{keys.path}: {where} of {file} has no {missing!r}")
        text = record[text_column]
        texts.append("" if text is None else str(text))
        labels.append(whole_number(record[label_column], f"{keys.label}: {label_column!r} in {file}", where))
    return TextSet(texts, labels)


def whole_number(value: Any, setting: str, where: str) -> int:
    """A class label: 1, 1.0 and "1" are the label 1; 0.5 (which used to become 0 without a word) is refused."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip()) if value.strip() else None
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number) \
            or number != int(number):
        raise ConfigError(f"{setting} must hold whole-number class labels (0, 1, ...); {where} has {value!r}")
    return int(number)


def _decoded(file: Path, keys: Keys) -> str:
    try:
        data = file.read_bytes()
    except OSError as err:
        raise ConfigError(f"{keys.path}: {file} cannot be read ({err.strerror})") from None
    try:
        return data.decode("utf-8-sig")  # -sig: a leading byte-order mark is not part of the first column's name
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{keys.path}: {file} is not UTF-8 text (line {line}: byte {data[err.start]:#04x} "
                          f"cannot be decoded); save it as UTF-8") from None


def _text_records(file: Path, keys: Keys) -> tuple[list[str], list[tuple[str, dict]]]:
    text = _decoded(file, keys)
    if file.suffix in (".tsv", ".csv"):
        return _delimited(text, file, keys)
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{keys.path}: {file} is not valid JSON (line {err.lineno}: {err.msg})") from None
        records = [(f"item {i}", item) for i, item in enumerate(items)]
    else:  # JSON Lines (a .json file may hold them too)
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{keys.path}: line {number} of {file} is not valid JSON ({err.msg})") from None
    for where, record in records:
        if not isinstance(record, dict):
            raise ConfigError(f"{keys.path}: {where} of {file} is not a JSON object of columns, got "
                              f"{type(record).__name__}")
    return (list(records[0][1]) if records else []), records


def _delimited(text: str, file: Path, keys: Keys) -> tuple[list[str], list[tuple[str, dict]]]:
    # tsv without quote handling: sentences hold unbalanced " characters (GLUE's files are written this way)
    options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if file.suffix == ".tsv" else {}
    reader = csv.reader(io.StringIO(text, newline=""), **options)
    try:
        header = next(reader, [])
        records = []
        for row in reader:
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                raise ConfigError(f"{keys.path}: line {reader.line_num} of {file} has {len(row)} fields, the header "
                                  f"has {len(header)}")
            records.append((f"line {reader.line_num}", dict(zip(header, row))))
    except csv.Error as err:
        raise ConfigError(f"{keys.path}: line {reader.line_num} of {file} cannot be read ({err})") from None
    return header, records


def _parquet(file: Path, keys: Keys) -> tuple[list[str], list[tuple[str, dict]]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(file)
    except (pyarrow.ArrowException, OSError) as err:
        raise ConfigError(f"{keys.path}: {file} is not a readable parquet file ({' '.join(str(err).split())})") \
            from None
    return table.column_names, [(f"row {i + 1}", row) for i, row in enumerate(table.to_pylist())]
