"""The ``arithmetic`` task: add two numbers, scored by exact match. The demo's task.

Template (``PROMPT_TEMPLATE`` / ``COMPLETION_TEMPLATE``)::

    prompt      "Q: 12+34= A:"
    completion  " 46"            then EOS (a newline would end the answer just as well)

Rows are ``{"prompt": "Q: 12+34= A:", "answer": "46"}``; the ``exact_match`` reward compares the
completion's first line, stripped, with ``answer``.

Splits. The ``(max_operand + 1) ** 2`` ordered pairs ``(a, b)`` are shuffled once with the fixed
``SPLIT_SEED`` (never with ``seed``). The first ``HELD_OUT_POOL`` (1000) pairs of that order are the
held-out pool: ``test`` is its first ``num_test`` pairs, in that order. ``train`` is every pair outside
the pool (9000 of them by default), shuffled with ``seed``; ``num_train`` keeps the first rows of it.
Pool pairs past ``num_test`` are in neither split (``make_default_model.py`` picks its checkpoint on
them). So the splits are deterministic, disjoint for every option, and the test set does not depend
on ``seed`` or ``num_train``: the shipped model (:func:`default_model_path`), pre-trained on exactly the
default ``train`` pairs, has seen none of the pool, whatever ``num_test`` is.
"""

from __future__ import annotations

import random
from pathlib import Path

from .base import TASKS, Task

PROMPT_TEMPLATE = "Q: {a}+{b}= A:"
COMPLETION_TEMPLATE = " {answer}"
SPLIT_SEED = 1234
"""Seed of the one shuffle that fixes the held-out pool; independent of the task's ``seed``."""
HELD_OUT_POOL = 1000
"""Number of pairs reserved for held-out use; ``num_test`` can be at most this."""
DEFAULT_MAX_OPERAND = 99
MODEL_DIR = "arithmetic-llama"


def default_model_path() -> Path:
    """Folder of the tiny Llama shipped in the package, pre-trained on this task's default ``train``.

    A 1.08M-parameter ``LlamaForCausalLM`` with a character-level tokenizer; loads with plain
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``. Made by
    ``scripts/make_default_model.py`` from a deliberately careless corpus (70% of answers written
    without carrying), so it answers right greedily only where no carry is needed (~25-30% of the
    held-out set) while its temperature-1 samples are right ~45% of the time: room that online RL
    with ``exact_match`` closes in a few dozen steps. ``training_info.json`` there has its numbers.
    """
    return Path(__file__).resolve().parent.parent / "assets" / MODEL_DIR


def format_prompt(a: int, b: int) -> str:
    """``format_prompt(12, 34) == "Q: 12+34= A:"``."""
    return PROMPT_TEMPLATE.format(a=a, b=b)


def format_completion(answer: int | str) -> str:
    """The gold completion text (without EOS): ``format_completion(46) == " 46"``."""
    return COMPLETION_TEMPLATE.format(answer=answer)


def _row(a: int, b: int) -> dict:
    return {"prompt": format_prompt(a, b), "answer": str(a + b)}


def split_pairs(max_operand: int = DEFAULT_MAX_OPERAND) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(pool, rest)``: the held-out pool of ``HELD_OUT_POOL`` pairs and every other pair, both in the
    fixed ``SPLIT_SEED`` order. ``pool`` and ``rest`` are disjoint and cover all pairs.

    >>> pool, rest = split_pairs()
    >>> len(pool), len(rest), len(set(pool) & set(rest))
    (1000, 9000, 0)
    """
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    if len(pairs) < 2 * HELD_OUT_POOL:
        raise ValueError(
            f"max_operand={max_operand} gives {len(pairs)} pairs; need at least {2 * HELD_OUT_POOL} "
            f"(a held-out pool of {HELD_OUT_POOL} and as many for training)"
        )
    random.Random(SPLIT_SEED).shuffle(pairs)
    return pairs[:HELD_OUT_POOL], pairs[HELD_OUT_POOL:]


@TASKS.register("arithmetic")
def arithmetic(
    *,
    seed: int = 0,
    num_test: int = 200,
    num_train: int | None = None,
    max_operand: int = DEFAULT_MAX_OPERAND,
) -> Task:
    """Two-number addition ``a + b`` with ``0 <= a, b <= max_operand``; see the module docstring.

    ``seed`` shuffles the train rows only; ``num_test`` (<= 1000) held-out rows; ``num_train`` caps
    the train rows (``None``: all). The shipped model was pre-trained with the defaults.

    >>> task = arithmetic(num_test=3)
    >>> task.test[0]["prompt"].startswith("Q: "), len(task.test), len(task.train)
    (True, 3, 9000)
    >>> task.max_new_tokens  # " 198" + EOS
    5
    """
    if not 1 <= num_test <= HELD_OUT_POOL:
        raise ValueError(f"num_test must be between 1 and {HELD_OUT_POOL}, got {num_test}")
    if num_train is not None and num_train < 1:
        raise ValueError(f"num_train must be >= 1 or None, got {num_train}")
    pool, rest = split_pairs(max_operand)
    test = [_row(a, b) for a, b in pool[:num_test]]
    train_pairs = list(rest)
    random.Random(seed).shuffle(train_pairs)
    if num_train is not None:
        train_pairs = train_pairs[:num_train]
    train = [_row(a, b) for a, b in train_pairs]
    longest_answer = len(format_completion(2 * max_operand))
    return Task(
        name="arithmetic",
        train=train,
        test=test,
        rewards=("exact_match",),
        accuracy_reward="exact_match",
        max_new_tokens=longest_answer + 1,  # + EOS
        extra={
            "prompt_template": PROMPT_TEMPLATE,
            "completion_template": COMPLETION_TEMPLATE,
            "max_operand": max_operand,
            "split_seed": SPLIT_SEED,
            "held_out_pool": HELD_OUT_POOL,
            "default_model_path": str(default_model_path()),
        },
    )
