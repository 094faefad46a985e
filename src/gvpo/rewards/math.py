"""Math answer rewards: ``math`` (answer checked with math-verify) and ``format`` (answer present).

``math(prompts, completions, answer=golds)`` takes the final answer out of each completion with
:func:`extract_answer` (the last complete ``\\boxed{...}``, else a GSM8K ``#### N`` line, else the last
number), takes the gold final answer out of ``answer`` with :func:`gold_answer` (a bare answer, or a
whole GSM8K solution ending in ``#### N``, or a solution with ``\\boxed{}``), and scores 1.0 when
math-verify (``math_verify.parse`` + ``math_verify.verify``) says they are equal, else 0.0.
``None`` means "cannot score": a ``None`` completion or a missing gold.

Every check runs with a hard timeout in a pool of killable worker processes: see
:class:`~gvpo.rewards.verify.MathVerifier` (importable from here too) and :mod:`gvpo.rewards.verify`.
A check that times out or fails scores 0.0 and is logged on ``gvpo.rewards.math``.

The registered ``math`` reward uses a shared :class:`MathVerifier` built from the environment:
``GVPO_MATH_TIMEOUT`` (seconds, default 5) and ``GVPO_MATH_WORKERS`` (default ``min(4, cpus)``).
For other settings build your own with :func:`make_math_reward`.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from typing import Any

from .base import REWARDS, completion_text  # noqa: F401  (completion_text: also importable from here)
from .verify import MathVerifier

# ----------------------------------------------------------------------------------------------
# Answer extraction (pure string work, linear time: runs in the caller's process).
# ----------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASHES_RE = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
_COMMA_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _boxed_spans(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``), in order.

    Nested braces count; ``\\{`` and ``\\}`` are literal braces, not groups. An unclosed box
    (a truncated completion) is skipped.
    """
    out = []
    for m in _BOXED_RE.finditer(text):
        i = m.end()
        n = len(text)
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == "{":
            depth, j = 0, i
            while j < n:
                ch = text[j]
                if ch == "\\":
                    j += 2
                    continue
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        out.append(text[i + 1 : j])
                        break
                j += 1
        elif i > m.end():  # "\boxed 5": one token up to whitespace or "$"
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                out.append(token.group(0))
    return out


def last_boxed(text: str) -> str | None:
    """Contents of the last complete ``\\boxed{}`` in ``text``, nested braces handled.

    >>> last_boxed(r"so $x = \\boxed{\\frac{1}{\\sqrt{2}}}$ and not \\boxed{3")
    '\\\\frac{1}{\\\\sqrt{2}}'
    >>> last_boxed("no box") is None
    True
    """
    spans = _boxed_spans(text)
    return spans[-1] if spans else None


def normalize_answer(ans: str) -> str:
    """Light clean-up before math-verify: outer ``$``, ``\\$``, a trailing period, thousands commas.

    >>> normalize_answer(" $1,234$. ")
    '1234'
    >>> normalize_answer(r"\\$18")
    '18'
    >>> normalize_answer(r"\\left( 3, \\frac{\\pi}{2} \\right)")
    '\\\\left( 3, \\\\frac{\\\\pi}{2} \\\\right)'
    """
    s = ans.replace("\\$", "").strip()
    s = s.rstrip(".").strip().strip("$").strip().rstrip(".").strip()
    if _COMMA_NUMBER_RE.fullmatch(s):
        s = s.replace(",", "")
    return s


def extract_answer(text: Any) -> str | None:
    """The final answer of a completion, or ``None`` if it has none.

    Order: last complete ``\\boxed{...}``; else the text after the last ``####`` on its line; else
    the last number (``-3``, ``2.5``, ``1,234``). Chat completions (a list of ``{"role", "content"}``
    messages, TRL's conversational form) use the last message's content.

    >>> extract_answer(r"... so the answer is $\\boxed{\\frac{a}{b^{2}}}$.")
    '\\\\frac{a}{b^{2}}'
    >>> extract_answer("She pays 3 * 4 = 12 dollars.\\n#### 1,234")
    '1234'
    >>> extract_answer("I think it is 7, maybe -2.5.")
    '-2.5'
    >>> extract_answer("no idea") is None
    True
    """
    text = completion_text(text)
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return normalize_answer(boxed) or None
    hashes = _HASHES_RE.findall(text)
    if hashes and hashes[-1].strip():
        return normalize_answer(hashes[-1]) or None
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return normalize_answer(numbers[-1])
    return None


