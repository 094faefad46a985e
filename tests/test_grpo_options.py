"""GSPO (``importance_sampling_level="sequence"``) against a float64 loop and TRL 1.16's own
``GRPOTrainer._compute_loss``; and ``loss_aggregation=bnpo`` with several micro-steps per optimizer step, where
gvpo and TRL differ by design: both values computed and the difference pinned."""

from __future__ import annotations

import math

import pytest
import torch

from gvpo.config import load_config
from gvpo.objectives import create_objective
from gvpo.objectives.grpo import GRPOObjective, grpo_advantages, grpo_token_loss, grpo_token_terms
from gvpo.run.metrics import read_metrics
from gvpo.trainer import train

import tiny
from test_grpo import AGGREGATIONS, EPS, MAX_LEN, make_case, objective_config, overrides, trainer_loss, trl_compute_loss

SEQ_EPS = 0.1
"""Clip range of the loop test: mean log-ratios vary less than token ones, and at 0.1 some of the case's 7
completions are clipped and some not (checked in the test)."""


def loop_sequence_loss(logps, old, ref, advantages, lengths, *, eps, kl_coef, aggregation, eps_high=None,
                       bias_kl=True, max_len=MAX_LEN):
    """GSPO in plain loops (GSPO paper, Eq. 5-7, as TRL 1.16 computes it): per completion the ratio
    ``r_i = exp(mean over its tokens of (logp - old))``; every token of it gets ``-min(r_i A_i, clip(r_i) A_i)``
    plus ``kl_coef * k3_it * r_i`` (``* r_i`` only with ``bias_kl``); then the aggregation of ``loop_loss``.
    Returns (loss, number of completions whose clipped branch is active)."""
    high = eps if eps_high is None else eps_high
    n = len(lengths)
    rows, clipped = [], 0
    for i in range(n):
        length = lengths[i]
        mean_log_ratio = sum(logps[i, t] - old[i, t] for t in range(length)) / max(length, 1)
        ratio = torch.exp(mean_log_ratio)
        clamped = torch.clamp(ratio, 1.0 - eps, 1.0 + high)
        surrogate = min(ratio * advantages[i], clamped * advantages[i])
        clipped += int(bool(clamped * advantages[i] < ratio * advantages[i]))
        row = 0.0
        for t in range(length):
            token = -surrogate
            if kl_coef:
                d = ref[i, t] - logps[i, t]
                k3 = torch.exp(d) - d - 1
                token = token + kl_coef * (k3 * ratio if bias_kl else k3)
            row = row + token
        rows.append(row)
    if aggregation == "grpo":
        return sum(r / max(length, 1) for r, length in zip(rows, lengths)) / n, clipped
    if aggregation in ("dapo", "bnpo"):  # one process: bnpo is the token mean
        return sum(rows) / sum(lengths), clipped
    assert aggregation == "dr_grpo"
    return sum(rows) / (n * max_len), clipped


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("bias_kl", [True, False])
def test_gspo_loss_and_gradient_match_float64_loop(aggregation, kl_coef, on_policy, bias_kl):
    c = make_case(on_policy=on_policy)
    adv = grpo_advantages(c["rewards"], c["group_ids"])
    x = c["logps"].clone().requires_grad_(True)
    loss = grpo_token_loss(x, c["old"], c["ref"], adv, c["mask"], epsilon=SEQ_EPS, kl_coef=kl_coef,
                           use_bias_correction_kl=bias_kl, aggregation=aggregation, max_completion_length=MAX_LEN,
                           importance_sampling_level="sequence")
    (grad,) = torch.autograd.grad(loss, x)
    y = c["logps"].clone().requires_grad_(True)
    want, clipped = loop_sequence_loss(y, c["old"], c["ref"], adv.tolist(), c["lengths"], eps=SEQ_EPS, kl_coef=kl_coef,
                                       bias_kl=bias_kl, aggregation=aggregation)
    (want_grad,) = torch.autograd.grad(want, y)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-12)
    terms = grpo_token_terms(x, c["old"], c["ref"], adv, c["mask"], epsilon=SEQ_EPS, kl_coef=kl_coef,
                             importance_sampling_level="sequence")
    rows_clipped = terms.clipped.any(-1)
    assert int(rows_clipped.sum()) == clipped
    assert (terms.clipped == rows_clipped[:, None] & c["mask"].bool()).all()  # a completion is clipped whole
    if not on_policy:  # the case exercises both branches, and differs from the token-level ratio
        assert 0 < clipped < len(c["lengths"])
        token = grpo_token_loss(c["logps"], c["old"], c["ref"], adv, c["mask"], epsilon=SEQ_EPS, kl_coef=kl_coef,
                                aggregation=aggregation, max_completion_length=MAX_LEN)
        assert abs(float((token - loss).detach())) > 1e-3


