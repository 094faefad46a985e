"""GVPO and the other members of the paper's unified family (Eq. 9), as pure tensor functions.

Every post-training loss here has a gradient of the form (Eq. 9)

    grad L = - sum_groups sum_i w_i * grad log pi_theta(y_i | x)

and differs only in the weights ``w_i``. GVPO's weights (Eq. 12) are the difference between the
centred actual rewards and the centred implicit rewards ``R_theta = beta * log(pi_theta/pi_ref)``;
they sum to zero in every group, so the partition function ``Z(x)`` cancels (section 3.1) and the
loss is the MSE of Eq. 13, estimated without bias with ``1/(k-1)`` (Theorem 3.3, Corollary 3.4).

Names: ``logps``, ``ref_logps``, ``rewards``, ``group_ids`` all have shape ``(N,)``, one value per
completion; ``logps`` are sequence log-probs (sums over completion tokens). Nothing here keeps state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..groups import center, dense_index, group_sizes, group_std
from ..registry import Registry

__all__ = [
    "WEIGHT_SCHEMES",
    "check_inputs",
    "gvpo_loss",
    "gvpo_weights",
    "gvpo_grad_coefficients",
    "weighted_nll",
]


def check_inputs(logps: Tensor, ref_logps: Tensor, rewards: Tensor, group_ids: Tensor, beta: float) -> None:
    """Raise ``ValueError`` naming the argument when the inputs are not what the objectives expect."""
    n = None
    for name, t in (("logps", logps), ("ref_logps", ref_logps), ("rewards", rewards), ("group_ids", group_ids)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (N,), got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must have shape (N,) (one value per completion), got shape {tuple(t.shape)}")
        if n is None:
            n = t.shape[0]
        elif t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} values but logps has {n}; all inputs must have shape (N,)")
    if n == 0:
        raise ValueError("logps is empty: need at least one completion")
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor (one group label per completion), got dtype {group_ids.dtype}")
    for name, t in (("logps", logps), ("ref_logps", ref_logps), ("rewards", rewards)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        bad = ~torch.isfinite(t.detach())
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"{name} must be finite; {name}[{i}] = {t[i].item()} ({int(bad.sum())} non-finite values)")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def gvpo_weights(logps: Tensor, ref_logps: Tensor, rewards: Tensor, group_ids: Tensor, *, beta: float) -> Tensor:
    """GVPO gradient weights, Eq. 12 (detached), shape ``(N,)``.

    ``w_i = (R_i - mean_g R) - beta * (l_i - mean_g l)`` with ``l = logps - ref_logps``; the weights
    sum to zero within every group (0 for a group of one).

    >>> w = gvpo_weights(torch.tensor([-1., -2., -3.]), torch.zeros(3), torch.tensor([1., 0., 2.]),
    ...                  torch.tensor([0, 0, 0]), beta=0.5)
    >>> [round(x, 6) for x in w.tolist()], round(float(w.sum()), 6)
    ([-0.5, -1.0, 1.5], 0.0)
    """
    check_inputs(logps, ref_logps, rewards, group_ids, beta)
    index, num_groups = dense_index(group_ids)
    log_ratio = (logps - ref_logps).detach()
    return (center(rewards.detach(), index, num_groups) - beta * center(log_ratio, index, num_groups))


def _loss_normalisers(group_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, int, Tensor, int]:
    """Dense index, G, per-group ``1/(G * (k_g - 1))`` in ``dtype`` (0 where k_g = 1), and G_valid."""
    index, num_groups = dense_index(group_ids)
    sizes = group_sizes(index, num_groups)
    valid = sizes >= 2
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            "group_ids: every group has a single completion (k = 1): GVPO needs k >= 2 completions "
            "in at least one group"
        )
    # Divide in the inputs' dtype: an int / int here gives float32 and would cap float64 at ~1e-8.
    denominators = (num_valid * (sizes - 1).clamp(min=1)).to(dtype)
    per_group = torch.where(valid, denominators.reciprocal(), torch.zeros((), dtype=dtype, device=sizes.device))
    return index, num_groups, per_group, num_valid


def gvpo_loss(logps: Tensor, ref_logps: Tensor, rewards: Tensor, group_ids: Tensor, *, beta: float) -> Tensor:
    """GVPO loss, Eq. 13 with the unbiased ``1/(k-1)`` estimator of Eq. 16 (Corollary 3.4). Scalar.

    ``L = 1/G * sum_g 1/(k_g - 1) * sum_{i in g} 0.5 * ((Rθ_i - mean_g Rθ) - (R_i - mean_g R))**2``

    with ``Rθ_i = beta * (logps_i - ref_logps_i)``, over the ``G`` groups that have ``k_g >= 2``
    completions (groups of one carry no variance and contribute nothing). Its gradient is
    ``d L / d logps_i = -beta * w_i / (G * (k_g - 1))`` with ``w`` from :func:`gvpo_weights` (Eq. 13),
    so whole-group means can be computed once and detached when a group is split across micro-batches.

    Shapes: ``logps, ref_logps, rewards, group_ids: (N,)``; returns ``()``.

    Worked case (one group, beta = 1): Rθ = (0, 1), R = (1, 0): centred Rθ = (-.5, .5), centred
    R = (.5, -.5), residuals (-1, 1), sum of halves of squares = 1, times 1/(k-1) = 1.

    >>> gvpo_loss(torch.tensor([0., 1.]), torch.zeros(2), torch.tensor([1., 0.]), torch.tensor([4, 4]), beta=1.0)
    tensor(1.)
    """
    check_inputs(logps, ref_logps, rewards, group_ids, beta)
    implicit = beta * (logps - ref_logps)
    index, num_groups, per_group, _ = _loss_normalisers(group_ids, implicit.dtype)
    residual = center(implicit, index, num_groups) - center(rewards.to(implicit.dtype), index, num_groups)
    per_completion = 0.5 * residual**2 * per_group.index_select(0, index)
    return per_completion.sum()


def gvpo_grad_coefficients(
    logps: Tensor, ref_logps: Tensor, rewards: Tensor, group_ids: Tensor, *, beta: float
) -> Tensor:
    """``c_i = -d gvpo_loss / d logps_i = beta * w_i / (G * (k_g - 1))``, detached, shape ``(N,)``.

    ``-(c * logps).sum()`` has the same gradient as :func:`gvpo_loss`, and splitting it into any
    micro-batches is exact, because ``c`` holds the whole-group statistics.

    >>> gvpo_grad_coefficients(torch.tensor([0., 1.]), torch.zeros(2), torch.tensor([1., 0.]),
    ...                        torch.tensor([4, 4]), beta=1.0)
    tensor([ 1., -1.])
    """
    w = gvpo_weights(logps, ref_logps, rewards, group_ids, beta=beta)
    index, _, per_group, _ = _loss_normalisers(group_ids, w.dtype)
    return beta * w * per_group.index_select(0, index)


def weighted_nll(logps: Tensor, weights: Tensor, group_ids: Tensor) -> Tensor:
    """Weighted negative log-likelihood whose gradient is Eq. 9, averaged over groups. Scalar.

    ``L = -1/G * sum_g sum_{i in g} w_i * logps_i`` with ``weights`` detached (they are constants of
    the update, as in Eq. 9). ``G`` counts all groups in ``group_ids``.

    >>> weighted_nll(torch.tensor([-1., -2.]), torch.tensor([1., -1.]), torch.tensor([0, 0]))
    tensor(-1.)
    """
    if weights.shape != logps.shape or group_ids.shape != logps.shape:
        raise ValueError(
            f"logps, weights and group_ids must share shape (N,), got {tuple(logps.shape)}, "
            f"{tuple(weights.shape)}, {tuple(group_ids.shape)}"
        )
    _, num_groups = dense_index(group_ids)
    return -(weights.detach().to(logps.dtype) * logps).sum() / num_groups


# ----------------------------------------------------------------------------------------------
# Eq. 9 weight schemes, selectable by name. Each takes (logps, ref_logps, rewards, group_ids, *, beta)
# and returns detached weights (N,); turn them into a loss with ``weighted_nll``.
# ----------------------------------------------------------------------------------------------

WEIGHT_SCHEMES: Registry = Registry("weight scheme")


def _best_and_worst(rewards: Tensor, index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Position (N-space) of the first best and the first worst completion of each group, ``(G,)``."""
    n = rewards.shape[0]
    positions = torch.arange(n, device=rewards.device)
    result = []
    for reduce in ("amax", "amin"):
        extreme = rewards.new_empty(num_groups).scatter_reduce(0, index, rewards, reduce, include_self=False)
        is_extreme = rewards == extreme.index_select(0, index)
        pos = torch.where(is_extreme, positions, torch.full_like(positions, n))
        first = torch.full((num_groups,), n, dtype=positions.dtype, device=rewards.device)
        result.append(first.scatter_reduce(0, index, pos, "amin", include_self=True))
    return result[0], result[1]


