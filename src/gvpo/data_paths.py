"""Where rows come from: the evaluation sets shipped in the package, and one reader for every data source.

Built-in data (:func:`builtin_data_dir`): ``gsm8k/{train,test}.jsonl.gz``, ``math500/test.jsonl.gz`` and
``aime24/test.jsonl.gz`` inside the installed package, each folder with a ``SOURCE.md`` (origin, licence,
checksums). Nothing is read from outside the package.

A *source* (:func:`read_splits`) is any of:

* a local file: ``.jsonl`` / ``.json`` (rows or a JSON array), optionally ``.gz``; ``.parquet``, ``.csv``,
  ``.tsv``, ``.arrow`` (read with ``datasets``). One file is one split, named ``"train"`` as
  ``datasets.load_dataset`` names it;
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* a folder of split files ``<split>.jsonl[.gz]`` (or ``.json``/``.parquet``/``.csv``);
* a Hugging Face dataset id (``"openai/gsm8k"``), read with ``datasets.load_dataset(id, config)``;
* a mapping of ``datasets.load_dataset`` keyword arguments (``{"path": "openai/gsm8k", "name": "main",
  "split": "test"}``); on the command line ``task.options.path='{path: openai/gsm8k, name: main}'``;
* a ``datasets.Dataset`` / ``DatasetDict``, a list of dicts, or a dict of split name -> any of these.

>>> import json, os, tempfile
>>> d = tempfile.mkdtemp()
>>> with open(os.path.join(d, "rows.jsonl"), "w") as f:
...     _ = f.write(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\\n")
>>> splits, described = read_splits(os.path.join(d, "rows.jsonl"))
>>> splits
{'train': [{'prompt': '1+1=', 'answer': '2'}]}
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

_DATASETS_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
_SPLIT_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".tsv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

Rows = list  # list[dict]


def builtin_data_dir() -> Path:
    """The folder holding the evaluation sets shipped in the package, one sub-folder each.

    >>> sorted(p.name for p in builtin_data_dir().iterdir() if p.is_dir())
    ['aime24', 'gsm8k', 'math500']
    """
    return Path(__file__).resolve().parent / "assets" / "data"


def builtin_file(name: str, split: str) -> Path:
    """The shipped ``<name>/<split>.jsonl.gz``, e.g. ``builtin_file("gsm8k", "test")``."""
    path = builtin_data_dir() / name / f"{split}.jsonl.gz"
    if not path.is_file():
        have = sorted(p.name for p in (builtin_data_dir() / name).glob("*.jsonl.gz"))
        raise FileNotFoundError(f"no built-in split {split!r} for {name!r} ({path}); shipped: {have or 'none'}")
    return path


def read_jsonl(path: str | Path) -> Rows:
    """Rows of a ``.jsonl`` / ``.json`` file (a JSON array or one object per line), ``.gz`` or not.

    Raises ``ValueError`` naming the file and line of the first row that is not a JSON object.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        rows = json.loads(text)
        where = "item"
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {lineno}: invalid JSON ({err.msg}, column {err.colno})") from None
        where = "row"
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{path} {where} {i}: expected a JSON object, got {type(r).__name__}")
    return rows


def _read_file(path: Path) -> Rows:
    name = path.name.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")):
        return read_jsonl(path)
    fmt = _DATASETS_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot read {path}: use .jsonl, .json (optionally .gz), .parquet, .csv, .tsv or .arrow, "
                         "a folder written by datasets' save_to_disk, or a Hugging Face dataset id")
    import datasets

    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    return [dict(r) for r in datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)]


