"""The ``number_match`` reward: the answer read out of free-text chat replies. The replies are hand-written,
and the ones under "observed" are SmolLM2-135M-Instruct's own greedy replies to ``chat_arithmetic`` prompts
(``gvpo eval --items``, and ``generate`` decoded with its special tokens), copied with runs of ``<|im_end|>``
shortened."""

from __future__ import annotations

import pytest

from gvpo.rewards import REWARDS, combine
from gvpo.rewards.numbers import final_number, number_match, same_number

CASES = [
    # (reply, the number it gives as its answer)
    ("81", "81"),
    ("23 + 58 = 81", "81"),
    ("The answer is 81.", "81"),
    ("The answer is: **81**", "81"),
    ("**81**", "81"),
    ("81<|im_end|>", "81"),
    ("23 + 58 = 81<|im_end|><|im_end|><|im_end|>", "81"),
    ("23 + 58 = 81<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|> 4", "81"),  # after the turn: not the reply
    ("Sure! \\boxed{81}", "81"),
    ("The answer is 81. Check: 81 - 58 = 23", "81"),  # an explicit answer beats a later equation
    ("First 20 + 50 = 70, then 3 + 8 = 11, so 23 + 58 = 81.", "81"),  # the last equation
    ("It is 1,234.", "1234"),
    ("The result is \u221212.", "-12"),  # Unicode minus
    ("47-38 gives 9", "9"),  # a hyphen between numbers is no sign
    ("about 85.0", "85.0"),
    ("So, 60 - 30", None),  # cut off while restating the question: operands are not answers
    ("I cannot compute that.", None),
    ("", None),
    # observed
    ("To add 21 and 46, we need to follow the order of operations: 21 + 46 = 102.", "102"),
    ("To add 64 and 98, we need to perform the usual addition operation, which is 18. So, 64 + 98 = 18*18 = 254.",
     "254"),
    ("14 + 56 = 78\n\nThis is a classic example of a mathematical identity that has been used in various contexts "
     "throughout history. It's a reminder of the beauty and simplicity of arithmetic.", "78"),
    ("To add 71 and 55, we need to combine the numbers in a way that results in a single number with the opposite "
     "of the original operation. In this case, we can simply add the numbers together: 71 + 55 = 126."
     "<|im_end|><|im_end|><|im_end|>", "126"),
    ("To calculate 22 - 89, you simply subtract 22 from 89, which gives you 22.<|im_end|><|im_end|>", "22"),
    ("To calculate 3 * 97, you simply multiply 3 by 97.<|im_end|><|im_end|>", "97"),
    ("To add 91 and 91, we need to find a common multiple of 91 and 91, which is 92. This is achieved by "
     "multiplying 91 by 92, which is 8192.\n\nSo, 91 + 91", "8192"),  # cut off at max_new_tokens
    ("To add 55 and 54, you simply add them together: 55 + 54 = 22.", "22"),
]


@pytest.mark.parametrize("reply, expected", CASES)
def test_final_number(reply, expected):
    assert final_number(reply) == expected


def test_conversational_completions_use_the_assistant_content():
    assert final_number([{"role": "assistant", "content": "The answer is 81."}]) == "81"


@pytest.mark.parametrize("predicted, gold, equal", [
    ("81", "81", True), ("81.0", "81", True), ("81.5", "81", False), ("-12", "-12", True), ("12", "-12", False),
    ("1234", "1,234", True), ("81", 81, True), (None, "81", False), ("81", "eighty-one", False),
])
def test_same_number_compares_exact_decimals(predicted, gold, equal):
    assert same_number(predicted, gold) is equal


def test_the_reward_is_registered_and_called_as_trl_calls_it():
    assert REWARDS.resolve("number_match") is number_match
    prompts = [[{"role": "user", "content": "What is 23 + 58?"}]] * 4
    replies = ["23 + 58 = 81", "The answer is 80.", "**81**", None]
    assert number_match(prompts, replies, answer=["81"] * 4) == [1.0, 0.0, 1.0, None]
    assert combine(["number_match"])(prompts=prompts, completions=replies[:3], answer=["81"] * 3) == [1.0, 0.0, 1.0]