@WEIGHT_SCHEMES.register("gvpo")
def gvpo_scheme(logps, ref_logps, rewards, group_ids, *, beta):
    """GVPO, Eq. 12: centred rewards minus centred implicit rewards."""
    return gvpo_weights(logps, ref_logps, rewards, group_ids, beta=beta)


@WEIGHT_SCHEMES.register("grpo")
def grpo_scheme(logps, ref_logps, rewards, group_ids, *, beta, eps: float = 1e-4):
    """GRPO, Eq. 3: ``(R_i - mean R) / (std R + eps)``, unbiased std as in TRL; 0 in a group of one."""
    check_inputs(logps, ref_logps, rewards, group_ids, beta)
    index, num_groups = dense_index(group_ids)
    r = rewards.detach()
    return center(r, index, num_groups) / (group_std(r, index, num_groups).index_select(0, index) + eps)


@WEIGHT_SCHEMES.register("dr_grpo")
def dr_grpo_scheme(logps, ref_logps, rewards, group_ids, *, beta):
    """Dr.GRPO: centred rewards ``R_i - mean R``, no standard-deviation scaling."""
    check_inputs(logps, ref_logps, rewards, group_ids, beta)
    index, num_groups = dense_index(group_ids)
    return center(rewards.detach(), index, num_groups)


