"""The Eq. 9 family as trainer objectives: ``L = -1/G sum_i c_i log pi(y_i|x)`` with whole-group ``c``.

- ``gvpo``: ``c_i = beta * w_i / (k_g - 1)`` with the Eq. 12 weights and the Eq. 16 normalisation (G
  counts groups with k >= 2), so ``grad L`` equals ``grad gvpo_loss`` exactly (Eq. 13).
- ``dr_grpo``, ``rs``, ``sft``, ``dpo``: their Eq. 9 weights (centred rewards, Eq. 2, Eq. 1,
  section 2.3), sequence-level, no clipping, ``G`` = all groups.

``dr_grpo`` here is the paper's unified-framework gradient, not the Dr. GRPO *recipe* (token sums, a
max-length constant, PPO clipping): that recipe is ``objective.name=grpo`` with
``loss_aggregation=dr_grpo`` and ``scale_rewards=none`` (:mod:`gvpo.objectives.grpo`). Likewise the
Eq. 3 weight scheme ``WEIGHT_SCHEMES["grpo"]`` is not the ``grpo`` objective (PPO-clipped, token level).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..batch import Batch, Prepared
from ..groups import dense_index, group_sizes
from ..model.logprobs import sequence_logps
from .base import OBJECTIVES
from .functional import WEIGHT_SCHEMES, gvpo_loss, gvpo_weights, weighted_nll


def _micro_loss(token_logps: Tensor, batch: Batch, rows: slice, prepared: Prepared) -> Tensor:
    logps = sequence_logps(token_logps, batch.action_mask[rows])
    return -(prepared.coef[rows].to(device=logps.device, dtype=logps.dtype) * logps).sum()


class GVPOObjective:
    """GVPO (Eq. 12-16) with whole-group weights; ``micro_loss`` is linear in the rows."""

    name = "gvpo"

    def __init__(self, beta: float):
        self.beta = beta

    def prepare(self, batch: Batch, token_logps: Tensor) -> Prepared:
        logps = sequence_logps(token_logps, batch.action_mask).double()
        ref, rewards, gids = batch.ref_logps.double(), batch.rewards.double(), batch.group_ids
        index, num_groups = dense_index(gids)
        sizes = group_sizes(index, num_groups)
        valid = int((sizes >= 2).sum())
        if valid == 0:
            return Prepared(norm=0.0, loss_sum=0.0, coef=torch.zeros_like(logps))
        w = gvpo_weights(logps, ref, rewards, gids, beta=self.beta)
        k = sizes[index].double()
        coef = torch.where(k >= 2, self.beta * w / (k - 1).clamp(min=1), torch.zeros_like(w))
        value = float(gvpo_loss(logps, ref, rewards, gids, beta=self.beta))
        return Prepared(norm=float(valid), loss_sum=value * valid, coef=coef,
                        stats={"weight_abs_mean": float(w.abs().mean())})

    micro_loss = staticmethod(_micro_loss)


class WeightedObjective:
    """An Eq. 9 weight scheme of :data:`gvpo.objectives.WEIGHT_SCHEMES` as a trainer objective."""

    def __init__(self, name: str, beta: float):
        self.name, self.beta = name, beta
        self.scheme = WEIGHT_SCHEMES.resolve(name)

    def prepare(self, batch: Batch, token_logps: Tensor) -> Prepared:
        logps = sequence_logps(token_logps, batch.action_mask).double()
        ref, rewards, gids = batch.ref_logps.double(), batch.rewards.double(), batch.group_ids
        _, num_groups = dense_index(gids)
        w = self.scheme(logps, ref, rewards, gids, beta=self.beta)
        value = float(weighted_nll(logps, w, gids))
        return Prepared(norm=float(num_groups), loss_sum=value * num_groups, coef=w,
                        stats={"weight_abs_mean": float(w.abs().mean())})

    micro_loss = staticmethod(_micro_loss)


@OBJECTIVES.register("gvpo")
def gvpo(config) -> GVPOObjective:
    """GVPO, the paper's objective (Eq. 12 weights, Eq. 13 MSE, Eq. 16 1/(k-1))."""
    return GVPOObjective(config.beta)


def _register_scheme(objective_name: str, scheme_name: str, doc: str) -> None:
    def factory(config) -> WeightedObjective:
        return WeightedObjective(scheme_name, config.beta)

    factory.__doc__ = doc
    OBJECTIVES.register(objective_name)(factory)


_register_scheme("dr_grpo", "dr_grpo", "Eq. 9 with centred rewards (no std), sequence-level, no clipping.")
_register_scheme("rs", "rs", "Rejection sampling / RAFT (Eq. 2): the best completion of each group.")
_register_scheme("sft", "sft", "SFT (Eq. 1): every given completion with weight 1.")
_register_scheme("dpo", "dpo", "DPO (section 2.3) on each group's best/worst pair.")
