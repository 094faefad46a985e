"""GRPO as people run it (DeepSeekMath, TRL, DAPO, Dr.GRPO): token-level PPO-clipped surrogate.

This is the baseline GVPO is compared against (paper section 3.5), not the Eq. 3 / Eq. 9 weight scheme
``grpo`` in :mod:`gvpo.objectives` (that one is the sequence-level gradient of the unified framework).
It follows TRL 1.16's ``GRPOTrainer`` (``_generate_and_score_completions`` for the advantages,
``_compute_loss`` for the loss, ``importance_sampling_level="token"``), with TRL's option names. Per
completion ``i`` of a group and per completion token ``t``:

    A_i   = (R_i - mean_g R) / (std R + 1e-4)                    advantage; std per ``scale_rewards``
    r_it  = exp(logp_it - old_it)                                importance ratio to pi_old (Eq. 19)
    s_it  = min(r_it A_i, clip(r_it, 1 - eps, 1 + eps_high) A_i) PPO clipped surrogate
    k3_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1       k3 estimator of KL(pi_theta || pi_ref)
    l_it  = -s_it + kl_coef * k3_it * r_it                       per-token loss (``* r_it``: bias correction)

``scale_rewards``: ``group`` (default) divides by the group's std, ``batch`` by the std of all the
step's rewards (the mean stays per group), ``none`` does not divide (Dr.GRPO); std is the unbiased
(Bessel, n-1) one and a group of one gets ``A = 0``. ``eps`` is ``clip_epsilon`` (TRL's ``epsilon``),
``eps_high`` is ``epsilon_high`` (DAPO's clip-higher; ``None`` = ``eps``). The factor ``r_it`` on the
KL term is TRL's ``use_bias_correction_kl=True`` (its default and ours): it makes the penalty's
gradient the unbiased reverse-KL gradient off-policy. Its value is ``k3`` when ``r = 1`` but its
gradient gains ``kl_coef * k3_it * grad logp_it``, so it changes the update whenever the policy is
away from the reference, even at the first update on a batch; ``False`` is the plain ``k3`` penalty.

GSPO (``importance_sampling_level="sequence"``, TRL's option; Zheng et al. 2025) replaces the token
ratio by one ratio per completion, the geometric mean of its token ratios (``m`` = completion mask):

    r_i   = exp(sum_t m_it (logp_it - old_it) / max(|y_i|, 1))   sequence ratio, used for every token of y_i

in the clipped surrogate and in the bias-corrected KL term, exactly as TRL 1.16 broadcasts its ``(B, 1)``
ratio; the k3 term stays per token. Each token's loss then carries ``d r_i / d logp_it = r_i / |y_i|``.
The aggregations apply unchanged (TRL warns that with dapo, bnpo or dr_grpo the sum over tokens weights a
completion by its length; GSPO's paper uses ``grpo``). ``objective.name=gspo`` is ``grpo`` with this level.

``old`` is the policy before this batch's first update (``Batch.old_token_logps``): with
``train.updates_per_batch=1``, ``r = 1`` in value but its gradient is still the policy gradient
``-A_i * grad logp_it``. With ``kl_coef == 0`` no reference log-probs are needed.

Under ``train.async_lag`` (:mod:`gvpo.generation`) the completions come from older weights. With
``importance_sampling`` (the default, ``objective.importance_sampling``) ``old`` is then the log-probs of
the weights that sampled each completion (``Batch.sampler_token_logps``), so ``r`` is the importance
ratio to the sampler, clipped as above: what TRL's ``AsyncGRPOTrainer`` does with its sampler's
log-probs. ``False`` keeps ``old`` = the policy at the batch's first update: stale samples treated as
on-policy, no correction. Without a lag both are the same.

Aggregation of ``l`` over the ``N`` completions (``m_it`` = the loss mask, a batch's ``action_mask``: 1 on
the model's tokens, 0 on an episode's observations and on padding, TRL's ``completion_mask * tool_mask``;
``|y_i| = sum_t m_it`` counts the model's tokens only), named as TRL's ``loss_type``:

- ``grpo`` (DeepSeekMath, the original GRPO): ``1/N sum_i 1/|y_i| sum_t m_it l_it``.
- ``dapo`` (DAPO; TRL's default): ``sum_it m_it l_it / sum_it m_it`` over the whole step's batch.
- ``bnpo``: a token mean per process, averaged over processes (see below).
- ``dr_grpo`` (Dr.GRPO): ``sum_it m_it l_it / (N * L)`` with ``L = max_completion_length``, the
  generation budget (the trainer passes ``rollout.max_new_tokens``, or the task's), a constant that does
  not depend on the batch. Dr.GRPO's full recipe is this *and* ``scale_rewards=none``
  (``objective.name=dr_grpo`` is the paper's Eq. 9 weight scheme: sequence-level, no clipping).

Micro-batches and processes. The trainer divides the summed ``micro_loss`` of all micro-batches by the
global ``norm`` (summed over processes), so each aggregation is written as ``sum_i a_i sum_t m_it l_it /
norm`` with per-row scales ``a_i`` that need no other row, and the loss and gradient are the same for
any micro-batch size. ``grpo``: ``a_i = 1/|y_i|``, ``norm = N``; ``dapo``: ``a_i = 1``, ``norm = sum
m``; ``dr_grpo``: ``a_i = 1``, ``norm = N * L``. These equal TRL's (its micro-batch losses divided by
the accumulation steps and averaged over processes) whenever TRL's micro-batches hold equal numbers of
completions and one generation batch makes one optimizer step. TRL's ``bnpo`` divides each micro-batch
by *its own* token count, so its value depends on how TRL splits the step; ours takes TRL's meaning
with one micro-batch per process (``gradient_accumulation_steps=1``): ``a_i = 1/T_p`` with ``T_p`` the
tokens of this process's batch and ``norm = 1`` per process, i.e. ``1/P sum_p (sum over process p's
tokens / T_p)``; it does not change with our micro-batch size, and on one process it equals ``dapo``.
``scale_rewards=batch`` takes the std over all processes' rewards (as TRL does) when
``torch.distributed`` is initialised.

Where this departs from TRL otherwise: the group statistics come from a batch on one process (the
trainer keeps groups whole), and the clipped-fraction and ``kl_k3`` statistics (plain ``k3``, without
the ratio) are measured at the start of the update (``prepare``), from detached log-probs, not averaged
over micro-batches (with GSPO, a clipped completion counts all its tokens: TRL counts it once). TRL's other
options (``delta``, entropy masks, vLLM importance correction, the other loss types) are not offered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..batch import Batch, Prepared
from .base import OBJECTIVES
from .functional import dr_grpo_scheme, grpo_scheme

__all__ = [
    "AGGREGATIONS",
    "LEVELS",
    "SCALE_REWARDS",
    "GRPOObjective",
    "GRPOTerms",
    "aggregation_scales",
    "batch_reward_std",
    "grpo_advantages",
    "grpo_token_loss",
    "grpo_token_terms",
]

AGGREGATIONS = ("grpo", "dapo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
LEVELS = ("token", "sequence")
"""``importance_sampling_level``: a ratio per token (PPO, GRPO) or per completion (GSPO)."""
STD_EPS = 1e-4


def batch_reward_std(rewards: Tensor) -> float:
    """Unbiased (n-1) std of all the step's rewards ``(N,)``: this process's, or every process's when
    ``torch.distributed`` is initialised (TRL gathers the rewards of all processes); 0 for one reward.

    >>> round(batch_reward_std(torch.tensor([1., 0., 0., 5.])), 6)  # sqrt(17 / 3)
    2.380476
    """
    r = rewards.detach().double()
    device = r.device
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())

    def total(values: list[Tensor]) -> Tensor:
        t = torch.stack(values).to(device)
        if distributed:
            dist.all_reduce(t)
        return t

    count, sum_ = total([r.new_tensor(float(r.numel())), r.sum()]).tolist()
    if count < 2:
        return 0.0
    (squares,) = total([((r - sum_ / count) ** 2).sum()]).tolist()
    return math.sqrt(squares / (count - 1))


def grpo_advantages(rewards: Tensor, group_ids: Tensor, *, scale_rewards: str = "group",
                    batch_std: float | None = None) -> Tensor:
    """Group-relative advantages ``(N,)``: ``(R - mean_g R) / (std + 1e-4)`` or ``R - mean_g R``.

    ``scale_rewards``: ``group`` = the group's std (:func:`gvpo.objectives.grpo_scheme`, Eq. 3),
    ``batch`` = ``batch_std`` (default: :func:`batch_reward_std` of ``rewards``), ``none`` = centred
    only (``dr_grpo_scheme``). A group of one completion gets 0.

    >>> r, g = torch.tensor([1., 0., 0., 5.]), torch.tensor([0, 0, 0, 1])
    >>> [round(x, 3) for x in grpo_advantages(r, g).tolist()]
    [1.155, -0.577, -0.577, 0.0]
    >>> grpo_advantages(r, g, scale_rewards="none")
    tensor([ 0.6667, -0.3333, -0.3333,  0.0000])
    >>> [round(x, 3) for x in grpo_advantages(r, g, scale_rewards="batch").tolist()]  # std 2.380
    [0.28, -0.14, -0.14, 0.0]
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}; got {scale_rewards!r}")
    zeros = torch.zeros_like(rewards)
    if scale_rewards == "group":
        return grpo_scheme(zeros, zeros, rewards, group_ids, beta=1.0, eps=STD_EPS)
    centred = dr_grpo_scheme(zeros, zeros, rewards, group_ids, beta=1.0)
    if scale_rewards == "none":
        return centred
    std = batch_reward_std(rewards) if batch_std is None else batch_std
    return centred / (std + STD_EPS)


