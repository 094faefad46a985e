"""Rewards are called exactly as TRL's GRPOTrainer calls them: keywords ``prompts``, ``completions``,
``completion_ids``, every dataset column, ``trainer_state`` (and TRL's ``log_extra`` / ``log_metric``).

TRL's own shipped rewards (``trl.rewards``) and functions in each style TRL documents (``trl_style``)
run unchanged, first on hand-worked inputs, then inside ``gvpo train`` on the embedded model with the
``dataset`` task, where every step's logged ``reward_mean`` is recomputed by calling the same
functions on the inputs the trainer passed (recorded by ``trl_style.record``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")

import trl_style  # noqa: E402
from gvpo.config import load_config  # noqa: E402
from gvpo.rewards import TrainerState, combine  # noqa: E402
from gvpo.run.metrics import read_metrics  # noqa: E402
from gvpo.tasks.arithmetic import default_model_path  # noqa: E402
from gvpo.trainer import train  # noqa: E402

CHAT = [{"role": "user", "content": "Q: 1+2= A:"}]


def test_keywords_reach_every_documented_style():
    """Hand-worked: completions " 3" (ids [5, 6]) and "12345" (ids [1, 2, 3, 4, 5]), totals 3 and 7, step 5."""
    call = dict(prompts=["Q: 1+2= A:", "Q: 3+4= A:"], completions=[" 3", "12345"], completion_ids=[[5, 6], [1, 2, 3, 4, 5]],
                trainer_state={"step": 5, "samples": 80}, total=["3", "7"])
    one = {name: combine([f"trl_style.{name}"])(**call) for name in
           ("reward_len", "reward_total", "step_scaled", "token_count", "async_digits", "only_even")}
    assert one["reward_len"] == [-1.0, -2.0]  # -|3 - 2|, -|3 - 5|
    assert one["reward_total"] == [1.0, 0.0]
    assert one["step_scaled"] == [5.0, 5.0]  # trainer_state.global_step
    assert one["token_count"] == [-2.0, -5.0]
    assert one["async_digits"] == [0.5, 1.0]  # " 3": 1 digit of 2 characters
    assert one["only_even"] == [None, None]  # both totals odd: the reward does not apply
    both = combine(["trl_style.reward_len", "trl_style.token_count"], [1.0, 0.5])(**call)
    assert both == [-1.0 - 1.0, -2.0 - 2.5]


def test_trl_shipped_rewards_on_conversational_completions():
    """Conversational prompts: completions arrive as ``[{"role": "assistant", "content": ...}]``.

    think_format: only the first has ``<think>..</think>`` -> [1, 0]. accuracy (math-verify, boxed):
    1/3 right, 1/2 wrong -> [1, 0]; reasoning_accuracy looks after ``</think>`` -> [1, 0].
    cosine (max_len 4): right with 2 tokens -> 0.5 + 0.25 * (1 + cos(pi/2)) = 0.75; wrong with 4
    tokens -> -0.5 + (-0.25) * (1 + cos(pi)) = -0.5. repetition (2-grams of [1, 1, 1, 9]: 2 unique of 3):
    -(1 - 2/3) = -1/3; [1, 2]: 0. soft overlong (max 4, cache 2): 2 tokens -> 0; 4 -> (4 - 2 - 4) / 2 = -1.
    """
    texts = [r"<think>easy</think> so \boxed{\frac{1}{3}}", r"it is \boxed{\frac{1}{2}}"]
    call = dict(prompts=[CHAT, CHAT], completions=texts, completion_ids=[[1, 2], [1, 1, 1, 9]],
                trainer_state=None, solution=[r"\frac{1}{3}", r"\frac{1}{3}"])
    got = {name: combine([f"trl_style.{name}"])(**call) for name in
           ("think_format_reward", "accuracy_reward", "reasoning_accuracy_reward", "cosine_scaled",
            "repetition_penalty", "soft_overlong", "format_reward_func")}
    assert got["think_format_reward"] == [1.0, 0.0]
    assert got["accuracy_reward"] == [1.0, 0.0]
    assert got["reasoning_accuracy_reward"] == [1.0, 0.0]
    assert got["cosine_scaled"] == pytest.approx([0.75, -0.5])
    assert got["repetition_penalty"] == pytest.approx([0.0, -1 / 3])
    assert got["soft_overlong"] == pytest.approx([0.0, -1.0])
    assert got["format_reward_func"] == [0.0, 0.0]


def test_log_hooks_and_functions_without_kwargs():
    f = combine(["trl_style.logs"])
    assert f(prompts=["a", "b"], completions=["1", "22"]) == [0.0, 0.0]
    assert f.logged == {"extra": {"length": [1, 2]}, "metrics": {"calls": [1.0]}}

    def named_only(completions, total):  # no **kwargs: TRL would raise; it gets what it names
        return [float(c == t) for c, t in zip(completions, total)]

    assert combine([named_only])(prompts=["p"], completions=["4"], total=["4"]) == [1.0]

    def needs_missing(completions, solution):
        return [0.0]

    with pytest.raises(TypeError, match=r"needs \['solution'\].*completion_ids, completions, log_extra"):
        combine([needs_missing])(prompts=["p"], completions=["4"])


def test_async_rewards_run_concurrently_under_one_timeout():
    async def slow(completions, **kwargs):
        await asyncio.sleep(0.6)
        return [1.0] * len(completions)

    start = time.perf_counter()
    assert combine([slow, slow, slow], timeout_s=5)(prompts=["p"], completions=["c"]) == [3.0]
    assert time.perf_counter() - start < 1.5  # together, not 3 x 0.6 s one after another

    async def hangs(completions, **kwargs):
        await asyncio.sleep(30)

    with pytest.raises(TimeoutError, match="hangs"):
        combine([slow, hangs], timeout_s=1)(prompts=["p"], completions=["c"])


def test_trainer_state_from_the_trainer_dict():
    state = TrainerState.of({"step": 7, "samples": 112, "elapsed_s": 3.0})
    assert (state.global_step, state.step, state.samples) == (7, 7, 112)


# ------------------------------------------------------------------------------------------------
# Inside gvpo train, on the embedded model.
# ------------------------------------------------------------------------------------------------


def _data(path: Path, chat: bool) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for a in range(10, 26):  # sums of both parities, so only_even scores some and drops others
            prompt = f"Q: {a}+{a % 5}= A:"
            f.write(json.dumps({"prompt": [{"role": "user", "content": prompt}] if chat else prompt,
                                "total": str(a + a % 5), "solution": str(a + a % 5)}) + "\n")
    return path


def _chat_model(tmp: Path) -> Path:
    """The embedded model with a chat template that renders the user's message as is."""
    from transformers import AutoTokenizer

    out = tmp / "chat-model"
    shutil.copytree(default_model_path(), out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    tok.save_pretrained(out)
    return out


def _train(tmp: Path, model: str, data: Path, rewards: list[str]) -> list[dict]:
    trl_style.CALLS.clear()
    config = load_config(None, {
        "model.name_or_path": model, "task.name": "dataset",
        "task.options": {"path": str(data), "rewards": rewards + ["trl_style.record"], "test_size": 2},
        "train.max_steps": 2, "train.prompts_per_step": 2, "rollout.k": 4, "rollout.max_new_tokens": 4,
        "train.eval_every": 0, "train.eval_n": 2, "train.checkpoint_every": 0, "output.dir": str(tmp),
        "output.name": "run", "output.progress": False, "output.report_to": [], "output.plots": False})
    run = train(config)
    return [r for r in read_metrics(run / "metrics.jsonl") if "reward_mean" in r]


def _check_steps(steps: list[dict], rewards: list[str], tokenizer, conversational: bool) -> None:
    """Recompute each step's mean reward from the recorded keyword arguments, calling every function
    directly as TRL's trainer does; completions with any ``None`` are dropped, as the trainer drops them."""
    assert len(trl_style.CALLS) == len(steps) == 2
    for step, (row, call) in enumerate(zip(steps, trl_style.CALLS)):
        assert call["trainer_state"].global_step == step and call["trainer_state"].samples == 8 * step
        assert set(call) >= {"prompts", "completions", "completion_ids", "trainer_state", "total", "solution",
                             "log_extra", "log_metric"}
        for completion, ids in zip(call["completions"], call["completion_ids"]):
            text = completion[0]["content"] if conversational else completion
            assert conversational == isinstance(completion, list) and (
                not conversational or completion[0]["role"] == "assistant")
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
        per_fn = [getattr(trl_style, name.split(".")[-1])(**call) for name in rewards]
        per_fn = [asyncio.run(v) if asyncio.iscoroutine(v) else v for v in per_fn]
        totals = [None if None in vs else sum(vs) for vs in zip(*per_fn)]
        kept = [t for t in totals if t is not None]
        assert row["reward_none"] == len(totals) - len(kept)
        assert row["reward_mean"] == pytest.approx(sum(kept) / len(kept), rel=1e-6, abs=1e-6)  # float32 batch


def test_documented_styles_in_a_train_run(tmp_path, one_thread):
    from transformers import AutoTokenizer

    rewards = ["trl_style.reward_len", "trl_style.reward_total", "trl_style.step_scaled", "trl_style.token_count",
               "trl_style.async_digits", "trl_style.only_even", "trl_style.logs", "trl_style.repetition_penalty",
               "trl_style.soft_overlong"]
    steps = _train(tmp_path, "default", _data(tmp_path / "adds.jsonl", chat=False), rewards)
    _check_steps(steps, rewards, AutoTokenizer.from_pretrained(default_model_path()), conversational=False)


def test_trl_shipped_rewards_in_a_conversational_train_run(tmp_path, one_thread):
    from transformers import AutoTokenizer

    rewards = ["trl_style.accuracy_reward", "trl_style.think_format_reward", "trl_style.reasoning_accuracy_reward",
               "trl_style.cosine_scaled", "trl_style.repetition_penalty", "trl_style.soft_overlong",
               "trl_style.format_reward_func", "trl_style.reward_total"]
    model = _chat_model(tmp_path)
    steps = _train(tmp_path, str(model), _data(tmp_path / "chat.jsonl", chat=True), rewards)
    _check_steps(steps, rewards, AutoTokenizer.from_pretrained(model), conversational=True)
    assert any(c[0]["content"].strip() == t for call in trl_style.CALLS
               for c, t in zip(call["completions"], call["total"]))  # the chat prompt reached the model as trained
