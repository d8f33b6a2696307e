"""Where preference rows come from: a local .json/.jsonl/.parquet/.csv file, a local dataset
folder, or a hub dataset. Errors name the file (and line) and say what to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

from qorpo.errors import DataError

JSON_SUFFIXES = (".json", ".jsonl")
FILE_SUFFIXES = (*JSON_SUFFIXES, ".parquet", ".csv")


def load_rows(source: str, *, split: str = "train", subset: str | None = None,
              trust_remote_code: bool = False) -> datasets.Dataset:
    """Rows of a local .json/.jsonl/.parquet/.csv file, a local dataset folder or a hub dataset."""
    path = Path(source).expanduser()
    if path.is_file():
        return _load_file(path)
    if path.suffix.lower() in FILE_SUFFIXES:
        raise DataError(f"data file not found: {source} (looked in {Path.cwd()}). Check the path, "
                        "or pass a hub dataset name such as HuggingFaceH4/ultrafeedback_binarized.")
    kwargs: dict[str, Any] = {"split": split}
    if trust_remote_code:  # only old `datasets` accept it; new ones reject scripts anyway
        kwargs["trust_remote_code"] = True
    try:
        return datasets.load_dataset(str(path) if path.is_dir() else source, subset, **kwargs)
    except Exception as exc:  # network, auth, unknown split or subset: all the user's to fix
        raise DataError(f"could not load dataset {source!r} (split={split!r}, "
                        f"subset={subset!r}): {exc}. For a local file use a .json, .jsonl, "
                        ".parquet or .csv path; for the hub check the name, --split and "
                        "--subset.") from exc


def _load_file(path: Path) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"{path}: unknown data file extension {suffix!r}. Supported: "
                        f"{', '.join(FILE_SUFFIXES)}; convert the file or pass a hub dataset.")
    if suffix in JSON_SUFFIXES:
        return _rows_to_dataset(_read_json(path), path)
    import pyarrow.csv
    import pyarrow.parquet
    from datasets.table import InMemoryTable

    try:
        table = (pyarrow.parquet.read_table(path) if suffix == ".parquet"
                 else pyarrow.csv.read_csv(path, convert_options=_csv_as_text(path)))
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        bad = _first_non_utf8(path) if suffix == ".csv" else None
        if bad is not None:  # (the header is read by Python, the rest by pyarrow)
            raise _not_utf8(path, *bad) from exc
        raise DataError(f"{path}: could not read the {suffix[1:]} file: {exc}") from exc
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no rows")
    return datasets.Dataset(InMemoryTable(table))


def _csv_as_text(path: Path) -> Any:
    """CSV values are text: a column of numbers ("4", "5") is an answer, not an int column."""
    import csv

    import pyarrow as pa
    import pyarrow.csv

    with path.open(newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    return pyarrow.csv.ConvertOptions(column_types={name: pa.string() for name in header})


def _read_json(path: Path) -> list[dict[str, Any]]:
    """A JSON array of objects, or JSON Lines (one object per line); errors name file:line."""
    raw = path.read_bytes()
    try:  # utf-8-sig: files saved by Windows editors start with a byte-order mark
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
        raise _not_utf8(path, exc.start + bom, raw.count(b"\n", 0, exc.start + bom) + 1) from exc
    head = text.lstrip()[:1]
    if head == "[" or (path.suffix.lower() == ".json" and head == "{" and _single_object(text)):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg}). Fix the "
                            "file: a JSON array of objects or JSON Lines.") from exc
        rows = _unwrap(data, path)
    else:
        rows = []
        # Lines end at "\n" only: str.splitlines also splits at U+2028, U+2029 and U+0085,
        # which json.dumps(..., ensure_ascii=False) leaves raw inside strings.
        for n, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: invalid JSON on line {n} ({exc.msg}). Each line of "
                                "a .jsonl file must be one JSON object.") from exc
            if not isinstance(rows[-1], dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got "
                                f"{type(rows[-1]).__name__}")
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows


def _not_utf8(path: Path, offset: int, line: int) -> DataError:
    how = ("a spreadsheet's \"CSV UTF-8\" export, or " if path.suffix.lower() == ".csv"
           else "")
    return DataError(f"{path}: not UTF-8 text (byte {offset:,}, line {line}): qorpo reads data "
                     f"files as UTF-8. Save the file as UTF-8 (e.g. {how}`iconv -f latin1 -t "
                     f"utf-8 IN > OUT` for Latin-1 text).")


def _first_non_utf8(path: Path) -> tuple[int, int] | None:
    """(byte offset, line) of the first byte that is not UTF-8 text, or None: read in blocks
    (only when pyarrow already failed, so a good file is not read twice)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                # exc.start counts from the decoder's pending bytes (<= 3) plus this block
                start = max(0, exc.start - len(exc.object) + len(block))
                return offset + start, lines + block.count(b"\n", 0, start)
            offset, lines = offset + len(block), lines + block.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return offset, lines
    return None


def _single_object(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc.msg != "Extra data"  # "Extra data": several objects, i.e. JSON Lines
    return True


def _unwrap(data: Any, path: Path) -> list[dict[str, Any]]:
    if isinstance(data, dict):  # {"data": [...]} style: the one list of objects inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of objects (or JSON Lines)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i} is {type(row).__name__}, expected an object")
    return data


def _rows_to_dataset(rows: list[dict[str, Any]], path: Path) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_list(rows)
    except (TypeError, ValueError) as exc:  # pyarrow's ArrowTypeError/ArrowInvalid
        raise DataError(f"{path}: {_mixed_types(rows) or exc}. Every row must use the same "
                        "type for a column (all strings or all message lists).") from exc


def _mixed_types(rows: list[dict[str, Any]]) -> str | None:
    seen: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows):
        for key, value in row.items():
            if value is None:
                continue
            kind = type(value).__name__
            first = seen.setdefault(key, (kind, i))
            if first[0] != kind:
                return (f"column {key!r} is {first[0]} in row {first[1]} but {kind} in row {i}")
    return None
