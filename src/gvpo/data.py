"""Offline grouped-response datasets: load, validate, summarise; and a reference log-prob cache.

GVPO trains from *groups*: ``k`` rated completions of one prompt, drawn from any distribution
(Corollary 3.2), so a file of model outputs scored offline is enough. ``k`` may differ between
prompts (Corollary 3.4); a group needs ``k >= 2`` (with one completion the group-centred reward is
zero), so ``k = 1`` groups are skipped and counted.

Two row layouts are read:

* **grouped** -- one row per prompt: ``{"prompt": ..., "completions": [...], "rewards": [...]}``;
* **flat** -- one row per completion: ``{"prompt": ..., "completion": ..., "reward": ...}``, grouped
  by prompt (a chat-message prompt is grouped by its canonical JSON).

A prompt is a string or a list of chat messages ``[{"role": ..., "content": ...}, ...]``. Sources:
``.jsonl``/``.ndjson``, ``.json`` (a list of rows), ``.parquet``, a ``datasets.Dataset`` (or a
directory written by ``Dataset.save_to_disk``), or a list of dicts. Column names are set with
:class:`OfflineColumns` (dotted names such as ``"meta.question"`` reach into nested objects), and
files with their own shape load through a named preset (see :data:`PRESETS`).

Validation collects *every* problem, each naming the line (1-based, jsonl/json) or row index
(0-based, parquet/datasets) and the field, then raises one :class:`DataError`:

>>> import json, os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "bad.jsonl")
>>> rows = [{"prompt": "1+1=", "completions": ["2", "3"], "rewards": [1, 0]},
...         {"prompt": "2+2=", "completions": ["4", "5"], "reward": [1, 0]}]
>>> _ = open(path, "w").write("\\n".join(json.dumps(r) for r in rows))
>>> check(path)
Traceback (most recent call last):
...
gvpo.data.DataError: 1 problem in bad.jsonl:
  line 2: missing field 'rewards' (did you mean 'reward'?)
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import numbers
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

from .registry import Registry

__all__ = [
    "PRESETS",
    "DataError",
    "FieldProblem",
    "OfflineColumns",
    "OfflineGroup",
    "OfflinePreset",
    "RefLogpCache",
    "Summary",
    "check",
    "fingerprint_file",
    "fingerprint_model",
    "format_summary",
    "load_offline",
    "lookup",
    "main_check",
    "register_preset",
]

MAX_LISTED_PROBLEMS = 20
"""How many problems a :class:`DataError` message lists before "... and N more"."""
_MAX_KEPT_PROBLEMS = 1000  # kept in DataError.problems; the rest are only counted

FILE_FORMATS = ("jsonl", "json", "parquet")
LAYOUTS = ("auto", "grouped", "flat")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


# --------------------------------------------------------------------------------------------------
# Public types


class DataError(ValueError):
    """A data file cannot be used; ``problems`` lists every problem found (up to 1000).

    ``str(err)`` is ``"<N> problems in <source>:"`` followed by up to :data:`MAX_LISTED_PROBLEMS`
    indented lines and ``"... and <M> more"``.
    """

    def __init__(self, problems: Sequence[str], source: str = "data", total: int | None = None, hint: str = ""):
        self.problems = list(problems)
        self.source = source
        self.total = len(self.problems) if total is None else total
        self.hint = hint
        n = self.total
        lines = [f"{n} problem{'s' if n != 1 else ''} in {source}:"]
        lines += [f"  {p}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if n > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {n - MAX_LISTED_PROBLEMS} more")
        if hint:
            lines.append(f"hint: {hint}")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # picklable across processes (e.g. dataloader workers)
        return (DataError, (self.problems, self.source, self.total, self.hint))


class FieldProblem(Exception):
    """Raised by a preset's converter for a bad or missing raw field; reported with its line."""

    def __init__(self, field: str, problem: str, missing: bool = False):
        super().__init__(problem if missing else f"field '{field}' {problem}")
        self.field = field
        self.missing = missing


@dataclass(frozen=True)
class OfflineColumns:
    """Where each value lives in a row. A dotted name (``"meta.score"``) reaches into nested objects.

    Grouped rows use ``prompt``, ``completions`` and ``rewards``; flat rows use ``prompt``,
    ``completion`` and ``reward``.
    """

    prompt: str = "prompt"
    completions: str = "completions"
    rewards: str = "rewards"
    completion: str = "completion"
    reward: str = "reward"

    def used(self, layout: str) -> tuple[str, ...]:
        """The column names read for ``layout`` (``"grouped"`` or ``"flat"``)."""
        if layout == "grouped":
            return (self.prompt, self.completions, self.rewards)
        return (self.prompt, self.completion, self.reward)


@dataclass
class OfflineGroup:
    """All rated completions of one prompt; ``extra`` holds the row's other columns."""

    prompt: str | list[dict]
    completions: list[str]
    rewards: list[float]
    extra: dict = field(default_factory=dict)
    source: str = ""
    """Where the group came from, e.g. ``"line 3"`` or ``"rows 0, 4, 9"``."""

    @property
    def k(self) -> int:
        return len(self.completions)


