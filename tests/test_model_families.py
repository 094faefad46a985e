"""The model families users bring, each as a tiny random-init model built from its config (no download).

For each of ``tiny.FAMILIES``: prefix-shared and plain log-probs agree with an independent per-row float64
computation (left padding, ragged completions); full-weight and LoRA runs with a fixed reference save a
``final/`` folder that plain transformers loads; and a batch without reward signal leaves every parameter
bit-identical (GVPO's gradient is exactly 0 when pi_theta = pi_ref and all rewards in a group are equal).
Then dropout (off by default, opt-in only in the gradient forward) and the error for models that are not
causal LMs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tiny
from gvpo import cli
from gvpo.config import ConfigError, ModelConfig, load_config
from gvpo.model.loading import Reference, has_dropout, load_policy
from gvpo.model.logprobs import _completion_token_logps, completion_token_logps
from gvpo.trainer import train


MOE = ("qwen3_moe", "mixtral")
"""The Mixture-of-Experts families: their router's load-balancing loss is added by default (tests/test_router_loss.py)."""


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, tiny.make_tiny_family(tmp_path_factory.mktemp(request.param) / "model", request.param)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is faster and keeps BLAS on one code path."""


def grouped_batch(seed: int = 0, groups: int = 3, k: int = 3, prompt_len: int = 9, completion_len: int = 6):
    """``groups`` prompts of different lengths (left-padded to ``prompt_len``), ``k`` completions each of
    different lengths (right-padded to ``completion_len``); returns ids, attention mask, completion mask."""
    g = torch.Generator().manual_seed(seed)
    ids, attention, completion = [], [], []
    for i in range(groups):
        plen = prompt_len - 2 * i
        prompt = torch.randint(3, tiny.VOCAB_SIZE, (plen,), generator=g)
        for j in range(k):
            clen = completion_len - j % completion_len
            tokens = torch.randint(3, tiny.VOCAB_SIZE, (clen,), generator=g)
            pad_left, pad_right = prompt_len - plen, completion_len - clen
            ids.append(torch.cat([torch.zeros(pad_left, dtype=torch.long), prompt, tokens,
                                  torch.zeros(pad_right, dtype=torch.long)]))
            attention.append(torch.tensor([0] * pad_left + [1] * (plen + clen) + [0] * pad_right))
            completion.append(torch.tensor([1] * clen + [0] * pad_right))
    return torch.stack(ids), torch.stack(attention), torch.stack(completion)


def per_row_logps(model, ids, attention, completion) -> torch.Tensor:
    """Independent reference: each row alone, without padding (positions 0..T-1, no masks, no cache), its
    logits' ``log_softmax`` in float64."""
    out = torch.zeros(completion.shape, dtype=torch.float64)
    for row in range(ids.shape[0]):
        tokens = ids[row][attention[row].bool()][None]
        with torch.no_grad():
            logits = model(input_ids=tokens).logits[0].double()
        clen = int(completion[row].sum())
        logps = logits.log_softmax(-1)[:-1].gather(-1, tokens[0, 1:, None]).squeeze(-1)
        out[row, :clen] = logps[-clen:]
    return out


def test_shared_and_plain_logps_match_an_unpadded_per_row_reference(family):
    """Left-padded prompts of three lengths, ragged completions: both paths equal the per-row reference,
    each other within 1e-6, and the trainable policy (with grad) and its frozen reference copy (without)
    give bit-identical values on both paths."""
    _, path = family
    policy, _ = load_policy(ModelConfig(name_or_path=str(path)))
    reference = Reference(policy, lora=False).model
    batch = grouped_batch()
    expected = per_row_logps(reference, *batch)
    results = {}
    for share in (True, False):
        logps = completion_token_logps(policy, *batch, share_prompts=share)
        assert logps.requires_grad
        with torch.no_grad():
            ref_logps = completion_token_logps(reference, *batch, share_prompts=share)
        assert torch.equal(logps.detach(), ref_logps), f"share_prompts={share}: policy and reference differ"
        torch.testing.assert_close(logps.detach().double(), expected, atol=1e-5, rtol=0)
        results[share] = logps.detach()
    torch.testing.assert_close(results[True], results[False], atol=1e-6, rtol=0)


