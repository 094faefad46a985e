"""Rule-based rewards that need no extra dependency."""

from __future__ import annotations

from .base import REWARDS, completion_text


def first_line(text) -> str:
    """The completion's answer line: text (or a conversational completion's content) up to the first newline, stripped."""
    return (completion_text(text) or "").strip().split("\n", 1)[0].strip()


@REWARDS.register("exact_match")
def exact_match(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the completion's first line equals the gold ``answer`` (whitespace-stripped), else 0.0.

    >>> exact_match(["2+2="], [" 4\\nmore"], answer=["4"])
    [1.0]
    """
    return [float(first_line(c) == str(a).strip()) for c, a in zip(completions, answer)]
