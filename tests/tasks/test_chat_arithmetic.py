"""The ``chat_arithmetic`` task: rows, options and splits, checked against references written here (the
question parsed back and computed with Python's operators, carries counted on the decimal strings)."""

from __future__ import annotations

import operator
import re

import pytest

from gvpo.config import ConfigError
from gvpo.rewards import combine
from gvpo.tasks import get_task
from gvpo.tasks.chat_arithmetic import HELD_OUT_SHARE, is_held_out

QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
NAMES = {"+": "add", "-": "sub", "*": "mul"}


def parse(row) -> tuple[int, str, int]:
    a, op, b = QUESTION.fullmatch(row["question"]).groups()
    return int(a), op, int(b)


def column_carries(a: int, op: str, b: int) -> int:
    """Carries (``+``) or borrows (``-``, larger minus smaller) counted on zero-padded decimal strings."""
    if op == "-" and a < b:
        a, b = b, a
    width = max(len(str(a)), len(str(b)))
    xs, ys = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    count, carry = 0, 0
    for x, y in zip(xs, ys):
        if op == "+":
            carry = 1 if int(x) + int(y) + carry > 9 else 0
        else:
            carry = 1 if int(x) - carry < int(y) else 0
        count += carry
    return count


def test_rows_are_chat_messages_with_the_right_answer():
    task = get_task("chat_arithmetic", operation="mixed", num_test=200, num_train=300, shots=0)
    for row in task.train + task.test:
        a, op, b = parse(row)
        assert row["prompt"] == [{"role": "user", "content": row["question"]}]
        assert row["answer"] == str(OPS[op](a, b))
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert op != "-" or a >= b  # no negative answers by default
    assert {parse(r)[1] for r in task.test} == {"+", "-", "*"}
    assert task.rewards == ("number_match",) and task.accuracy_reward == "number_match"


def test_splits_are_disjoint_fixed_and_the_test_set_does_not_depend_on_seed_or_num_train():
    a = get_task("chat_arithmetic", seed=0)
    b = get_task("chat_arithmetic", seed=1, num_train=100)
    assert [r["question"] for r in a.test] == [r["question"] for r in b.test]
    assert len(a.test) == 200 and len(b.train) == 100
    assert {r["question"] for r in a.train}.isdisjoint(r["question"] for r in a.test)
    assert [r["question"] for r in a.train] != [r["question"] for r in get_task("chat_arithmetic", seed=1).train]
    pairs = [(x, "add", y) for x in range(10, 100) for y in range(10, 100)]
    example = _named(parse({"question": a.test[0]["prompt"][0]["content"]}))
    assert {_named(parse(r)) for r in a.train} == {p for p in pairs if not is_held_out(*p)} - {example}  # the rest
    assert all(is_held_out(*_named(parse(r))) for r in a.test)
    assert abs(len(a.train) / len(pairs) - (1 - HELD_OUT_SHARE)) < 0.03  # the hash holds out about that share


def _named(problem):
    a, op, b = problem
    return a, NAMES[op], b


@pytest.mark.parametrize("operation", ["add", "sub"])
def test_carry_options_match_carries_counted_by_hand(operation):
    none = get_task("chat_arithmetic", operation=operation, carries="none", shots=0)
    some = get_task("chat_arithmetic", operation=operation, carries="some", shots=0)
    any_ = get_task("chat_arithmetic", operation=operation, shots=0)
    assert all(column_carries(*parse(r)) == 0 for r in none.train + none.test)
    assert all(column_carries(*parse(r)) > 0 for r in some.train + some.test)
    # none and some split the train problems of any; their test problems stay out of every train set
    assert {r["question"] for r in none.train} | {r["question"] for r in some.train} == \
        {r["question"] for r in any_.train}
    assert {r["question"] for r in none.train}.isdisjoint(r["question"] for r in some.train)
    assert {r["question"] for r in none.test + some.test}.isdisjoint(r["question"] for r in any_.train)


