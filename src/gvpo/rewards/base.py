"""What every reward module shares: the ``REWARDS`` registry, the ``TrainerState`` rewards receive, and
helpers for TRL's conversational format. A leaf module, so the built-in rewards register here without a cycle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..registry import Registry

RewardFn = Callable[..., list]

REWARDS: Registry = Registry("reward")


def resolve(name_or_path: str | RewardFn) -> RewardFn:
    """The reward callable registered as ``name_or_path``, or imported from a dotted path (a callable passes through)."""
    return name_or_path if callable(name_or_path) else REWARDS.resolve(name_or_path)


@dataclass(frozen=True)
class TrainerState:
    """Training progress, passed to rewards as ``trainer_state`` (TRL passes its ``TrainerState``)."""

    step: int = 0
    """Optimizer steps done before this batch was scored."""
    samples: int = 0
    """Completions generated so far."""

    @property
    def global_step(self) -> int:
        """TRL's name for :attr:`step`."""
        return self.step

    @classmethod
    def of(cls, state: Any) -> TrainerState:
        """A :class:`TrainerState` from the trainer's state dict (``step``, ``samples``), one, or ``None``.

        >>> TrainerState.of({"step": 3, "samples": 48, "elapsed_s": 1.0}).global_step
        3
        """
        if state is None:
            return cls()
        if isinstance(state, Mapping):
            return cls(step=int(state.get("step", 0)), samples=int(state.get("samples", 0)))
        return state


def is_conversational(prompt: Any) -> bool:
    """True for a list of ``{"role", "content"}`` messages (TRL's conversational format).

    >>> is_conversational([{"role": "user", "content": "hi"}]), is_conversational("hi")
    (True, False)
    """
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], Mapping) and "role" in prompt[0]


def completion_text(completion: Any) -> str | None:
    """A completion as text: strings as-is, chat messages -> the last message's ``content``.

    >>> completion_text([{"role": "assistant", "content": " 4"}]), completion_text(" 4")
    (' 4', ' 4')
    """
    if completion is None:
        return None
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)):
        return completion_text(completion[-1]) if completion else ""
    return str(completion)
