"""Offline GVPO on slices of the real rated files in tests/data (issue 4), end to end.

Each test builds a byte-level BPE tokenizer and a tiny random-init Llama from the slice with
``gvpo.offline_model`` (in tmp, no download), trains through ``gvpo.trainer.train`` with
``sampler.source: offline`` and the file's preset, and scores every training group with the final
policy against the initial one (the fixed reference). GVPO's loss (Eq. 16) is an MSE between
centred implicit rewards ``beta * log(pi/pi_ref)`` and centred actual rewards (Eq. 13), so on the
groups it trains on the loss should fall towards 0 and the within-group correlation towards 1.

Slices (chosen for CPU time, not for how well they fit):

* rm8: the 8 prompts whose longest response is shortest among those whose 8 responses are all
  distinct. 34 of the 100 rm8 groups repeat a response verbatim, mostly with slightly different RM
  scores; identical texts get identical implicit rewards, which caps the correlation of such a group
  below 1 (0.68 for the worst), so they would test the data rather than the method.
  ``bench/offline_real.py`` runs the whole file and reports that ceiling.
* gsm8k_model_solutions: the file's first 12 questions (8 with mixed correctness, 4 all-wrong).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import gvpo.offline_model as bom
from gvpo.config import load_config
from gvpo.run.metrics import read_metrics
from gvpo.trainer import train

import tiny

REPO = Path(__file__).resolve().parent.parent
RM8_SLICE = [0, 3, 4, 12, 15, 42, 57, 65]
"""rm8 line indices (0-based): the shortest groups with 8 distinct responses (see the module doc)."""
GSM8K_SLICE = list(range(12))
STEPS_RM8 = 40
STEPS_GSM8K = 45


build_script = tiny.load_script("scripts/build_offline_model.py")  # its command line, tested below


def data_file(*parts: str) -> Path:
    """A file of the rated test data in ``tests/data`` (see each folder's SOURCE.md)."""
    return REPO / "tests" / "data" / Path(*parts)


def train_on_slice(tmp: Path, data: Path, preset: str, select: list[int], *, max_new_tokens: int, steps: int,
                   prompts_per_step: int, beta: float = 0.1, lr: float = 3e-4) -> tuple[dict, list[dict], list]:
    train_path, _ = bom.split_offline_file(data, tmp / "data", held_out=0, select=select)
    groups = bom.load_groups(train_path, preset)
    model = tmp / "model"
    bom.build_offline_model(train_path, model, preset=preset, vocab_size=1024, hidden=32, layers=2, heads=4,
                            max_positions=1024, groups=groups)
    config = load_config(None, {
        "model.name_or_path": str(model), "task.name": "arithmetic", "task.options": {"num_test": 2},
        "sampler.source": "offline", "sampler.offline_path": str(train_path), "sampler.offline_preset": preset,
        "rollout.max_new_tokens": max_new_tokens, "objective.beta": beta, "optim.lr": lr,
        "optim.scheduler": "cosine", "optim.warmup_steps": 5, "train.max_steps": steps,
        "train.prompts_per_step": prompts_per_step, "train.eval_every": 0, "train.eval_n": 2,
        "train.checkpoint_every": 0, "output.dir": str(tmp), "output.name": "run", "output.progress": False,
        "output.report_to": [], "output.plots": False})
    run = train(config)
    rows = read_metrics(run / "metrics.jsonl")
    from transformers import AutoTokenizer

    scored = bom.load_groups(train_path, preset, AutoTokenizer.from_pretrained(model), max_new_tokens)
    assert len(scored) == len(select)
    result = bom.implicit_reward_correlation(run / "final", model, scored, beta)
    print(preset, {k: v for k, v in result.items() if k not in ("group_corrs", "reward_std")})
    return result, rows, scored


def test_rm8_slice_implicit_rewards_match_reward_model_scores(tmp_path, one_thread):
    data = data_file("qwen25_math_rm8", "math_cot_100.jsonl")
    result, rows, groups = train_on_slice(tmp_path, data, "qwen25_math_rm8", RM8_SLICE, max_new_tokens=384,
                                          steps=STEPS_RM8, prompts_per_step=2)
    assert all(len(set(g.completions)) == g.k == 8 for g in groups)  # nothing over 384 tokens was skipped
    assert bom.attainable_correlation(groups)["corr"] == pytest.approx(1.0)
    steps = [r for r in rows if "loss" in r]
    assert all(r["samples"] == 0 and r["source/offline"] == 1.0 for r in steps)  # nothing generated
    assert result["groups_scored"] == 8  # RM scores vary in every group
    assert result["loss"] < 0.1 * result["loss_at_reference"], result
    assert result["corr"] >= 0.9, result


def test_gsm8k_solutions_slice_implicit_rewards_match_correctness(tmp_path, one_thread):
    data = data_file("gsm8k_model_solutions", "example_model_solutions.head300.jsonl")
    result, rows, groups = train_on_slice(tmp_path, data, "gsm8k_model_solutions", GSM8K_SLICE,
                                          max_new_tokens=256, steps=STEPS_GSM8K, prompts_per_step=4)
    assert all(set(g.rewards) <= {0.0, 1.0} for g in groups)
    # on_too_long=skip: one 393-token solution (question 6, all four wrong) is over the limit and dropped
    assert sorted(g.k for g in groups) == [3] + [4] * 11
    assert result["groups_scored"] == sum(len(set(g.rewards)) > 1 for g in groups) == 8
    assert all(r["samples"] == 0 for r in rows)
    assert result["loss"] < 0.1 * result["loss_at_reference"], result
    assert result["corr"] >= 0.9, result


def test_build_script_round_trips_and_reports_lengths(tmp_path):
    """The command line writes a folder the Auto classes load, with the chat template and length report."""
    data = data_file("qwen25_math_rm8", "math_cot_100.jsonl")
    small = tmp_path / "rm8.jsonl"
    small.write_text("".join(data.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    out = tmp_path / "model"
    assert build_script.main(["--preset", "qwen25_math_rm8", "--data", str(small), "--out", str(out),
                              "--vocab-size", "512", "--hidden", "32"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    chat = [{"role": "system", "content": "Reason step by step."}, {"role": "user", "content": "1+1?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\nReason step by step.\n<|user|>\n1+1?\n<|assistant|>\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    info = json.loads((out / "build_info.json").read_text())
    assert info["groups"] == 3 and info["completion_tokens"]["n"] == 24
    assert set(info["skipped_at_max_new_tokens"]) >= {"512", "1024"}


@pytest.mark.parametrize("name, preset", [("qwen25-math-rm8-offline.yaml", "qwen25_math_rm8"),
                                          ("gsm8k-solutions-offline.yaml", "gsm8k_model_solutions")])
def test_whole_set_recipes_load_and_point_at_the_built_model(name, preset):
    config = load_config(REPO / "configs" / name)
    assert config.sampler.source == "offline" and config.sampler.offline_preset == preset
    assert config.model.name_or_path == bom.DEFAULT_OUT[preset]  # where build_offline_model.py writes
    assert Path(config.sampler.offline_path).parts[-2:] == bom.DEFAULT_FILES[preset]
    assert config.train.eval_every == 0 and config.sampler.on_too_long == "skip"
