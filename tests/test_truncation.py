"""``rollout.mask_truncated`` in gvpo's own trainer (TRL's ``mask_truncated_completions``): a generated
completion that hits ``rollout.max_new_tokens`` without EOS leaves its group before scoring; the group keeps
the rest, with Corollary 3.4's ``1/(k-1)`` over the remaining ``k``, and a group left with one contributes 0.

The completions come from ``tiny.ScriptedEngine`` behind the built-in policy sampler, so which ones are
truncated is known (``tiny.truncation_script``); the loss and the gradient are checked against the float64
loop ``tiny.kept_gvpo_loss_loop`` and a hand-worked value.
"""

from __future__ import annotations


import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import tiny
from gvpo.batch import build_batch
from gvpo.config import ModelConfig, load_config
from gvpo.model.loading import load_policy
from gvpo.model.logprobs import completion_token_logps, sequence_logps
from gvpo.objectives.weighted import GVPOObjective
from gvpo.rollout import SamplingParams
from gvpo.samplers import generate_groups
from gvpo.trainer import train
from test_model_families import metrics, run_overrides

K, MAX_NEW = 4, 4
ROWS = [(p, {"prompt": f"Q: {p}+1= A:"}) for p in range(4)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is faster and keeps BLAS on one code path."""


def scripted(mask: bool):
    tokenizer = tiny.char_tokenizer()
    engine = tiny.ScriptedEngine(tokenizer, K, tiny.truncation_script)
    return tokenizer, generate_groups(engine, ROWS, K, SamplingParams(MAX_NEW, mask_truncated=mask), seed=0, step=3,
                                      source="policy")


def test_the_sampler_drops_what_hit_the_limit_without_eos():
    """Even groups: completion 1 (4 tokens, no EOS) goes; completion 2 (4 tokens, the 4th EOS) and the ones that
    ended early stay. Odd groups keep completion 0 only. Off, every completion stays and nothing is counted."""
    _, groups = scripted(mask=True)
    assert [len(g) for g in groups] == [3, 1, 3, 1] and [g.truncated for g in groups] == [1, 3, 1, 3]
    assert groups[0].completion_ids == [tiny.truncation_script(0, j) for j in (0, 2, 3)]
    assert groups[0].born_step == [3, 3, 3] and groups[0].sources == ["policy"] * 3
    merged = groups[1] + groups[0]  # as replay and mixture groups combine: the counts add
    assert len(merged) == 4 and merged.truncated == 4 and merged.select([0]).truncated == 4
    _, kept = scripted(mask=False)
    assert [len(g) for g in kept] == [4] * 4 and [g.truncated for g in kept] == [0] * 4


def test_update_on_the_kept_completions_equals_the_float64_loop(tmp_path):
    """One SGD step (float64) on the sampler's groups, with rewards that differ within groups and a reference
    from another model (so the implicit rewards are not 0), equals one step on ``kept_gvpo_loss_loop`` over
    all 16 generated completions with the truncated ones marked; the same loop keeping them all differs."""
    from gvpo.update import update

    tokenizer, groups = scripted(mask=True)
    _, everything = scripted(mask=False)
    rewards = lambda g: [float(sum(g.completion_ids[j]) % 5) for j in range(len(g))]  # noqa: E731
    groups = [g.with_rewards(rewards(g)) for g in groups]
    everything = [g.with_rewards(rewards(g)) for g in everything]
    model_dir, other_dir = tiny.make_tiny_model(tmp_path / "policy"), tiny.make_tiny_model(tmp_path / "ref", seed=1)
    load = lambda path: load_policy(ModelConfig(name_or_path=str(path), dtype="float64"))[0]  # noqa: E731
    reference = load(other_dir)

    batch = build_batch(groups, tokenizer, "cpu")
    with torch.no_grad():
        batch.ref_token_logps = completion_token_logps(reference, *batch.rows(slice(None)), share_prompts=False)
    policy = load(model_dir)
    update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch, GVPOObjective(0.1), micro_batch_size=0,
           share_prompts=False, max_grad_norm=0.0, accelerator=Accelerator(cpu=True))

    full = build_batch(everything, tokenizer, "cpu")
    kept = [len(c) < MAX_NEW or c[-1] == 2 for g in everything for c in g.completion_ids]
    gids = full.group_ids.tolist()
    results = {}
    for name, keep in (("kept", kept), ("all", [True] * len(kept))):
        fresh = load(model_dir)
        rows = full.rows(slice(None))
        logps = sequence_logps(completion_token_logps(fresh, *rows, share_prompts=False), full.completion_mask)
        with torch.no_grad():
            ref = sequence_logps(completion_token_logps(reference, *rows, share_prompts=False), full.completion_mask)
        loss = tiny.kept_gvpo_loss_loop(logps, ref, full.rewards, gids, keep, 0.1)
        grads = dict(zip([n for n, _ in fresh.named_parameters()], torch.autograd.grad(loss, list(fresh.parameters()))))
        results[name] = {n: p.detach() - grads[n] for n, p in fresh.named_parameters()}
    trained = dict(policy.named_parameters())
    assert max((trained[n] - results["kept"][n]).abs().max().item() for n in trained) < 1e-12
    assert max((results["all"][n] - results["kept"][n]).abs().max().item() for n in trained) > 1e-4


def test_a_run_trains_on_the_kept_completions_and_logs_the_drops(tmp_path):
    """``gvpo train`` with ``rollout.mask_truncated=true`` on the scripted policy sampler, 4 prompts of k = 4.
    Hand-worked step 1 (pi_theta = pi_ref, so only the rewards enter): each even group keeps the texts "0 ",
    "  5" and " ", whose digit_reward (digits among the first 3 characters) is 1/3, 1/3 and 0: centred
    (1/9, 1/9, -2/9), ``0.5 * 6/81 / (3 - 1) = 1/54`` per group; the odd groups keep one completion and
    contribute 0, so the loss (over the 2 groups that count) is 1/54. 16 generated, 8 dropped, 8 trained."""
    model_dir = tiny.make_tiny_model(tmp_path / "model")
    run = train(load_config(None, run_overrides(model_dir, tmp_path, "masked", **{
        "sampler.source": "tiny.scripted_sampler", "rollout.mask_truncated": True, "rollout.k": K,
        "rollout.max_new_tokens": MAX_NEW, "train.prompts_per_step": 4, "train.max_steps": 1})))
    row = metrics(run)[0]
    assert row["truncated"] == 8 and row["samples"] == 16 and row["completions_trained"] == 8
    assert row["loss"] == pytest.approx(1 / 54, rel=1e-6)


def test_a_step_whose_every_completion_is_truncated_is_skipped(tmp_path, capsys):
    """Every completion hits the limit without EOS: no update (the weights stay bit for bit), the step counts
    as skipped and says why."""
    model_dir = tiny.make_tiny_model(tmp_path / "model")
    run = train(load_config(None, run_overrides(model_dir, tmp_path, "all", **{
        "sampler.source": "tiny.truncating_sampler", "rollout.mask_truncated": True, "train.max_steps": 1})))
    row = metrics(run)[0]
    assert row["skipped_steps"] == 1 and row["samples"] == 6 and row["completions_trained"] == 0
    assert "step 1: no completion left (0 completions dropped, 6 truncated (rollout.mask_truncated))" \
        in capsys.readouterr().err
    initial, final = load_file(str(model_dir / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(initial[k], final[k]) for k in initial)
