"""GRPO (token-level PPO-clipped surrogate + k3 penalty) against a float64 loop, micro-batch exactness,
and short trainer runs for grpo and the other Eq. 9 objectives."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gvpo.config import load_config
from gvpo.objectives.grpo import GRPOObjective, grpo_advantages, grpo_token_loss, grpo_token_terms
from gvpo.metrics import read_metrics
from gvpo.trainer import train
from gvpo.batch import Batch
from gvpo.objectives import create_objective

import tiny
from test_trainer import overrides as trainer_overrides

AGGREGATIONS = ["sequence_mean", "token_mean", "constant"]
EPS = 0.2


# ---------------------------------------------------------------------------------------------
# A plain float64 reference: loops over completions and tokens, Python min/if for the clipping.
# ---------------------------------------------------------------------------------------------


def loop_advantages(rewards: list[float], group_ids: list[int], scale: bool = True) -> list[float]:
    out = []
    for r, g in zip(rewards, group_ids):
        members = [rr for rr, gg in zip(rewards, group_ids) if gg == g]
        mean = sum(members) / len(members)
        std = statistics.stdev(members) if len(members) > 1 else 0.0
        out.append((r - mean) / (std + 1e-4) if scale else r - mean)
    return out


def loop_loss(logps, old, ref, advantages, lengths, width, *, eps, kl_coef, aggregation):
    """Returns (loss, number of tokens where the clipped branch is active)."""
    lo, hi = torch.tensor(1.0 - eps, dtype=torch.float64), torch.tensor(1.0 + eps, dtype=torch.float64)
    total, clipped, tokens = 0.0, 0, 0
    n = len(lengths)
    for i in range(n):
        a = advantages[i]
        row = 0.0
        for t in range(lengths[i]):
            ratio = torch.exp(logps[i, t] - old[i, t])
            clamped = lo if ratio < lo else hi if ratio > hi else ratio
            surrogate = min(ratio * a, clamped * a)
            if (clamped * a) < (ratio * a):
                clipped += 1
            token = -surrogate
            if kl_coef:
                d = ref[i, t] - logps[i, t]
                token = token + kl_coef * (torch.exp(d) - d - 1)
            row = row + token
            tokens += 1
        total = total + (row / max(lengths[i], 1) if aggregation == "sequence_mean" else row)
    if aggregation == "sequence_mean":
        return total / n, clipped
    if aggregation == "token_mean":
        return total / tokens, clipped
    return total / (n * width), clipped


def make_case(seed: int = 0, on_policy: bool = False):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 1, 4, 2, 5, 3]
    n, width = len(lengths), 5
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    logps = -torch.rand(n, width, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logps + 0.4 * torch.randn(n, width, generator=g, dtype=torch.float64)
    if on_policy:
        old = logps.clone()
    ref = logps + 0.5 * torch.randn(n, width, generator=g, dtype=torch.float64)
    garbage = ~mask.bool()  # padding may hold anything; it must not leak into the loss
    logps[garbage], old[garbage], ref[garbage] = 40.0, -40.0, 60.0
    rewards = torch.rand(n, generator=g, dtype=torch.float64)
    group_ids = torch.tensor([5, 2, 5, 2, 5, 2, 9])  # interleaved, plus a group of one
    return dict(logps=logps, old=old, ref=ref, mask=mask, rewards=rewards, group_ids=group_ids,
                lengths=lengths, width=width)


@pytest.mark.parametrize("scale", [True, False])
def test_advantages_match_loop(scale):
    c = make_case()
    got = grpo_advantages(c["rewards"], c["group_ids"], scale_rewards=scale)
    want = loop_advantages(c["rewards"].tolist(), c["group_ids"].tolist(), scale)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    assert got[-1] == 0.0  # the group of one


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
@pytest.mark.parametrize("on_policy", [False, True])
def test_loss_and_gradient_match_float64_loop(aggregation, kl_coef, on_policy):
    c = make_case(on_policy=on_policy)
    adv = grpo_advantages(c["rewards"], c["group_ids"])
    x = c["logps"].clone().requires_grad_(True)
    loss = grpo_token_loss(x, c["old"], c["ref"], adv, c["mask"], epsilon=EPS, kl_coef=kl_coef,
                           aggregation=aggregation)
    (grad,) = torch.autograd.grad(loss, x)

    y = c["logps"].clone().requires_grad_(True)
    want, clipped = loop_loss(y, c["old"], c["ref"], adv.tolist(), c["lengths"], c["width"], eps=EPS,
                              kl_coef=kl_coef, aggregation=aggregation)
    (want_grad,) = torch.autograd.grad(want, y)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-12)
    terms = grpo_token_terms(x, c["old"], c["ref"], adv, c["mask"], epsilon=EPS, kl_coef=kl_coef)
    assert int(terms.clipped.sum()) == clipped
    if on_policy:  # ratio 1: nothing clipped, the gradient is the policy gradient
        assert clipped == 0
    else:  # the case must exercise clipping: some tokens clipped, and some clipped tokens' gradient is 0
        assert 0 < clipped < int(c["mask"].sum())
        if kl_coef == 0:
            assert (grad[terms.clipped] == 0).all() and (grad[c["mask"].bool() & ~terms.clipped] != 0).any()


def test_on_policy_gradient_is_the_policy_gradient():
    """old == current: d loss / d logp_it = -A_i / (N |y_i|) (sequence_mean, no KL)."""
    c = make_case(on_policy=True)
    adv = grpo_advantages(c["rewards"], c["group_ids"])
    x = c["logps"].clone().requires_grad_(True)
    grpo_token_loss(x, c["old"], None, adv, c["mask"], epsilon=EPS).backward()
    lengths = torch.tensor(c["lengths"], dtype=torch.float64)
    want = -(adv / (len(lengths) * lengths))[:, None] * c["mask"]
    torch.testing.assert_close(x.grad, want, rtol=0, atol=1e-14)


def test_kl_coef_zero_needs_no_reference_and_ignores_it():
    c = make_case()
    adv = grpo_advantages(c["rewards"], c["group_ids"])
    without = grpo_token_loss(c["logps"], c["old"], None, adv, c["mask"], kl_coef=0.0)
    with_ref = grpo_token_loss(c["logps"], c["old"], c["ref"], adv, c["mask"], kl_coef=0.0)
    penalised = grpo_token_loss(c["logps"], c["old"], c["ref"], adv, c["mask"], kl_coef=0.5)
    assert without == with_ref and penalised > without
    with pytest.raises(ValueError, match="ref_token_logps"):
        grpo_token_loss(c["logps"], c["old"], None, adv, c["mask"], kl_coef=0.1)


def test_bad_inputs_are_refused():
    c = make_case()
    adv = grpo_advantages(c["rewards"], c["group_ids"])
    with pytest.raises(ValueError, match="aggregation"):
        grpo_token_loss(c["logps"], c["old"], None, adv, c["mask"], aggregation="token_sum")
    with pytest.raises(ValueError, match="old_token_logps"):
        grpo_token_loss(c["logps"], c["old"][:, :3], None, adv, c["mask"])
    with pytest.raises(ValueError, match="advantages"):
        grpo_token_loss(c["logps"], c["old"], None, adv[:3], c["mask"])


def _batch(c, *, ref=True) -> Batch:
    n, width = c["mask"].shape
    return Batch(input_ids=torch.zeros(n, 3 + width, dtype=torch.long), attention_mask=torch.ones(n, 3 + width),
                 completion_mask=c["mask"], rewards=c["rewards"], group_ids=c["group_ids"],
                 ref_token_logps=c["ref"] if ref else None, old_token_logps=c["old"])


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_micro_batches_add_up_to_the_full_loss(aggregation, kl_coef):
    """sum over micro-batches of micro_loss / norm == full loss, for any split; same gradient."""
    c = make_case(seed=1)
    config = SimpleNamespace(name="grpo", clip_epsilon=EPS, kl_coef=kl_coef, loss_aggregation=aggregation)
    objective = create_objective(config)
    assert isinstance(objective, GRPOObjective)
    batch = _batch(c, ref=kl_coef > 0)
    adv = torch.tensor(loop_advantages(c["rewards"].tolist(), c["group_ids"].tolist()), dtype=torch.float64)
    y = c["logps"].clone().requires_grad_(True)
    want, _ = loop_loss(y, c["old"], c["ref"], adv.tolist(), c["lengths"], c["width"], eps=EPS, kl_coef=kl_coef,
                        aggregation=aggregation)
    (want_grad,) = torch.autograd.grad(want, y)

    prepared = objective.prepare(batch, c["logps"])
    assert prepared.loss_sum / prepared.norm == pytest.approx(float(want.detach()), abs=1e-12)
    assert prepared.stats["clip_fraction"] > 0
    n = len(batch)
    for size in (1, 3, n):
        x = c["logps"].clone().requires_grad_(True)
        total = sum(objective.micro_loss(x[s : s + size], batch, slice(s, s + size), prepared)
                    for s in range(0, n, size)) / prepared.norm
        (grad,) = torch.autograd.grad(total, x)
        torch.testing.assert_close(total, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-12)


def test_objective_stats_and_missing_reference():
    c = make_case()
    objective = GRPOObjective(SimpleNamespace(clip_epsilon=EPS, kl_coef=0.2, loss_aggregation="token_mean"))
    prepared = objective.prepare(_batch(c), c["logps"])
    m = c["mask"].bool()
    d = (c["ref"] - c["logps"])[m]
    assert prepared.stats["kl_k3"] == pytest.approx(float((d.exp() - d - 1).mean()), rel=1e-12)
    _, clipped = loop_loss(c["logps"], c["old"], c["ref"], grpo_advantages(c["rewards"], c["group_ids"]).tolist(),
                           c["lengths"], c["width"], eps=EPS, kl_coef=0.2, aggregation="token_mean")
    assert prepared.stats["clip_fraction"] == pytest.approx(clipped / int(m.sum()))
    with pytest.raises(ValueError, match="kl_coef"):
        objective.prepare(_batch(c, ref=False), c["logps"])


# ---------------------------------------------------------------------------------------------
# Short trainer runs on the tiny model.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def overrides(model_dir: Path, out: Path, name: str, **extra) -> dict:
    """test_trainer's settings, shortened to 2 steps of 2 prompts with no evaluation or checkpoints."""
    short = {"train.max_steps": 2, "train.prompts_per_step": 2, "train.eval_every": 0, "train.eval_n": 4,
             "train.checkpoint_every": 0}
    return trainer_overrides(model_dir, out, name, **{**short, **extra})


def test_trainer_runs_grpo_and_logs_its_metrics(model_dir, tmp_path):
    run = train(load_config(None, overrides(model_dir, tmp_path, "grpo", **{
        "objective.name": "grpo", "objective.kl_coef": 0.04, "objective.loss_aggregation": "token_mean",
        "train.updates_per_batch": 2, "train.micro_batch_size": 3, "optim.lr": 5e-2})))
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        assert 0.0 <= row["clip_fraction"] <= 1.0 and row["kl_k3"] >= 0.0
    # the stats are from the second update on each batch: the policy has moved away from pi_old and pi_ref
    assert any(r["kl_k3"] > 0 for r in rows[1:])
    assert "eval/accuracy" in rows[-1]


@pytest.mark.parametrize("name", ["dr_grpo", "rs", "sft", "dpo"])
def test_trainer_runs_the_other_eq9_objectives(model_dir, tmp_path, name):
    run = train(load_config(None, overrides(model_dir, tmp_path, name, **{"objective.name": name})))
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) and "weight_abs_mean" in r for r in rows[1:])
    assert (run / "final" / "model.safetensors").exists()
