"""The Mixture-of-Experts router's load-balancing loss, added to gvpo's own update as TRL 1.16 adds it.

An MoE model (Qwen3-MoE, Mixtral, GPT-OSS, ...) that is asked for its router logits
(``output_router_logits=True``) returns ``aux_loss``, the Switch-Transformer load-balancing loss of that
forward's tokens (padding excluded by the attention mask). TRL's ``GRPOTrainer`` adds
``router_aux_loss_coef * aux_loss / gradient_accumulation_steps`` to every micro-batch's loss; DDP then
averages over processes. :func:`gvpo.update.update` does the same with its micro-batches as the
accumulation steps, so one optimizer step gets ``coef * mean over micro-batches and processes of
grad aux_loss`` on top of the objective's gradient.

GVPO's own loss is a sum over whole groups; the router loss is a per-forward regulariser of the
experts' load, not part of the objective. It changes what the parameters minimise (a compromise between
Eq. 14 and balanced experts), as it does for GRPO in TRL: set ``model.router_aux_loss_coef=0`` to train
on GVPO's loss alone.

Prefix sharing: the statistics are a mean over a forward's tokens. A prefix-shared forward
(``train.share_prompts``) runs each group's prompt once and the completions on its KV cache, so its
prompt tokens would count once per group instead of once per row (and the completion pass alone does
not see the prompt's router logits); length buckets (:mod:`gvpo.model.buckets`) would split one forward into
several. While the coefficient is nonzero the update's forwards therefore run as one plain pass per
micro-batch (``one_pass`` of :func:`gvpo.model.logprobs.completion_token_logps`), so its ``aux_loss`` is that
of the full forward TRL takes; everything else (reference log-probs, generation) keeps both.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..config import ConfigError
from .logprobs import _base_model


def router_aux_loss_coef(model: nn.Module, configured: float | None) -> float:
    """TRL 1.16's rule: ``configured``, or when it is ``None`` the model config's ``router_aux_loss_coef``
    (0 when it declares none); 0 for a model that does not return router logits (no
    ``output_router_logits`` in its config), where a nonzero ``configured`` is an error.

    >>> from transformers import LlamaConfig, MixtralConfig
    >>> class Model(nn.Module):
    ...     def __init__(self, config):
    ...         super().__init__()
    ...         self.config = config
    >>> router_aux_loss_coef(Model(MixtralConfig()), None), router_aux_loss_coef(Model(MixtralConfig()), 0.0)
    (0.001, 0.0)
    >>> router_aux_loss_coef(Model(LlamaConfig()), None)
    0.0
    """
    config = _base_model(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not hasattr(text_config, "output_router_logits"):
        if configured:
            raise ConfigError(f"model.router_aux_loss_coef={configured}: {type(_base_model(model)).__name__} is not a "
                              "Mixture-of-Experts model that returns router logits; there is no router loss to weight "
                              "(leave it unset or 0)")
        return 0.0
    return float(getattr(text_config, "router_aux_loss_coef", 0.0) if configured is None else configured)


@contextlib.contextmanager
def router_aux_losses(model: nn.Module, enabled: bool = True):
    """Inside the context, every forward of ``model`` run with gradients enabled asks the transformers model
    under its wrappers for its router logits, and that forward's ``aux_loss`` is appended to the yielded
    list (forwards without gradient, e.g. the no-grad statistics pass, run as usual and are not recorded).
    With ``enabled`` false nothing changes and the list stays empty."""
    losses: list[Tensor] = []
    if not enabled:
        yield losses
        return
    base = _base_model(model)

    def ask(module, args, kwargs):
        if torch.is_grad_enabled():
            kwargs["output_router_logits"] = True
        return args, kwargs

    def record(module, args, kwargs, output):
        if torch.is_grad_enabled():
            losses.append(output.aux_loss)

    handles = [base.register_forward_pre_hook(ask, with_kwargs=True),
               base.register_forward_hook(record, with_kwargs=True)]
    try:
        yield losses
    finally:
        for handle in handles:
            handle.remove()


class RouterLoss:
    """One update's router loss: :meth:`forward` runs a gradient forward and keeps its ``aux_loss``,
    :meth:`term` is TRL's ``coef * aux_loss / micro_batches`` of the last one (0 when off), :meth:`stats`
    their mean for the metrics."""

    def __init__(self, policy: nn.Module, configured: float | None, micro_batches: int):
        self.policy, self.micro_batches = policy, micro_batches
        self.coef = router_aux_loss_coef(policy, configured)
        self.losses: list[Tensor] = []

    def forward(self, fn, *args):
        """``fn(*args)``, recording the router loss of its gradient forward when the coefficient is on."""
        with router_aux_losses(self.policy, enabled=bool(self.coef)) as recorded:
            out = fn(*args)
        if self.coef and len(recorded) != 1:
            raise RuntimeError(f"the router loss needs one gradient forward per micro-batch; {len(recorded)} ran")
        self.losses.extend(recorded)
        return out

    def term(self) -> Tensor | float:
        return self.coef * self.losses[-1] / self.micro_batches if self.coef else 0.0

    def stats(self) -> dict:
        return {"aux_loss": float(torch.stack(self.losses).detach().float().mean())} if self.coef else {}
