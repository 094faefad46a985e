"""The ``chat_arithmetic`` task: "What is 47 + 38?" as a chat message, scored on the number in the reply.

Made for real chat models (SmolLM2-135M-Instruct, ``gvpo model get smollm2-135m-instruct``), which answer
in free text: the ``number_match`` reward (:mod:`gvpo.rewards.numbers`) reads the answer out of replies such
as ``"47 + 38 = 85"``, ``"The answer is 85."`` or ``"**85**"``.

Rows are ``{"prompt": [...messages...], "question": "What is 47 + 38?", "answer": "85"}``. The prompt is a
chat: a ``{"role": "system"}`` message when ``system`` is given (otherwise the chat template's own default
system prompt applies), then ``shots`` worked examples as earlier turns (user: ``"What is 88 + 78?"``,
assistant: ``"88 + 78 = 166"``, written ``EXAMPLE_ANSWER``), then the question. The examples are fixed train-side
problems (the same in every prompt, never asked, independent of ``seed``); they show the format of a direct
answer. SmolLM2-135M-Instruct asked without one (``shots=0``) mostly explains at length ("To add 59 and 63,
we need to ...") and states a result after 30-50 tokens; with one it answers ``"21 + 46 = 69"`` (10 tokens).

Options (``task.options.*``, or ``--task-option`` of ``gvpo eval``):

- ``digits``: digits of each operand, 1 to 4 (default 2: 10..99); a list ``[2, 1]`` sets them apart
  (``a`` has 2 digits, ``b`` 1). One-digit operands range over 0..9.
- ``operation``: ``add`` (default), ``sub``, ``mul`` (or ``+``, ``-``, ``*``), or ``mixed`` (each problem
  picks one of the three).
- ``carries``: ``any`` (default), ``none`` (no column carries, or for ``sub`` borrows), ``some`` (at least
  one carry / borrow). Only ``any`` for ``mul``.
- ``negative``: for ``sub``, allow ``a < b`` (negative answers); default false (``a >= b``).
- ``template``: the question, with ``{a}``, ``{op}`` (``+``, ``-``, ``*``) and ``{b}``; default
  ``"What is {a} {op} {b}?"``.
- ``system``: a system message; ``None`` (default) = the chat template's own.
- ``shots``: worked examples before the question, 0 to 8 (default 1).
- ``num_test`` (default 200), ``num_train`` (default: all, at most ``TRAIN_CAP``), ``seed`` (shuffles the
  train rows only), ``max_new_tokens`` (default: :func:`default_max_new_tokens`, twice a direct answer's
  tokens, 22 for two-digit addition; give 64 or more with ``shots=0``, whose long replies state the result
  after 30-50 tokens).

Splits. Every problem ``(a, op, b)`` allowed by the options is held out or not by a fixed hash of the
problem (``HELD_OUT_SHARE`` of them), so train and test never share one whatever the options or
``seed``, and the test rows are the first ``num_test`` held-out problems in the fixed order of
``SPLIT_SEED``. Small problem sets (up to ``ENUMERATE_LIMIT`` operand pairs) are listed in full; larger
ones (3 or 4 digits) are drawn at random until enough distinct problems are found.
"""

from __future__ import annotations

import hashlib
import random
from typing import Iterator, Sequence

from ..config import ConfigError
from .base import TASKS, Task

DEFAULT_TEMPLATE = "What is {a} {op} {b}?"
EXAMPLE_ANSWER = "{a} {op} {b} = {answer}"
"""How a worked example (``shots``) answers its question."""
OPERATIONS = {"add": "+", "sub": "-", "mul": "*"}
SYMBOLS = {v: k for k, v in OPERATIONS.items()}
SPLIT_SEED = 1234
"""Seed of the fixed order the test rows are taken in (independent of ``seed``)."""
HELD_OUT_SHARE = 0.2
"""Share of problems reserved for held-out use, picked by a hash of the problem."""
ENUMERATE_LIMIT = 200_000
"""Operand pairs up to which every problem is listed; above, problems are drawn at random."""
TRAIN_CAP = 50_000
"""Most train rows built by default (``num_train`` may ask for more when the problem set has them)."""


def _operand_range(digits: int) -> range:
    if not 1 <= digits <= 4:
        raise ConfigError(f"task.options.digits: each operand has 1 to 4 digits, got {digits}")
    return range(10) if digits == 1 else range(10 ** (digits - 1), 10 ** digits)


def _columns(a: int, b: int) -> Iterator[tuple[int, int]]:
    """Digit pairs of ``a`` and ``b``, units first, zero-padded to the longer one."""
    while a or b:
        yield a % 10, b % 10
        a, b = a // 10, b // 10