def _split_files(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        for suffix in _SPLIT_FILE_SUFFIXES:
            if file.is_file() and file.name.endswith(suffix):
                out.setdefault(file.name[: -len(suffix)], file)
    return out


def _rows_of(obj: Any) -> Rows:
    return [dict(r) for r in obj]


def _is_dataset_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(hasattr(v, "column_names") for v in obj.values()) and bool(obj)


def _load_hub(kwargs: dict, described: str) -> dict[str, Rows]:
    """``datasets.load_dataset(**kwargs)``; all its splits, or the one ``kwargs["split"]`` names."""
    import datasets

    try:
        loaded = datasets.load_dataset(**kwargs)
    except Exception as err:  # noqa: BLE001 - hub/network errors come in many types
        text = f"{type(err).__name__}: {err}"
        offline = any(s in text for s in ("offline", "Offline", "ConnectionError", "connect", "resolve", "Max retries"))
        hint = (" There is no network here (or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and the dataset is not in "
                "the datasets cache. Where there is network, run `import datasets; datasets.load_dataset("
                f"{_kwargs_text(kwargs)}).save_to_disk('DIR')`, copy DIR here and pass DIR as the path (or its data "
                "files); or run once with network so the cache fills.") if offline else ""
        raise RuntimeError(f"could not load {described} with datasets.load_dataset({_kwargs_text(kwargs)}): "
                           f"{text}.{hint}") from err
    if "split" in kwargs and kwargs["split"] is not None:
        return {str(kwargs["split"]): _rows_of(loaded)}
    return {str(name): _rows_of(ds) for name, ds in loaded.items()}


def _kwargs_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def is_saved_dataset(path: str | Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    path = Path(path).expanduser()
    return any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def looks_like_hub_id(text: str) -> bool:
    """``"owner/name"`` or ``"name"`` with hub characters only, and no file extension it could be read by.

    >>> looks_like_hub_id("EleutherAI/hendrycks_math"), looks_like_hub_id("data/train.jsonl")
    (True, False)
    """
    return bool(_HUB_ID.match(text)) and not text.lower().endswith(_SPLIT_FILE_SUFFIXES + (".arrow", ".gz"))


def read_splits(source: Any, *, config: str | None = None) -> tuple[dict[str, Rows], str]:
    """Every split of ``source`` as ``({split name: rows}, description)``; see the module docstring.

    ``config`` is the dataset configuration (``name=`` of ``datasets.load_dataset``) for a hub id.
    Raises ``FileNotFoundError`` for a path that is neither a file, a folder nor a hub id, and
    ``RuntimeError`` saying what to do when a hub id cannot be loaded (no network).
    """
    if isinstance(source, (list, tuple)):
        rows = list(source)
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, Mapping)), None)
        if bad is not None:
            raise TypeError(f"row {bad} of the list is a {type(rows[bad]).__name__}, not a dict")
        return {"train": [dict(r) for r in rows]}, f"list of {len(rows)} rows"
    if hasattr(source, "column_names") and not isinstance(source, Mapping):  # datasets.Dataset
        return {"train": _rows_of(source)}, f"datasets.Dataset ({len(source)} rows)"
    if isinstance(source, Mapping):
        if "path" in source and isinstance(source["path"], str) and not _is_dataset_dict(source):
            kwargs = dict(source)
            if config is not None:
                kwargs.setdefault("name", config)
            return _load_hub(kwargs, f"dataset {kwargs['path']!r}"), f"datasets.load_dataset({_kwargs_text(kwargs)})"
        out, parts = {}, []
        for split, sub in source.items():  # DatasetDict, or a dict of split -> source
            rows, described = read_splits(sub, config=config)
            if len(rows) != 1:
                raise ValueError(f"split {split!r} of the mapping is itself {described} with splits {sorted(rows)}; "
                                 "give one split per key")
            out[str(split)] = next(iter(rows.values()))
            parts.append(f"{split}: {described}")
        return out, "{" + ", ".join(parts) + "}"
    if not isinstance(source, (str, Path)):
        raise TypeError(f"cannot read rows from a {type(source).__name__}: give a file, a folder, a Hugging Face "
                        "dataset id, a mapping of datasets.load_dataset arguments, a datasets.Dataset or a list of dicts")
    path = Path(source).expanduser()
    if path.is_file():
        return {"train": _read_file(path)}, str(path)
    if path.is_dir():
        if is_saved_dataset(path):
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.Dataset):
                return {"train": _rows_of(loaded)}, f"{path} (datasets.save_to_disk)"
            return {str(k): _rows_of(v) for k, v in loaded.items()}, f"{path} (datasets.save_to_disk)"
        files = _split_files(path)
        if not files:
            raise FileNotFoundError(f"{path} holds no data: expected <split>.jsonl files (e.g. train.jsonl, "
                                    "test.jsonl) or a folder written by datasets' save_to_disk")
        return {split: _read_file(f) for split, f in files.items()}, str(path)
    if isinstance(source, str) and looks_like_hub_id(source):
        kwargs = {"path": source} if config is None else {"path": source, "name": config}
        return _load_hub(kwargs, f"Hugging Face dataset {source!r}"), f"datasets.load_dataset({_kwargs_text(kwargs)})"
    raise FileNotFoundError(f"data source {str(source)!r} does not exist: not a file, not a folder, and not a "
                            "Hugging Face dataset id ('owner/name')")


def pick_split(splits: dict[str, Rows], split: str | Sequence[str], described: str, option: str = "") -> Rows:
    """The rows of ``split`` (a list of names: concatenated), or, for a source with one split only, that
    split; else ``KeyError`` naming the split, the option that chose it and the splits there are.

    >>> pick_split({"train": [1]}, "test", "x.jsonl")  # one file: whatever the split is called
    [1]
    >>> pick_split({"train": [1], "extra": [2]}, ["train", "extra"], "ds")
    [1, 2]
    >>> pick_split({"train": [1], "validation": [2]}, "test", "ds", "test_split")
    Traceback (most recent call last):
    ...
    KeyError: "ds has no split 'test' (test_split); its splits: train, validation"
    """
    names = [split] if isinstance(split, str) else list(split)
    if len(splits) == 1 and len(names) == 1:
        return list(next(iter(splits.values())))
    missing = [n for n in names if n not in splits]
    if missing:
        chosen_by = f" ({option})" if option else ""
        raise KeyError(f"{described} has no split {missing[0]!r}{chosen_by}; its splits: {', '.join(sorted(splits))}")
    return [r for n in names for r in splits[n]]