@dataclass
class Summary:
    """What a load kept and skipped; :func:`format_summary` renders it for people."""

    source: str
    file_format: str | None
    layout: str
    preset: str | None
    rows: int
    prompts: int
    completions: int
    k_histogram: dict[int, int]
    reward_min: float | None
    reward_max: float | None
    reward_mean: float | None
    constant_reward_groups: int = 0
    """Kept groups whose rewards are all equal: valid, but they give GVPO no gradient."""
    duplicate_prompts: int = 0
    """Grouped rows whose prompt also appears in an earlier row (kept as separate groups)."""
    skipped_groups: dict[str, int] = field(default_factory=dict)
    """Reason -> count: ``"k=1"``, ``"prompt_too_long"``, ``"k<2_after_length_filter"``."""
    skipped_completions: dict[str, int] = field(default_factory=dict)
    """Reason -> count: ``"completion_too_long"``."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OfflinePreset:
    """A named way to read one kind of file.

    Either ``columns`` + ``layout`` (a plain column mapping), or ``convert``: a function from a raw
    row to ``{"prompt", "completions", "rewards", "extra"}`` (optionally also ``"prompt_field"``,
    ``"completion_fields"``, ``"reward_fields"``: the raw field names that error messages cite). A
    converter reads fields with :func:`lookup`, which raises :class:`FieldProblem` naming the field.
    """

    name: str
    description: str
    columns: OfflineColumns = OfflineColumns()
    layout: str = "auto"
    convert: Callable[[dict], dict] | None = None
    detect: tuple[str, ...] = ()
    """Fields whose joint presence suggests this preset when a load without one fails."""


PRESETS: Registry = Registry("offline data preset")
"""Named presets for :func:`load_offline` (``preset="..."``); a dotted path to an
:class:`OfflinePreset` also works."""


def register_preset(preset: OfflinePreset) -> OfflinePreset:
    """Add ``preset`` to :data:`PRESETS` under ``preset.name``."""
    return PRESETS.register(preset.name)(preset)


# --------------------------------------------------------------------------------------------------
# Field access and value checks

_MISSING = object()


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, [c for c in candidates if isinstance(c, str)], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _get(row: Any, name: str) -> Any:
    """``row[name]``, else a walk along the dotted ``name``; ``_MISSING`` when absent."""
    if isinstance(row, dict) and name in row:
        return row[name]
    if "." not in name:
        return _MISSING
    value = row
    for part in name.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _missing_message(row: Any, name: str) -> str:
    """``"missing field 'x' (did you mean 'y'?)"``, suggesting at the level where the walk stopped."""
    prefix, value = "", row
    if not (isinstance(row, dict) and name in row) and "." in name:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if isinstance(value, dict) and part in value and i < len(parts) - 1:
                value, prefix = value[part], prefix + part + "."
                continue
            break
    keys = [prefix + k for k in value] if isinstance(value, dict) else []
    return f"missing field '{name}'{_suggest(name, keys)}"


def lookup(row: dict, name: str) -> Any:
    """``row``'s value at ``name`` (dotted names walk nested dicts and list indices).

    Raises :class:`FieldProblem` with a close-match suggestion when it is absent.

    >>> lookup({"a": {"b": [5, 6]}}, "a.b.1")
    6
    >>> lookup({"reward": 1}, "rewards")
    Traceback (most recent call last):
    ...
    gvpo.data.FieldProblem: missing field 'rewards' (did you mean 'reward'?)
    """
    value = _get(row, name)
    if value is _MISSING:
        raise FieldProblem(name, _missing_message(row, name), missing=True)
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_text(value: Any, label: str, problems: list[str]) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(f"field '{label}' is not valid UTF-8 (byte 0x{value[err.start]:02x} at offset {err.start})")
            return None
    if not isinstance(value, str):
        problems.append(f"field '{label}' must be a string, got {_type_name(value)}")
        return None
    if not value.strip():
        problems.append(f"field '{label}' is empty")
        return None
    return value


def _check_prompt(value: Any, label: str, problems: list[str]) -> str | list[dict] | None:
    """A non-empty string, or a non-empty list of ``{"role": str, "content": str | list}`` messages."""
    if isinstance(value, (list, tuple)):
        if not value:
            problems.append(f"field '{label}' is empty (no messages)")
            return None
        n_before, messages, has_text = len(problems), [], False
        for i, msg in enumerate(value):
            where = f"{label}[{i}]"
            if not isinstance(msg, dict):
                problems.append(f"field '{where}' must be a chat message object, got {_type_name(msg)}")
                continue
            for key in ("role", "content"):
                if key not in msg:
                    problems.append(f"missing field '{where}.{key}'{_suggest(key, msg)}")
            role, content = msg.get("role"), msg.get("content")
            if "role" in msg and not (isinstance(role, str) and role.strip()):
                problems.append(f"field '{where}.role' must be a non-empty string, got {role!r}")
            if "content" in msg and not isinstance(content, (str, list)):
                problems.append(f"field '{where}.content' must be a string or a list of parts, "
                                f"got {_type_name(content)}")
            has_text = has_text or bool(content.strip() if isinstance(content, str) else content)
            messages.append(dict(msg))
        if len(problems) > n_before:
            return None
        if not has_text:
            problems.append(f"field '{label}' is empty (every message has empty content)")
            return None
        return messages
    return _check_text(value, label, problems)


def _check_reward(value: Any, label: str, problems: list[str]) -> float | None:
    """A finite real number; ``True``/``False`` read as 1.0/0.0 (verifier outcomes)."""
    if value is None:
        problems.append(f"field '{label}' is null (rewards are required)")
        return None
    if not isinstance(value, numbers.Real):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        problems.append(f"field '{label}' must be a number, got {_type_name(value)} {shown}")
        return None
    number = float(value)
    if math.isnan(number):
        problems.append(f"field '{label}' is NaN")
        return None
    if math.isinf(number):
        problems.append(f"field '{label}' is infinite ({number})")
        return None
    return number


def _prompt_key(prompt: str | list[dict]) -> str:
    """Grouping key: the string itself, or the canonical JSON of a message list."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------------------------------
