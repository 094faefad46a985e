"""GRPO as people run it (DeepSeekMath, TRL, DAPO, Dr.GRPO): token-level PPO-clipped surrogate.

This is the baseline GVPO is compared against (paper section 3.5), not the Eq. 3 / Eq. 9 weight scheme
``grpo`` in :mod:`gvpo.objectives` (that one is the sequence-level gradient of the unified framework).
Per completion ``i`` of a group and per completion token ``t``:

    A_i   = (R_i - mean_g R) / (std_g R + 1e-4)                 group-standardised advantage (Eq. 3)
    r_it  = exp(logp_it - old_it)                               importance ratio to pi_old (Eq. 19)
    s_it  = min(r_it * A_i, clip(r_it, 1 - eps, 1 + eps) * A_i) PPO clipped surrogate
    k3_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1      k3 estimator of KL(pi_theta || pi_ref)
    l_it  = -(s_it - kl_coef * k3_it)                           per-token loss

``old`` is the policy before this batch's first update (``Batch.old_token_logps``): with
``train.updates_per_batch=1``, ``r = 1`` in value but its gradient is still the policy gradient
``-A_i * grad logp_it``. ``std`` is the unbiased (k-1) standard deviation, as in TRL. With
``kl_coef == 0`` no reference log-probs are needed.

Aggregation of ``l`` over the ``N`` completions (``m_it`` = completion mask, ``|y_i| = sum_t m_it``):

- ``sequence_mean`` (DeepSeekMath, the original GRPO): ``1/N sum_i 1/|y_i| sum_t m_it l_it``.
- ``token_mean`` (DAPO; TRL's default ``loss_type``): ``sum_it m_it l_it / sum_it m_it``.
- ``constant`` (Dr.GRPO): ``sum_it m_it l_it / (N * C)`` with ``C`` the padded completion width.
  Dr.GRPO (and TRL's ``loss_type="dr_grpo"``) use the generation budget ``max_new_tokens`` as ``C``; the
  trainer pads each batch to its longest completion, so here ``C`` is that width unless you pass
  ``constant_length``. Dr.GRPO's full recipe is ``constant`` aggregation *and* advantages without the
  std division: ``GRPOObjective(config, scale_rewards=False)`` with ``loss_aggregation=constant``
  (``objective.name=dr_grpo`` stays the Eq. 9 weight scheme, sequence-level, no clipping).

Micro-batches and processes. The trainer divides the summed ``micro_loss`` of all micro-batches by the
global ``norm`` (summed over processes), so each aggregation is written as ``sum_i a_i sum_t m_it l_it /
norm`` with per-row scales ``a_i`` that need no other row: ``sequence_mean``: ``a_i = 1/|y_i|``,
``norm = N``; ``token_mean``: ``a_i = 1``, ``norm = sum m``; ``constant``: ``a_i = 1``, ``norm = N * C``.
Any micro-batch split then gives the same loss and gradient. Across processes ``sequence_mean`` and
``token_mean`` are exact; ``constant`` uses each process's own padded width (``sum_p N_p * C_p``), which
equals ``N * C`` when every process pads to the same width.

Where this departs from TRL: the advantages use whole-group statistics of a batch on one process (the
trainer keeps groups whole), and the clipped-fraction statistic is measured at the start of the update
(``prepare``), from detached log-probs, not averaged over micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..batch import Batch, Prepared
from .base import OBJECTIVES
from .functional import dr_grpo_scheme, grpo_scheme

__all__ = [
    "AGGREGATIONS",
    "GRPOObjective",
    "GRPOTerms",
    "aggregation_scales",
    "grpo_advantages",
    "grpo_token_loss",
    "grpo_token_terms",
]

AGGREGATIONS = ("sequence_mean", "token_mean", "constant")


def grpo_advantages(rewards: Tensor, group_ids: Tensor, *, scale_rewards: bool = True) -> Tensor:
    """Group-relative advantages ``(N,)``: ``(R - mean_g R) / (std_g R + 1e-4)``, or ``R - mean_g R``.

    Uses :func:`gvpo.objectives.grpo_scheme` (standardised, Eq. 3) or ``dr_grpo_scheme`` (centred only,
    ``scale_rewards=False``). A group of one completion gets 0.

    >>> a = grpo_advantages(torch.tensor([1., 0., 0., 5.]), torch.tensor([0, 0, 0, 1]))
    >>> [round(x, 3) for x in a.tolist()]
    [1.155, -0.577, -0.577, 0.0]
    >>> grpo_advantages(torch.tensor([1., 0., 0., 5.]), torch.tensor([0, 0, 0, 1]), scale_rewards=False)
    tensor([ 0.6667, -0.3333, -0.3333,  0.0000])
    """
    zeros = torch.zeros_like(rewards)
    scheme = grpo_scheme if scale_rewards else dr_grpo_scheme
    return scheme(zeros, zeros, rewards, group_ids, beta=1.0)


class GRPOTerms(NamedTuple):
    """Per-token pieces of the GRPO loss, each ``(N, C)``; zero (False) where the mask is 0."""

    loss: Tensor
    """``l_it = -(s_it - kl_coef * k3_it)`` (differentiable in ``token_logps``)."""
    clipped: Tensor
    """bool: the clipped branch of the min is the active one (``r < 1-eps, A < 0`` or ``r > 1+eps, A > 0``)."""
    kl: Tensor
    """``k3_it`` (detached); zeros when no reference was given."""


def _check(token_logps, old_token_logps, ref_token_logps, advantages, completion_mask, epsilon, kl_coef) -> None:
    if token_logps.dim() != 2:
        raise ValueError(f"token_logps must have shape (N, C), got {tuple(token_logps.shape)}")
    shape = tuple(token_logps.shape)
    named = [("old_token_logps", old_token_logps), ("completion_mask", completion_mask)]
    if ref_token_logps is not None:
        named.append(("ref_token_logps", ref_token_logps))
    for name, t in named:
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape} like token_logps")
    if tuple(advantages.shape) != shape[:1]:
        raise ValueError(f"advantages must have shape (N,) = ({shape[0]},), got {tuple(advantages.shape)}")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if not (isinstance(kl_coef, (int, float)) and math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
    if kl_coef > 0 and ref_token_logps is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_token_logps (pass kl_coef=0 to train without a reference)")


def grpo_token_terms(token_logps: Tensor, old_token_logps: Tensor, ref_token_logps: Tensor | None,
                     advantages: Tensor, completion_mask: Tensor, *, epsilon: float, kl_coef: float) -> GRPOTerms:
    """Per-token loss ``l``, clipped mask and ``k3`` (module docstring), all ``(N, C)``, masked.

    ``token_logps, old_token_logps, ref_token_logps, completion_mask: (N, C)``; ``advantages: (N,)``
    (detached). ``ref_token_logps`` may be ``None`` when ``kl_coef == 0``. Values at masked positions
    are ignored (they never reach an ``exp``), so padding may hold anything.
    """
    _check(token_logps, old_token_logps, ref_token_logps, advantages, completion_mask, epsilon, kl_coef)
    mask = completion_mask.bool()
    dtype = token_logps.dtype
    zero = torch.zeros((), dtype=dtype, device=token_logps.device)
    log_ratio = torch.where(mask, token_logps - old_token_logps.detach().to(dtype), zero)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(dtype)[:, None]
    unclipped = ratio * adv
    clipped_value = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * adv
    surrogate = torch.minimum(unclipped, clipped_value)
    with torch.no_grad():
        clipped = mask & (clipped_value < unclipped)
    loss = -surrogate
    if ref_token_logps is not None:
        delta = torch.where(mask, ref_token_logps.detach().to(dtype) - token_logps, zero)
        k3 = torch.exp(delta) - delta - 1.0
        if kl_coef > 0:
            loss = loss + kl_coef * k3
        kl = k3.detach()
    else:
        kl = torch.zeros_like(token_logps, dtype=dtype).detach()
    return GRPOTerms(torch.where(mask, loss, zero), clipped, torch.where(mask, kl, zero))


def aggregation_scales(completion_mask: Tensor, aggregation: str, *, constant_length: int | None = None,
                       dtype: torch.dtype = torch.float32) -> tuple[Tensor, float]:
    """Per-row scales ``a (N,)`` and normaliser ``norm`` so that the loss is ``sum_i a_i sum_t m_it l_it / norm``.

    ``sequence_mean``: ``a_i = 1/max(|y_i|, 1)``, ``norm = N``; ``token_mean``: ``a = 1``,
    ``norm = sum m``; ``constant``: ``a = 1``, ``norm = N * (constant_length or C)``.

    >>> a, norm = aggregation_scales(torch.tensor([[1, 1, 0], [1, 0, 0]]), "sequence_mean")
    >>> a.tolist(), norm
    ([0.5, 1.0], 2.0)
    >>> aggregation_scales(torch.tensor([[1, 1, 0], [1, 0, 0]]), "constant")[1]
    6.0
    """
    n, width = completion_mask.shape
    lengths = completion_mask.to(dtype).sum(-1)
    if aggregation == "sequence_mean":
        return lengths.clamp(min=1.0).reciprocal(), float(n)
    ones = torch.ones(n, dtype=dtype, device=completion_mask.device)
    if aggregation == "token_mean":
        return ones, float(lengths.sum())
    if aggregation == "constant":
        length = width if constant_length is None else constant_length
        if length < width:
            raise ValueError(f"constant_length={constant_length} is shorter than the completions' width {width}")
        return ones, float(n * length)
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {aggregation!r}")


def grpo_token_loss(token_logps: Tensor, old_token_logps: Tensor, ref_token_logps: Tensor | None,
                    advantages: Tensor, completion_mask: Tensor, *, epsilon: float = 0.2, kl_coef: float = 0.0,
                    aggregation: str = "sequence_mean", constant_length: int | None = None) -> Tensor:
    """GRPO loss (module docstring): clipped surrogate minus ``kl_coef * k3``, aggregated. Scalar.

    Shapes: ``token_logps, old_token_logps, ref_token_logps, completion_mask: (N, C)``,
    ``advantages: (N,)`` (e.g. from :func:`grpo_advantages`); ``ref_token_logps`` may be ``None``
    when ``kl_coef == 0``. Differentiable in ``token_logps`` only.

    On-policy (``old == logps``) the ratio is 1 and the value is ``-mean_i A_i`` (sequence_mean):

    >>> logps = torch.tensor([[-1., -2.], [-0.5, 0.]], requires_grad=True)
    >>> mask = torch.tensor([[1, 1], [1, 0]])
    >>> adv = torch.tensor([1., -1.])
    >>> loss = grpo_token_loss(logps, logps.detach(), None, adv, mask, epsilon=0.2)
    >>> loss.backward(); loss.item(), logps.grad.tolist()
    (0.0, [[-0.25, -0.25], [0.5, 0.0]])

    A ratio of ``e**0.5 > 1.2`` with ``A > 0`` is clipped: the token's value is ``1.2 * A``, no gradient.

    >>> grpo_token_loss(torch.tensor([[0.5]]), torch.tensor([[0.]]), None, torch.tensor([1.]),
    ...                 torch.tensor([[1]]), epsilon=0.2)
    tensor(-1.2000)
    """
    terms = grpo_token_terms(token_logps, old_token_logps, ref_token_logps, advantages, completion_mask,
                             epsilon=epsilon, kl_coef=kl_coef)
    scales, norm = aggregation_scales(completion_mask, aggregation, constant_length=constant_length,
                                      dtype=terms.loss.dtype)
    return (scales[:, None] * terms.loss).sum() / max(norm, 1.0)


@dataclass
class GRPOPrepared(Prepared):
    """:class:`gvpo.batch.Prepared` plus the per-row scales of the aggregation; ``coef`` = advantages ``(N,)``.

    Both are kept in float64 and cast to the log-probs' dtype in ``micro_loss``.
    """

    scales: Tensor | None = None
    """(N,) per-row factor ``a_i`` of :func:`aggregation_scales`."""


class GRPOObjective:
    """Trainer-facing GRPO (``objective.name=grpo``): token-level clipped surrogate and k3 penalty.

    Reads ``clip_epsilon``, ``kl_coef`` and ``loss_aggregation`` from an ``ObjectiveConfig``.
    ``scale_rewards=False`` drops the std division of the advantages (Dr.GRPO); ``constant_length``
    sets ``C`` of the ``constant`` aggregation (default: the batch's padded width).
    """

    name = "grpo"

    def __init__(self, config, *, scale_rewards: bool = True, constant_length: int | None = None):
        self.epsilon = float(config.clip_epsilon)
        self.kl_coef = float(config.kl_coef)
        self.aggregation = config.loss_aggregation
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {', '.join(AGGREGATIONS)}; got {self.aggregation!r}")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"clip_epsilon must be >= 0, got {self.epsilon}")
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        self.scale_rewards, self.constant_length = scale_rewards, constant_length

    def _terms(self, token_logps: Tensor, batch: Batch, rows: slice, advantages: Tensor) -> GRPOTerms:
        ref = batch.ref_token_logps[rows] if batch.ref_token_logps is not None else None
        if batch.old_token_logps is None:
            raise ValueError("batch.old_token_logps is missing: the trainer sets it at the first update of a batch")
        if self.kl_coef > 0 and ref is None:
            raise ValueError(f"objective.kl_coef={self.kl_coef} needs reference log-probs; set kl_coef=0 to train without")
        return grpo_token_terms(token_logps, batch.old_token_logps[rows].to(token_logps.device),
                                None if ref is None else ref.to(token_logps.device), advantages,
                                batch.completion_mask[rows].to(token_logps.device),
                                epsilon=self.epsilon, kl_coef=self.kl_coef)

    def prepare(self, batch: Batch, token_logps: Tensor) -> GRPOPrepared:
        """Advantages and aggregation scales of the whole batch; loss value at the current policy."""
        advantages = grpo_advantages(batch.rewards.double(), batch.group_ids, scale_rewards=self.scale_rewards)
        mask = batch.completion_mask
        scales, norm = aggregation_scales(mask, self.aggregation, constant_length=self.constant_length,
                                          dtype=torch.float64)
        all_rows = slice(None)
        terms = self._terms(token_logps.detach().double(), batch, all_rows, advantages)
        loss_sum = float((scales[:, None] * terms.loss).sum())
        tokens = max(float(mask.sum()), 1.0)
        stats = {"advantage_abs_mean": float(advantages.abs().mean()),
                 "clip_fraction": float(terms.clipped.sum()) / tokens,
                 "kl_k3": float(terms.kl.sum()) / tokens}
        return GRPOPrepared(norm=norm, loss_sum=loss_sum, coef=advantages, stats=stats, scales=scales)

    def micro_loss(self, token_logps: Tensor, batch: Batch, rows: slice, prepared: GRPOPrepared) -> Tensor:
        """``sum_{i in rows} a_i sum_t m_it l_it``; the trainer divides by the global ``norm``."""
        advantages = prepared.coef[rows].to(token_logps.device)
        terms = self._terms(token_logps, batch, rows, advantages)
        scales = prepared.scales[rows].to(device=token_logps.device, dtype=terms.loss.dtype)
        return (scales[:, None] * terms.loss).sum()


@OBJECTIVES.register("grpo")
def grpo(config) -> GRPOObjective:
    """GRPO as people run it: PPO-clipped token-level surrogate with a k3 KL penalty."""
    return GRPOObjective(config)
