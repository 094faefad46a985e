"""Named ways to read one kind of file (:data:`PRESETS`), and the presets for two real rated files (tests/data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import Registry
from .errors import FieldProblem
from .fields import OfflineColumns, _type_name, lookup

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


# --------------------------------------------------------------------------------------------------
# Presets for the real rated files in tests/data

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
