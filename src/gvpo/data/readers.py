"""File formats: rows out of ``.jsonl`` (also ``.jsonl.gz``) / ``.json`` / ``.parquet`` files, ``datasets``
objects, Hugging Face dataset ids (or ``datasets.load_dataset`` argument mappings; their ``train``
split, or their only one) and lists of dicts.

Each reader yields ``(where, row)``, or ``(where, None)`` after adding a problem (bad UTF-8, bad JSON,
not an object) that names the line (1-based, jsonl/json) or row (0-based).
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .errors import DataError, _Problems
from .fields import _type_name

FILE_FORMATS = ("jsonl", "json", "parquet")
_EXTENSIONS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


def _utf8_problem(raw: bytes, err: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"


def _read_jsonl_lines(lines: Iterable[bytes], problems: _Problems) -> Iterator[tuple[str, Any]]:
    for lineno, raw in enumerate(lines, 1):
        where = f"line {lineno}"
        raw = raw.rstrip(b"\r\n")
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.add(where, _utf8_problem(raw, err))
            yield where, None
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            problems.add(where, f"invalid JSON: {err.msg} (column {err.colno})")
            yield where, None
            continue
        if not isinstance(row, dict):
            problems.add(where, f"expected a JSON object, got {_type_name(row)}")
            yield where, None
            continue
        yield where, row


def _read_json(path: Path, problems: _Problems) -> list[tuple[str, Any]]:
    raw = path.read_bytes()
    bad = False
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        try:
            line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as err:
            problems.add(f"line {lineno}", _utf8_problem(line, err))
            bad = True
    if bad:
        return []
    text = raw.decode("utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines saved as .json
            return list(_read_jsonl_lines(raw.split(b"\n"), problems))
        problems.add(f"line {err.lineno}", f"invalid JSON: {err.msg} (column {err.colno})")
        return []
    if not isinstance(data, list):
        problems.add("file", f"expected a JSON list of row objects, got {_type_name(data)}")
        return []
    out = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            problems.add(f"row {i}", f"expected a JSON object, got {_type_name(row)}")
            out.append((f"row {i}", None))
        else:
            out.append((f"row {i}", row))
    return out


def _read_parquet(path: Path, problems: _Problems) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        rows = [r for batch in pf.iter_batches(batch_size=4096) for r in batch.to_pylist()]
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a bad file
        problems.add("file", f"cannot read parquet: {err}")
        return []
    return [(f"row {i}", r) for i, r in enumerate(rows)]


def _read_rows(source: Any, file_format: str | None, problems: _Problems) -> tuple[list[tuple[str, Any]], str, str | None]:
    """``(rows, source name, file format)``; rows are ``(where, dict | None)``."""
    datasets = sys.modules.get("datasets")  # a Dataset object means it is imported; else skip the import
    if datasets is not None and isinstance(source, datasets.Dataset):
        return [(f"row {i}", r) for i, r in enumerate(source)], "<datasets.Dataset>", "dataset"
    if isinstance(source, (list, tuple)):
        out = []
        for i, r in enumerate(source):
            if not isinstance(r, dict):
                problems.add(f"row {i}", f"expected a dict, got {_type_name(r)}")
                r = None
            out.append((f"row {i}", r))
        return out, "<list of rows>", "rows"
    from ..data_paths import looks_like_hub_id, pick_split, read_splits

    if isinstance(source, Mapping) or (isinstance(source, str) and not Path(source).exists()
                                       and looks_like_hub_id(source)):
        found, name = read_splits(source)  # a hub id or datasets.load_dataset arguments
        rows = pick_split(found, "train", name)
        return [(f"row {i}", r) for i, r in enumerate(rows)], name, "dataset"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_offline needs a path, a Hugging Face dataset id, a datasets.Dataset or a list of dicts, "
                        f"got {type(source).__name__}")
    path = Path(source)
    name = str(path)
    if not path.exists():
        raise DataError([f"no such file or directory: {path}"], name)
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
            raise DataError([f"{path} is a directory; expected a .jsonl, .json or .parquet file, "
                             "or a directory written by datasets.Dataset.save_to_disk"], name)
        import datasets

        ds = datasets.load_from_disk(str(path))
        if not isinstance(ds, datasets.Dataset):
            raise DataError([f"{path} holds a DatasetDict with splits {list(ds)}; pass one split's directory"], name)
        return [(f"row {i}", r) for i, r in enumerate(ds)], name, "dataset"
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    fmt = file_format or _EXTENSIONS.get(suffix)
    if fmt is None:
        raise DataError([f"cannot tell the file format from the extension '{path.suffix}'; pass "
                         f"file_format= (--file-format) one of {', '.join(FILE_FORMATS)}"], name)
    if fmt not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {fmt!r}")
    if fmt == "jsonl":
        with (gzip.open if path.suffix.lower() == ".gz" else open)(path, "rb") as f:
            rows = list(_read_jsonl_lines(f, problems))
    elif fmt == "json":
        rows = _read_json(path, problems)
    else:
        rows = _read_parquet(path, problems)
    return rows, name, fmt
