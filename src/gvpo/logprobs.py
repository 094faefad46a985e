"""Token and sequence log-probs of completions under a causal LM.

The naive ``logits.log_softmax(-1).gather(-1, labels)`` materialises a full ``(B, T, V)`` float32
copy of the logits (2.5 GB at V=152k, T=1024, B=4). Here each row's log-prob is
``logit[label] - logsumexp(logits)``, computed over chunks of rows, so the extra memory is one
chunk (``chunk_rows x V``) whatever the batch; bf16 logits are upcast one chunk at a time.

Log-probs are always at temperature 1: GVPO compares pi_theta with pi_ref as distributions, and the
sampling temperature only changes pi_s, which GVPO needs no correction for (Corollary 3.2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

DEFAULT_CHUNK_ROWS = 256


def token_logps_from_logits(logits: Tensor, labels: Tensor, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tensor:
    """``log softmax(logits)[labels]`` without a full-vocabulary float32 copy.

    Shapes: ``logits (..., V)``, ``labels (...)`` integer; returns float32 ``(...)``.

    >>> logits = torch.tensor([[[0.0, 0.0], [1.0, 3.0]]])
    >>> token_logps_from_logits(logits, torch.tensor([[0, 1]])).exp()
    tensor([[0.5000, 0.8808]])
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits shape without the vocabulary, "
                         f"{tuple(logits.shape[:-1])}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1, 1)
    out = []
    for start in range(0, flat_logits.shape[0], chunk_rows):
        chunk = flat_logits[start : start + chunk_rows].float()
        picked = chunk.gather(-1, flat_labels[start : start + chunk_rows]).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    if not out:
        return flat_logits.new_zeros(labels.shape, dtype=torch.float32)
    return torch.cat(out).reshape(labels.shape)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` uses them: ``cumsum(mask) - 1`` clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_token_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Tensor:
    """Per-token log-probs of the completion part of ``input_ids``, zero where ``completion_mask`` is 0.

    ``input_ids, attention_mask: (B, P + C)`` hold a (left-padded) prompt followed by a
    (right-padded) completion of ``C`` tokens; ``completion_mask: (B, C)``. Only the last ``C + 1``
    positions' logits are computed (``logits_to_keep``) when the model supports it.
    Returns ``token_logps: (B, C)`` float32.
    """
    num_completion = completion_mask.shape[1]
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    try:
        logits = model(**kwargs, logits_to_keep=num_completion + 1).logits
    except TypeError:  # models without logits_to_keep
        logits = model(**kwargs).logits
    logits = logits[:, -(num_completion + 1) : -1]
    labels = input_ids[:, -num_completion:]
    token_logps = token_logps_from_logits(logits, labels, chunk_rows=chunk_rows)
    return token_logps * completion_mask.to(token_logps.dtype)


def sequence_logps(token_logps: Tensor, completion_mask: Tensor) -> Tensor:
    """Sequence log-prob ``log pi(y|x)``: the sum of completion token log-probs, ``(B, C) -> (B,)``.

    >>> sequence_logps(torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[1, 1, 0]]))
    tensor([-3.])
    """
    return (token_logps * completion_mask.to(token_logps.dtype)).sum(-1)
