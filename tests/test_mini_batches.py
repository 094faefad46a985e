"""``train.mini_batches``: the authors' schedule of several optimizer steps per rollout batch (issue 12).

The reference here is a float64 re-implementation written in the test: the Eq. 12 weights in a Python
loop with pi_ref = the policy that generated the batch (``reference: rollout``), the loss
``-sum_i beta w_i / (G (k-1)) log pi(y_i|x)`` per mini-batch (whose gradient is that of Eq. 13/16), and
torch's own AdamW. Its sequence log-probs come from the same padded batches as the trainer's (one
``completion_token_logps`` call per mini-batch, tested against unpadded forwards in test_logprobs.py):
Llama's RMSNorm rounds to float32 even in a float64 model, and AdamW's first steps turn that rounding
in near-zero gradients into visible parameter differences (up to 2e-6 here with unpadded forwards).

With one mini-batch the log-ratio is zero at the update, so the weights are the centred rewards and
the GVPO gradient is the Dr. GRPO (Eq. 9, centred-reward) gradient times ``beta / (G (k-1))``. With four,
steps 2-4 see a policy that has moved: the weights differ from the centred rewards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gvpo.batch import build_batch
from gvpo.config import load_config
from gvpo.model.logprobs import completion_token_logps
from gvpo.model.logprobs import sequence_logps as sequence_logps_of
from gvpo.samplers import process_rows
from gvpo.samplers import step_rows
from gvpo.tasks import get_task
from gvpo.trainer import train

import tiny

BETA, LR, K, PROMPTS = 0.1, 1e-2, 4, 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def config(model_dir, out, name, **extra):
    base = {"model.name_or_path": str(model_dir), "model.dtype": "float64", "task.name": "tiny.tiny_add",
            "task.rewards": ["exact_match"], "sampler.source": "tiny.answer_sampler", "rollout.k": K,
            "train.prompts_per_step": PROMPTS, "train.max_steps": 1, "train.share_prompts": False,
            "objective.beta": BETA, "objective.reference": "rollout", "optim.lr": LR, "optim.warmup_steps": 0,
            "optim.max_grad_norm": 0.0, "train.eval_every": 0, "train.eval_n": 2, "train.checkpoint_every": 0,
            "output.dir": str(out), "output.name": name, "output.progress": False, "output.report_to": [],
            "output.plots": False}
    return load_config(None, {**base, **extra})


def sequence_logps(model, tokenizer, groups) -> list[list[torch.Tensor]]:
    """log pi(y|x) of every completion of ``groups``, as a list per group, from one padded batch."""
    batch = build_batch([g.with_rewards([0.0] * len(g)) for g in groups], tokenizer, "cpu")
    logps = sequence_logps_of(completion_token_logps(model, *batch.rows(slice(None)), share_prompts=False),
                              batch.completion_mask)
    return [list(logps[i * K : (i + 1) * K]) for i in range(len(groups))]


def reference_run(model_dir, mini_batches: int, updates_per_batch: int = 1):
    """Float64 re-implementation of one rollout step; returns final parameters and, per optimizer step,
    the largest gap between the Eq. 12 weights and the centred rewards."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    rows = process_rows(step_rows(get_task("tiny.tiny_add").train, 0, PROMPTS, 0), 0, 1, mini_batches)
    groups = tiny.AnswerSampler(tokenizer, K).sample(rows, 0, None)
    rewards = [[1.0] + [0.0] * (K - 1) for _ in groups]  # exact_match: the first completion is the answer
    per = len(groups) // mini_batches
    chunks = [groups[j * per : (j + 1) * per] for j in range(mini_batches)]
    with torch.no_grad():  # pi_ref = pi_old = the policy that generated the batch, before any update
        ref = [[float(lp) for lp in group] for chunk in chunks for group in sequence_logps(model, tokenizer, chunk)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    gaps = []
    for _ in range(updates_per_batch):
        for j in range(mini_batches):
            loss, gap = 0.0, 0.0
            chunk_logps = sequence_logps(model, tokenizer, chunks[j])
            for g in range(j * per, (j + 1) * per):
                logps = chunk_logps[g - j * per]
                implicit = [BETA * (float(lp.detach()) - r) for lp, r in zip(logps, ref[g])]
                mean_r, mean_i = sum(rewards[g]) / K, sum(implicit) / K
                for i in range(K):
                    w = (rewards[g][i] - mean_r) - (implicit[i] - mean_i)  # Eq. 12
                    gap = max(gap, abs(w - (rewards[g][i] - mean_r)))
                    loss = loss - BETA * w / (per * (K - 1)) * logps[i]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            gaps.append(gap)
    return {n: p.detach() for n, p in model.named_parameters()}, gaps


def assert_params_close(trained: dict, reference: dict, atol: float) -> None:
    for name, value in reference.items():
        if name in trained:
            assert torch.allclose(trained[name], value, rtol=0, atol=atol), name


@pytest.mark.parametrize("mini_batches", [1, 4])
def test_each_mini_batch_step_matches_eq12_with_the_rollout_reference(model_dir, tmp_path, mini_batches):
    run = train(config(model_dir, tmp_path, f"m{mini_batches}", **{"train.mini_batches": mini_batches}))
    reference, gaps = reference_run(model_dir, mini_batches)
    start = load_file(str(model_dir / "model.safetensors"))
    trained = load_file(str(run / "final" / "model.safetensors"))
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert_params_close(trained, reference, atol=1e-12)
    row = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["optimizer_steps"] == mini_batches and row["step"] == 1
    assert gaps[0] < 1e-12  # first step: log-ratio 0, weights = centred rewards (Dr. GRPO's direction)
    assert all(gap > 1e-4 for gap in gaps[1:])  # steps 2-4: the policy moved, GVPO is not Dr. GRPO


def test_mini_batches_compose_with_epochs_and_micro_batches(model_dir, tmp_path):
    """Two epochs over two mini-batches, micro-batches of one completion: the same as the whole-batch
    reference, 4 optimizer steps, and the learning-rate schedule counts those steps."""
    extra = {"train.mini_batches": 2, "train.updates_per_batch": 2, "train.micro_batch_size": 1}
    run = train(config(model_dir, tmp_path, "epochs", **extra))
    reference, _ = reference_run(model_dir, 2, updates_per_batch=2)
    assert_params_close(load_file(str(run / "final" / "model.safetensors")), reference, atol=1e-12)
    row = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["optimizer_steps"] == 4


def test_learning_rate_schedule_is_counted_in_optimizer_steps(model_dir, tmp_path):
    """Warm-up of 4 optimizer steps with 2 mini-batches: step 1 ends at lr * 2/5 (counted from 1:
    lr * (s + 1) / (warmup + 1) for optimizer step s = 0, 1, ...; the logged lr is the next step's)."""
    run = train(config(model_dir, tmp_path, "lr", **{"train.mini_batches": 2, "optim.warmup_steps": 4,
                                                      "train.max_steps": 3}))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["optimizer_steps"] for r in rows] == [2, 4, 6]
    assert [r["lr"] for r in rows] == pytest.approx([LR * 3 / 5, LR * 5 / 5, LR])


