"""Rows -> candidate groups: required fields and values checked (every problem recorded with its
line and field), flat rows grouped by prompt, and the token-length limits applied."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import FieldProblem, _Problems
from .fields import (
    _MISSING,
    OfflineColumns,
    _check_prompt,
    _check_reward,
    _check_text,
    _get,
    _missing_message,
    _prompt_key,
    _type_name,
)
from .presets import OfflinePreset

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