# Reading rows. Each reader yields (where, row) or (where, None) after adding to ``problems``.


@dataclass
class _Problems:
    """Problems in source order; missing fields are tracked so one missing everywhere is said once."""

    items: list[tuple[str, str]] = field(default_factory=list)  # (where, text)
    missing: dict[str, list[int]] = field(default_factory=dict)  # field -> indices into items

    def add(self, where: str, text: str, missing_field: str | None = None) -> None:
        if missing_field is not None:
            self.missing.setdefault(missing_field, []).append(len(self.items))
        self.items.append((where, text))

    def __len__(self) -> int:
        return len(self.items)

    def render(self, n_rows: int, hints: dict[str, str]) -> list[str]:
        drop: set[int] = set()
        head: list[str] = []
        for name, idx in self.missing.items():
            if n_rows >= 2 and len(idx) == n_rows:
                drop.update(idx)
                hint = hints.get(name, "")
                head.append(f"all {n_rows} rows: {self.items[idx[0]][1]}{hint}")
        rest = [(w, t) for i, (w, t) in enumerate(self.items) if i not in drop]
        rest.sort(key=lambda wt: _first_number(wt[0]))  # stable: reading and checking problems interleave
        return head + [f"{w}: {t}" for w, t in rest]


def _first_number(where: str) -> int:
    match = re.search(r"\d+", where)
    return int(match.group()) if match else -1


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
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_offline needs a path, a datasets.Dataset or a list of dicts, got {type(source).__name__}")
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
    fmt = file_format or _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DataError([f"cannot tell the file format from the extension '{path.suffix}'; pass "
                         f"file_format= (--file-format) one of {', '.join(FILE_FORMATS)}"], name)
    if fmt not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {fmt!r}")
    if fmt == "jsonl":
        with open(path, "rb") as f:
            rows = list(_read_jsonl_lines(f, problems))
    elif fmt == "json":
        rows = _read_json(path, problems)
    else:
        rows = _read_parquet(path, problems)
    return rows, name, fmt


# --------------------------------------------------------------------------------------------------
# Rows -> candidate groups


@dataclass
class _Candidate:
    where: str
    prompt: str | list[dict]
    completions: list[str]
    rewards: list[float]
    extra: dict
    fields: list[str]  # per completion, for length messages
    item_wheres: list[str] | None = None  # per completion, when a group spans rows (flat layout)


def _grouped_candidate(where: str, row: dict, cols: OfflineColumns, problems: _Problems) -> _Candidate | None:
    values, ok = {}, True
    for role in ("prompt", "completions", "rewards"):
        name = getattr(cols, role)
        v = _get(row, name)
        if v is _MISSING:
            problems.add(where, _missing_message(row, name), missing_field=name)
            ok = False
        values[role] = v
    if not ok:
        return None
    extra = {k: v for k, v in row.items() if k not in cols.used("grouped")}
    return _candidate_from_values(
        where, values["prompt"], values["completions"], values["rewards"], extra, problems,
        prompt_field=cols.prompt, completions_field=cols.completions, rewards_field=cols.rewards,
    )


