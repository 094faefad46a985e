"""Objectives: pure loss functions (:mod:`.functional`) and the trainer-facing objectives built on them.

``OBJECTIVES`` (registry, :mod:`.base`) holds what ``objective.name`` picks:

======== ==========================================================================================
gvpo     GVPO: Eq. 12 weights, Eq. 13 MSE, Eq. 16 ``1/(k-1)`` (:mod:`.weighted`)
grpo     GRPO as people run it: PPO-clipped token-level surrogate, k3 KL (:mod:`.grpo`)
gspo     GSPO: ``grpo`` with one importance ratio per completion (``importance_sampling_level=sequence``)
dr_grpo  Eq. 9 with centred rewards, sequence-level (the paper's family member, not the recipe)
rs       rejection sampling / RAFT, Eq. 2
sft      SFT, Eq. 1
dpo      DPO on each group's best/worst pair, section 2.3
======== ==========================================================================================

A dotted path ``my_pkg.module.factory`` works too: ``factory(config: ObjectiveConfig) -> Objective``
(a factory with a keyword ``max_completion_length`` also gets the generation budget, see ``create_objective``).
"""

import inspect

from .base import OBJECTIVES, Objective
from .functional import (
    WEIGHT_SCHEMES,
    check_inputs,
    dr_grpo_scheme,
    gvpo_grad_coefficients,
    gvpo_loss,
    gvpo_weights,
    grpo_scheme,
    weighted_nll,
)
from .grpo import GRPOObjective
from .weighted import GVPOObjective, WeightedObjective

__all__ = [
    "OBJECTIVES",
    "Objective",
    "WEIGHT_SCHEMES",
    "GRPOObjective",
    "GVPOObjective",
    "WeightedObjective",
    "check_inputs",
    "create_objective",
    "dr_grpo_scheme",
    "grpo_scheme",
    "gvpo_grad_coefficients",
    "gvpo_loss",
    "gvpo_weights",
    "weighted_nll",
]


def create_objective(config, *, max_completion_length: int | None = None) -> Objective:
    """The objective ``config.name`` names (a registered name or a dotted path to a factory), built from
    ``config`` (an :class:`gvpo.config.ObjectiveConfig`).

    ``max_completion_length`` (the generation budget, ``rollout.max_new_tokens``) is passed to a factory
    that has a keyword parameter of that name (``grpo`` uses it for ``loss_aggregation=dr_grpo``)."""
    factory = OBJECTIVES.resolve(config.name)
    takes_length = "max_completion_length" in inspect.signature(factory).parameters
    objective = (factory(config, max_completion_length=max_completion_length) if takes_length and
                 max_completion_length is not None else factory(config))
    if not isinstance(objective, Objective):
        raise TypeError(f"objective.name={config.name!r} gave {type(objective).__name__}, which lacks "
                        "prepare/micro_loss (see gvpo.objectives.base.Objective)")
    return objective
