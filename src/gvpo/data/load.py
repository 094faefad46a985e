"""The entry points: :func:`load_offline` (read, validate, group, skip ``k = 1``) and :func:`check`."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import _MAX_KEPT_PROBLEMS, DataError, _Problems
from .fields import _MISSING, OfflineColumns, _get, _prompt_key
from .presets import PRESETS, OfflinePreset, _resolve_preset
from .readers import _read_rows
from .summary import Summary
from .validate import _apply_length_limits, _flat_candidates, _grouped_candidate, _preset_candidate

LAYOUTS = ("auto", "grouped", "flat")


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