def _candidate_from_values(
    where: str, prompt: Any, completions: Any, rewards: Any, extra: dict, problems: _Problems, *,
    prompt_field: str, completions_field: str | None = None, rewards_field: str | None = None,
    completion_fields: Sequence[str] | None = None, reward_fields: Sequence[str] | None = None,
) -> _Candidate | None:
    errs: list[str] = []
    p = _check_prompt(prompt, prompt_field, errs)
    lists_ok = True
    for value, name in ((completions, completions_field), (rewards, rewards_field)):
        if not isinstance(value, (list, tuple)):
            errs.append(f"field '{name}' must be a list, got {_type_name(value)}")
            lists_ok = False
    if lists_ok:
        if not completions:
            errs.append(f"field '{completions_field}' is an empty list")
        elif len(completions) != len(rewards):
            errs.append(f"fields '{completions_field}' and '{rewards_field}' have different lengths "
                        f"({len(completions)} completions, {len(rewards)} rewards)")
        c_fields = list(completion_fields or [f"{completions_field}[{i}]" for i in range(len(completions))])
        r_fields = list(reward_fields or [f"{rewards_field}[{i}]" for i in range(len(rewards))])
        texts = [_check_text(c, f, errs) for c, f in zip(completions, c_fields)]
        numbers_ = [_check_reward(r, f, errs) for r, f in zip(rewards, r_fields)]
    for e in errs:
        problems.add(where, e)
    if errs:
        return None
    return _Candidate(where, p, texts, numbers_, extra, c_fields)


def _preset_candidate(where: str, row: dict, preset: OfflinePreset, problems: _Problems) -> _Candidate | None:
    try:
        out = preset.convert(row)
    except FieldProblem as err:
        problems.add(where, str(err), missing_field=err.field if err.missing else None)
        return None
    except Exception as err:  # noqa: BLE001 - a converter bug must still name the line
        problems.add(where, f"preset '{preset.name}' cannot read this row: {type(err).__name__}: {err}")
        return None
    c_fields = out.get("completion_fields")
    r_fields = out.get("reward_fields")
    return _candidate_from_values(
        where, out["prompt"], out["completions"], out["rewards"], out.get("extra", {}), problems,
        prompt_field=out.get("prompt_field", "prompt"),
        completions_field=out.get("completions_field", "completions"),
        rewards_field=out.get("rewards_field", "rewards"),
        completion_fields=c_fields, reward_fields=r_fields,
    )


def _flat_candidates(rows: list[tuple[str, dict]], cols: OfflineColumns, problems: _Problems) -> list[_Candidate]:
    """Group flat rows by prompt, in order of first appearance."""
    groups: dict[str, list[tuple[str, Any, str, float, dict]]] = {}
    for where, row in rows:
        missing = False
        for name in cols.used("flat"):
            if _get(row, name) is _MISSING:
                problems.add(where, _missing_message(row, name), missing_field=name)
                missing = True
        if missing:
            continue
        errs: list[str] = []
        prompt = _check_prompt(_get(row, cols.prompt), cols.prompt, errs)
        text = _check_text(_get(row, cols.completion), cols.completion, errs)
        reward = _check_reward(_get(row, cols.reward), cols.reward, errs)
        for e in errs:
            problems.add(where, e)
        if errs:
            continue
        extra = {k: v for k, v in row.items() if k not in cols.used("flat")}
        groups.setdefault(_prompt_key(prompt), []).append((where, prompt, text, reward, extra))
    out = []
    for members in groups.values():
        keys = list(dict.fromkeys(k for m in members for k in m[4]))
        extra = {}
        for key in keys:  # one value when all rows agree, else one value per completion
            vals = [m[4].get(key) for m in members]
            extra[key] = vals[0] if all(v == vals[0] for v in vals) else vals
        wheres = [m[0] for m in members]
        where = wheres[0] if len(wheres) == 1 else _join_wheres(wheres)
        out.append(_Candidate(where, members[0][1], [m[2] for m in members], [m[3] for m in members], extra,
                              [cols.completion] * len(wheres), wheres))
    return out


def _join_wheres(wheres: list[str]) -> str:
    kind = wheres[0].split()[0]
    nums = [w.split()[1] for w in wheres]
    shown = ", ".join(nums[:5]) + (f", ... ({len(nums)} in all)" if len(nums) > 5 else "")
    return f"{kind}s {shown}"


# --------------------------------------------------------------------------------------------------
# Length limits


