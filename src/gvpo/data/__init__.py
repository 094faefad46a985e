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

The package, one module per concern: :mod:`~gvpo.data.readers` (file formats),
:mod:`~gvpo.data.fields` (field access, value checks), :mod:`~gvpo.data.validate` (rows -> groups,
length limits), :mod:`~gvpo.data.load` (:func:`load_offline`, :func:`check`),
:mod:`~gvpo.data.presets`, :mod:`~gvpo.data.summary`, :mod:`~gvpo.data.errors`,
:mod:`~gvpo.data.cli` (``gvpo data check``) and :mod:`~gvpo.data.cache` (:class:`RefLogpCache`).
Everything public is imported from ``gvpo.data``.
"""

from __future__ import annotations

from .cache import RefLogpCache, fingerprint_file, fingerprint_model
from .cli import main_check
from .errors import MAX_LISTED_PROBLEMS, DataError, FieldProblem
from .fields import OfflineColumns, lookup
from .load import LAYOUTS, OfflineGroup, check, load_offline
from .presets import PRESETS, OfflinePreset, register_preset
from .readers import FILE_FORMATS
from .summary import Summary, format_summary

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
