"""The ``Task`` record and the ``TASKS`` registry, in a leaf module so that the built-in tasks register
here without importing the package that imports them."""

from __future__ import annotations

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
