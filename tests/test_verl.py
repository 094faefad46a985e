"""The stock-verl route of docs/verl.md gives GVPO's update (fixed reference, one optimizer step per
rollout batch).

verl's arithmetic, re-implemented in float64 from its documented formulas (verl 0.9.1:
``ray_trainer.apply_kl_penalty``, ``core_algos.kl_penalty("kl")``,
``core_algos.compute_grpo_outcome_advantage(norm_adv_by_std_in_grpo=False)``,
``core_algos.compute_policy_loss_vanilla`` with ``agg_loss("seq-mean-token-sum")``), and, when verl
imports, verl's own functions on the same tensors (``test_verl_functions_...``; skipped otherwise).

Why the gradients match. Completion ``i`` of group ``g`` (``k`` each, ``N = G k`` in the mini-batch)
has token log-probs ``o_it`` under the rollout policy (verl's ``old_log_probs``, recomputed by the
actor, no gradient), ``r_it`` under the reference, ``m_it`` its response mask, reward ``R_i`` on its
last token. KL in the reward: ``token_level_rewards_it = score_it - beta * m_it (o_it - r_it)``;
GRPO sums them over tokens, ``s_i = R_i - beta * l_i`` with ``l_i = sum_t m_it (o_it - r_it)``, and
without std normalisation ``A_i = s_i - mean_g s = (R_i - mean_g R) - beta (l_i - mean_g l)``: Eq. 12's
weight ``w_i`` at the rollout parameters, a constant of the update (all inputs are detached).
With one optimizer step per batch the parameters of that step are the rollout parameters, so
``l_i = log pi_theta(y_i)/pi_ref(y_i)`` at the current ``theta`` and ``A_i = w_i(theta)`` exactly.
The vanilla PPO loss ``-A_i min(rho_it, clip(rho_it))`` (``rho = exp(logp - o)``) at ``rho = 1``
has gradient ``-A_i grad logp_it`` (the clip is inactive at 1 and the dual clip needs rho > 3), and
``seq-mean-token-sum`` sums tokens and divides by ``N``: ``grad L_verl = -(1/N) sum_i w_i grad
log pi(y_i)``. GVPO (``gvpo_loss``, Eq. 13 with 1/(k-1)) has ``grad L = -beta / (G (k-1)) sum_i w_i
grad log pi(y_i)``. So ``grad L_gvpo = c grad L_verl`` with ``c = beta k / (k-1)``: the same
direction; Adam's update ignores ``c`` (but for its epsilon), SGD needs ``lr_verl = c lr_gvpo``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gvpo import gvpo_loss, gvpo_weights

G, K, T, BETA = 5, 4, 7, 0.1


def random_batch(seed: int = 0) -> dict:
    """G groups of K completions of up to T tokens, verl's right-padded layout, float64."""
    g = torch.Generator().manual_seed(seed)
    n = G * K
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    scores = torch.zeros(n, T, dtype=torch.float64)
    rewards = torch.randint(0, 3, (n,), generator=g).double() + torch.rand(n, generator=g, dtype=torch.float64)
    scores[torch.arange(n), lengths - 1] = rewards  # verl's reward managers put the score on the last token
    return {
        "old": -3 * torch.rand(n, T, generator=g, dtype=torch.float64) * mask,  # rollout policy = current
        "ref": -3 * torch.rand(n, T, generator=g, dtype=torch.float64) * mask,
        "mask": mask, "scores": scores, "rewards": rewards,
        "uid": np.repeat(np.array([f"prompt-{i}" for i in range(G)], dtype=object), K),
        "group_ids": torch.arange(G).repeat_interleave(K),
    }


def verl_advantages(b: dict, beta: float) -> torch.Tensor:
    """KL in the reward (kl_penalty 'kl', fixed coefficient) then GRPO without std, per token."""
    kld = (b["old"] - b["ref"]) * b["mask"]
    token_level_rewards = b["scores"] - beta * kld
    s = token_level_rewards.sum(-1)
    mean = {u: s[b["uid"] == u].mean() for u in set(b["uid"])}
    return (s - torch.stack([mean[u] for u in b["uid"]]))[:, None] * b["mask"]


def verl_vanilla_seq_mean_token_sum(log_prob, old, advantages, mask, clip=0.2, clip_c=3.0) -> torch.Tensor:
    """verl's PPO clip loss with dual clip, aggregated as seq-mean-token-sum over the whole mini-batch."""
    ratio = torch.exp((log_prob - old).clamp(-20, 20))
    losses = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    losses = torch.where(advantages < 0, torch.minimum(-advantages * clip_c, losses), losses)
    seq = (losses * mask).sum(-1)
    return seq.sum() / (mask.sum(-1) > 0).sum()


