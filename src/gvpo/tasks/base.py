"""The ``Task`` record and the ``TASKS`` registry, in a leaf module so that the built-in tasks register
here without importing the package that imports them."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..registry import Registry

TASKS: Registry = Registry("task")


@dataclass(frozen=True)
class Task:
    """Prompts and how to score completions of them."""

    name: str
    train: list[dict]
    """Training rows: each has ``"prompt"`` (a string, or a list of ``{"role", "content"}`` messages that
    goes through the chat template) plus the columns the rewards read by name (e.g. ``"answer"``)."""
    test: list[dict]
    """Held-out rows in the same form, disjoint from ``train``."""
    rewards: tuple[str, ...]
    """Reward names (registry keys or dotted paths) summed with ``reward_weights``."""
    reward_weights: tuple[float, ...] | None = None
    """One weight per reward; ``None`` means all 1."""
    accuracy_reward: str | None = None
    """Reward whose value >= 1 counts as correct for ``eval/accuracy``; ``None`` means ``rewards[0]``."""
    max_new_tokens: int = 16
    """Completion budget that fits this task's answers."""
    extra: dict = field(default_factory=dict)
    """Anything else a task wants to carry (template, source path)."""


def subsample(train: list, test: list, *, seed: int | None, num_train: int | None,
              num_test: int | None) -> tuple[list, list]:
    """``train`` shuffled with ``seed`` (if given) then cut to ``num_train`` rows; ``test`` cut to ``num_test``.

    >>> subsample([1, 2, 3], [4, 5], seed=None, num_train=2, num_test=None)
    ([1, 2], [4, 5])
    """
    train = list(train)
    if seed is not None:
        random.Random(seed).shuffle(train)
    return train[:num_train] if num_train is not None else train, test[:num_test] if num_test is not None else test