def gold_answer(gold: Any) -> str | None:
    """The gold final answer: after the last ``####`` (GSM8K solutions), else the last ``\\boxed{}``
    (MATH solutions), else the whole string; ``None`` when missing or empty.

    >>> gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n#### 72")
    '72'
    >>> gold_answer(r"\\frac{14}{3}")
    '\\\\frac{14}{3}'
    >>> gold_answer(25)
    '25'
    """
    if gold is None:
        return None
    s = str(gold)
    if "####" in s:
        s = s.rsplit("####", 1)[1].split("\n", 1)[0]
    else:
        boxed = last_boxed(s)
        if boxed is not None:
            s = boxed
    s = normalize_answer(s)
    return s or None


# ----------------------------------------------------------------------------------------------
# Rewards.
# ----------------------------------------------------------------------------------------------


def score_completions(verifier: MathVerifier, completions: Sequence[Any], answers: Sequence[Any]) -> list[float | None]:
    """The ``math`` reward's scores: extract both answers here, let ``verifier`` check the pairs.

    ``None`` for a ``None`` completion or a missing gold, 0.0 for a completion with no final answer
    (math-verify is not asked), else :meth:`MathVerifier.check` of (gold, extracted answer).

    >>> score_completions(MathVerifier(workers=0), ["#### 4", "no answer", None, "4"], ["4", "4", "4", None])
    [1.0, 0.0, None, None]
    """
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions for {len(answers)} gold answers")
    out: list[float | None] = [None] * len(completions)
    pairs, where = [], []
    for i, (c, a) in enumerate(zip(completions, answers)):
        gold = gold_answer(a)
        if c is None or gold is None:
            continue
        pred = extract_answer(c)
        if pred is None:
            out[i] = 0.0
            continue
        pairs.append((gold, pred))
        where.append(i)
    if pairs:
        for i, v in zip(where, verifier.check([g for g, _ in pairs], [p for _, p in pairs])):
            out[i] = v
    return out


_default: MathVerifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> MathVerifier:
    """The shared verifier behind the registered ``math`` reward (``GVPO_MATH_TIMEOUT``/``_WORKERS``)."""
    global _default
    with _default_lock:
        if _default is None:
            workers = os.environ.get("GVPO_MATH_WORKERS")
            _default = MathVerifier(
                timeout=float(os.environ.get("GVPO_MATH_TIMEOUT", "5")),
                workers=int(workers) if workers else None,
            )
        return _default


def make_math_reward(verifier: MathVerifier | None = None, **verifier_options):
    """A ``math`` reward bound to its own :class:`MathVerifier` (``verifier`` or one built from options)."""
    v = verifier if verifier is not None else MathVerifier(**verifier_options)

    def math_reward(prompts, completions, answer, **_) -> list[float | None]:
        """1.0 if the completion's final answer equals the gold ``answer`` (math-verify), else 0.0."""
        return score_completions(v, completions, answer)

    math_reward.verifier = v  # type: ignore[attr-defined]
    return math_reward


def math_reward(prompts, completions, answer, **_) -> list[float | None]:
    """1.0 if the completion's final answer equals the gold ``answer`` under math-verify, else 0.0.

    ``answer`` holds gold final answers (``"72"``, ``"\\frac{1}{2}"``) or whole GSM8K solutions
    ending in ``#### 72``. ``None`` for a ``None`` completion or gold. See the module docstring.

    >>> math_reward(["Q"] * 3, [r"so \\boxed{0.5}", "#### 1,000", None], answer=[r"\\frac{1}{2}", "... #### 1000", "3"])
    [1.0, 1.0, None]
    """
    return score_completions(default_verifier(), completions, answer)


def has_final_answer(text: Any) -> bool:
    """True when ``text`` holds a final answer in the expected form: a complete non-empty
    ``\\boxed{...}`` or a non-empty ``#### ...`` line.

    >>> has_final_answer(r"\\boxed{\\frac{1}{2}}"), has_final_answer("#### 5"), has_final_answer("5")
    (True, True, False)
    """
    text = completion_text(text)
    if not text:
        return False
    if any(s.strip() for s in _boxed_spans(text)):
        return True
    return any(h.strip() for h in _HASHES_RE.findall(text))


def format_reward(prompts, completions, **_) -> list[float | None]:
    """1.0 if the completion states a final answer as ``\\boxed{...}`` or ``#### ...``, else 0.0;
    ``None`` for a ``None`` completion.

    >>> format_reward(["Q", "Q", "Q"], [r"\\boxed{3}", "it is 3", None])
    [1.0, 0.0, None]
    """
    return [None if c is None else float(has_final_answer(c)) for c in completions]


REWARDS.register("math")(math_reward)
REWARDS.register("format")(format_reward)