def gvpo_reference(b: dict, log_prob: torch.Tensor) -> torch.Tensor:
    return gvpo_loss((log_prob * b["mask"]).sum(-1), (b["ref"] * b["mask"]).sum(-1), b["rewards"], b["group_ids"],
                     beta=BETA)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_in_reward_grpo_advantages_are_eq12_weights(seed):
    b = random_batch(seed)
    advantages = verl_advantages(b, BETA)
    w = gvpo_weights((b["old"] * b["mask"]).sum(-1), (b["ref"] * b["mask"]).sum(-1), b["rewards"], b["group_ids"],
                     beta=BETA)
    assert torch.allclose(advantages, w[:, None] * b["mask"], rtol=0, atol=1e-13)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_verl_step_is_the_gvpo_gradient_times_a_constant(seed):
    """At the rollout parameters, d L_gvpo / d logp_it = beta k/(k-1) * d L_verl / d logp_it, every token."""
    b = random_batch(seed)
    log_prob = b["old"].clone().requires_grad_(True)  # the first (only) step: current = rollout policy
    (g_verl,) = torch.autograd.grad(
        verl_vanilla_seq_mean_token_sum(log_prob, b["old"], verl_advantages(b, BETA), b["mask"]), log_prob)
    (g_gvpo,) = torch.autograd.grad(gvpo_reference(b, log_prob), log_prob)
    assert g_gvpo.abs().max() > 1e-3
    assert torch.allclose(g_gvpo, BETA * K / (K - 1) * g_verl, rtol=0, atol=1e-14)


def test_a_second_step_on_the_same_batch_is_not_gvpo():
    """Why more steps per batch need a code change: after an update, verl's advantages still hold the
    rollout-time log-ratios and its ratio is no longer 1, so the gradient leaves GVPO's direction."""
    b = random_batch(0)
    g = torch.Generator().manual_seed(5)
    moved = (b["old"] + 0.3 * torch.randn(b["old"].shape, generator=g, dtype=torch.float64)) * b["mask"]
    log_prob = moved.clone().requires_grad_(True)
    (g_verl,) = torch.autograd.grad(
        verl_vanilla_seq_mean_token_sum(log_prob, b["old"], verl_advantages(b, BETA), b["mask"]), log_prob)
    (g_gvpo,) = torch.autograd.grad(gvpo_reference(b, log_prob), log_prob)
    cos = torch.nn.functional.cosine_similarity(g_gvpo.flatten(), g_verl.flatten(), dim=0)
    assert cos < 0.99


def test_verl_functions_give_the_same_advantages_and_gradient():
    """The same checks with verl's own functions (verl installs with ray; skipped where it does not import)."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from omegaconf import OmegaConf

    for seed in range(3):
        b = random_batch(seed)
        kld = core_algos.kl_penalty(b["old"], b["ref"], kl_penalty="kl") * b["mask"]  # as in apply_kl_penalty
        token_level_rewards = b["scores"] - BETA * kld
        advantages, _ = core_algos.compute_grpo_outcome_advantage(
            token_level_rewards, b["mask"], b["uid"], norm_adv_by_std_in_grpo=False)
        assert torch.allclose(advantages, verl_advantages(b, BETA), rtol=0, atol=1e-13)

        config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
                                   "clip_ratio_c": 3.0, "global_batch_info": {}})
        log_prob = b["old"].clone().requires_grad_(True)
        loss, _ = core_algos.compute_policy_loss_vanilla(b["old"], log_prob, advantages, b["mask"].bool(),
                                                         loss_agg_mode="seq-mean-token-sum", config=config)
        (g_verl,) = torch.autograd.grad(loss, log_prob)
        (g_gvpo,) = torch.autograd.grad(gvpo_reference(b, log_prob), log_prob)
        assert torch.allclose(g_gvpo, BETA * K / (K - 1) * g_verl, rtol=0, atol=1e-14)

        # and the re-implemented PPO loss is verl's away from ratio 1 too (clipped and dual-clipped tokens)
        moved = b["old"] + 0.5 * torch.randn(b["old"].shape, generator=torch.Generator().manual_seed(seed),
                                             dtype=torch.float64)
        theirs, _ = core_algos.compute_policy_loss_vanilla(b["old"], moved, advantages, b["mask"].bool(),
                                                           loss_agg_mode="seq-mean-token-sum", config=config)
        ours = verl_vanilla_seq_mean_token_sum(moved, b["old"], advantages, b["mask"])
        assert torch.allclose(theirs, ours, rtol=1e-12, atol=0)
