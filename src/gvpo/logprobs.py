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


def _row_blocks(x: Tensor) -> list[Tensor]:
    """``x (..., V)`` as 2-D ``(rows, V)`` views, in row-major order, without copying.

    ``x.view(-1, V)`` when the strides allow it; otherwise (e.g. ``logits[:, :-1]``, whose batch stride
    skips a row) one block per leading index, recursively, instead of the full copy ``reshape`` makes.
    """
    if x.dim() <= 2:
        return [x.reshape(-1, x.shape[-1])]
    try:
        return [x.view(-1, x.shape[-1])]
    except RuntimeError:
        return [block for sub in x.unbind(0) for block in _row_blocks(sub)]


def _row_chunks(logits: Tensor, chunk_rows: int):
    """Yield ``(first_row, chunk (n, V))`` over all rows of ``logits (..., V)``, ``n <= chunk_rows``."""
    row = 0
    for block in _row_blocks(logits):
        for start in range(0, block.shape[0], chunk_rows):
            chunk = block[start : start + chunk_rows]
            yield row, chunk
            row += chunk.shape[0]


class _ChunkedTokenLogps(torch.autograd.Function):
    """``log softmax(logits)[labels]`` chunk by chunk, forward *and* backward.

    Backward writes ``g * (onehot(label) - softmax(chunk))`` into one gradient buffer chunk by chunk;
    autograd through per-chunk slices would instead allocate a zero tensor the size of all the logits
    for every chunk (twice the memory, and chunks x the work).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk_rows: int) -> Tensor:
        flat_labels = labels.reshape(-1)
        out = torch.empty(flat_labels.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for row, chunk in _row_chunks(logits, chunk_rows):
            rows = slice(row, row + chunk.shape[0])
            chunk = chunk.float()
            lse[rows] = torch.logsumexp(chunk, dim=-1)
            out[rows] = chunk.gather(-1, flat_labels[rows, None]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(logits, flat_labels, lse)
        ctx.chunk_rows = chunk_rows
        return out.reshape(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, flat_labels, lse = ctx.saved_tensors
        grad_out = grad_out.reshape(-1).float()
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        flat_grad = grad.view(-1, logits.shape[-1])
        for row, chunk in _row_chunks(logits, ctx.chunk_rows):
            rows = slice(row, row + chunk.shape[0])
            g = grad_out[rows, None]
            part = (chunk.float() - lse[rows, None]).exp_().mul_(-g)  # -g * softmax
            part.scatter_add_(-1, flat_labels[rows, None], g)  # + g at the label
            flat_grad[rows] = part
        return grad, None, None


def token_logps_from_logits(logits: Tensor, labels: Tensor, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tensor:
    """``log softmax(logits)[labels]`` without a full-vocabulary float32 copy.

    Shapes: ``logits (..., V)``, ``labels (...)`` integer; returns float32 ``(...)``. Extra memory is a
    few ``chunk_rows x V`` float32 chunks in the forward, plus the logits' gradient (in their dtype)
    in the backward; strided views such as ``logits[:, :-1]`` are not copied.

    >>> logits = torch.tensor([[[0.0, 0.0], [1.0, 3.0]]])
    >>> token_logps_from_logits(logits, torch.tensor([[0, 1]])).exp()
    tensor([[0.5000, 0.8808]])
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits shape without the vocabulary, "
                         f"{tuple(logits.shape[:-1])}")
    if labels.numel() == 0:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    return _ChunkedTokenLogps.apply(logits, labels, chunk_rows)


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
