"""The ``exact_match`` reward (first line of the completion vs the gold answer) and ``combine``."""

from __future__ import annotations

import pytest

from gvpo.rewards import REWARDS, combine, resolve
from gvpo.rewards.basic import exact_match, first_line


def test_registered():
    assert "exact_match" in REWARDS
    assert resolve("exact_match") is exact_match
    assert resolve("gvpo.rewards.basic.exact_match") is exact_match


def test_first_line_strips_and_cuts():
    assert first_line("  46 \nmore text") == "46"
    assert first_line("\n\n 7\n8") == "7"
    assert first_line("") == ""


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        (" 46", "46", 1.0),
        ("46\n", "46", 1.0),
        (" 46\nQ: 1+1= A: 2", "46", 1.0),  # only the first line counts
        ("  46  ", " 46 ", 1.0),  # whitespace stripped on both sides
        ("47", "46", 0.0),
        ("46.0", "46", 0.0),  # exact, not numeric
        ("4 6", "46", 0.0),
        ("", "46", 0.0),
        ("\n46", "46", 1.0),  # leading blank lines are stripped before cutting
        ("46", 46, 1.0),  # a non-string gold is compared as str
    ],
)
def test_exact_match(completion, gold, expected):
    assert exact_match(["Q: 12+34= A:"], [completion], answer=[gold]) == [expected]


def test_exact_match_batch_and_extra_columns():
    scores = resolve("exact_match")(["a", "b", "c"], ["1", "2", "x"], answer=["1", "3", "x"], other=[0, 0, 0])
    assert scores == [1.0, 0.0, 1.0]


def test_combine_weights_and_none():
    f = combine(["exact_match", __name__ + ".maybe_reward"], [2.0, 0.5])
    assert f(prompts=["Q", "Q", "Q"], completions=["4", "5", "?"], answer=["4", "4", "4"]) == [2.5, 0.5, None]
    with pytest.raises(ValueError):
        combine(["exact_match"], [1.0, 2.0])


def maybe_reward(prompts, completions, **_):
    """``None`` (cannot score) for a ``"?"`` completion, else 1.0: exercises ``combine``'s None rule."""
    return [None if c == "?" else 1.0 for c in completions]
