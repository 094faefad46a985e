"""One gradient update on a batch of groups, exact for any micro-batch size and process split.

Every objective is used in two steps:

1. ``prepare(batch, token_logps)``: whole-batch statistics from detached log-probs of the current
   policy (group means, weights, advantages). Nothing here needs gradients.
2. ``micro_loss(token_logps, batch, rows, prepared)``: a loss on any subset of rows, linear in the
   rows, so the micro-batch losses add up to the full-batch loss and their gradients to its gradient.

The trainer divides the summed loss by the global normaliser (``prepared.norm`` summed over
processes) and multiplies by the number of processes, because DDP averages gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .groups import dense_index, group_sizes
from .logprobs import completion_token_logps, sequence_logps
from .objectives import WEIGHT_SCHEMES, gvpo_loss, gvpo_weights, weighted_nll


@dataclass
class Batch:
    """Groups of completions ready for an update; one row per completion."""

    input_ids: Tensor
    """(N, P + C) prompt (left-padded) followed by completion (right-padded)."""
    attention_mask: Tensor
    """(N, P + C)."""
    completion_mask: Tensor
    """(N, C) 1 on completion tokens."""
    rewards: Tensor
    """(N,) float."""
    group_ids: Tensor
    """(N,) integer group labels (global prompt positions)."""
    ref_token_logps: Tensor | None = None
    """(N, C) reference per-token log-probs; for ``reference: rollout`` filled at the first update."""
    old_token_logps: Tensor | None = None
    """(N, C) per-token log-probs of the policy before this batch's first update (PPO ratios)."""
    sources: list = field(default_factory=list)
    """Per row: where the completion came from (policy, reference, replay, offline)."""

    def __len__(self) -> int:
        return self.rewards.shape[0]

    def rows(self, sl: slice) -> tuple[Tensor, Tensor, Tensor]:
        return self.input_ids[sl], self.attention_mask[sl], self.completion_mask[sl]

    @property
    def ref_logps(self) -> Tensor:
        return sequence_logps(self.ref_token_logps, self.completion_mask)


@dataclass
class Prepared:
    """Whole-batch, detached quantities an objective computed for its micro-batch losses."""

    norm: float
    """Local normaliser (groups or tokens); the trainer sums it over processes."""
    loss_sum: float
    """Objective value times ``norm`` on this process (so the global value is sum / sum of norms)."""
    coef: Tensor | None = None
    """(N,) or (N, C) per-row coefficients used by ``micro_loss``."""
    stats: dict = field(default_factory=dict)
    """Extra metrics (weights' spread, clip fraction, ...)."""


class WeightedObjective:
    """Eq. 9 objectives: ``L = -1/G sum_i c_i log pi(y_i|x)`` with whole-group coefficients ``c``.

    GVPO: ``c_i = beta * w_i / (k_g - 1)`` (Eq. 12 weights, Eq. 16 normalisation; G counts groups with
    k >= 2), which makes ``grad L`` equal ``grad gvpo_loss`` exactly (Eq. 13). Other schemes use their
    Eq. 9 weights with ``G`` = all groups.
    """

    def __init__(self, name: str, beta: float):
        self.name, self.beta = name, beta
        self.scheme = WEIGHT_SCHEMES.resolve(name)

    def prepare(self, batch: Batch, token_logps: Tensor) -> Prepared:
        logps = sequence_logps(token_logps, batch.completion_mask).double()
        ref, rewards, gids = batch.ref_logps.double(), batch.rewards.double(), batch.group_ids
        index, num_groups = dense_index(gids)
        sizes = group_sizes(index, num_groups)
        if self.name == "gvpo":
            valid = int((sizes >= 2).sum())
            if valid == 0:
                return Prepared(norm=0.0, loss_sum=0.0, coef=torch.zeros_like(logps).float())
            w = gvpo_weights(logps, ref, rewards, gids, beta=self.beta)
            k = sizes[index].double()
            coef = torch.where(k >= 2, self.beta * w / (k - 1).clamp(min=1), torch.zeros_like(w))
            value = float(gvpo_loss(logps, ref, rewards, gids, beta=self.beta))
            return Prepared(norm=float(valid), loss_sum=value * valid, coef=coef.float(),
                            stats={"weight_abs_mean": float(w.abs().mean())})
        w = self.scheme(logps, ref, rewards, gids, beta=self.beta)
        value = float(weighted_nll(logps, w, gids))
        return Prepared(norm=float(num_groups), loss_sum=value * num_groups, coef=w.float(),
                        stats={"weight_abs_mean": float(w.abs().mean())})

    def micro_loss(self, token_logps: Tensor, batch: Batch, rows: slice, prepared: Prepared) -> Tensor:
        logps = sequence_logps(token_logps, batch.completion_mask[rows])
        return -(prepared.coef[rows].to(logps.device) * logps).sum()


def create_objective(config):
    """The objective named by ``config.objective.name`` (an ``ObjectiveConfig``'s parent)."""
    name = config.name
    if name == "grpo":
        from .grpo import GRPOObjective

        return GRPOObjective(config)
    return WeightedObjective(name, config.beta)


def token_logps_for(model, batch: Batch, rows: slice, share_prompts: bool = True) -> Tensor:
    """(n, C) per-token log-probs of ``batch`` rows ``rows`` (with grad if enabled); ``share_prompts`` runs
    each group's prompt once (see :func:`gvpo.logprobs.completion_token_logps`)."""
    return completion_token_logps(model, *batch.rows(rows), share_prompts=share_prompts)


@torch.no_grad()
def all_token_logps(model, batch: Batch, micro_batch_size: int, share_prompts: bool = True) -> Tensor:
    """(N, C) per-token log-probs of every row, computed micro-batch by micro-batch without grad."""
    n = len(batch)
    step = micro_batch_size or n
    return torch.cat([token_logps_for(model, batch, slice(s, s + step), share_prompts) for s in range(0, n, step)])