def test_gspo_ratio_gradient_spreads_over_the_completion():
    """One completion of 2 tokens, on-policy, A = 1, no KL: the loss is ``-exp(mean(logp - old))``, whose
    gradient is ``-r / |y| = -1/2`` on each token (token level: ``-1`` on each, summed per row then averaged
    by the grpo aggregation: ``-1/2`` too); off-policy by +0.1 on one token the sequence ratio is
    ``exp(0.05)`` on both tokens."""
    logps = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    args = (torch.zeros(1, 2, dtype=torch.float64), None, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2))
    loss = grpo_token_loss(logps, *args, epsilon=0.2, importance_sampling_level="sequence")
    (grad,) = torch.autograd.grad(loss, logps)
    assert loss.item() == -1.0 and grad.tolist() == [[-0.5, -0.5]]
    moved = torch.tensor([[0.1, 0.0]], dtype=torch.float64)
    terms = grpo_token_terms(moved, *args, epsilon=0.2, kl_coef=0.0, importance_sampling_level="sequence")
    torch.testing.assert_close(terms.loss, torch.full((1, 2), -math.exp(0.05), dtype=torch.float64))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("bias_kl", [True, False])
@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("layout", [(1, 1), (1, 2), (2, 1), (2, 2)], ids=lambda p: f"P{p[0]}xGA{p[1]}")
def test_gspo_matches_trl_compute_loss(aggregation, bias_kl, eps_high, layout):
    """As ``test_grpo.test_matches_trl_compute_loss``, with TRL's ``importance_sampling_level="sequence"``
    and gvpo's ``objective.importance_sampling_level=sequence``: equal to 1e-12 in float64 (value and
    gradient), except bnpo with GA > 1 (see ``test_bnpo_with_several_micro_steps_differs_from_trl_as_documented``)."""
    processes, accumulation = layout
    c = make_case(seed=3, garbage=False, rows=8)
    beta = 0.3
    advantages = grpo_advantages(c["rewards"], c["group_ids"])
    share = 8 // (processes * accumulation)
    x = c["logps"].clone().requires_grad_(True)
    trl_loss = sum(trl_compute_loss(x, c, slice(s, s + share), advantages, loss_type=aggregation, beta=beta,
                                    bias_kl=bias_kl, eps_high=eps_high, processes=processes,
                                    accumulation=accumulation, level="sequence")
                   for s in range(0, 8, share)) / processes
    (trl_grad,) = torch.autograd.grad(trl_loss, x)

    objective = create_objective(objective_config(kl_coef=beta, epsilon_high=eps_high, use_bias_correction_kl=bias_kl,
                                                  loss_aggregation=aggregation, importance_sampling_level="sequence"),
                                 max_completion_length=MAX_LEN)
    split = [slice(p * 8 // processes, (p + 1) * 8 // processes) for p in range(processes)]
    y = c["logps"].clone().requires_grad_(True)
    ours, reported = trainer_loss(objective, c, y, split, micro=3)
    (grad,) = torch.autograd.grad(ours, y)
    terms = grpo_token_terms(c["logps"], c["old"], c["ref"], advantages, c["mask"], epsilon=EPS,
                             epsilon_high=eps_high, kl_coef=beta, importance_sampling_level="sequence")
    assert 0 < int(terms.clipped.any(-1).sum()) < 8  # the clip is exercised
    if aggregation == "bnpo" and accumulation > 1:
        return
    ours, trl_loss = float(ours.detach()), float(trl_loss.detach())
    assert abs(ours - trl_loss) <= 1e-12 and abs(reported - trl_loss) <= 1e-12
    assert float((grad - trl_grad).abs().max()) <= 1e-12


def test_gspo_name_and_key_select_the_sequence_level(model_dir, tmp_path):
    """``objective.name=gspo`` is grpo at the sequence level; the trainer runs it and logs its metrics."""
    assert create_objective(objective_config(name="gspo")).level == "sequence"
    assert create_objective(objective_config(importance_sampling_level="sequence")).level == "sequence"
    assert create_objective(objective_config()).level == "token"
    with pytest.raises(ValueError, match="objective.importance_sampling_level"):
        GRPOObjective(objective_config(importance_sampling_level="sentence"))
    run = train(load_config(None, overrides(model_dir, tmp_path, "gspo", **{
        "objective.name": "gspo", "objective.clip_epsilon": 3e-4, "objective.epsilon_high": 4e-4,
        "objective.kl_coef": 0.0, "train.updates_per_batch": 2, "optim.lr": 5e-2})))
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows[1:])
    assert all(0.0 < r["clip_fraction"] <= 1.0 for r in rows[1:])  # GSPO's 3e-4 range binds by the second update


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("processes", [1, 2])
def test_bnpo_with_several_micro_steps_differs_from_trl_as_documented(processes):
    """TRL 1.16's bnpo with ``gradient_accumulation_steps = G``: each of a process's G micro-batches is divided
    by *its own* token count ``T_pg`` and by G, i.e. ``1/P sum_p 1/G sum_g S_pg / T_pg`` (``S`` = the summed
    per-token loss). gvpo's bnpo divides each process's whole batch by its tokens: ``1/P sum_p (sum_g S_pg) /
    (sum_g T_pg)``, whatever the micro-batch size. Both computed here from ``S`` and ``T`` and checked against
    TRL's own ``_compute_loss`` and gvpo's objective; with micro-batches of unequal token counts they differ."""
    c = make_case(seed=3, garbage=False, rows=8)
    advantages = grpo_advantages(c["rewards"], c["group_ids"])
    accumulation, beta = 2, 0.3
    share = 8 // (processes * accumulation)
    x = c["logps"].clone().requires_grad_(True)
    trl_loss = sum(trl_compute_loss(x, c, slice(s, s + share), advantages, loss_type="bnpo", beta=beta,
                                    bias_kl=True, eps_high=None, processes=processes, accumulation=accumulation)
                   for s in range(0, 8, share)) / processes
    objective = create_objective(objective_config(kl_coef=beta, loss_aggregation="bnpo"))
    split = [slice(p * 8 // processes, (p + 1) * 8 // processes) for p in range(processes)]
    ours, _ = trainer_loss(objective, c, c["logps"].clone(), split, micro=1)

    terms = grpo_token_terms(c["logps"], c["old"], c["ref"], advantages, c["mask"], epsilon=EPS, kl_coef=beta)
    sums, tokens = terms.loss.sum(-1), c["mask"].sum(-1).double()  # S and T per completion

    def part(rows):
        return float(sums[rows].sum()), float(tokens[rows].sum())

    per_step = [[part(slice(p * 8 // processes + g * share, p * 8 // processes + (g + 1) * share))
                 for g in range(accumulation)] for p in range(processes)]
    trl_formula = sum(sum(s / t for s, t in steps) / accumulation for steps in per_step) / processes
    gvpo_formula = sum(sum(s for s, _ in steps) / sum(t for _, t in steps) for steps in per_step) / processes
    assert float(trl_loss.detach()) == pytest.approx(trl_formula, abs=1e-12)
    assert float(ours.detach()) == pytest.approx(gvpo_formula, abs=1e-12)
    assert any(steps[0][1] != steps[1][1] for steps in per_step)  # unequal micro-batch token counts...
    assert abs(trl_formula - gvpo_formula) > 1e-3  # ...give different values