def test_loaded_weights_are_aligned_and_ties_kept(tmp_path):
    """``from_pretrained`` on CPU can leave weights at 8-byte offsets of the safetensors file, where BLAS
    rounds differently than for the 64-byte aligned copy the reference gets; ``load_policy`` re-homes them."""
    path = tiny.make_tiny_model(tmp_path / "model")
    raw = AutoModelForCausalLM.from_pretrained(path)
    policy, _ = load_policy(ModelConfig(name_or_path=str(path)))
    assert all(p.data_ptr() % 64 == 0 for p in [*policy.parameters(), *policy.buffers()])
    assert policy.lm_head.weight is policy.model.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(raw.state_dict().values(), policy.state_dict().values()))


def run_overrides(path: Path, out: Path, name: str, **extra) -> dict:
    return {"model.name_or_path": str(path), "task.name": "tiny.tiny_add", "task.rewards": ["tiny.digit_reward"],
            "train.max_steps": 2, "train.prompts_per_step": 2, "rollout.k": 3, "rollout.max_new_tokens": 3,
            "output.dir": str(out), "output.name": name, "train.eval_every": 0, "train.eval_n": 1,
            "train.checkpoint_every": 0, "output.progress": False, "output.report_to": [],
            "output.plots": False, "optim.lr": 1e-2, "optim.warmup_steps": 0, **extra}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_steps_with_a_fixed_reference_save_a_final_folder_plain_transformers_loads(family, tmp_path, lora):
    name, path = family
    run = train(load_config(None, run_overrides(path, tmp_path, "run", **{"model.lora": lora})))
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["kl"], r["grad_norm"]])).all() for r in rows)
    assert all(("aux_loss" in r) == (name in MOE) for r in rows)  # the router loss is on by default for MoE
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    initial = AutoModelForCausalLM.from_pretrained(path)
    assert type(final) is type(initial)
    assert not any("lora" in key for key in final.state_dict())
    moved = [k for k, v in initial.state_dict().items() if not torch.equal(v, final.state_dict()[k])]
    assert moved, f"{name}: training did not change any weight"
    ids, attention, completion = grouped_batch(groups=1)
    with torch.no_grad():
        assert torch.isfinite(completion_token_logps(final, ids, attention, completion)).all()


@pytest.mark.parametrize("share", [True, False], ids=["shared", "plain"])
def test_a_batch_without_reward_signal_leaves_the_parameters_bit_identical(family, tmp_path, share):
    """All rewards 0, fixed reference = the initial weights: GVPO's weights ``w = (R - mean R) - beta (log
    ratio - mean log ratio)`` are exactly 0 only if the policy's and the reference's log-probs are
    bit-identical; any rounding difference becomes a full Adam step (a 1e-8 gradient is normalised to
    ~lr). Three steps, then the saved weights must equal the initial ones bit for bit. The MoE families' router
    loss is switched off here: it moves the router by design (tests/test_router_loss.py)."""
    _, path = family
    run = train(load_config(None, run_overrides(path, tmp_path, "zero", **{
        "task.rewards": ["tiny.zero_reward"], "train.max_steps": 3, "train.share_prompts": share,
        "model.router_aux_loss_coef": 0.0})))
    assert [(r["kl"], r["grad_norm"]) for r in metrics(run)] == [(0.0, 0.0)] * 3
    initial, final = load_file(str(path / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert initial.keys() == final.keys()
    changed = [key for key in initial if not torch.equal(initial[key], final[key])]
    assert not changed


# --- dropout ------------------------------------------------------------------------------------------------

DROPOUT = {"gpt2": dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),  # nn.Dropout modules
           "opt": dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, layerdrop=0.2)}  # floats


@pytest.fixture(scope="module", params=list(DROPOUT))
def dropout_model(request, tmp_path_factory) -> Path:
    name = request.param
    return tiny.make_tiny_family(tmp_path_factory.mktemp(name) / "model", name, **DROPOUT[name])


