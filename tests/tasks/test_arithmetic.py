"""The ``arithmetic`` task and the tiny Llama shipped for it (``gvpo/assets/arithmetic-llama``)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from gvpo.rewards import resolve
from gvpo.rewards.basic import exact_match
from gvpo.tasks import TASKS, Task, get_task
from gvpo.tasks.arithmetic import HELD_OUT_POOL, default_model_path, format_completion, format_prompt, split_pairs

PROMPT_RE = re.compile(r"^Q: (\d+)\+(\d+)= A:$")


def test_registered_and_shaped():
    assert "arithmetic" in TASKS
    task = get_task("arithmetic")
    assert isinstance(task, Task) and task.name == "arithmetic"
    assert task.rewards == ("exact_match",)
    assert len(task.test) == 200 and len(task.train) == 9000
    for row in task.train[:50] + task.test:
        a, b = map(int, PROMPT_RE.match(row["prompt"]).groups())
        assert row["answer"] == str(a + b)
    assert format_prompt(12, 34) == "Q: 12+34= A:" and format_completion(46) == " 46"


def test_splits_disjoint_and_deterministic():
    a, b = get_task("arithmetic"), get_task("arithmetic")
    assert a.train == b.train and a.test == b.test
    assert not {r["prompt"] for r in a.train} & {r["prompt"] for r in a.test}
    # `seed` reorders train only; the test set never moves, so the shipped model never saw it.
    c = get_task("arithmetic", seed=1)
    assert c.test == a.test and c.train != a.train
    assert sorted(r["prompt"] for r in c.train) == sorted(r["prompt"] for r in a.train)
    # A larger test set extends the default one and is still disjoint from train.
    big = get_task("arithmetic", num_test=HELD_OUT_POOL)
    assert big.test[:200] == a.test
    assert not {r["prompt"] for r in big.test} & {r["prompt"] for r in a.train}
    assert len(get_task("arithmetic", num_train=10).train) == 10
    pool, rest = split_pairs()
    assert len(set(pool)) == len(pool) and not set(pool) & set(rest)
    with pytest.raises(ValueError, match="num_test"):
        get_task("arithmetic", num_test=HELD_OUT_POOL + 1)


def test_exact_match_scores_gold_and_wrong():
    task = get_task("arithmetic", num_test=5)
    answers = [r["answer"] for r in task.test]
    prompts = [r["prompt"] for r in task.test]
    gold = [format_completion(a) for a in answers]
    assert exact_match(prompts, gold, answer=answers) == [1.0] * 5
    assert exact_match(prompts, [g + "\nQ: 1+1= A: 2" for g in gold], answer=answers) == [1.0] * 5
    wrong = [format_completion(int(a) + 1) for a in answers]
    assert exact_match(prompts, wrong, answer=answers) == [0.0] * 5
    assert resolve(task.rewards[0]) is exact_match


# ---------------------------------------------------------------- the shipped model


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tokenizer


def test_asset_folder_small():
    path = default_model_path()
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(files)
    assert sum(files.values()) <= 20 * 1024 * 1024


def test_loads_with_auto_classes(shipped):
    model, tokenizer = shipped
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert tokenizer.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id
    assert tokenizer.pad_token_id == model.config.pad_token_id == model.generation_config.pad_token_id
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token_id == model.config.bos_token_id
    assert len(tokenizer) <= model.config.vocab_size


def test_tokenizer_round_trip(shipped):
    _, tokenizer = shipped
    texts = ["Q: 12+34= A:", " 46", "Q: 7+0= A: 7\n", "  two  spaces, punctuation!? ~{}[]"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tokenizer.decode(ids) == text
        with_bos = tokenizer(text)["input_ids"]
        assert with_bos[0] == tokenizer.bos_token_id and with_bos[1:] == ids
        assert tokenizer.decode(with_bos, skip_special_tokens=True) == text
    # prompt + completion tokenise as the concatenation (no merges across the boundary)
    assert tokenizer("Q: 1+2= A: 3", add_special_tokens=False)["input_ids"] == (
        tokenizer("Q: 1+2= A:", add_special_tokens=False)["input_ids"]
        + tokenizer(" 3", add_special_tokens=False)["input_ids"]
    )


def test_max_new_tokens_fits_longest_answer(shipped):
    _, tokenizer = shipped
    task = get_task("arithmetic")
    longest = max(len(tokenizer(format_completion(r["answer"]), add_special_tokens=False)["input_ids"])
                  for r in task.train + task.test)
    assert task.max_new_tokens == longest + 1  # + EOS


def test_held_out_greedy_accuracy_leaves_room(shipped):
    """Greedy ``model.generate`` (batched, left padding) on the held-out prompts: 10%..60% right."""
    model, tokenizer = shipped
    task = get_task("arithmetic")
    tokenizer.padding_side = "left"
    batch = tokenizer([r["prompt"] for r in task.test], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=task.max_new_tokens)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    accuracy = sum(exact_match(None, completions, answer=[r["answer"] for r in task.test])) / len(task.test)
    assert 0.10 <= accuracy <= 0.60, accuracy
    info = json.loads((default_model_path() / "training_info.json").read_text())
    assert accuracy == pytest.approx(info["test_with_generate"]["greedy"], abs=0.02)
