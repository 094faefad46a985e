"""Completion log-probs from the last hidden states, with the LM head applied only where a token is scored.

The plain path asks the model for the logits of the last ``C + 1`` positions and then takes
``log softmax(logits)[label]``: a ``(B, C + 1, V)`` tensor (400 MB for 32 x 64 tokens at SmolLM2's 49k
vocabulary), kept for the backward with its gradient of the same size, and computed for padding and for
the position after the last token too. Here the model runs with its LM head swapped for a capture of the
head's input (:func:`head_inputs`); the hidden states of the real completion tokens (``completion_mask``)
then go through the head ``chunk_rows`` rows at a time: ``logp = h @ W[label] - logsumexp(h @ W^T)``. The
backward recomputes each chunk's logits instead of storing them (one more head matmul per token for about
``(B x C x V)`` x 8 bytes less memory): the only extra memory is one chunk and the weight's gradient.

Where it applies (:func:`fused_head`): a transformers model whose output layer is a plain ``nn.Linear`` and
whose logits are not rescaled or soft-capped after it (Gemma 2's ``final_logit_softcapping``, Cohere's
``logit_scale``, ...), not sharded (FSDP and ZeRO-3 gather the head's weight only inside its own forward).
Elsewhere :mod:`gvpo.model.logprobs` keeps the plain path.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

RESCALING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")
"""Config fields of models that change the logits after the head (TRL's ``add_fused_lm_head`` reads the same);
any of them set to something other than None or 1 keeps the plain path."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision and float32 weights, float64 for float64 (exactness checks stay exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _HeadTokenLogps(torch.autograd.Function):
    """``log softmax(hidden @ weight^T + bias)[labels]`` for ``hidden (n, H)``, chunk by chunk of rows.

    Backward: for each chunk, ``d = g * (onehot(label) - softmax)`` from recomputed logits, then
    ``grad_hidden = d @ W`` (in the weights' dtype) and ``grad_W += d^T @ hidden`` (accumulated in float32, or
    float64 for a float64 head).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk_rows: int) -> Tensor:
        dtype = _compute_dtype(weight.dtype)
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = _chunk_logits(hidden[rows], weight, bias, dtype)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = logits.gather(-1, labels[rows, None]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype = lse.dtype
        grad_out = grad_out.to(dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            g = grad_out[rows, None]
            d = _chunk_logits(hidden[rows], weight, bias, dtype).sub_(lse[rows, None]).exp_().mul_(-g)  # -g softmax
            d.scatter_add_(-1, labels[rows, None], g)  # + g at the label
            if need_hidden:  # in the weights' dtype, as nn.Linear's backward (no float32 copy of a bf16 head)
                grad_hidden[rows] = (d.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(d.t(), hidden[rows].to(dtype))
            if need_bias:
                grad_bias += d.sum(0)
        return (grad_hidden, grad_weight.to(weight.dtype) if need_weight else None,
                grad_bias.to(bias.dtype) if need_bias else None, None, None)


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``hidden @ weight^T + bias`` in the weights' dtype (as ``nn.Linear`` computes it), as ``dtype``."""
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    return logits.to(dtype)


def head_token_logps(hidden: Tensor, head: nn.Linear, labels: Tensor, mask: Tensor | None = None, *,
                     chunk_rows: int = 256) -> Tensor:
    """Per-token log-probs ``log softmax(head(hidden))[labels]`` without a ``(..., V)`` logits tensor.

    Shapes: ``hidden (..., H)``, ``labels (...)``, optional ``mask (...)``: the head runs only where ``mask`` is
    nonzero and the result is 0 elsewhere. Returns float32 ``(...)`` (float64 for a float64 head).

    >>> head = nn.Linear(2, 3, bias=False)
    >>> _ = head.weight.data.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    >>> hidden = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    >>> head_token_logps(hidden, head, torch.tensor([[0, 0]]), torch.tensor([[0, 1]])).detach()
    tensor([[ 0.0000, -0.2395]])
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden shape without the last dimension, "
                         f"{tuple(hidden.shape[:-1])}")
    dtype = _compute_dtype(head.weight.dtype)
    keep = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
    picked = hidden[keep]
    if picked.shape[0] == 0:
        return hidden.new_zeros(labels.shape, dtype=dtype) + 0 * hidden.sum()  # still connected to the graph
    values = _HeadTokenLogps.apply(picked, head.weight, head.bias, labels[keep], chunk_rows)
    return values.new_zeros(labels.shape).masked_scatter(keep, values)


def fused_head(model: nn.Module, base: nn.Module) -> nn.Linear | None:
    """``base``'s output layer when :func:`head_token_logps` computes what its forward would (see the module
    docstring), else None. ``model`` is what is called (maybe a DDP or PEFT wrapper); ``base`` the transformers
    model under it."""
    from .sharding import is_sharded

    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.__dict__.get("forward") is not None:
        return None
    config = getattr(base, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is None or any(getattr(text, name, None) not in (None, 1, 1.0) for name in RESCALING):
        return None
    return None if is_sharded(model) else head


@contextlib.contextmanager
def head_inputs(head: nn.Linear):
    """Inside the context, ``head``'s forward stores its input in the yielded list and returns empty logits
    ``(..., 0)``; outside it, the head is as it was."""
    captured: list[Tensor] = []

    def capture(hidden: Tensor) -> Tensor:
        captured.append(hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)

    head.forward = capture
    try:
        yield captured
    finally:
        del head.forward