@pytest.mark.parametrize("shots", [1, 3])
def test_worked_examples_are_earlier_turns_with_right_answers_and_never_asked(shots):
    task = get_task("chat_arithmetic", shots=shots)
    head = task.test[0]["prompt"][:-1]
    assert [m["role"] for m in head] == ["user", "assistant"] * shots
    for question, reply in zip(head[::2], head[1::2]):
        a, op, b = parse({"question": question["content"]})
        assert reply["content"] == f"{a} {op} {b} = {OPS[op](a, b)}"
        assert not is_held_out(a, NAMES[op], b)  # a train-side problem, so no test answer is shown
    asked = {r["question"] for r in task.train + task.test}
    assert asked.isdisjoint(m["content"] for m in head[::2])
    assert all(r["prompt"][:-1] == head for r in task.train + task.test)  # the same examples in every prompt
    assert get_task("chat_arithmetic", shots=shots, seed=3).test[0]["prompt"][:-1] == head  # not seed-dependent


def test_the_default_budget_fits_twice_the_direct_answer():
    assert get_task("chat_arithmetic").max_new_tokens == 2 * len("21+46=69") + 2 * 3  # digits + 4 for " + ", " = "
    assert get_task("chat_arithmetic", max_new_tokens=64).max_new_tokens == 64


def test_digits_negative_template_and_system_options():
    task = get_task("chat_arithmetic", digits=[3, 1], operation="-", negative=True, num_train=2000,
                    template="Compute {a} {op} {b}.", system="You are a calculator.")
    for row in task.test + task.train:
        a, op, b = map(str.strip, re.fullmatch(r"Compute (\d+) (.) (\d+)\.", row["question"]).groups())
        assert len(a) == 3 and len(b) == 1 and row["answer"] == str(int(a) - int(b))
        assert row["prompt"][0] == {"role": "system", "content": "You are a calculator."}
        assert row["prompt"][1]["content"].startswith("Compute ")  # the example asked with the same template
    neg = get_task("chat_arithmetic", digits=1, operation="sub", negative=True, num_test=10)
    assert any(int(r["answer"]) < 0 for r in neg.train + neg.test)


@pytest.mark.parametrize("digits", [3, 4])
def test_large_problem_sets_are_drawn_distinct_and_split_by_the_same_hash(digits):
    task = get_task("chat_arithmetic", digits=digits, num_train=3000)
    train = [parse(r) for r in task.train]
    test = [parse(r) for r in task.test]
    assert len(set(train)) == 3000 and len(set(test)) == 200
    assert all(len(str(x)) == digits for a, _, b in train + test for x in (a, b))
    assert not any(is_held_out(*_named(p)) for p in train) and all(is_held_out(*_named(p)) for p in test)
    assert test == [parse(r) for r in get_task("chat_arithmetic", digits=digits, seed=5, num_train=10).test]


def test_the_task_reward_scores_chat_replies():
    task = get_task("chat_arithmetic", num_test=2)
    reward = combine(task.rewards)
    rows = task.test
    replies = [f"{parse(rows[0])[0]} + {parse(rows[0])[2]} = {rows[0]['answer']}", "I don't know."]
    assert reward(prompts=[r["prompt"] for r in rows], completions=replies,
                  answer=[r["answer"] for r in rows]) == [1.0, 0.0]


@pytest.mark.parametrize("options, named", [
    ({"digits": 5}, "task.options.digits"), ({"digits": [2]}, "task.options.digits"),
    ({"operation": "div"}, "task.options.operation"), ({"carries": "lots"}, "task.options.carries"),
    ({"operation": "mul", "carries": "none"}, "task.options.carries"),
    ({"template": "What is {x}?"}, "task.options.template"),
    ({"digits": 1, "carries": "none"}, "held-out problems"), ({"num_test": 0}, "num_test"),
    ({"shots": 9}, "task.options.shots"),
    ({"dgits": 2}, "task.options for task 'chat_arithmetic'"),
])
def test_bad_options_are_config_errors_naming_the_option(options, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        get_task("chat_arithmetic", **options)
