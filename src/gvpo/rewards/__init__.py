"""Reward functions: plain callables ``(prompts, completions, **dataset_columns) -> list[float | None]``.

This is TRL's convention, so a reward written for TRL works here unchanged. ``None`` means "cannot
score this completion": the trainer drops it from its group and counts it in the metrics.
Pick rewards by registry name or dotted import path with :func:`resolve`.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

from ..registry import Registry
from ..reward_checks import call_checked, check_values

RewardFn = Callable[..., list]

REWARDS: Registry = Registry("reward")


def resolve(name_or_path: str) -> RewardFn:
    """The reward callable registered as ``name_or_path``, or imported from a dotted path."""
    return REWARDS.resolve(name_or_path)


def call_with_timeout(fn: RewardFn, name: str, timeout_s: float, *args, **kwargs) -> list:
    """Run user reward code in a daemon thread; raise ``TimeoutError`` naming it if it hangs.

    >>> call_with_timeout(lambda p, c: [1.0], "one", 5, ["p"], ["c"])
    [1.0]
    """
    if not timeout_s:
        return fn(*args, **kwargs)
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as err:  # re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"reward {name!r} did not return within {timeout_s} s (task.reward_timeout_s); "
                           "the run stops here and its last checkpoint is intact")
    if "error" in result:
        raise result["error"]
    return result["value"]


def combine(names: Sequence[str], weights: Sequence[float] | None = None, timeout_s: float = 0) -> RewardFn:
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
            values = check_values(name, call_checked(call_with_timeout, name, fn, name, timeout_s, prompts,
                                                     completions, **columns), len(completions))
            total = [None if (t is None or v is None) else t + weight * float(v) for t, v in zip(total, values)]
        return total

    return combined


from . import basic  # noqa: E402,F401  (registers the built-in rewards)
from . import math  # noqa: E402,F401  (registers math, format)