def _token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    if not texts:
        return []
    if callable(tokenizer):
        try:
            enc = tokenizer(texts, add_special_tokens=False)
            ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
            return [len(x) for x in ids]
        except TypeError:
            pass
    return [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def _prompt_tokens(tokenizer: Any, prompt: str | list[dict]) -> int:
    if isinstance(prompt, str):
        return _token_counts(tokenizer, [prompt])[0]
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return len(ids)
    text = "\n".join(m["content"] if isinstance(m["content"], str) else json.dumps(m["content"]) for m in prompt)
    return _token_counts(tokenizer, [text])[0]


def _apply_length_limits(
    cands: list[_Candidate], tokenizer: Any, max_prompt_tokens: int | None, max_completion_tokens: int | None,
    on_too_long: str, problems: _Problems, skipped_groups: Counter, skipped_completions: Counter,
) -> list[_Candidate]:
    if tokenizer is None:
        if max_prompt_tokens is not None or max_completion_tokens is not None:
            raise ValueError("max_prompt_tokens / max_completion_tokens need a tokenizer")
        return cands
    out = []
    for c in cands:
        if max_prompt_tokens is not None:
            n = _prompt_tokens(tokenizer, c.prompt)
            if n > max_prompt_tokens:
                if on_too_long == "error":
                    problems.add(c.where, f"field 'prompt' is {n} tokens, over max_prompt_tokens={max_prompt_tokens}")
                skipped_groups["prompt_too_long"] += 1
                continue
        if max_completion_tokens is not None:
            counts = _token_counts(tokenizer, c.completions)
            keep = [i for i, n in enumerate(counts) if n <= max_completion_tokens]
            for i, n in enumerate(counts):
                if n > max_completion_tokens:
                    if on_too_long == "error":
                        where = c.item_wheres[i] if c.item_wheres else c.where
                        problems.add(where, f"field '{c.fields[i]}' is {n} tokens, over "
                                              f"max_completion_tokens={max_completion_tokens}")
                    skipped_completions["completion_too_long"] += 1
            if len(keep) < len(counts):
                if len(keep) < 2 and len(counts) >= 2:
                    skipped_groups["k<2_after_length_filter"] += 1
                    continue
                c = _Candidate(c.where, c.prompt, [c.completions[i] for i in keep], [c.rewards[i] for i in keep],
                               c.extra, [c.fields[i] for i in keep],
                               [c.item_wheres[i] for i in keep] if c.item_wheres else None)
        out.append(c)
    return out


# --------------------------------------------------------------------------------------------------
# Entry points


def _resolve_preset(preset: str | OfflinePreset | None) -> OfflinePreset | None:
    if preset is None or isinstance(preset, OfflinePreset):
        return preset
    try:
        obj = PRESETS.resolve(preset)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    if not isinstance(obj, OfflinePreset):
        raise TypeError(f"preset {preset!r} is a {type(obj).__name__}, not an OfflinePreset")
    return obj


def load_offline(
    source: str | os.PathLike | Any,
    *,
    format: Literal["auto", "grouped", "flat"] = "auto",
    file_format: Literal["jsonl", "json", "parquet"] | None = None,
    columns: OfflineColumns | None = None,
    preset: str | OfflinePreset | None = None,
    tokenizer: Any = None,
    max_prompt_tokens: int | None = None,
    max_completion_tokens: int | None = None,
    on_too_long: Literal["skip", "error"] = "skip",
) -> tuple[list[OfflineGroup], Summary]:
    """Read, validate and group offline rated completions; returns ``(groups, summary)``.

    ``source``: a ``.jsonl``/``.json``/``.parquet`` path (``file_format`` overrides the extension),
    a ``datasets.Dataset`` or its ``save_to_disk`` directory, or a list of dicts. ``format`` is the
    row layout; ``"auto"`` picks grouped when the ``completions`` column is present. ``columns``
    renames the fields; ``preset`` (a :data:`PRESETS` name) sets layout and columns or a converter
    for a known file. With a ``tokenizer``, prompts over ``max_prompt_tokens`` drop their group and
    completions over ``max_completion_tokens`` are dropped (``on_too_long="skip"``, counted in the
    summary) or reported (``"error"``). Groups left with ``k = 1`` are skipped and counted.

    Raises :class:`DataError` listing every problem found, or when no group with ``k >= 2`` is left.
    """
    if format not in LAYOUTS:
        raise ValueError(f"format must be one of {LAYOUTS}, got {format!r}")
    if on_too_long not in ("skip", "error"):
        raise ValueError(f"on_too_long must be 'skip' or 'error', got {on_too_long!r}")
    pre = _resolve_preset(preset)
    if pre is not None:
        if columns is None:
            columns = pre.columns
        if format == "auto":
            format = pre.layout
    cols = columns or OfflineColumns()

    problems = _Problems()
    rows, name, fmt = _read_rows(source, file_format, problems)
    short_name = Path(name).name if fmt not in ("dataset", "rows") else name
    good = [(w, r) for w, r in rows if r is not None]

    if pre is not None and pre.convert is not None:
        layout = "grouped"
        cands = [c for w, r in good if (c := _preset_candidate(w, r, pre, problems)) is not None]
    else:
        layout = format
        if layout == "auto":
            n_grouped = sum(_get(r, cols.completions) is not _MISSING for _, r in good)
            n_flat = sum(_get(r, cols.completion) is not _MISSING for _, r in good)
            layout = "grouped" if n_grouped and n_grouped >= n_flat else "flat"
        if layout == "grouped":
            cands = [c for w, r in good if (c := _grouped_candidate(w, r, cols, problems)) is not None]
        else:
            cands = _flat_candidates(good, cols, problems)

    skipped_groups: Counter = Counter()
    skipped_completions: Counter = Counter()
    cands = _apply_length_limits(cands, tokenizer, max_prompt_tokens, max_completion_tokens, on_too_long,
                                 problems, skipped_groups, skipped_completions)

    if problems:
        hints = {}
        for role in ("prompt", "completions", "rewards", "completion", "reward"):
            col = getattr(cols, role)
            flag = f"--{role}-column"
            hints.setdefault(col, f"; map it with {flag} NAME or OfflineColumns({role}=NAME)")
        if pre is not None and pre.convert is not None:
            hints = {}
        rendered = problems.render(len(rows), hints)
        hint = ""
        if pre is None and good:
            for pname in PRESETS.names():
                cand = PRESETS.resolve(pname)
                if cand.detect and all(_get(good[0][1], f) is not _MISSING for f in cand.detect):
                    hint = (f"these rows look like preset '{pname}' ({cand.description}); "
                            f"pass preset='{pname}' / --preset {pname}")
                    break
        raise DataError(rendered[:_MAX_KEPT_PROBLEMS], short_name, total=len(rendered), hint=hint)
    if not rows:
        raise DataError(["no rows"], short_name)

    kept, seen = [], set()
    duplicates = 0
    for c in cands:
        if len(c.completions) < 2:
            skipped_groups["k=1"] += 1
            continue
        key = _prompt_key(c.prompt)
        duplicates += key in seen
        seen.add(key)
        kept.append(OfflineGroup(c.prompt, c.completions, c.rewards, c.extra, c.where))
    if not kept:
        why = ", ".join(f"{n} {r}" for r, n in sorted(skipped_groups.items())) or "none read"
        raise DataError([f"no group with k >= 2 completions is left (skipped: {why}); GVPO needs at least "
                         "2 rated completions per prompt" + (" -- is this flat data grouped by the right "
                                                              "prompt column?" if layout == "flat" else "")],
                        short_name)

    rewards = [r for g in kept for r in g.rewards]
    summary = Summary(
        source=name, file_format=fmt, layout=layout, preset=pre.name if pre else None, rows=len(rows),
        prompts=len(kept), completions=len(rewards),
        k_histogram=dict(sorted(Counter(g.k for g in kept).items())),
        reward_min=min(rewards), reward_max=max(rewards), reward_mean=sum(rewards) / len(rewards),
        constant_reward_groups=sum(max(g.rewards) == min(g.rewards) for g in kept),
        duplicate_prompts=duplicates,
        skipped_groups=dict(skipped_groups), skipped_completions=dict(skipped_completions),
    )
    return kept, summary


def check(source: str | os.PathLike | Any, **options) -> Summary:
    """Validate ``source`` as :func:`load_offline` would (same options) and return its :class:`Summary`."""
    return load_offline(source, **options)[1]


_REASONS = {
    "k=1": "groups with k=1 (no group baseline)",
    "prompt_too_long": "groups whose prompt is over max_prompt_tokens",
    "k<2_after_length_filter": "groups left with k<2 after dropping too-long completions",
    "completion_too_long": "completions over max_completion_tokens",
}


def format_summary(summary: Summary) -> str:
    """A few aligned lines for people: counts, k histogram, reward range, what was skipped."""
    s = summary
    what = ", ".join(x for x in (s.file_format, s.layout, f"preset {s.preset}" if s.preset else None) if x)
    hist = "  ".join(f"k={k}: {n}" for k, n in sorted(s.k_histogram.items()))
    lines = [
        f"{s.source} ({what})",
        f"  rows read:    {s.rows}",
        f"  prompts:      {s.prompts}",
        f"  completions:  {s.completions}",
        f"  k histogram:  {hist}",
        f"  rewards:      min {s.reward_min:.4g}  max {s.reward_max:.4g}  mean {s.reward_mean:.4g}",
        f"  constant-reward groups: {s.constant_reward_groups} (all rewards equal: no GVPO gradient)",
    ]
    if s.duplicate_prompts:
        lines.append(f"  duplicate prompts: {s.duplicate_prompts} (rows repeating an earlier prompt; "
                     "kept as separate groups)")
    skipped = {**s.skipped_groups, **s.skipped_completions}
    if not skipped:
        lines.append("  skipped:      none")
    else:
        lines.append("  skipped:")
        lines += [f"    {n:>6}  {_REASONS.get(r, r)}" for r, n in sorted(skipped.items())]
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gvpo data check",
        description="Validate an offline file of rated completions and print a summary. Every problem "
                    "is listed with its line (jsonl/json) or row (parquet) and field; exit status 1 if any.",
    )
    p.add_argument("path", nargs="?", help="a .jsonl, .json or .parquet file, or a datasets.save_to_disk directory")
    p.add_argument("--format", choices=LAYOUTS, default="auto",
                   help="row layout: 'grouped' (prompt, completions, rewards), 'flat' (prompt, completion, "
                        "reward; grouped by prompt) or 'auto' (grouped if the completions column exists)")
    p.add_argument("--file-format", choices=FILE_FORMATS, default=None,
                   help="file format; default: from the extension")
    p.add_argument("--preset", default=None,
                   help=f"read a known file shape: {', '.join(PRESETS.names())} (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    defaults = OfflineColumns()
    for f in fields(OfflineColumns):
        p.add_argument(f"--{f.name}-column", dest=f"{f.name}_column", default=None, metavar="NAME",
                       help=f"column holding the {f.name} (default '{getattr(defaults, f.name)}'; "
                            "dotted names reach into nested objects)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or path (transformers AutoTokenizer) for the length limits")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="drop groups whose prompt is longer")
    p.add_argument("--max-completion-tokens", type=int, default=None, help="drop completions that are longer")
    p.add_argument("--on-too-long", choices=("skip", "error"), default="skip",
                   help="what to do with over-long prompts/completions: skip and count them, or report errors")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    return p


