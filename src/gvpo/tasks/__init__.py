"""Built-in tasks: prompts with the columns their rewards need, train and held-out splits.

A task is picked by name (``task.name: arithmetic``) through the ``TASKS`` registry; each entry is a
factory ``(**options) -> Task``. ``dataset`` (:mod:`gvpo.tasks.dataset`) trains on the user's own data
with their own rewards, configured by options alone.
"""

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


def get_task(name: str, **options) -> Task:
    """Build the task registered as ``name`` (or a dotted path to a factory) with ``options``."""
    return TASKS.resolve(name)(**options)


def _register_builtins() -> None:
    from . import arithmetic  # noqa: F401  (registers itself)
    from . import dataset  # noqa: F401  (registers dataset: the user's own data)
    from . import math_tasks  # noqa: F401  (registers gsm8k, math500, aime24)


_register_builtins()