class GRPOTerms(NamedTuple):
    """Per-token pieces of the GRPO loss, each ``(N, C)``; zero (False) where the mask is 0."""

    loss: Tensor
    """``l_it = -s_it + kl_coef * k3_it (* r_it)`` (differentiable in ``token_logps``)."""
    clipped: Tensor
    """bool: the clipped branch of the min is the active one (``r < 1-eps, A < 0`` or ``r > 1+eps_high, A > 0``)."""
    kl: Tensor
    """``k3_it`` (detached, without the ratio); zeros when no reference was given."""


def _check_number(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check(token_logps, old_token_logps, ref_token_logps, advantages, completion_mask, epsilon, epsilon_high,
           kl_coef, level="token") -> None:
    if level not in LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {', '.join(LEVELS)}; got {level!r}")
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
    _check_number("epsilon", epsilon)
    _check_number("epsilon_high", epsilon_high, allow_none=True)
    _check_number("kl_coef", kl_coef)
    if kl_coef > 0 and ref_token_logps is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_token_logps (pass kl_coef=0 to train without a reference)")


def grpo_token_terms(token_logps: Tensor, old_token_logps: Tensor, ref_token_logps: Tensor | None,
                     advantages: Tensor, completion_mask: Tensor, *, epsilon: float, kl_coef: float,
                     epsilon_high: float | None = None, use_bias_correction_kl: bool = True,
                     importance_sampling_level: str = "token") -> GRPOTerms:
    """Per-token loss ``l``, clipped mask and ``k3`` (module docstring), all ``(N, C)``, masked.

    ``token_logps, old_token_logps, ref_token_logps, completion_mask: (N, C)``; ``advantages: (N,)``
    (detached). ``ref_token_logps`` may be ``None`` when ``kl_coef == 0``. Values at masked positions
    are ignored (they never reach an ``exp``), so padding may hold anything. ``completion_mask`` is the loss
    mask: a :class:`~gvpo.batch.Batch`'s ``action_mask`` (an episode's observations are 0).
    ``importance_sampling_level``: ``token``, or ``sequence`` (GSPO: one ratio per row, the exp of its mean
    token log-ratio).

    GSPO's ratio is the geometric mean of the token ratios, e.g. ``exp((0.2 - 0.1) / 2)`` for this row:

    >>> terms = grpo_token_terms(torch.tensor([[0.2, -0.1]]), torch.zeros(1, 2), None, torch.tensor([1.]),
    ...                          torch.ones(1, 2), epsilon=0.2, kl_coef=0.0, importance_sampling_level="sequence")
    >>> terms.loss  # -r A on each token
    tensor([[-1.0513, -1.0513]])
    """
    _check(token_logps, old_token_logps, ref_token_logps, advantages, completion_mask, epsilon, epsilon_high,
           kl_coef, importance_sampling_level)
    high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.bool()
    dtype = token_logps.dtype
    zero = torch.zeros((), dtype=dtype, device=token_logps.device)
    log_ratio = torch.where(mask, token_logps - old_token_logps.detach().to(dtype), zero)
    if importance_sampling_level == "sequence":  # (N, 1): one ratio per completion, broadcast over its tokens
        log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1).to(dtype)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(dtype)[:, None]
    unclipped = ratio * adv
    clipped_value = torch.clamp(ratio, 1.0 - epsilon, 1.0 + high) * adv
    surrogate = torch.minimum(unclipped, clipped_value)
    with torch.no_grad():
        clipped = mask & (clipped_value < unclipped)
    loss = -surrogate
    if ref_token_logps is not None:
        delta = torch.where(mask, ref_token_logps.detach().to(dtype) - token_logps, zero)
        k3 = torch.exp(delta) - delta - 1.0
        if kl_coef > 0:
            loss = loss + kl_coef * (k3 * ratio if use_bias_correction_kl else k3)
        kl = k3.detach()
    else:
        kl = torch.zeros_like(token_logps, dtype=dtype).detach()
    return GRPOTerms(torch.where(mask, loss, zero), clipped, torch.where(mask, kl, zero))