def test_prompts_must_divide_into_mini_batches(model_dir, tmp_path):
    from gvpo.config import ConfigError

    with pytest.raises(ConfigError, match="train.mini_batches=3"):
        config(model_dir, tmp_path, "bad", **{"train.mini_batches": 3})



def authors_micro_batch_loss(implicit, rewards, uid, rows, *, k, gradient_accumulation):
    """The GVPO authors' loss on one micro-batch (github jszkc/GVPO: ``compute_policy_loss_gvpo`` in
    ``gvpo_core_algos.py``, scaled in ``gvpo_dp_actor.py``), re-implemented as a float64 loop:
    ``sum_{i in rows} 0.5 ((Rθ_i - mean_uid Rθ) - (R_i - mean_uid R))^2 / (n - 1)`` with the group means
    over every rank's completions (their all-gather; the Rθ mean detached), times ``1 / gradient_accumulation``.
    ``implicit`` = Rθ = beta (log pi - log pi_old)."""
    loss = 0.0
    for i in rows:
        same = uid == uid[i]
        residual = (implicit[i] - implicit[same].detach().mean()) - (rewards[i] - rewards[same].mean())
        loss = loss + 0.5 * residual**2
    return loss / (k - 1) / gradient_accumulation


def test_authors_gradient_is_ours_times_micro_batch_over_k_so_the_recipe_clips_at_k_over_micro():
    """Their gradient is ``micro_batch_per_gpu / k`` times ours, whatever the number of GPUs: a mini-batch
    of G groups (G k completions) is split over W ranks into micro-batches of m completions, each loss
    summed over its completions and scaled by 1/GA with GA = G k / (W m); FSDP averages over the W ranks,
    so their loss is ``sum / (W GA) = (m / k) * sum / G`` while ours (Eq. 16) is ``sum / G``. Their
    grad-norm clip of 1.0 is therefore ``k / m`` on our scale: 4 / 16 = 0.25 in the 7B recipe."""
    import yaml

    from gvpo import gvpo_loss

    torch.manual_seed(0)
    k, groups, ranks, micro = 4, 8, 2, 8
    n = k * groups
    gradient_accumulation = n // (ranks * micro)
    logps = torch.randn(n, dtype=torch.float64, requires_grad=True)
    old = logps.detach() + 0.3 * torch.randn(n, dtype=torch.float64)  # a policy that moved (steps 2-4)
    rewards = torch.rand(n, dtype=torch.float64)
    uid = torch.arange(groups).repeat_interleave(k)
    implicit = BETA * (logps - old)
    per_rank = n // ranks
    rank_losses = [sum(authors_micro_batch_loss(implicit, rewards, uid, range(s, s + micro), k=k,
                                                gradient_accumulation=gradient_accumulation)
                       for s in range(r * per_rank, (r + 1) * per_rank, micro)) for r in range(ranks)]
    their_grad = torch.autograd.grad(sum(rank_losses) / ranks, logps)[0]  # FSDP averages over ranks
    our_grad = torch.autograd.grad(gvpo_loss(logps, old, rewards, uid, beta=BETA), logps)[0]
    assert torch.allclose(their_grad, our_grad * micro / k, rtol=1e-12, atol=1e-15)

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "qwen2.5-math-7b-math.yaml").read_text())
    assert recipe["optim"]["max_grad_norm"] == pytest.approx(1.0 * recipe["rollout"]["k"] / 16)