def logps_and_grad(model, batch, seed: int = 0, *, this_mode: bool = False):
    """Log-probs and the gradient of their sum over all trainable weights, with the RNG seeded;
    ``this_mode`` = the plain forward in the model's current mode (with dropout in train mode)."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    logps = (_completion_token_logps if this_mode else completion_token_logps)(model, *batch, share_prompts=False)
    logps.sum().backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logps.detach(), grad


def test_dropout_is_off_by_default_in_train_mode(dropout_model):
    """The raw model's train-mode forward is noisy (so the test can fail); the loaded policy, in train mode,
    gives the log-probs and gradient of an eval-mode copy exactly."""
    batch = grouped_batch(groups=2)
    raw = AutoModelForCausalLM.from_pretrained(dropout_model).train()
    with torch.no_grad():
        noisy = _completion_token_logps(raw, *batch, share_prompts=False)
        clean = _completion_token_logps(raw.eval(), *batch, share_prompts=False)
    assert (noisy - clean).abs().max() > 1e-3
    policy, _ = load_policy(ModelConfig(name_or_path=str(dropout_model)))
    assert policy.training and not has_dropout(policy)
    evaluated = copy.deepcopy(policy).eval()
    logps, grad = logps_and_grad(policy, batch)
    eval_logps, eval_grad = logps_and_grad(evaluated, batch)
    assert torch.equal(logps, eval_logps) and torch.equal(grad, eval_grad)


def test_kept_dropout_acts_in_the_gradient_forward_only(dropout_model):
    """``model.disable_dropout=false``: values (with or without grad) are the eval-mode copy's, and the
    gradient is that of a train-mode forward with dropout under the same seed."""
    batch = grouped_batch(groups=2)
    policy, _ = load_policy(ModelConfig(name_or_path=str(dropout_model), disable_dropout=False))
    assert policy.training and has_dropout(policy)
    evaluated = copy.deepcopy(policy).eval()
    eval_logps, eval_grad = logps_and_grad(evaluated, batch)
    with torch.no_grad():
        assert torch.equal(completion_token_logps(policy, *batch, share_prompts=False), eval_logps)
    assert policy.training
    logps, grad = logps_and_grad(policy, batch, seed=1)
    assert torch.equal(logps, eval_logps)
    _, dropout_grad = logps_and_grad(policy, batch, seed=1, this_mode=True)
    assert torch.equal(grad, dropout_grad)
    assert (grad - eval_grad).abs().max() > 1e-4
    _, other_seed = logps_and_grad(policy, batch, seed=2)
    assert not torch.equal(grad, other_seed)


def test_kept_dropout_does_not_enter_the_statistics(dropout_model, tmp_path):
    """With dropout kept, a zero-signal run still does not move: pi_theta and pi_ref are scored without
    dropout, so their log-ratio and GVPO's weights are exactly 0 (with dropout in the scores they are not)."""
    run = train(load_config(None, run_overrides(dropout_model, tmp_path, "zero", **{
        "task.rewards": ["tiny.zero_reward"], "model.disable_dropout": False})))
    assert [(r["kl"], r["grad_norm"]) for r in metrics(run)] == [(0.0, 0.0)] * 2


def test_lora_dropout_needs_dropout_kept(tmp_path):
    path = tiny.make_tiny_model(tmp_path / "model")
    with pytest.raises(ConfigError, match="model.lora_dropout=0.05 needs model.disable_dropout=false"):
        load_policy(ModelConfig(name_or_path=str(path), lora=True, lora_dropout=0.05))
    policy, _ = load_policy(ModelConfig(name_or_path=str(path), lora=True, lora_dropout=0.05, disable_dropout=False))
    assert has_dropout(policy)


# --- models that are not causal LMs ---------------------------------------------------------------------------

def _t5(path: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=tiny.VOCAB_SIZE, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                      pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    return tiny.save_tiny(T5ForConditionalGeneration(config), path)


def _bert(path: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=tiny.VOCAB_SIZE, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
    return tiny.save_tiny(BertForMaskedLM(config), path)


@pytest.mark.parametrize("build, kind", [(_t5, "t5 is an encoder-decoder model"),
                                         (_bert, "bert is a masked \\(bidirectional\\) LM")], ids=["t5", "bert"])
def test_models_that_are_not_causal_lms_get_a_one_line_error(tmp_path, capsys, build, kind):
    path = build(tmp_path / "model")
    with pytest.raises(ConfigError, match=f"model.name_or_path={path}: {kind}; expected a causal"):
        load_policy(ModelConfig(name_or_path=str(path)))
    args = [f"{k}={v}" for k, v in run_overrides(path, tmp_path, "cli").items() if k != "task.rewards"]
    capsys.readouterr()
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gvpo: config error: model.name_or_path={path}") and "\n" not in err
