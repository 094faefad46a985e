"""One optimizer step on a batch of groups, exact for any micro-batch size and process split.

The objective's ``prepare`` computes whole-batch statistics from detached log-probs of the current
policy; each micro-batch's ``micro_loss`` is divided by the global normaliser (``prepared.norm`` summed
over processes) and multiplied by the number of processes, because DDP averages gradients. See
:mod:`gvpo.objectives.base` for the contract.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .batch import Batch, all_token_logps, token_logps_for
from .model.router_loss import RouterLoss


class NonFiniteError(RuntimeError):
    """Loss or gradient became NaN/inf; the run stops and the last checkpoint stays as it was."""


def update(policy, optimizer, batch: Batch, objective, *, micro_batch_size: int, share_prompts: bool,
           max_grad_norm: float, accelerator, router_coef: float | None = 0.0) -> dict:
    """One optimizer step on ``batch``: whole-batch statistics first, then micro-batched backward.

    ``router_coef`` (``model.router_aux_loss_coef``; None = an MoE model's own) adds the router's
    load-balancing loss of every gradient forward as TRL does (:mod:`gvpo.model.router_loss`); the update's
    forwards then run as one plain pass per micro-batch (no prefix sharing, no length buckets). Returns the step's metrics plus ``logps``, the detached per-token log-probs
    before the step.
    """
    n = len(batch)
    size = micro_batch_size or n
    slices = [slice(s, s + size) for s in range(0, n, size)]
    router = RouterLoss(policy, router_coef, len(slices))
    one_pass = bool(router.coef)  # the router loss of one full forward, as TRL takes it
    if len(slices) == 1:  # one forward serves both the statistics and the gradient
        token_logps = router.forward(token_logps_for, policy, batch, slices[0], share_prompts, one_pass)
        current = token_logps.detach()
    else:
        token_logps = None
        current = all_token_logps(policy, batch, micro_batch_size, share_prompts, one_pass)
    fill_rollout_logps(batch, current)
    prepared = objective.prepare(batch, current)
    norm = accelerator.reduce(torch.tensor([prepared.norm, prepared.loss_sum], device=accelerator.device,
                                           dtype=torch.float64), "sum")
    global_norm, loss_value = float(norm[0]), float(norm[1] / norm[0]) if norm[0] > 0 else 0.0
    scale = accelerator.num_processes / global_norm if global_norm > 0 else 0.0
    for i, sl in enumerate(slices):
        last = i == len(slices) - 1
        # accelerate's accumulation boundary: under DeepSpeed, backward also steps the optimizer, and does so only
        # when sync_gradients is set, so only the last micro-batch may set it (elsewhere it only gates the step)
        accelerator.sync_gradients = last
        with accelerator.no_sync(policy) if not last else contextlib.nullcontext():
            tl = token_logps if token_logps is not None else router.forward(token_logps_for, policy, batch, sl,
                                                                             share_prompts, one_pass)
            loss = objective.micro_loss(tl, batch, sl, prepared) * scale + router.term()
            if not torch.isfinite(loss):
                accelerator.sync_gradients = True
                raise NonFiniteError(f"non-finite loss ({loss.item()}) at a micro-batch of rows {sl.start}:{sl.stop}; "
                                     "stopping with the last checkpoint intact")
            accelerator.backward(loss)
    params = [p for p in policy.parameters() if p.requires_grad]
    grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")))
    if not math.isfinite(grad_norm):
        raise NonFiniteError(f"non-finite gradient norm ({grad_norm}); stopping with the last checkpoint intact")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_value, "grad_norm": grad_norm, "logps": current, **prepared.stats, **router.stats()}


def fill_rollout_logps(batch: Batch, token_logps: torch.Tensor) -> None:
    """First update on a batch: the current policy's log-probs are pi_old, and pi_ref for ``reference: rollout``."""
    if batch.old_token_logps is None:
        batch.old_token_logps = token_logps
    if batch.ref_token_logps is None:
        batch.ref_token_logps = token_logps