def count_carries(a: int, op: str, b: int) -> int:
    """Column carries of ``a + b``, or borrows of ``a - b`` (``a >= b``; else of ``b - a``), done by hand.

    >>> count_carries(47, "add", 38), count_carries(41, "add", 38), count_carries(995, "add", 5)  # 7+8; none; 3
    (1, 0, 3)
    >>> count_carries(52, "sub", 38), count_carries(58, "sub", 32), count_carries(100, "sub", 1)  # 2-8; none; 2
    (1, 0, 2)
    """
    if op == "sub" and a < b:
        a, b = b, a
    count = carry = 0
    for x, y in _columns(a, b):
        carry = int(x + y + carry >= 10) if op == "add" else int(x - y - carry < 0)
        count += carry
    return count


def _hash(a: int, op: str, b: int) -> float:
    """A fixed number in [0, 1) per problem (SHA-256, so the same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(f"{a}{OPERATIONS[op]}{b}".encode()).digest()[:8], "big") / 2 ** 64


def is_held_out(a: int, op: str, b: int) -> bool:
    """Whether the problem belongs to the held-out share (fixed, whatever the task's options)."""
    return _hash(a, op, b) < HELD_OUT_SHARE


def answer(a: int, op: str, b: int) -> int:
    """The result of the problem.

    >>> answer(47, "add", 38), answer(38, "sub", 47), answer(12, "mul", 3)
    (85, -9, 36)
    """
    return a + b if op == "add" else a - b if op == "sub" else a * b


def _parse_operations(operation: str) -> tuple[str, ...]:
    op = SYMBOLS.get(str(operation), str(operation))
    if op == "mixed":
        return tuple(OPERATIONS)
    if op not in OPERATIONS:
        raise ConfigError(f"task.options.operation={operation!r}: expected add, sub, mul (or +, -, *) or mixed")
    return (op,)


def _parse_digits(digits: int | Sequence[int]) -> tuple[int, int]:
    pair = (digits, digits) if isinstance(digits, int) else tuple(digits)
    if len(pair) != 2 or not all(isinstance(d, int) for d in pair):
        raise ConfigError(f"task.options.digits={digits!r}: expected an integer or two, e.g. 2 or [2, 1]")
    return pair


class _Problems:
    """The problems ``(a, op, b)`` the options allow, as a predicate plus a way to list or draw them."""

    def __init__(self, digits: tuple[int, int], ops: tuple[str, ...], carry_rule: str, negative: bool):
        if carry_rule not in ("any", "none", "some"):
            raise ConfigError(f"task.options.carries={carry_rule!r}: expected any, none or some")
        if carry_rule != "any" and "mul" in ops:
            raise ConfigError(f"task.options.carries={carry_rule} applies to add and sub only; use carries=any "
                             "with operation mul or mixed")
        self.ranges = tuple(_operand_range(d) for d in digits)
        self.ops, self.carry_rule, self.negative = ops, carry_rule, negative

    def allowed(self, a: int, op: str, b: int) -> bool:
        if op == "sub" and a < b and not self.negative:
            return False
        if self.carry_rule == "any":
            return True
        return (count_carries(a, op, b) > 0) == (self.carry_rule == "some")

    def listed(self) -> list[tuple[int, str, int]] | None:
        """Every allowed problem in a fixed order, or ``None`` when there are too many to list."""
        if len(self.ranges[0]) * len(self.ranges[1]) > ENUMERATE_LIMIT:
            return None
        return [(a, op, b) for op in self.ops for a in self.ranges[0] for b in self.ranges[1] if self.allowed(a, op, b)]

    def drawn(self, rng: random.Random, count: int, held_out: bool) -> list:
        """``count`` distinct allowed problems on the ``held_out`` side, drawn at random (large sets only)."""
        out, seen = [], set()
        for _ in range(200 * count + 10_000):
            p = (rng.choice(self.ranges[0]), rng.choice(self.ops), rng.choice(self.ranges[1]))
            if p not in seen and self.allowed(*p) and is_held_out(*p) == held_out:
                seen.add(p)
                out.append(p)
                if len(out) == count:
                    break
        return out


def _question(a: int, op: str, b: int, template: str) -> str:
    return template.format(a=a, op=OPERATIONS[op], b=b)


def example_turns(examples: list[tuple[int, str, int]], template: str) -> list[dict]:
    """Worked examples as earlier chat turns: the question, then the answer written ``EXAMPLE_ANSWER``.

    >>> example_turns([(23, "add", 45)], DEFAULT_TEMPLATE)
    [{'role': 'user', 'content': 'What is 23 + 45?'}, {'role': 'assistant', 'content': '23 + 45 = 68'}]
    """
    turns = []
    for a, op, b in examples:
        turns += [{"role": "user", "content": _question(a, op, b, template)},
                  {"role": "assistant", "content": EXAMPLE_ANSWER.format(a=a, op=OPERATIONS[op], b=b,
                                                                        answer=answer(a, op, b))}]
    return turns


def _row(problem: tuple[int, str, int], template: str, head: list[dict]) -> dict:
    question = _question(*problem, template)
    return {"prompt": [*head, {"role": "user", "content": question}], "question": question,
            "answer": str(answer(*problem))}


def default_max_new_tokens(digits: tuple[int, int], ops: tuple[str, ...]) -> int:
    """Twice the tokens of the longest direct answer ``a op b = c`` (one token per digit, as SmolLM2's and most
    BPE tokenizers write numbers, and 4 for `` op `` and `` = ``), so a short sentence around it fits too.

    >>> default_max_new_tokens((2, 2), ("add",)), default_max_new_tokens((2, 2), ("add", "sub", "mul"))
    (22, 24)
    """
    longest = max(len(str(answer(10 ** digits[0] - 1, op, 10 ** digits[1] - 1))) for op in ops)
    return 2 * (digits[0] + digits[1] + longest + 4)


@TASKS.register("chat_arithmetic")
def chat_arithmetic(
    *,
    digits: int | Sequence[int] = 2,
    operation: str = "add",
    carries: str = "any",
    negative: bool = False,
    template: str = DEFAULT_TEMPLATE,
    system: str | None = None,
    shots: int = 1,
    num_test: int = 200,
    num_train: int | None = None,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> Task:
    """Arithmetic questions in chat form for chat models, scored by ``number_match``; see the module docstring.

    >>> task = chat_arithmetic(num_test=3, num_train=5)
    >>> [m["role"] for m in task.test[0]["prompt"]], len(task.test), len(task.train), task.rewards
    (['user', 'assistant', 'user'], 3, 5, ('number_match',))
    """
    if num_test < 1 or (num_train is not None and num_train < 1):
        raise ConfigError(f"task.options.num_test / num_train must be >= 1, got {num_test} / {num_train}")
    try:
        filled = template.format(a=1, op="+", b=2)
    except (KeyError, IndexError, ValueError):
        filled = ""
    if "1" not in filled or "2" not in filled:
        raise ConfigError(f"task.options.template={template!r}: expected a question with {{a}} and {{b}} (and "
                         "optionally {op}) and no other braces")
    if not 0 <= shots <= 8:
        raise ConfigError(f"task.options.shots={shots}: expected 0 to 8 worked examples")
    pair, ops = _parse_digits(digits), _parse_operations(operation)
    problems = _Problems(pair, ops, carries, negative)
    listed = problems.listed()
    if listed is not None:
        test = [p for p in listed if is_held_out(*p)]
        random.Random(SPLIT_SEED).shuffle(test)
        train = [p for p in listed if not is_held_out(*p)]
        examples = random.Random(SPLIT_SEED + 1).sample(train, min(shots, len(train)))
        train = [p for p in train if p not in examples]
        random.Random(seed).shuffle(train)
        train = train[: num_train or TRAIN_CAP]
    else:
        test = problems.drawn(random.Random(SPLIT_SEED), num_test, held_out=True)
        examples = problems.drawn(random.Random(SPLIT_SEED + 1), shots, held_out=False)
        train = [p for p in problems.drawn(random.Random(seed), (num_train or TRAIN_CAP) + shots, held_out=False)
                 if p not in examples][: num_train or TRAIN_CAP]
    if len(test) < num_test:
        raise ConfigError(f"task.options: these options allow only {len(test)} held-out problems; lower num_test "
                         f"(now {num_test}) or allow more problems (digits, operation, carries)")
    if num_train is not None and len(train) < num_train:
        raise ConfigError(f"task.options: these options allow only {len(train)} train problems; lower num_train "
                         f"(now {num_train})")
    if not train:
        raise ConfigError("task.options: these options allow no train problems; allow more (digits, operation, carries)")
    head = ([{"role": "system", "content": system}] if system is not None else []) + example_turns(examples, template)
    return Task(
        name="chat_arithmetic",
        train=[_row(p, template, head) for p in train],
        test=[_row(p, template, head) for p in test[:num_test]],
        rewards=("number_match",),
        accuracy_reward="number_match",
        max_new_tokens=max_new_tokens or default_max_new_tokens(pair, ops),
        extra={"digits": pair, "operation": operation, "carries": carries, "negative": negative, "template": template,
               "system": system, "examples": examples, "split_seed": SPLIT_SEED, "held_out_share": HELD_OUT_SHARE},
    )