def main_check(argv: list[str] | None = None) -> int:
    """``gvpo data check PATH [options]``: 0 and the summary on stdout, or 1 and the problems on stderr."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        for name in PRESETS.names():
            print(f"{name}: {PRESETS.resolve(name).description}")
        return 0
    if args.path is None:
        parser.error("the PATH argument is required")
    overrides = {f.name: getattr(args, f"{f.name}_column") for f in fields(OfflineColumns)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        pre = _resolve_preset(args.preset)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    columns = None
    if overrides:
        if pre is not None and pre.convert is not None:
            print(f"error: preset {pre.name!r} has its own converter; --*-column options do not apply",
                  file=sys.stderr)
            return 1
        base = pre.columns if pre is not None else OfflineColumns()
        columns = OfflineColumns(**{**asdict(base), **overrides})
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    try:
        summary = check(args.path, format=args.format, file_format=args.file_format, columns=columns, preset=pre,
                        tokenizer=tokenizer, max_prompt_tokens=args.max_prompt_tokens,
                        max_completion_tokens=args.max_completion_tokens, on_too_long=args.on_too_long)
    except DataError as err:
        print(str(err), file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary.to_dict(), indent=2) if args.json else format_summary(summary))
    return 0


# --------------------------------------------------------------------------------------------------
# Presets for the real files in shared/data

_GSM8K_MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def _convert_gsm8k_model_solutions(row: dict) -> dict:
    """GSM8K paper's example model outputs: 4 solutions per question, reward = is_correct (1.0/0.0)."""
    prompt = lookup(row, "question")
    completions, rewards = [], []
    for m in _GSM8K_MODELS:
        completions.append(lookup(row, f"{m}.solution"))
        rewards.append(lookup(row, f"{m}.is_correct"))
    return {
        "prompt": prompt, "completions": completions, "rewards": rewards,
        "extra": {"ground_truth": row.get("ground_truth"), "models": list(_GSM8K_MODELS)},
        "prompt_field": "question",
        "completion_fields": [f"{m}.solution" for m in _GSM8K_MODELS],
        "reward_fields": [f"{m}.is_correct" for m in _GSM8K_MODELS],
    }