def aggregation_scales(completion_mask: Tensor, aggregation: str, *, max_completion_length: int | None = None,
                       dtype: torch.dtype = torch.float32) -> tuple[Tensor, float]:
    """Per-row scales ``a (N,)`` and normaliser ``norm`` so that the loss is ``sum_i a_i sum_t m_it l_it / norm``.

    ``grpo``: ``a_i = 1/max(|y_i|, 1)``, ``norm = N``; ``dapo``: ``a = 1``, ``norm = sum m``; ``bnpo``:
    ``a = 1/max(sum m, 1)``, ``norm = 1`` (this process's token mean); ``dr_grpo``: ``a = 1``,
    ``norm = N * max_completion_length`` (required, at least the mask's width).

    >>> m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> a, norm = aggregation_scales(m, "grpo")
    >>> a.tolist(), norm
    ([0.5, 1.0], 2.0)
    >>> aggregation_scales(m, "dapo")[1], aggregation_scales(m, "bnpo")
    (3.0, (tensor([0.3333, 0.3333]), 1.0))
    >>> aggregation_scales(m, "dr_grpo", max_completion_length=16)[1]
    32.0
    """
    n, width = completion_mask.shape
    lengths = completion_mask.to(dtype).sum(-1)
    ones = torch.ones(n, dtype=dtype, device=completion_mask.device)
    if aggregation == "grpo":
        return lengths.clamp(min=1.0).reciprocal(), float(n)
    if aggregation == "dapo":
        return ones, float(lengths.sum())
    if aggregation == "bnpo":
        return ones / lengths.sum().clamp(min=1.0), 1.0
    if aggregation == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_aggregation=dr_grpo needs max_completion_length (the generation budget; the "
                             "trainer passes rollout.max_new_tokens)")
        if max_completion_length < width:
            raise ValueError(f"max_completion_length={max_completion_length} is shorter than the completions' "
                             f"width {width}")
        return ones, float(n * max_completion_length)
    raise ValueError(f"loss_aggregation must be one of {', '.join(AGGREGATIONS)}; got {aggregation!r}")


