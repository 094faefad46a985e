"""Reward functions: plain callables ``(prompts, completions, **dataset_columns) -> list[float | None]``.

This is TRL's convention, so a reward written for TRL works here unchanged. ``None`` means "cannot
score this completion": the trainer drops it from its group and counts it in the metrics.
Pick rewards by registry name or dotted import path with :func:`resolve`.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..registry import Registry

RewardFn = Callable[..., list]

REWARDS: Registry = Registry("reward")


def resolve(name_or_path: str) -> RewardFn:
    """The reward callable registered as ``name_or_path``, or imported from a dotted path."""
    return REWARDS.resolve(name_or_path)


def combine(names: Sequence[str], weights: Sequence[float] | None = None) -> RewardFn:
    """One reward that is the weighted sum of several; ``None`` from any of them gives ``None``.

    >>> f = combine(["exact_match", "exact_match"], [1.0, 0.5])
    >>> f(["Q", "Q"], [" 4\\n", " 5"], answer=["4", "4"])
    [1.5, 0.0]
    """
    fns = [resolve(n) for n in names]
    weights = list(weights) if weights is not None else [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ValueError(f"reward_weights has {len(weights)} values for {len(fns)} rewards {list(names)}")

    def combined(prompts, completions, **columns):
        total: list = [0.0] * len(completions)
        for fn, weight, name in zip(fns, weights, names):
            values = fn(prompts, completions, **columns)
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
            total = [None if (t is None or v is None) else t + weight * float(v) for t, v in zip(total, values)]
        return total

    return combined


from . import basic  # noqa: E402,F401  (registers the built-in rewards)
