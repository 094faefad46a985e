"""What every objective the trainer can run must do, documented once, and the registry users pick from.

An objective is used in two steps per optimizer step, which makes any micro-batch and process split exact:

1. ``prepare(batch, token_logps) -> Prepared``: whole-batch statistics from *detached* per-token
   log-probs ``(N, C)`` of the current policy (group means, weights, advantages, the loss value and
   its normaliser). Nothing here needs gradients.
2. ``micro_loss(token_logps, batch, rows, prepared) -> Tensor``: a scalar loss on the rows ``rows`` of
   the batch, *linear in the rows*, so the micro-batch losses add up to the full-batch loss (times
   ``prepared.norm``) and their gradients to its gradient.

Loss tokens. An objective sums and counts only the tokens of ``batch.action_mask`` (1 on the model's tokens):
in a multi-turn episode the environment's observations sit inside the completion with ``completion_mask`` 1
(they are attended to) and ``action_mask`` 0, and the environment's factor ``P(o_t | history)`` is the same
under pi_theta and pi_ref, so ``log pi_theta(tau) - log pi_ref(tau)`` is exactly the sum over the model's tokens
(:mod:`gvpo.episodes`). ``completion_mask`` is attention and padding only; never use it for a loss. For a
single-turn completion the two masks are equal. ``batch.ref_logps`` is already the ``action_mask`` sum.

The trainer sums ``prepared.norm`` over processes and divides every micro-batch loss by it (and
multiplies by the number of processes, because DDP averages gradients).

``OBJECTIVES`` maps a name (``objective.name``) to a factory ``factory(config) -> Objective`` that
reads the fields it needs from an :class:`gvpo.config.ObjectiveConfig`; ``objective.name`` may also be
a dotted path ``my_pkg.module.factory`` to such a factory.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from ..batch import Batch, Prepared
from ..registry import Registry


@runtime_checkable
class Objective(Protocol):
    name: str
    """Shown in metrics and run names."""

    def prepare(self, batch: Batch, token_logps: Tensor) -> Prepared:
        """Whole-batch detached statistics; ``token_logps (N, C)`` of the current policy, detached."""
        ...

    def micro_loss(self, token_logps: Tensor, batch: Batch, rows: slice, prepared: Prepared) -> Tensor:
        """Scalar loss on ``batch`` rows ``rows`` (``token_logps (n, C)`` with grad), linear in the rows."""
        ...


OBJECTIVES: Registry = Registry("objective")
