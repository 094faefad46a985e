"""The ``number_match`` reward: the number a chat reply gives as its answer, compared with the gold number.

A small chat model rarely answers with the bare number. SmolLM2-135M-Instruct, asked "What is 47 + 38?",
writes things like ``"47 + 38 = 85"``, ``"To add 47 and 38, we ... together: 47 + 38 = 85."`` or
``"The answer is 85."``, sometimes with Markdown bold (``"**85**"``), and decoded with special tokens a
reply ends in ``<|im_end|>``. :func:`final_number` reads the answer out of such text, in this order:

1. the text is cut at the first end-of-turn marker (``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>``,
   ``</s>``): what follows is not part of the reply;
2. the last ``\\boxed{N}``;
3. the last ``answer is N`` / ``answer: N`` / ``answer = N`` (any case, ``**`` and ``$`` around N allowed);
4. the last bold number ``**N**``;
5. the last ``= N`` (an equation's result);
6. the last number in the reply that is not an operand (next to ``+ - * / ^ × ÷`` or before ``=``): a reply
   cut off at ``"So, 60 - 30"`` states the question, not an answer.

Numbers may have a sign (``-``, or the Unicode minus ``−``; a hyphen between two numbers, ``47-38``, is not a
sign), thousands commas (``1,234``) and decimals (``85.0`` equals 85; a full stop after a number is not a
decimal point). Comparison is exact on decimals (:class:`decimal.Decimal`), so ``85.0`` matches ``"85"`` and
``85.5`` does not.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from .base import REWARDS, completion_text

_END_OF_TURN = re.compile(r"<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|<\|end\|>|</s>")
_NUM = r"(?<![\w.,])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])"
"""A number not glued to a word or to a digit before it (``x2``, ``1.5``'s ``5``, ``47-38``'s ``-38`` are not)."""
_NUMBER = re.compile(_NUM)
_BOXED = re.compile(r"\\boxed\{\s*\$?\s*(" + _NUM + r")\s*\$?\s*\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*[*$\s]*(" + _NUM + ")", re.IGNORECASE)
_BOLD = re.compile(r"\*\*\s*\$?(" + _NUM + r")\$?\s*\.?\*\*")
_EQUALS = re.compile(r"=\s*[*$]*\s*(" + _NUM + ")")
_OPERATORS = set("+-*/^\u00d7\u00f7\u2212")


def reply_text(completion: Any) -> str:
    """The reply as text, up to its first end-of-turn marker (chat messages: the last one's content).

    >>> reply_text("85<|im_end|><|im_end|>"), reply_text([{"role": "assistant", "content": "It is 3</s>4"}])
    ('85', 'It is 3')
    """
    return _END_OF_TURN.split(completion_text(completion) or "", maxsplit=1)[0]


def final_number(completion: Any) -> str | None:
    """The number the reply gives as its answer, normalised (no commas, ASCII minus); ``None`` if it has none.

    >>> final_number("To add 47 and 38, we add them together: 47 + 38 = 85.<|im_end|>")
    '85'
    >>> final_number("The answer is **85**. Check: 85 - 38 = 47")
    '85'
    >>> final_number("47-38 gives 9"), final_number("It is \u221212."), final_number("about 1,234.50 units")
    ('9', '-12', '1234.50')
    >>> final_number("I cannot compute that.") is None
    True
    """
    text = reply_text(completion)
    for pattern in (_BOXED, _ANSWER_IS, _BOLD, _EQUALS):
        found = pattern.findall(text)
        if found:
            return _normalise(found[-1])
    values = [m.group() for m in _NUMBER.finditer(text) if not _is_operand(text, m)]
    return _normalise(values[-1]) if values else None


def _is_operand(text: str, match: re.Match) -> bool:
    """Whether the number is an operand of an expression (``+ 30``, ``60 -``): stated, not given as a result."""
    before, after = text[: match.start()].rstrip(), text[match.end():].lstrip()
    return before[-1:] in _OPERATORS or after[:1] in _OPERATORS | {"="}


def _normalise(number: str) -> str:
    return number.replace(",", "").replace("\u2212", "-")


def same_number(predicted: str | None, gold: Any) -> bool:
    """Whether ``predicted`` (from :func:`final_number`) equals ``gold`` as exact decimals.

    >>> same_number("85.0", "85"), same_number("85.5", 85), same_number(None, "85"), same_number("85", "n/a")
    (True, False, False, False)
    """
    if predicted is None:
        return False
    try:
        return Decimal(predicted) == Decimal(str(gold).strip().replace(",", ""))
    except InvalidOperation:
        return False


@REWARDS.register("number_match")
def number_match(prompts, completions, answer, **_) -> list[float | None]:
    """1.0 when the number the reply gives as its answer (:func:`final_number`) equals ``answer``, else 0.0;
    ``None`` for a ``None`` completion or gold.

    >>> number_match(["Q"] * 4, ["47 + 38 = 85", "The answer is 84.", "**85**<|im_end|>", None], answer=["85"] * 4)
    [1.0, 0.0, 1.0, None]
    """
    return [None if c is None or a is None else float(same_number(final_number(c), a))
            for c, a in zip(completions, answer)]
