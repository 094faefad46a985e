"""The ``arithmetic_tool`` task: the arithmetic task asked in chat, with a calculator the model may call.

Rows are ``{"prompt": [{"role": "user", "content": "What is 12+34?"}], "answer": "46"}`` over the arithmetic
task's splits (:func:`gvpo.tasks.arithmetic.split_pairs`: the same held-out pool). Train it as multi-turn
episodes with the environment :class:`Calculator` (``task.environment=gvpo.tasks.calculator.Calculator``): its
``add`` tool is what the model can call; ``exact_match`` scores the episode's final message.
``bench/episodes_calculator.py`` pre-trains a small model that sometimes calls the tool and otherwise answers
carelessly, and measures the reward rising as GVPO teaches it to call the tool (bench/README.md).
"""

from __future__ import annotations

import re

from .arithmetic import DEFAULT_MAX_OPERAND, arithmetic
from .base import TASKS, Task

QUESTION = "What is {a}+{b}?"


class Calculator:
    """An environment in TRL's conventions: one instance per episode, ``add`` is its tool."""

    def reset(self, **row) -> None:
        """Nothing to set up; the prompt is the row's."""
        return None

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first number.
            b: The second number.
        """
        return int(a) + int(b)


def chat_row(row: dict) -> dict:
    """An arithmetic row asked in chat.

    >>> chat_row({"prompt": "Q: 12+34= A:", "answer": "46"})["prompt"]
    [{'role': 'user', 'content': 'What is 12+34?'}]
    """
    a, b = re.match(r"Q: (\d+)\+(\d+)= A:", row["prompt"]).groups()
    return {"prompt": [{"role": "user", "content": QUESTION.format(a=a, b=b)}], "answer": row["answer"]}


@TASKS.register("arithmetic_tool")
def arithmetic_tool(*, seed: int = 0, num_test: int = 200, num_train: int | None = None,
                    max_operand: int = DEFAULT_MAX_OPERAND) -> Task:
    """The arithmetic task's rows as chat questions, for episodes with :class:`Calculator`; options as
    :func:`gvpo.tasks.arithmetic.arithmetic`. The budget (64 tokens) holds a tool call, its result and the answer.

    >>> task = arithmetic_tool(num_test=2, num_train=3)
    >>> len(task.train), task.test[0]["prompt"][0]["content"].startswith("What is ")
    (3, True)
    """
    base = arithmetic(seed=seed, num_test=num_test, num_train=num_train, max_operand=max_operand)
    return Task(name="arithmetic_tool", train=[chat_row(r) for r in base.train], test=[chat_row(r) for r in base.test],
                rewards=("exact_match",), accuracy_reward="exact_match", max_new_tokens=64,
                extra={"environment": "gvpo.tasks.calculator.Calculator"})
