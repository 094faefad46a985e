"""The ``math`` and ``format`` rewards: extraction, math-verify agreement on the real data, timeouts.

The real-data tests check every GSM8K test solution (1319) and every MATH-500 solution (500) against
its own gold answer, and every gold answer against the *next* question's solution. They use a verifier
with no result cache, so each distinct (gold, answer) pair goes through math-verify; any disagreement
fails the test with the full list (nothing is skipped silently). Run with ``-s`` to see the counts.
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

import gvpo.rewards.verify as rv
from gvpo.data_paths import builtin_file, read_jsonl
from gvpo.rewards import combine, resolve
from gvpo.rewards.math import (
    MathVerifier,
    extract_answer,
    format_reward,
    gold_answer,
    last_boxed,
    make_math_reward,
    math_reward,
    score_completions,
)

PATHOLOGICAL = r"9^{9^{9^{9}}}"
"""sympy spends minutes inside one C call on this (holding the GIL): only a process kill stops it."""


@pytest.fixture(scope="module")
def fresh_reward():
    """A ``math`` reward with its own 2-worker pool and no cache: every distinct pair is verified."""
    reward = make_math_reward(timeout=20.0, workers=2, cache_size=0)
    yield reward
    reward.verifier.close()


@pytest.fixture(scope="module")
def gsm8k_test():
    return read_jsonl(builtin_file("gsm8k", "test"))


@pytest.fixture(scope="module")
def math500_test():
    return read_jsonl(builtin_file("math500", "test"))


# ------------------------------------------------------------------------------------------------
# Registry and extraction.
# ------------------------------------------------------------------------------------------------


def test_registered_under_their_names():
    assert resolve("math") is math_reward
    assert resolve("format") is format_reward
    assert combine(["math", "format"], [1.0, 0.5])(prompts=["Q"], completions=[r"\boxed{4}"], answer=["4"]) == [1.5]


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"$\boxed{\frac{\sqrt{2}}{2}}$", r"\frac{\sqrt{2}}{2}"),
        (r"\boxed{\left\{ 1, 2 \right\}}", r"\left\{ 1, 2 \right\}"),  # escaped braces are not groups
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"first \boxed{1}, then \boxed{{2}^{3}}.", r"{2}^{3}"),  # the last box wins
        (r"\boxed{7} and a cut-off \boxed{\frac{1}{", "7"),  # an unclosed box is skipped
        (r"\fbox{12}", "12"),
        (r"the answer is \boxed 5$.", "5"),
        (r"\boxed{1,234}", "1234"),
        (r"\boxed{\text{(C)}}", r"\text{(C)}"),
    ],
)
def test_boxed_extraction(text, expected):
    assert extract_answer(text) == expected


def test_boxed_beats_hashes_beats_last_number():
    assert extract_answer("3 apples\n#### 5\nso \\boxed{6} and 7") == "6"
    assert extract_answer("3 apples\n#### 5\nthen 7") == "5"
    assert extract_answer("3 apples then 7 pears.") == "7"
    assert extract_answer("it is x = -2.5.") == "-2.5"
    assert extract_answer("total 1,234,567 dollars") == "1234567"
    assert extract_answer("5-3") == "3"
    assert extract_answer("no digits here") is None
    assert extract_answer("#### ") is None and extract_answer("") is None and extract_answer(None) is None
    assert last_boxed(r"\boxed{") is None


def test_gsm8k_hashes_with_commas():
    assert extract_answer("so in total 1000 + 234 = 1,234\n#### 1,234") == "1234"
    assert extract_answer("#### $1,234.50") == "1234.50"
    for gold in ["1234", "1,234", "... so he has 1,234\n#### 1,234", "#### 1234"]:
        assert math_reward(["Q"], ["blah\n#### 1,234"], answer=[gold]) == [1.0], gold
    assert math_reward(["Q"], ["#### 1,235"], answer=["1,234"]) == [0.0]


def test_gold_answer_forms():
    assert gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gold_answer(r"so it is $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert gold_answer(r"\frac{14}{3}") == r"\frac{14}{3}"
    assert gold_answer(1000) == "1000"
    assert gold_answer(None) is None and gold_answer("") is None and gold_answer("  ") is None


def test_none_empty_and_chat_completions():
    prompts = ["Q"] * 7
    completions = [
        None,  # cannot score
        "",  # said nothing: wrong
        "I do not know",  # no answer: wrong
        r"\boxed{4}",
        r"\boxed{4}",  # gold missing: cannot score
        [{"role": "assistant", "content": r"it is \boxed{4}"}],  # TRL conversational completion
        [{"role": "assistant", "content": r"\boxed{5}"}],
    ]
    golds = ["4", "4", "4", "4", None, "4", "4"]
    assert math_reward(prompts, completions, answer=golds) == [None, 0.0, 0.0, 1.0, None, 1.0, 0.0]
    with pytest.raises(ValueError):
        math_reward(["Q"], ["1", "2"], answer=["1"])


def test_the_verifier_only_sees_extracted_gold_and_prediction():
    """Extraction is the reward's job (gvpo.rewards.math), checking is the verifier's: the verifier is
    handed the extracted (gold, prediction) strings, once per completion that has both, in order."""

    class Recorder:
        def __init__(self):
            self.calls = []

        def check(self, golds, preds):
            self.calls.append((list(golds), list(preds)))
            return [1.0 if g == p else 0.0 for g, p in zip(golds, preds)]

    rec = Recorder()
    completions = [r"so \boxed{\frac{1}{2}}.", "no answer", None, "#### 1,234", "it is 7", r"\boxed{3}"]
    golds = [r"\frac{1}{2}", "5", "5", "Natalia ... #### 1234", r"$\boxed{8}$", None]
    assert score_completions(rec, completions, golds) == [1.0, 0.0, None, 1.0, 0.0, None]
    assert rec.calls == [([r"\frac{1}{2}", "1234", "8"], [r"\frac{1}{2}", "1234", "7"])]
    assert score_completions(rec, [None, "x"], ["1", None]) == [None, None] and len(rec.calls) == 1  # nothing to check
    with pytest.raises(ValueError, match="2 completions for 1 gold answers"):
        score_completions(rec, ["1", "2"], ["1"])


def test_equivalent_forms_verify():
    cases = [
        (r"\frac{1}{2}", r"the answer is \boxed{0.5}", 1.0),
        (r"\frac{1}{2}", r"\boxed{\dfrac12}", 1.0),
        (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \pi/2)}", 1.0),
        ("025", r"\boxed{25}", 1.0),  # AIME-style leading zeros
        (r"2\sqrt{2}", r"\boxed{\sqrt{8}}", 1.0),
        (r"\frac{1}{2}", r"\boxed{0.51}", 0.0),
        (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \pi)}", 0.0),
    ]
    golds, comps, expected = zip(*cases)
    assert math_reward(["Q"] * len(cases), list(comps), answer=list(golds)) == list(expected)


def test_format_reward():
    comps = [r"so \boxed{3}", "work\n#### 3", "the answer is 3", r"\boxed{}", "#### ", r"\boxed{3", None, ""]
    assert format_reward(["Q"] * len(comps), comps) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, None, 0.0]


# ------------------------------------------------------------------------------------------------
# Real data: every gold solution scores 1.0 against its own answer, 0.0 against the next question's.
# ------------------------------------------------------------------------------------------------


def _gsm8k_value(solution: str) -> float:
    return float(solution.rsplit("####", 1)[1].strip().replace(",", ""))


def _same_latex_answer(a: str, b: str) -> bool:
    """Checker-independent "these two gold answers are the same": equal after dropping spaces,
    ``\\left``/``\\right``, ``\\dfrac``->``\\frac`` and a leading one-letter assignment (``x=5`` is 5)."""

    def norm(s: str) -> str:
        s = re.sub(r"\s+|\\left|\\right|\\!|\\,", "", s).replace("\\dfrac", "\\frac")
        return re.sub(r"^[A-Za-z]=", "", s)

    return norm(a) == norm(b)


def test_gsm8k_gold_solutions_all_verify(fresh_reward, gsm8k_test):
    completions = [row["answer"] for row in gsm8k_test]  # the whole solution, ending in "#### N"
    scores = fresh_reward(["Q"] * len(gsm8k_test), completions, answer=[row["answer"] for row in gsm8k_test])
    bad = [(i, gold_answer(row["answer"])) for i, (row, s) in enumerate(zip(gsm8k_test, scores)) if s != 1.0]
    print(f"\nGSM8K test: {len(scores) - len(bad)}/{len(scores)} gold solutions verify; disagreements: {bad}")
    assert len(scores) == 1319
    assert not bad, f"{len(bad)} GSM8K gold solutions do not verify: {bad}"


def test_math500_gold_solutions_all_verify(fresh_reward, math500_test):
    completions = [row["solution"] for row in math500_test]  # ends in \boxed{...}
    scores = fresh_reward(["Q"] * len(math500_test), completions, answer=[row["answer"] for row in math500_test])
    bad = [
        (row["unique_id"], extract_answer(row["solution"]), row["answer"])
        for row, s in zip(math500_test, scores)
        if s != 1.0
    ]
    print(f"\nMATH-500: {len(scores) - len(bad)}/{len(scores)} gold solutions verify; disagreements: {bad}")
    assert len(scores) == 500
    assert not bad, f"{len(bad)} MATH-500 solutions do not verify (id, boxed, answer): {bad}"


def test_gsm8k_wrong_question_scores_zero(fresh_reward, gsm8k_test):
    golds = [row["answer"] for row in gsm8k_test[:-1]]
    completions = [row["answer"] for row in gsm8k_test[1:]]  # question i's gold vs question i+1's solution
    scores = fresh_reward(["Q"] * len(golds), completions, answer=golds)
    equal = [i for i in range(len(golds)) if _gsm8k_value(golds[i]) == _gsm8k_value(completions[i])]
    false_pos = [
        (i, gold_answer(golds[i]), gold_answer(completions[i])) for i, s in enumerate(scores) if s and i not in equal
    ]
    print(
        f"\nGSM8K shifted: {len(golds)} pairs, {len(equal)} skipped (same answer), "
        f"{len(golds) - len(equal) - len(false_pos)}/{len(golds) - len(equal)} score 0.0; false positives: {false_pos}"
    )
    assert not false_pos, f"wrong answers scored 1.0: {false_pos}"
    assert all(scores[i] == 1.0 for i in equal), "pairs with the same answer must score 1.0"
    assert len(equal) < 50  # a sanity bound: most neighbours differ (15 in the shipped file)


def test_math500_wrong_question_scores_zero(fresh_reward, math500_test):
    golds = [row["answer"] for row in math500_test[:-1]]
    completions = [row["solution"] for row in math500_test[1:]]
    scores = fresh_reward(["Q"] * len(golds), completions, answer=golds)
    equal = [i for i in range(len(golds)) if _same_latex_answer(golds[i], math500_test[i + 1]["answer"])]
    false_pos = [(i, golds[i], extract_answer(completions[i])) for i, s in enumerate(scores) if s and i not in equal]
    print(
        f"\nMATH-500 shifted: {len(golds)} pairs, {len(equal)} skipped (same answer), "
        f"{len(golds) - len(equal) - len(false_pos)}/{len(golds) - len(equal)} score 0.0; false positives: {false_pos}"
    )
    assert not false_pos, f"wrong answers scored 1.0: {false_pos}"
    assert all(scores[i] == 1.0 for i in equal), "pairs with the same answer must score 1.0"
    assert len(equal) < 20  # 3 in the shipped file


def test_aime24_answers_verify(fresh_reward):
    rows = read_jsonl(builtin_file("aime24", "test"))
    completions = [rf"so the answer is $\boxed{{{int(r['answer'])}}}$" for r in rows]  # "025" -> \boxed{25}
    assert fresh_reward(["Q"] * len(rows), completions, answer=[r["answer"] for r in rows]) == [1.0] * 30
    wrong = [rf"\boxed{{{int(r['answer']) + 1}}}" for r in rows]
    assert fresh_reward(["Q"] * len(rows), wrong, answer=[r["answer"] for r in rows]) == [0.0] * 30


# ------------------------------------------------------------------------------------------------
# Timeouts: hard kill from any thread, in-worker alarm, in-process mode, caching, dead workers.
# ------------------------------------------------------------------------------------------------


def _warm(v: MathVerifier) -> None:
    """Start the workers (startup is not part of the per-check timeout) so timings measure checks."""
    assert v.check(["1"] * v.workers, ["1"] * v.workers) == [1.0] * v.workers


def test_hard_timeout_kills_a_stuck_worker_from_a_non_main_thread(caplog):
    v = MathVerifier(timeout=1.5, workers=1, worker_alarm=False)  # only the parent's kill can stop it
    try:
        _warm(v)
        out = {}

        def run():
            start = time.monotonic()
            out["scores"] = v.check(["1", "2"], [PATHOLOGICAL, "2"])
            out["elapsed"] = time.monotonic() - start

        with caplog.at_level("WARNING", logger="gvpo.rewards.math"):
            t = threading.Thread(target=run)
            t.start()
            t.join(60)
        assert not t.is_alive()
        assert out["scores"] == [0.0, 1.0]
        # 1.5 s for the stuck check, then a fresh worker must start (~1 s) for the second one
        assert out["elapsed"] < 1.5 + 8.0, out
        assert v.stats["timeouts"] == 1 and v.stats["worker_restarts"] == 1
        assert any("timed out" in r.getMessage() and PATHOLOGICAL in r.getMessage() for r in caplog.records)
        assert v.check(["3"], ["3"]) == [1.0]  # the replacement worker is healthy
    finally:
        v.close()


def test_timeout_through_the_reward_from_the_main_thread():
    reward = make_math_reward(timeout=1.5, workers=1)
    try:
        _warm(reward.verifier)
        start = time.monotonic()
        scores = reward(["Q"] * 3, [rf"\boxed{{{PATHOLOGICAL}}}"] * 3, answer=["1"] * 3)
        elapsed = time.monotonic() - start
        assert scores == [0.0, 0.0, 0.0]
        assert elapsed < 1.5 + 1.0, elapsed  # one check: the 3 identical pairs share it
        assert reward.verifier.stats["timeouts"] == 1
        assert reward(["Q"], [rf"\boxed{{{PATHOLOGICAL}}}"], answer=["1"]) == [0.0]  # cached
        assert reward.verifier.stats["timeouts"] == 1 and reward.verifier.stats["cache_hits"] == 1
    finally:
        reward.verifier.close()


def test_dead_worker_scores_zero_and_is_replaced():
    v = MathVerifier(timeout=60, workers=1, worker_alarm=False)
    try:
        _warm(v)
        pid = v._pool[0].proc.pid
        killer = threading.Timer(0.5, lambda: os.kill(pid, 9))
        killer.start()
        start = time.monotonic()
        assert v.check(["1"], [PATHOLOGICAL]) == [0.0]
        assert time.monotonic() - start < 10
        killer.join()
        assert v.stats["errors"] == 1 and v.stats["timeouts"] == 0
        assert v._pool[0].proc.pid != pid
        assert v.check(["2"], ["2"]) == [1.0]
    finally:
        v.close()


def test_in_process_mode_times_out_a_slow_verify_in_the_main_thread(monkeypatch):
    def slow(gold, pred):
        time.sleep(30)
        return True

    monkeypatch.setattr(rv, "_verify_pair", slow)
    v = MathVerifier(timeout=0.5, workers=0)
    start = time.monotonic()
    assert v.check(["1", "2"], ["1", "2"]) == [0.0, 0.0]
    assert time.monotonic() - start < 2.0
    assert v.stats["timeouts"] == 2


def test_in_process_mode_off_the_main_thread_warns_that_there_is_no_timeout(caplog):
    v = MathVerifier(timeout=0.5, workers=0)
    out = []
    with caplog.at_level("WARNING", logger="gvpo.rewards.math"):
        t = threading.Thread(target=lambda: out.append(v.check([r"\frac{1}{2}"], ["0.5"])))
        t.start()
        t.join(60)
    assert out == [[1.0]]
    assert any("NO timeout" in r.getMessage() for r in caplog.records)


def test_in_process_alarm_restores_an_outer_alarm():
    """pytest-timeout and others use SIGALRM too: an in-process check must put their timer back."""
    import signal

    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert MathVerifier(timeout=5, workers=0).check(["4"], ["4"]) == [1.0]
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 20.0 < remaining <= 30.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired


def test_concurrent_callers_share_one_pool():
    v = MathVerifier(timeout=20, workers=2)
    results, errors = {}, []

    def run(k):
        try:
            results[k] = v.check([str(k)] * 20, [str(k) if j % 2 else str(k + 1) for j in range(20)])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    try:
        threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert all(results[k] == [float(j % 2) for j in range(20)] for k in range(4))
    finally:
        v.close()
