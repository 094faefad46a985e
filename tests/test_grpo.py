"""GRPO (token-level PPO-clipped surrogate + k3 penalty) against a float64 loop that follows TRL 1.16's
definitions, against TRL 1.16's own ``GRPOTrainer._compute_loss`` on identical tensors, micro-batch and
process exactness, and short trainer runs for grpo and the other Eq. 9 objectives."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from gvpo.config import ObjectiveConfig, load_config
from gvpo.objectives.grpo import (GRPOObjective, batch_reward_std, grpo_advantages, grpo_token_loss,
                                  grpo_token_terms)
from gvpo.batch import Batch
from gvpo.objectives import create_objective
from gvpo.run.metrics import read_metrics
from gvpo.trainer import setup, train

import tiny
from test_trainer import overrides as trainer_overrides

AGGREGATIONS = ["grpo", "dapo", "bnpo", "dr_grpo"]
EPS = 0.2
MAX_LEN = 8  # dr_grpo's L, the generation budget: wider than the cases' padded width 5


def objective_config(**kw) -> ObjectiveConfig:
    return ObjectiveConfig(**{"name": "grpo", "clip_epsilon": EPS, **kw})


# ---------------------------------------------------------------------------------------------
# A plain float64 reference following TRL 1.16 (GRPOTrainer._generate_and_score_completions for the
# advantages, _compute_loss with importance_sampling_level="token"): loops over completions and tokens,
# Python min/if for the clipping.
# ---------------------------------------------------------------------------------------------


def loop_advantages(rewards: list[float], group_ids: list[int], scale: str = "group") -> list[float]:
    """TRL: ``A = R - mean_group R``, divided by ``std + 1e-4`` (Bessel std of the group or of all rewards)."""
    out = []
    for r, g in zip(rewards, group_ids):
        members = [rr for rr, gg in zip(rewards, group_ids) if gg == g]
        mean = sum(members) / len(members)
        pool = members if scale == "group" else rewards
        std = statistics.stdev(pool) if len(pool) > 1 else 0.0
        out.append(r - mean if scale == "none" else (r - mean) / (std + 1e-4))
    return out


def loop_loss(logps, old, ref, advantages, lengths, *, eps, kl_coef, aggregation, eps_high=None, bias_kl=True,
              max_len=MAX_LEN, processes=None):
    """Returns (loss, number of tokens where the clipped branch is active).

    ``processes``: lists of row indices, one per process (default: one process); only ``bnpo`` reads it
    (TRL 1.16's bnpo with one micro-batch per process: each process's token mean, averaged by DDP)."""
    high = eps if eps_high is None else eps_high
    lo, hi = torch.tensor(1.0 - eps, dtype=torch.float64), torch.tensor(1.0 + high, dtype=torch.float64)
    n = len(lengths)
    rows, clipped = [], 0
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
                k3 = torch.exp(d) - d - 1
                token = token + kl_coef * (k3 * ratio if bias_kl else k3)
            row = row + token
        rows.append(row)
    tokens = sum(lengths)
    if aggregation == "grpo":
        return sum(r / max(length, 1) for r, length in zip(rows, lengths)) / n, clipped
    if aggregation == "dapo":
        return sum(rows) / tokens, clipped
    if aggregation == "bnpo":
        processes = processes or [list(range(n))]
        means = [sum(rows[i] for i in p) / max(sum(lengths[i] for i in p), 1) for p in processes]
        return sum(means) / len(means), clipped
    assert aggregation == "dr_grpo"
    return sum(rows) / (n * max_len), clipped


def make_case(seed: int = 0, on_policy: bool = False, garbage: bool = True, rows: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 1, 4, 2, 5, 3, 2][:rows]
    n, width = len(lengths), 5
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    logps = -torch.rand(n, width, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logps + 0.4 * torch.randn(n, width, generator=g, dtype=torch.float64)
    if on_policy:
        old = logps.clone()
    ref = logps + 0.5 * torch.randn(n, width, generator=g, dtype=torch.float64)
    pad = ~mask.bool()  # padding may hold anything; it must not leak into the loss
    if garbage:
        logps[pad], old[pad], ref[pad] = 40.0, -40.0, 60.0
    else:  # TRL multiplies by the mask after the exp: keep its padding finite
        logps[pad], old[pad], ref[pad] = 0.0, 0.0, 0.0
    rewards = torch.rand(n, generator=g, dtype=torch.float64)
    # interleaved groups plus a group of one; with 8 rows, two whole groups of 4 (one per "process")
    group_ids = torch.tensor([5, 2, 5, 2, 5, 2, 9]) if n == 7 else torch.tensor([0] * 4 + [1] * 4)
    return dict(logps=logps, old=old, ref=ref, mask=mask, rewards=rewards, group_ids=group_ids,
                lengths=lengths, width=width)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_loop(scale):
    c = make_case()
    got = grpo_advantages(c["rewards"], c["group_ids"], scale_rewards=scale)
    want = loop_advantages(c["rewards"].tolist(), c["group_ids"].tolist(), scale)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    assert got[-1] == 0.0  # the group of one


def test_trl_std_is_the_bessel_std_of_the_loop():
    """TRL 1.16 standardises with its ``nanstd``: the n-1 (Bessel) std, as the loop's ``statistics.stdev``,
    except that TRL computes the factor ``n/(n-1)`` as an integer division in torch's default float32
    (``count / (count - 1)``), so on float64 rewards it differs by that rounding (relative < 6e-8)."""
    from trl.trainer.utils import nanstd

    r = make_case()["rewards"]
    n = len(r)
    population = statistics.pstdev(r.tolist())
    rounded_factor = float(torch.tensor(n, dtype=torch.float32) / (n - 1))
    assert float(nanstd(r)) == pytest.approx(population * math.sqrt(rounded_factor), rel=1e-14)
    assert float(nanstd(r)) == pytest.approx(statistics.stdev(r.tolist()), rel=6e-8)
    assert batch_reward_std(r) == pytest.approx(statistics.stdev(r.tolist()), rel=1e-14)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("bias_kl", [True, False])
def test_loss_and_gradient_match_float64_loop(aggregation, kl_coef, on_policy, eps_high, bias_kl):
    c = make_case(on_policy=on_policy)
    adv = grpo_advantages(c["rewards"], c["group_ids"])
    x = c["logps"].clone().requires_grad_(True)
    loss = grpo_token_loss(x, c["old"], c["ref"], adv, c["mask"], epsilon=EPS, epsilon_high=eps_high,
                           kl_coef=kl_coef, use_bias_correction_kl=bias_kl, aggregation=aggregation,
                           max_completion_length=MAX_LEN)
    (grad,) = torch.autograd.grad(loss, x)

    y = c["logps"].clone().requires_grad_(True)
    want, clipped = loop_loss(y, c["old"], c["ref"], adv.tolist(), c["lengths"], eps=EPS, eps_high=eps_high,
                              kl_coef=kl_coef, bias_kl=bias_kl, aggregation=aggregation)
    (want_grad,) = torch.autograd.grad(want, y)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-12)
    terms = grpo_token_terms(x, c["old"], c["ref"], adv, c["mask"], epsilon=EPS, epsilon_high=eps_high,
                             kl_coef=kl_coef, use_bias_correction_kl=bias_kl)
    assert int(terms.clipped.sum()) == clipped
    if on_policy:  # ratio 1: nothing clipped, the gradient is the policy gradient
        assert clipped == 0
    else:  # the case must exercise clipping: some tokens clipped, and some clipped tokens' gradient is 0
        assert 0 < clipped < int(c["mask"].sum())
        if kl_coef == 0:
            assert (grad[terms.clipped] == 0).all() and (grad[c["mask"].bool() & ~terms.clipped] != 0).any()


def test_epsilon_high_moves_only_the_upper_bound():
    """Ratios e^0.22 = 1.246 and e^-0.22 = 0.803 with A = +1 and -1 (eps = 0.2). Default bounds [0.8, 1.2]:
    the first is clipped (value 1.2, no gradient), the second is not (0.803 > 0.8). With epsilon_high=0.28
    the upper bound is 1.28: neither is clipped; the lower bound stays 0.8."""
    logps = torch.tensor([[0.22], [-0.22]], dtype=torch.float64, requires_grad=True)
    args = (torch.zeros(2, 1, dtype=torch.float64), None, torch.tensor([1.0, -1.0]), torch.ones(2, 1))
    terms = grpo_token_terms(logps, *args, epsilon=0.2, kl_coef=0.0)
    assert terms.clipped[:, 0].tolist() == [True, False]
    torch.testing.assert_close(terms.loss[:, 0], torch.tensor([-1.2, math.exp(-0.22)], dtype=torch.float64))
    high = grpo_token_terms(logps, *args, epsilon=0.2, epsilon_high=0.28, kl_coef=0.0)
    assert high.clipped[:, 0].tolist() == [False, False]
    torch.testing.assert_close(high.loss[:, 0], torch.tensor([-math.exp(0.22), math.exp(-0.22)], dtype=torch.float64))
    low = torch.tensor([[-0.3]], dtype=torch.float64)  # ratio 0.741 < 0.8 with A < 0: clipped either way
    assert grpo_token_terms(low, torch.zeros(1, 1), None, torch.tensor([-1.0]), torch.ones(1, 1), epsilon=0.2,
                            epsilon_high=0.28, kl_coef=0.0).clipped.item()


def test_bias_correction_adds_k3_times_the_policy_gradient_on_policy():
    """On-policy (r = 1): d(k3 r) = d k3 + k3 d logp, so with use_bias_correction_kl the gradient gains
    kl_coef * k3_it * a_i per token (a_i = 1/(N |y_i|) for grpo); the loss value is the same."""
    c = make_case(on_policy=True)
    adv = grpo_advantages(c["rewards"], c["group_ids"])
    out = {}
    for bias in (True, False):
        x = c["logps"].clone().requires_grad_(True)
        loss = grpo_token_loss(x, c["old"], c["ref"], adv, c["mask"], kl_coef=0.3, use_bias_correction_kl=bias)
        out[bias] = (loss.detach(), torch.autograd.grad(loss, x)[0])
    d = (c["ref"] - c["logps"]) * c["mask"]
    k3 = (d.exp() - d - 1) * c["mask"]
    lengths = torch.tensor(c["lengths"], dtype=torch.float64)
    extra = 0.3 * k3 / (len(lengths) * lengths)[:, None]
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-14)
    torch.testing.assert_close(out[True][1] - out[False][1], extra, rtol=0, atol=1e-14)
    assert extra.abs().max() > 1e-3


def test_on_policy_gradient_is_the_policy_gradient():
    """old == current: d loss / d logp_it = -A_i / (N |y_i|) (grpo aggregation, no KL)."""
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
        grpo_token_loss(c["logps"], c["old"], None, adv, c["mask"], aggregation="sequence_mean")
    with pytest.raises(ValueError, match="old_token_logps"):
        grpo_token_loss(c["logps"], c["old"][:, :3], None, adv, c["mask"])
    with pytest.raises(ValueError, match="advantages"):
        grpo_token_loss(c["logps"], c["old"], None, adv[:3], c["mask"])
    with pytest.raises(ValueError, match="epsilon_high"):
        grpo_token_loss(c["logps"], c["old"], None, adv, c["mask"], epsilon_high=-0.1)
    with pytest.raises(ValueError, match="max_completion_length"):  # dr_grpo needs the generation budget
        grpo_token_loss(c["logps"], c["old"], None, adv, c["mask"], aggregation="dr_grpo")
    with pytest.raises(ValueError, match="max_completion_length=4 is shorter"):
        grpo_token_loss(c["logps"], c["old"], None, adv, c["mask"], aggregation="dr_grpo", max_completion_length=4)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(c["rewards"], c["group_ids"], scale_rewards="batch_std")
    with pytest.raises(ValueError, match="objective.loss_aggregation=dr_grpo needs max_completion_length"):
        create_objective(objective_config(loss_aggregation="dr_grpo"))
    with pytest.raises(ValueError, match="objective.scale_rewards"):
        GRPOObjective(objective_config(scale_rewards="groups"))


def _batch(c, *, ref=True, rows=slice(None)) -> Batch:
    n, width = c["mask"][rows].shape
    return Batch(input_ids=torch.zeros(n, 3 + width, dtype=torch.long), attention_mask=torch.ones(n, 3 + width),
                 completion_mask=c["mask"][rows], rewards=c["rewards"][rows], group_ids=c["group_ids"][rows],
                 ref_token_logps=c["ref"][rows] if ref else None, old_token_logps=c["old"][rows])


def trainer_loss(objective, c, x, processes: list[slice], micro: int, *, ref=True) -> tuple[torch.Tensor, float]:
    """What gvpo.update does with ``processes`` (each its own batch and prepare): every micro-batch's
    micro_loss over the norm summed over processes (times P, then DDP's mean over P). Returns the
    differentiable loss and the reported value (sum of loss_sum / sum of norm)."""
    parts, norm, loss_sum = [], 0.0, 0.0
    for rows in processes:
        batch = _batch(c, ref=ref, rows=rows)
        local = x[rows]
        prepared = objective.prepare(batch, local.detach())
        norm, loss_sum = norm + prepared.norm, loss_sum + prepared.loss_sum
        n = len(batch)
        parts += [objective.micro_loss(local[s : s + micro], batch, slice(s, s + micro), prepared)
                  for s in range(0, n, micro)]
    return sum(parts) / norm, loss_sum / norm


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
@pytest.mark.parametrize("processes", [1, 2])
def test_micro_batches_and_processes_add_up_to_the_loop(aggregation, kl_coef, processes):
    """sum over micro-batches of micro_loss / global norm == the loop's loss, for any split; same gradient.
    Two processes hold a whole group each (rows 0-3, 4-7); bnpo is then the mean of two token means."""
    c = make_case(seed=1, rows=8)
    objective = create_objective(objective_config(kl_coef=kl_coef, loss_aggregation=aggregation),
                                 max_completion_length=MAX_LEN)
    assert isinstance(objective, GRPOObjective)
    split = [slice(0, 8)] if processes == 1 else [slice(0, 4), slice(4, 8)]
    adv = torch.tensor(loop_advantages(c["rewards"].tolist(), c["group_ids"].tolist()), dtype=torch.float64)
    y = c["logps"].clone().requires_grad_(True)
    want, _ = loop_loss(y, c["old"], c["ref"], adv.tolist(), c["lengths"], eps=EPS, kl_coef=kl_coef,
                        aggregation=aggregation, processes=[list(range(8))[s] for s in split])
    (want_grad,) = torch.autograd.grad(want, y)
    for micro in (1, 3, 8):
        x = c["logps"].clone().requires_grad_(True)
        total, reported = trainer_loss(objective, c, x, split, micro, ref=kl_coef > 0)
        (grad,) = torch.autograd.grad(total, x)
        assert reported == pytest.approx(float(want.detach()), abs=1e-12)
        torch.testing.assert_close(total, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-12)
    if aggregation == "bnpo" and processes == 2:  # per-process token means: not dapo's global token mean
        dapo, _ = loop_loss(y, c["old"], c["ref"], adv.tolist(), c["lengths"], eps=EPS, kl_coef=kl_coef,
                            aggregation="dapo")
        assert abs(float(dapo.detach() - want.detach())) > 1e-3


def test_objective_stats_and_missing_reference():
    c = make_case()
    objective = GRPOObjective(objective_config(kl_coef=0.2, loss_aggregation="dapo"))
    prepared = objective.prepare(_batch(c), c["logps"])
    m = c["mask"].bool()
    d = (c["ref"] - c["logps"])[m]
    assert prepared.stats["kl_k3"] == pytest.approx(float((d.exp() - d - 1).mean()), rel=1e-12)
    _, clipped = loop_loss(c["logps"], c["old"], c["ref"], grpo_advantages(c["rewards"], c["group_ids"]).tolist(),
                           c["lengths"], eps=EPS, kl_coef=0.2, aggregation="dapo")
    assert prepared.stats["clip_fraction"] == pytest.approx(clipped / int(m.sum()))
    with pytest.raises(ValueError, match="kl_coef"):
        objective.prepare(_batch(c, ref=False), c["logps"])


# ---------------------------------------------------------------------------------------------
# TRL 1.16's own GRPOTrainer._compute_loss on the same tensors.
# ---------------------------------------------------------------------------------------------


class _OneProcessAccelerator:
    """What _compute_loss asks of accelerate, for one simulated process (its metrics only)."""

    def __init__(self, num_processes: int):
        self.num_processes = num_processes

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def reduce(self, t, reduction="sum"):
        return t


def trl_compute_loss(x, c, rows, advantages, *, loss_type, beta, bias_kl, eps_high, processes, accumulation,
                     level="token"):
    """``GRPOTrainer._compute_loss`` of TRL on rows ``rows`` (one micro-batch of one process), with the
    model's forward replaced by the given log-probs ``x`` (differentiable); ``level``: TRL's
    ``importance_sampling_level``."""
    from trl import GRPOTrainer

    n, width = c["mask"].shape
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (x[rows], torch.zeros_like(x[rows]), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=bias_kl, delta=None, steps_per_generation=accumulation),
        loss_type=loss_type, epsilon_low=EPS, epsilon_high=EPS if eps_high is None else eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation, accelerator=_OneProcessAccelerator(processes),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        max_completion_length=MAX_LEN)
    m = c["mask"][rows]
    inputs = {"prompt_ids": torch.zeros(m.shape[0], 2, dtype=torch.long), "prompt_mask": torch.ones(m.shape[0], 2),
              "completion_ids": torch.zeros_like(m), "completion_mask": m, "advantages": advantages[rows],
              "old_per_token_logps": c["old"][rows], "ref_per_token_logps": c["ref"][rows],
              "num_items_in_batch": c["mask"].sum().double()}  # the whole generation batch's tokens
    return GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("bias_kl", [True, False])
@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("layout", [(1, 1), (1, 2), (2, 1), (2, 2)], ids=lambda p: f"P{p[0]}xGA{p[1]}")
def test_matches_trl_compute_loss(aggregation, bias_kl, eps_high, layout):
    """TRL's step = its micro-batch losses (each already divided by the accumulation steps) summed per
    process, averaged over processes (DDP). gvpo's: micro_loss / global norm, any micro-batch size.
    Equal for grpo, dapo, dr_grpo; for bnpo when each process takes one micro-batch (GA = 1): TRL's
    bnpo with GA = 2 divides each micro-batch by its own token count, which we do not follow."""
    import trl

    assert trl.__version__.split(".")[0] == "1"  # written against 1.16's _compute_loss
    processes, accumulation = layout
    c = make_case(seed=3, garbage=False, rows=8)
    beta = 0.3
    advantages = grpo_advantages(c["rewards"], c["group_ids"])  # = the loop's, test_advantages_match_loop
    share = 8 // (processes * accumulation)
    x = c["logps"].clone().requires_grad_(True)
    trl_loss = sum(trl_compute_loss(x, c, slice(s, s + share), advantages, loss_type=aggregation, beta=beta,
                                    bias_kl=bias_kl, eps_high=eps_high, processes=processes,
                                    accumulation=accumulation) for s in range(0, 8, share)) / processes
    (trl_grad,) = torch.autograd.grad(trl_loss, x)

    objective = create_objective(objective_config(kl_coef=beta, epsilon_high=eps_high, use_bias_correction_kl=bias_kl,
                                                  loss_aggregation=aggregation), max_completion_length=MAX_LEN)
    split = [slice(p * 8 // processes, (p + 1) * 8 // processes) for p in range(processes)]
    y = c["logps"].clone().requires_grad_(True)
    ours, reported = trainer_loss(objective, c, y, split, micro=3)
    (grad,) = torch.autograd.grad(ours, y)
    if aggregation == "bnpo" and accumulation > 1:
        assert abs(float(ours.detach() - trl_loss.detach())) > 1e-4
        return
    ours, trl_loss = float(ours.detach()), float(trl_loss.detach())
    assert abs(ours - trl_loss) <= 1e-15 and abs(reported - trl_loss) <= 1e-15
    assert float((grad - trl_grad).abs().max()) <= 1e-16


# ---------------------------------------------------------------------------------------------
# scale_rewards=batch across processes: the std of every process's rewards, as TRL gathers them.
# ---------------------------------------------------------------------------------------------


def _batch_std_worker(rank: int, store: str, rewards: list[list[float]], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=len(rewards))
    try:
        r = torch.tensor(rewards[rank], dtype=torch.float64)
        adv = grpo_advantages(r, torch.tensor([0, 0, 1, 1]), scale_rewards="batch")
        Path(f"{out}.{rank}").write_text(json.dumps({"std": batch_reward_std(r), "advantages": adv.tolist()}))
    finally:
        dist.destroy_process_group()


def test_batch_std_spans_processes(tmp_path):
    rewards = [[0.0, 1.0, 0.5, 0.5], [3.0, 1.0, 2.0, 7.0]]
    mp.spawn(_batch_std_worker, args=(str(tmp_path / "store"), rewards, str(tmp_path / "out")), nprocs=2)
    everything = rewards[0] + rewards[1]
    std = statistics.stdev(everything)
    for rank in range(2):
        got = json.loads((tmp_path / f"out.{rank}").read_text())
        assert got["std"] == pytest.approx(std, rel=1e-14)
        want = loop_advantages(everything, [0, 0, 1, 1, 2, 2, 3, 3], "batch")[4 * rank: 4 * rank + 4]
        assert got["advantages"] == pytest.approx(want, rel=1e-12)
    assert statistics.stdev(rewards[0]) != pytest.approx(std)  # the local std would differ


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
        "objective.name": "grpo", "objective.kl_coef": 0.04, "objective.loss_aggregation": "dapo",
        "train.updates_per_batch": 2, "train.micro_batch_size": 3, "optim.lr": 5e-2})))
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        assert 0.0 <= row["clip_fraction"] <= 1.0 and row["kl_k3"] >= 0.0
    # the stats are from the second update on each batch: the policy has moved away from pi_old and pi_ref
    assert any(r["kl_k3"] > 0 for r in rows[1:])
    assert "eval/accuracy" in rows[-1]


@pytest.mark.parametrize("budget", [0, 6])
def test_trainer_gives_dr_grpo_the_generation_budget(model_dir, tmp_path, budget):
    """The Dr. GRPO recipe in the trainer: L = rollout.max_new_tokens, or the task's (tiny_add: 4)."""
    config = load_config(None, overrides(model_dir, tmp_path, f"drgrpo{budget}", **{
        "objective.name": "grpo", "objective.loss_aggregation": "dr_grpo", "objective.scale_rewards": "none",
        "objective.epsilon_high": 0.28, "rollout.max_new_tokens": budget, "optim.lr": 5e-2}))
    run = setup(config)
    assert run.objective.max_completion_length == (budget or 4)
    assert run.objective.scale_rewards == "none" and run.objective.epsilon_high == 0.28
    run.lock.release()  # setup() made and locked the run folder: the run below replaces it
    rows = read_metrics(train(config, overwrite=True) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and all(math.isfinite(r["loss"]) for r in rows[1:])


@pytest.mark.parametrize("name", ["dr_grpo", "rs", "sft", "dpo"])
def test_trainer_runs_the_other_eq9_objectives(model_dir, tmp_path, name):
    run = train(load_config(None, overrides(model_dir, tmp_path, name, **{"objective.name": name})))
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) and "weight_abs_mean" in r for r in rows[1:])
    assert (run / "final" / "model.safetensors").exists()