def grpo_token_loss(token_logps: Tensor, old_token_logps: Tensor, ref_token_logps: Tensor | None,
                    advantages: Tensor, completion_mask: Tensor, *, epsilon: float = 0.2,
                    epsilon_high: float | None = None, kl_coef: float = 0.0, use_bias_correction_kl: bool = True,
                    aggregation: str = "grpo", max_completion_length: int | None = None,
                    importance_sampling_level: str = "token") -> Tensor:
    """GRPO loss (module docstring): clipped surrogate plus ``kl_coef * k3 (* r)``, aggregated. Scalar.

    Shapes: ``token_logps, old_token_logps, ref_token_logps, completion_mask: (N, C)``,
    ``advantages: (N,)`` (e.g. from :func:`grpo_advantages`); ``ref_token_logps`` may be ``None``
    when ``kl_coef == 0``. Differentiable in ``token_logps`` only. On one process ``bnpo`` is ``dapo``.

    On-policy (``old == logps``) the ratio is 1 and the value is ``-mean_i A_i`` (grpo):

    >>> logps = torch.tensor([[-1., -2.], [-0.5, 0.]], requires_grad=True)
    >>> mask = torch.tensor([[1, 1], [1, 0]])
    >>> adv = torch.tensor([1., -1.])
    >>> loss = grpo_token_loss(logps, logps.detach(), None, adv, mask, epsilon=0.2)
    >>> loss.backward(); loss.item(), logps.grad.tolist()
    (0.0, [[-0.25, -0.25], [0.5, 0.0]])

    A ratio of ``e**0.5 > 1.2`` with ``A > 0`` is clipped: the token's value is ``1.2 * A``, no gradient;
    with ``epsilon_high=0.28`` (clip-higher) the bound is 1.28.

    >>> args = torch.tensor([[0.5]]), torch.tensor([[0.]]), None, torch.tensor([1.]), torch.tensor([[1]])
    >>> grpo_token_loss(*args, epsilon=0.2), grpo_token_loss(*args, epsilon=0.2, epsilon_high=0.28)
    (tensor(-1.2000), tensor(-1.2800))
    """
    terms = grpo_token_terms(token_logps, old_token_logps, ref_token_logps, advantages, completion_mask,
                             epsilon=epsilon, epsilon_high=epsilon_high, kl_coef=kl_coef,
                             use_bias_correction_kl=use_bias_correction_kl,
                             importance_sampling_level=importance_sampling_level)
    scales, norm = aggregation_scales(completion_mask, aggregation, max_completion_length=max_completion_length,
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

    Reads ``clip_epsilon``, ``epsilon_high``, ``kl_coef``, ``use_bias_correction_kl``,
    ``loss_aggregation``, ``scale_rewards``, ``importance_sampling`` and ``importance_sampling_level`` from an
    ``ObjectiveConfig`` (``importance_sampling_level`` given here overrides it: ``gspo``). ``max_completion_length``
    is ``L`` of the ``dr_grpo`` aggregation (the generation budget), required for it.
    """

    name = "grpo"

    def __init__(self, config, *, max_completion_length: int | None = None,
                 importance_sampling_level: str | None = None):
        self.epsilon = float(config.clip_epsilon)
        self.epsilon_high = None if config.epsilon_high is None else float(config.epsilon_high)
        self.kl_coef = float(config.kl_coef)
        self.use_bias_correction_kl = bool(config.use_bias_correction_kl)
        self.aggregation = config.loss_aggregation
        self.scale_rewards = config.scale_rewards
        self.importance_sampling = bool(config.importance_sampling)
        self.level = importance_sampling_level or config.importance_sampling_level
        for key, value, choices in (("loss_aggregation", self.aggregation, AGGREGATIONS),
                                    ("scale_rewards", self.scale_rewards, SCALE_REWARDS),
                                    ("importance_sampling_level", self.level, LEVELS)):
            if value not in choices:
                raise ValueError(f"objective.{key} must be one of {', '.join(choices)}; got {value!r}")
        for key, value in (("clip_epsilon", self.epsilon), ("epsilon_high", self.epsilon_high),
                           ("kl_coef", self.kl_coef)):
            _check_number(f"objective.{key}", value, allow_none=key == "epsilon_high")
        if self.aggregation == "dr_grpo" and not max_completion_length:
            raise ValueError("objective.loss_aggregation=dr_grpo needs max_completion_length (the generation "
                             "budget; the trainer passes rollout.max_new_tokens)")
        self.max_completion_length = max_completion_length

    def _terms(self, token_logps: Tensor, batch: Batch, rows: slice, advantages: Tensor) -> GRPOTerms:
        ref = batch.ref_token_logps[rows] if batch.ref_token_logps is not None else None
        old = self.old_token_logps(batch)
        if old is None:
            raise ValueError("batch.old_token_logps is missing: the trainer sets it at the first update of a batch")
        if self.kl_coef > 0 and ref is None:
            raise ValueError(f"objective.kl_coef={self.kl_coef} needs reference log-probs; set kl_coef=0 to train without")
        return grpo_token_terms(token_logps, old[rows].to(token_logps.device),
                                None if ref is None else ref.to(token_logps.device), advantages,
                                batch.action_mask[rows].to(token_logps.device),
                                epsilon=self.epsilon, epsilon_high=self.epsilon_high, kl_coef=self.kl_coef,
                                use_bias_correction_kl=self.use_bias_correction_kl,
                                importance_sampling_level=self.level)

    def old_token_logps(self, batch: Batch) -> Tensor | None:
        """The ratio's denominator: the sampler's log-probs under a lag with ``importance_sampling``, else pi_old."""
        if self.importance_sampling and batch.sampler_token_logps is not None:
            return batch.sampler_token_logps
        return batch.old_token_logps

    def prepare(self, batch: Batch, token_logps: Tensor) -> GRPOPrepared:
        """Advantages and aggregation scales of the whole batch; loss value at the current policy."""
        advantages = grpo_advantages(batch.rewards.double(), batch.group_ids, scale_rewards=self.scale_rewards)
        mask = batch.action_mask
        scales, norm = aggregation_scales(mask, self.aggregation, max_completion_length=self.max_completion_length,
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
def grpo(config, *, max_completion_length: int | None = None) -> GRPOObjective:
    """GRPO as people run it: PPO-clipped token-level surrogate with a k3 KL penalty (TRL's options)."""
    return GRPOObjective(config, max_completion_length=max_completion_length)


@OBJECTIVES.register("gspo")
def gspo(config, *, max_completion_length: int | None = None) -> GRPOObjective:
    """GSPO: ``grpo`` with ``importance_sampling_level=sequence`` (a name for ``gvpo compare``); the clip range
    and aggregation come from the config as for ``grpo`` (GSPO's paper: 3e-4 / 4e-4, ``grpo``)."""
    return GRPOObjective(config, max_completion_length=max_completion_length, importance_sampling_level="sequence")