@WEIGHT_SCHEMES.register("rs")
def rs_scheme(logps, ref_logps, rewards, group_ids, *, beta):
    """Rejection sampling / RAFT, Eq. 2: 1 for the (first) best completion of each group, 0 otherwise."""
    check_inputs(logps, ref_logps, rewards, group_ids, beta)
    index, num_groups = dense_index(group_ids)
    best, _ = _best_and_worst(rewards.detach(), index, num_groups)
    w = torch.zeros_like(rewards, dtype=rewards.dtype)
    w[best] = 1.0
    return w.detach()


@WEIGHT_SCHEMES.register("sft")
def sft_scheme(logps, ref_logps, rewards, group_ids, *, beta):
    """SFT, Eq. 1: weight 1 on every given completion."""
    check_inputs(logps, ref_logps, rewards, group_ids, beta)
    return torch.ones_like(rewards).detach()


@WEIGHT_SCHEMES.register("dpo")
def dpo_scheme(logps, ref_logps, rewards, group_ids, *, beta):
    """DPO (section 2.3) on the best/worst pair of each group.

    ``w_best = sigmoid(beta * l_worst - beta * l_best)``, ``w_worst = -w_best``, 0 elsewhere, with
    ``l = logps - ref_logps``; a group whose rewards are all equal has no pair and gets zeros.
    """
    check_inputs(logps, ref_logps, rewards, group_ids, beta)
    index, num_groups = dense_index(group_ids)
    best, worst = _best_and_worst(rewards.detach(), index, num_groups)
    has_pair = best != worst
    best, worst = best[has_pair], worst[has_pair]
    l = (logps - ref_logps).detach()
    w_best = torch.sigmoid(beta * (l[worst] - l[best]))
    w = torch.zeros_like(l)
    w[best] = w_best
    w[worst] = -w_best
    return w