def _qwen_rm8_common(row: dict) -> tuple[list[dict], list, dict]:
    query, system = lookup(row, "query"), row.get("system")
    prompt = ([{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else [])
    prompt.append({"role": "user", "content": query})
    responses = lookup(row, "response")
    if not isinstance(responses, list):
        raise FieldProblem("response", f"must be a list, got {_type_name(responses)}")
    extra = {k: row.get(k) for k in ("idx", "gt", "answer", "level", "pred", "score", "pred_score") if k in row}
    return prompt, responses, extra


def _convert_qwen25_math_rm8(row: dict) -> dict:
    """Qwen2.5-Math rm@8 example: chat prompt (system + query), 8 responses, reward = RM score pred_score[i][0]."""
    prompt, responses, extra = _qwen_rm8_common(row)
    scores = lookup(row, "pred_score")
    if not isinstance(scores, list):
        raise FieldProblem("pred_score", f"must be a list, got {_type_name(scores)}")
    rewards = [s[0] if isinstance(s, list) and len(s) == 1 else s for s in scores]
    return {"prompt": prompt, "completions": responses, "rewards": rewards, "extra": extra,
            "prompt_field": "query", "completions_field": "response", "rewards_field": "pred_score",
            "reward_fields": [f"pred_score[{i}][0]" for i in range(len(rewards))]}


def _convert_qwen25_math_rm8_verifier(row: dict) -> dict:
    """As ``qwen25_math_rm8`` but reward = verifier correctness ``score[i]`` (1.0/0.0)."""
    prompt, responses, extra = _qwen_rm8_common(row)
    return {"prompt": prompt, "completions": responses, "rewards": lookup(row, "score"), "extra": extra,
            "prompt_field": "query", "completions_field": "response", "rewards_field": "score"}


register_preset(OfflinePreset(
    "gsm8k_model_solutions",
    "GSM8K example model solutions (openai/grade-school-math): prompt=question, 4 completions "
    "{6b,175b}_{finetuning,verification}.solution, reward=float(is_correct)",
    convert=_convert_gsm8k_model_solutions,
    detect=("question", *(f"{m}.solution" for m in _GSM8K_MODELS)),
))
register_preset(OfflinePreset(
    "qwen25_math_rm8",
    "Qwen2.5-Math rm@8 example: prompt=[system, user=query] chat, completions=response (8), "
    "reward=pred_score[i][0] (reward-model score)",
    convert=_convert_qwen25_math_rm8,
    detect=("query", "response", "pred_score"),
))
register_preset(OfflinePreset(
    "qwen25_math_rm8_verifier",
    "as qwen25_math_rm8 but reward=float(score[i]) (verifier correctness)",
    convert=_convert_qwen25_math_rm8_verifier,
))


# --------------------------------------------------------------------------------------------------
# Reference log-prob cache


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def fingerprint_file(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes (memoised per path, size and mtime within a process)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = _sha256_file(p)
    return _FILE_HASHES[key]


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset"}


def fingerprint_model(model: Any) -> str:
    """sha256 hex identifying a model's weights.

    * an ``nn.Module``: every state-dict tensor's name, dtype, shape and bytes, plus the model class
      and its ``config`` (less path and version fields) -- exact, and costs one pass over the weights;
    * a directory path: ``config.json`` plus the sha256 of every ``*.safetensors``/``*.bin`` file --
      cheap for a checkpoint on disk that will be loaded unchanged.
    """
    h = hashlib.sha256()
    if isinstance(model, (str, os.PathLike)):
        d = Path(model)
        files = sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin"))
        if not files:
            raise ValueError(f"no *.safetensors or *.bin weight files in {d}")
        for extra in ("config.json", "generation_config.json"):
            if (d / extra).exists():
                h.update(f"{extra}:{_sha256_file(d / extra)}\n".encode())
        for f in files:
            h.update(f"{f.name}:{fingerprint_file(f)}\n".encode())
        return h.hexdigest()
    import torch

    h.update(f"class:{type(model).__module__}.{type(model).__qualname__}\n".encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    state = model.state_dict() if hasattr(model, "state_dict") else dict(model)
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        h.update(f"\n{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    try:
        import torch

        if isinstance(obj, (torch.dtype, torch.device)):
            return str(obj)
        if isinstance(obj, torch.Size):
            return list(obj)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"RefLogpCache key parts must be JSON values (str, number, list, dict), got "
                    f"{type(obj).__name__}; fingerprint it first (fingerprint_model / fingerprint_file)")


class RefLogpCache:
    """Reference-model log-probs of fixed offline data, computed once and stored on disk.

    The file is ``<dir>/<sha256 of canonical JSON of key_parts>.safetensors``; ``key_parts``
    should name everything the values depend on, e.g. ``{"model": fingerprint_model(ref),
    "data": fingerprint_file(path), "settings": {"max_completion_tokens": 512, "dtype": "bf16"}}``.
    Writes go to a temp file in the same directory and are renamed into place, so readers never see
    a half-written file and concurrent writers of one key are harmless.

    >>> import torch, tempfile
    >>> cache = RefLogpCache(tempfile.mkdtemp())
    >>> cache.get_or_compute({"model": "m", "data": "d"}, lambda: torch.tensor([-1.5, -2.0]))
    tensor([-1.5000, -2.0000])
    >>> cache.get_or_compute({"model": "m", "data": "d"}, lambda: 1 / 0)  # cached: not called
    tensor([-1.5000, -2.0000])
    >>> cache.hits, cache.misses
    (1, 1)
    """

    TENSOR_NAME = "ref_logps"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def canonical(key_parts: dict) -> str:
        return json.dumps(key_parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)

    def key(self, key_parts: dict) -> str:
        """The sha256 hex fingerprint of ``key_parts``."""
        return hashlib.sha256(self.canonical(key_parts).encode()).hexdigest()

    def path(self, key_parts: dict) -> Path:
        return self.directory / f"{self.key(key_parts)}.safetensors"

    def get(self, key_parts: dict, device: Any = None):
        """The stored tensor, or ``None`` when absent or unreadable (a corrupt file is recomputed)."""
        from safetensors import safe_open

        path = self.path(key_parts)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt", device=str(device) if device is not None else "cpu") as f:
                meta = f.metadata() or {}
                if meta.get("key_parts") not in (None, self.canonical(key_parts)):
                    return None
                return f.get_tensor(self.TENSOR_NAME)
        except Exception:  # noqa: BLE001 - truncated/corrupt file: treat as a miss
            return None

    def put(self, key_parts: dict, tensor) -> Path:
        """Store ``tensor`` atomically under ``key_parts``' fingerprint; returns the path."""
        import torch
        from safetensors.torch import save_file

        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"RefLogpCache stores a torch.Tensor, got {type(tensor).__name__}")
        path = self.path(key_parts)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.stem[:16]}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({self.TENSOR_NAME: tensor.detach().cpu().contiguous()}, tmp,
                      metadata={"key_parts": self.canonical(key_parts)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def get_or_compute(self, key_parts: dict, compute_fn: Callable[[], Any], device: Any = None):
        """The cached tensor for ``key_parts``, else ``compute_fn()`` stored and returned.

        A hit is loaded on ``device`` (default CPU); a miss returns ``compute_fn``'s tensor detached.
        """
        cached = self.get(key_parts, device=device)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        tensor = compute_fn()
        self.put(key_parts, tensor)
        return tensor.detach()
