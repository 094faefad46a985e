"""Token and sequence log-probs of completions under a causal LM.

The naive ``logits.log_softmax(-1).gather(-1, labels)`` materialises a full ``(B, T, V)`` float32
copy of the logits (B x T x V x 4 bytes: 2.5 GB at V=152k, T=1024, B=4). Here each row's log-prob is
``logit[label] - logsumexp(logits)``, computed over chunks of rows, so the extra memory is one
chunk (``chunk_rows x V``) whatever the batch; bf16 logits are upcast one chunk at a time.

Log-probs are always at temperature 1: GVPO compares pi_theta with pi_ref as distributions, and the
sampling temperature only changes pi_s, which GVPO needs no correction for (Corollary 3.2).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn

from .buckets import PASS_COST, cache_rows, length_buckets
from .lm_head import fused_head, head_inputs, head_token_logps
from .loading import has_dropout

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


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32 for half-precision and float32 logits, float64 for float64."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _ChunkedTokenLogps(torch.autograd.Function):
    """``log softmax(logits)[labels]`` chunk by chunk, forward *and* backward.

    Backward writes ``g * (onehot(label) - softmax(chunk))`` into one gradient buffer chunk by chunk;
    autograd through per-chunk slices would instead allocate a zero tensor the size of all the logits
    for every chunk (twice the memory, and chunks x the work).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk_rows: int) -> Tensor:
        flat_labels = labels.reshape(-1)
        out = torch.empty(flat_labels.shape[0], dtype=_compute_dtype(logits), device=logits.device)
        lse = torch.empty_like(out)
        for row, chunk in _row_chunks(logits, chunk_rows):
            rows = slice(row, row + chunk.shape[0])
            chunk = chunk.to(out.dtype)
            lse[rows] = torch.logsumexp(chunk, dim=-1)
            out[rows] = chunk.gather(-1, flat_labels[rows, None]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(logits, flat_labels, lse)
        ctx.chunk_rows = chunk_rows
        return out.reshape(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, flat_labels, lse = ctx.saved_tensors
        grad_out = grad_out.reshape(-1).to(lse.dtype)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        flat_grad = grad.view(-1, logits.shape[-1])
        for row, chunk in _row_chunks(logits, ctx.chunk_rows):
            rows = slice(row, row + chunk.shape[0])
            g = grad_out[rows, None]
            part = (chunk.to(lse.dtype) - lse[rows, None]).exp_().mul_(-g)  # -g * softmax
            part.scatter_add_(-1, flat_labels[rows, None], g)  # + g at the label
            flat_grad[rows] = part
        return grad, None, None


def token_logps_from_logits(logits: Tensor, labels: Tensor, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tensor:
    """``log softmax(logits)[labels]`` without a full-vocabulary float32 copy.

    Shapes: ``logits (..., V)``, ``labels (...)`` integer; returns float32 ``(...)`` (float64 for float64
    logits, so exactness checks stay exact). Extra memory is a
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
        return logits.new_zeros(labels.shape, dtype=_compute_dtype(logits))
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
    share_prompts: bool = True,
    one_pass: bool = False,
) -> Tensor:
    """Per-token log-probs of the completion part of ``input_ids``, zero where ``completion_mask`` is 0.

    ``input_ids, attention_mask: (B, P + C)`` hold a (left-padded) prompt followed by a
    (right-padded) completion of ``C`` tokens; ``completion_mask: (B, C)``. Only the last ``C + 1``
    positions' logits are computed (``logits_to_keep``) when the model supports it.
    Returns ``token_logps: (B, C)`` float32 (float64 for a float64 model).

    With ``share_prompts`` (and a transformers model that keeps a KV cache, without gradient
    checkpointing), consecutive rows with the same prompt, such as the k completions of a group, run
    that prompt once: see :func:`shared_prompt_token_logps`. The result is the same up to float
    rounding; gradients flow through the shared prompt. Rows whose completions differ much in length run in
    buckets (:mod:`gvpo.model.buckets`). ``one_pass`` turns both off: every row's prompt and completion in one
    forward, for what is a statistic of a whole forward (an MoE router's load-balancing loss).

    Dropout never enters the values. For a model in train mode that has dropout (kept with
    ``model.disable_dropout=false``), a call without grad runs in eval mode, and a call with grad returns
    the eval-mode values carrying the gradient of a forward with dropout (``scored + trained -
    trained.detach()``, one extra forward without grad): dropout regularises the update while pi_theta,
    pi_old and pi_ref stay deterministic.
    """
    args, options = (model, input_ids, attention_mask, completion_mask), dict(chunk_rows=chunk_rows,
                                                                              share_prompts=share_prompts,
                                                                              one_pass=one_pass)
    if not (model.training and has_dropout(model)):
        return _completion_token_logps(*args, **options)
    with torch.no_grad(), eval_mode(model):
        scored = _completion_token_logps(*args, **options)
    if not torch.is_grad_enabled():
        return scored
    trained = _completion_token_logps(*args, **options)
    return scored + (trained - trained.detach())


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode inside the context, back in its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _completion_token_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, *,
                            chunk_rows: int = DEFAULT_CHUNK_ROWS, share_prompts: bool = True,
                            one_pass: bool = False) -> Tensor:
    """:func:`completion_token_logps` in the model's current mode."""
    if one_pass:
        return _plain_token_logps(model, input_ids, attention_mask, completion_mask, chunk_rows)
    num_completion = completion_mask.shape[1]
    owner = None
    if share_prompts and num_completion > 0 and caches_prompts(model):
        owner = prompt_owners(input_ids[:, :-num_completion], attention_mask[:, :-num_completion])
    lengths = completion_mask.sum(-1).tolist() if num_completion > 1 else []
    buckets = length_buckets(lengths, PASS_COST)
    if len(buckets) > 1:
        return _bucketed_token_logps(model, input_ids, attention_mask, completion_mask, owner, buckets, lengths,
                                     chunk_rows)
    if owner is not None:
        return shared_prompt_token_logps(model, input_ids, attention_mask, completion_mask, owner, chunk_rows=chunk_rows)
    return _plain_token_logps(model, input_ids, attention_mask, completion_mask, chunk_rows)


def _plain_token_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                       chunk_rows: int) -> Tensor:
    """Every row's prompt and completion in one pass; the logits (or hidden states) of the last ``C + 1`` positions."""
    num_completion = completion_mask.shape[1]
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    head = fused_head(model, _base_model(model))
    with _captured(head) as hidden:
        try:
            logits = model(**kwargs, logits_to_keep=last_positions(input_ids, num_completion + 1)).logits
        except TypeError:  # models without logits_to_keep
            logits = model(**kwargs).logits
    scores = (hidden[-1] if head is not None else logits)[:, -(num_completion + 1) : -1]
    return _scored(head, scores, input_ids[:, -num_completion:], completion_mask, chunk_rows)


def _captured(head):
    """:func:`gvpo.model.lm_head.head_inputs` for a fused head, else a context that yields None."""
    return head_inputs(head) if head is not None else contextlib.nullcontext()


def _scored(head, scores: Tensor, labels: Tensor, completion_mask: Tensor, chunk_rows: int) -> Tensor:
    """Token log-probs of ``labels`` where ``completion_mask`` is 1 (0 elsewhere) from ``scores``: the head's input
    hidden states when ``head`` is a fused head (:mod:`gvpo.model.lm_head`: the head runs on the masked positions
    only), else the logits."""
    if head is not None:
        return head_token_logps(scores, head, labels, completion_mask, chunk_rows=chunk_rows)
    token_logps = token_logps_from_logits(scores, labels, chunk_rows=chunk_rows)
    return token_logps * completion_mask.to(token_logps.dtype)


def last_positions(input_ids: Tensor, n: int) -> Tensor:
    """``logits_to_keep`` for the last ``n`` positions as an index tensor rather than the int ``n``.

    transformers slices the hidden states with it before the output layer. An int gives a strided view
    ``h[:, -n:]``, and torch's ``matmul`` of a strided 3-D input with the weight folds it into one ``mm``
    only when the weight requires grad, otherwise it runs a ``bmm``: the trainable policy and its frozen
    reference copy then round the same logits differently (~1e-7), which a zero-signal batch turns into
    a full Adam step. Indexing with a tensor copies the rows into a contiguous tensor, which always folds.

    >>> last_positions(torch.zeros(2, 5, dtype=torch.long), 2)
    tensor([3, 4])
    """
    length = input_ids.shape[1]
    return torch.arange(length - n, length, device=input_ids.device)


def caches_prompts(model: nn.Module) -> bool:
    """A transformers decoder that can return and take a KV cache (gradient checkpointing turns it off)."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    checkpointing = getattr(base, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    return (config is not None and hasattr(base, "generate") and not getattr(config, "is_encoder_decoder", False)
            and not checkpointing)


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/FSDP (accelerate's unwrapping) and PEFT (``get_base_model``) wrappers."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_argument(model: nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(_base_model(model).forward).parameters else "past_key_values"


def prompt_owners(prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor | None:
    """``(B,)`` index of each row's prompt among the runs of identical consecutive prompts, or ``None``
    when no two consecutive rows share a prompt (nothing to save).

    >>> ids = torch.tensor([[5, 6], [5, 6], [7, 8], [5, 6]])
    >>> prompt_owners(ids, torch.ones_like(ids))
    tensor([0, 0, 1, 2])
    """
    if prompt_ids.shape[0] < 2 or prompt_ids.shape[1] == 0:
        return None
    same = (prompt_ids[1:] == prompt_ids[:-1]).all(-1) & (prompt_mask[1:] == prompt_mask[:-1]).all(-1)
    if not bool(same.any()):
        return None
    starts = torch.cat([same.new_ones(1), ~same])
    return starts.long().cumsum(0) - 1


def prompt_cache(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, owner: Tensor, rows: Tensor | None = None):
    """Run each distinct prompt once (its first row per ``owner``) with ``use_cache=True``; returns the
    model output (last-position logits) and its KV cache gathered to all ``B`` rows (in the order ``rows``
    when given)."""
    first_rows = torch.cat([owner.new_zeros(1), (owner[1:] != owner[:-1]).nonzero().squeeze(-1) + 1])
    ids, mask = prompt_ids[first_rows], prompt_mask[first_rows]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True,
                logits_to_keep=last_positions(ids, 1))
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.batch_select_indices((owner if rows is None else owner[rows]).to(ids.device))
    return out, cache


def shared_prompt_token_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                              owner: Tensor, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tensor:
    """:func:`completion_token_logps` with each distinct prompt run once (prefix sharing).

    ``owner: (B,)`` maps rows to their prompt (:func:`prompt_owners`). The ``U`` distinct prompts run
    with ``use_cache=True``; their KV cache is gathered to ``B`` rows (differentiable indexing) and the
    ``C`` completion tokens run on top of it with positions that continue each prompt. The first
    completion token is scored from the prompt's last logits, the others from the completion pass.
    For a group of k completions of a P-token prompt this runs ``P + k*C`` tokens instead of ``k*(P + C)``.
    """
    head = fused_head(model, _base_model(model))
    first, cache = _prompt_pass(model, head, input_ids, attention_mask, completion_mask, owner, None, chunk_rows)
    rest = _continued(model, head, cache, input_ids, attention_mask, completion_mask, chunk_rows)
    return torch.cat([first, rest], 1)


def _prompt_pass(model, head, input_ids, attention_mask, completion_mask, owner, rows, chunk_rows):
    """Each distinct prompt once: the first completion token's log-prob of every row (scored from its prompt's last
    position), and the prompts' KV cache gathered to the rows (in the order ``rows`` when given)."""
    plen = input_ids.shape[1] - completion_mask.shape[1]
    with _captured(head) as hidden:
        out, cache = prompt_cache(model, input_ids[:, :plen], attention_mask[:, :plen], owner, rows)
    scores = hidden[-1] if head is not None else out.logits
    first = _scored(head, scores[:, -1:][owner], input_ids[:, plen : plen + 1], completion_mask[:, :1], chunk_rows)
    return first, cache


def _continued(model, head, cache, input_ids, attention_mask, completion_mask, chunk_rows) -> Tensor:
    """``(B, C - 1)`` log-probs of completion tokens 1.. from one pass of the completion tokens over ``cache`` (their
    prompts' keys and values, one row per batch row)."""
    plen = input_ids.shape[1] - completion_mask.shape[1]
    positions = position_ids_from_mask(attention_mask)[:, plen:]
    with _captured(head) as hidden:
        logits = model(input_ids=input_ids[:, plen:], attention_mask=attention_mask, position_ids=positions,
                       use_cache=True, **{cache_argument(model): cache}).logits
    scores = hidden[-1] if head is not None else logits
    return _scored(head, scores[:, :-1], input_ids[:, plen + 1 :], completion_mask[:, 1:], chunk_rows)


def _bucketed_token_logps(model, input_ids, attention_mask, completion_mask, owner, buckets, lengths,
                          chunk_rows) -> Tensor:
    """:func:`completion_token_logps` with the rows in ``buckets`` (:func:`gvpo.model.buckets.length_buckets`), each run
    trimmed to its longest completion. With ``owner`` (prefix sharing) the prompts run once and every bucket
    continues its rows' part of their cache (a model whose cache layers :func:`gvpo.model.buckets.cache_rows` cannot
    split runs all rows in one pass, as without buckets)."""
    num_completion = completion_mask.shape[1]
    plen = input_ids.shape[1] - num_completion
    order = torch.tensor([row for bucket in buckets for row in bucket], device=input_ids.device)
    first = cache = head = None
    if owner is not None:
        head = fused_head(model, _base_model(model))
        first, cache = _prompt_pass(model, head, input_ids, attention_mask, completion_mask, owner, order, chunk_rows)
        if cache_rows(cache, slice(0, 0)) is None:
            buckets = [order.tolist()]
    parts, start = [], 0
    for bucket in buckets:
        rows, part = order[start : start + len(bucket)], slice(start, start + len(bucket))
        start += len(bucket)
        width = max(1, max(lengths[row] for row in bucket))
        ids, mask, completion = input_ids[rows, : plen + width], attention_mask[rows, : plen + width], completion_mask[rows, :width]
        if cache is None:
            logps = _plain_token_logps(model, ids, mask, completion, chunk_rows)
        else:
            logps = _continued(model, head, cache_rows(cache, part), ids, mask, completion, chunk_rows)
        parts.append(nn.functional.pad(logps, (0, num_completion - width)))
    out = torch.cat(parts)[torch.argsort(order)]
    return out if first is None else torch.cat([first, out], 1)


def sequence_logps(token_logps: Tensor, completion_mask: Tensor) -> Tensor:
    """Sequence log-prob ``log pi(y|x)``: the sum of completion token log-probs, ``(B, C) -> (B,)``.

    >>> sequence_logps(torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[1, 1, 0]]))
    tensor([-3.])
    """
    return (token_logps * completion_mask.to(token_logps.dtype)).sum(-1)
