"""Reward functions written the way TRL's GRPOTrainer documentation shows them (for tests), and TRL's own
shipped rewards, unchanged, under dotted names the config can point at.

Each documented style: standard-format ``completions`` + ``**kwargs``; conversational completions
(``completion[0]["content"]``); a dataset column by name; ``trainer_state``; ``completion_ids``; an
``async def``; ``None`` for items a reward does not apply to; ``log_extra`` / ``log_metric``.
"""

from __future__ import annotations

import asyncio
import re

from trl.rewards import (
    accuracy_reward,  # noqa: F401  (used by dotted path)
    get_cosine_scaled_reward,
    get_repetition_penalty_reward,
    get_soft_overlong_punishment,
    reasoning_accuracy_reward,  # noqa: F401
    think_format_reward,  # noqa: F401
)

cosine_scaled = get_cosine_scaled_reward(max_len=4)
repetition_penalty = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
soft_overlong = get_soft_overlong_punishment(max_completion_len=4, soft_punish_cache=2)

CALLS: list[dict] = []
"""Every call of :func:`record`: the keyword arguments it received."""


def record(**kwargs) -> list[float]:
    """Keeps what it receives (for tests that recompute rewards from the same inputs); scores 0."""
    CALLS.append(kwargs)
    return [0.0] * len(kwargs["completions"])


def reward_len(completions, **kwargs):
    """TRL docs, standard format: reward completions close to 3 characters."""
    return [-abs(3 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    """TRL docs, conversational format: 1.0 when the content is digits only."""
    pattern = r"^ ?\d+$"
    completion_contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.match(pattern, content) else 0.0 for content in completion_contents]


def reward_total(completions, total, **kwargs):
    """TRL docs, a dataset column passed by name (here ``total``)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [1.0 if t.strip() == str(g) else 0.0 for t, g in zip(texts, total)]


def step_scaled(completions, trainer_state, **kwargs):
    """TRL docs, ``trainer_state``: a reward that grows with ``global_step``."""
    return [float(trainer_state.global_step)] * len(completions)


def token_count(completion_ids, **kwargs):
    """TRL docs, ``completion_ids``: minus the number of completion tokens."""
    return [-float(len(ids)) for ids in completion_ids]


async def async_digits(prompts, completions, **kwargs):
    """TRL docs, ``async def``: e.g. a remote judge; here the share of digits, after a short await."""
    await asyncio.sleep(0.01)
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def only_even(prompts, completions, total, **kwargs):
    """TRL docs, multi-task: ``None`` where the reward does not apply (odd totals)."""
    return [None if int(g) % 2 else 1.0 for g in total]


def logs(completions, log_extra=None, log_metric=None, **kwargs):
    """TRL's logging hooks: a column and a metric."""
    log_extra("length", [len(c if isinstance(c, str) else c[0]["content"]) for c in completions])
    log_metric("calls", 1.0)
    return [0.0] * len(completions)
