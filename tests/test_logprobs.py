"""Sequence log-probs ``log pi(y|x)``, the quantity every equation of the paper is written in
(``R_theta = beta log pi_theta/pi_ref``, Eq. 7/12): chunked token log-probs equal the textbook
``log_softmax + gather``, and left padding of prompts does not change a completion's log-probs."""

from __future__ import annotations

import pytest
import torch

from gvpo import completion_token_logps, sequence_logps, token_logps_from_logits


def naive(logits, labels):
    return logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_rows", [1, 2, 5, 8, 20, 21, 22, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_equal_log_softmax_gather(dtype, chunk_rows):
    """``logit[label] - logsumexp(logits)`` over row chunks (21 rows: most chunk sizes don't divide it)
    equals ``log_softmax(logits.float()).gather``, value and gradient; bf16 logits are upcast, the
    result is float32 and the gradient comes back in bf16."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 53, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 53, (3, 7), generator=g)
    upstream = torch.randn(3, 7, generator=g)

    a = logits.clone().requires_grad_(True)
    out = token_logps_from_logits(a, labels, chunk_rows=chunk_rows)
    (out * upstream).sum().backward()
    b = logits.clone().requires_grad_(True)
    expected = naive(b, labels)
    (expected * upstream).sum().backward()

    assert out.dtype == torch.float32 and out.shape == (3, 7)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    assert a.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=tol, atol=tol)
    # and both are close to the float64 truth
    truth = logits.double().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_of_a_strided_slice_match_and_are_not_copied(dtype):
    """``logits[:, :-1]`` (what a causal LM's next-token shift passes; its batch stride skips a row) gives
    the same values and gradient as the naive formula, and is processed as views of the original
    storage (no full copy of the logits)."""
    from gvpo.model.logprobs import _row_blocks

    g = torch.Generator().manual_seed(1)
    full = (torch.randn(3, 8, 29, generator=g) * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 29, (3, 7), generator=g)
    upstream = torch.randn(3, 7, generator=g)
    out = token_logps_from_logits(full[:, :-1], labels, chunk_rows=5)
    (out * upstream).sum().backward()
    grad = full.grad.clone()
    full.grad = None
    expected = naive(full[:, :-1], labels)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), full.grad.float(), rtol=tol, atol=tol)
    blocks = _row_blocks(full.detach()[:, :-1])
    assert sum(b.shape[0] for b in blocks) == 21
    assert all(b.untyped_storage().data_ptr() == full.untyped_storage().data_ptr() for b in blocks)


def test_token_logps_shapes_and_errors():
    """Any leading shape ``(..., V)``; empty input gives an empty float32 result; label shape mismatch
    is a ValueError naming labels."""
    logits = torch.randn(5, 11)
    labels = torch.randint(0, 11, (5,))
    torch.testing.assert_close(token_logps_from_logits(logits, labels, chunk_rows=2), naive(logits, labels))
    empty = token_logps_from_logits(torch.zeros(2, 0, 11), torch.zeros(2, 0, dtype=torch.long))
    assert empty.shape == (2, 0) and empty.dtype == torch.float32
    with pytest.raises(ValueError, match="labels"):
        token_logps_from_logits(torch.randn(2, 3, 11), torch.zeros(2, 4, dtype=torch.long))


def test_token_logps_probabilities_normalise():
    """exp of the log-probs over every possible label sums to 1 for each row (a distribution)."""
    logits = torch.randn(4, 9) * 10
    total = sum(token_logps_from_logits(logits, torch.full((4,), v), chunk_rows=3).exp() for v in range(9))
    torch.testing.assert_close(total, torch.ones(4))


def test_sequence_logps_sums_masked_tokens():
    """``log pi(y|x) = sum_t log pi(y_t | x, y_<t)`` over completion tokens only."""
    token_logps = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert sequence_logps(token_logps, mask).tolist() == [-7.0, -0.5]


# ------------------------------------------------------------------------------------------------
# A tiny LlamaForCausalLM, left-padded prompts
# ------------------------------------------------------------------------------------------------

VOCAB, PAD = 50, 0


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD)
    model = LlamaForCausalLM(config).eval()
    return model


def make_batch():
    """Prompts of lengths 2, 6, 4 (left-padded to 6), completions of lengths 4, 1, 5 (right-padded)."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (2, 6, 4)]
    completions = [torch.randint(1, VOCAB, (n,), generator=g) for n in (4, 1, 5)]
    P, C = max(map(len, prompts)), max(map(len, completions))
    rows, attn, cmask = [], [], []
    for p, c in zip(prompts, completions):
        rows.append(torch.cat([torch.full((P - len(p),), PAD), p, c, torch.full((C - len(c),), PAD)]))
        attn.append(torch.cat([torch.zeros(P - len(p)), torch.ones(len(p) + len(c)), torch.zeros(C - len(c))]))
        cmask.append(torch.cat([torch.ones(len(c)), torch.zeros(C - len(c))]))
    return prompts, completions, torch.stack(rows), torch.stack(attn).long(), torch.stack(cmask).long()


def unpadded_reference(model, prompt, completion):
    """log pi(completion tokens) from the example alone: no padding, no mask, positions 0..L-1."""
    ids = torch.cat([prompt, completion]).unsqueeze(0)
    logits = model(input_ids=ids).logits[0].double()
    logps = logits.log_softmax(-1)
    start = len(prompt)
    return torch.stack([logps[start + t - 1, completion[t]] for t in range(len(completion))])


@torch.no_grad()
@pytest.mark.parametrize("chunk_rows", [3, 256])
def test_completion_logps_with_left_padding_equal_unpadded(tiny_llama, chunk_rows):
    """Padding must not change log pi(y|x): completion_token_logps on a left-padded batch equals the
    per-example unpadded computation (float32, 1e-5), is 0 on completion padding, and
    sequence_logps sums the right tokens. Control: attending to the pads gives different numbers, so
    this test can detect a padding bug."""
    prompts, completions, input_ids, attention_mask, completion_mask = make_batch()
    token_logps = completion_token_logps(tiny_llama, input_ids, attention_mask, completion_mask,
                                         chunk_rows=chunk_rows)
    assert token_logps.shape == completion_mask.shape and token_logps.dtype == torch.float32
    seq = sequence_logps(token_logps, completion_mask)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ref = unpadded_reference(tiny_llama, p, c)
        torch.testing.assert_close(token_logps[b, : len(c)].double(), ref, rtol=1e-5, atol=1e-5)
        assert token_logps[b, len(c):].abs().sum() == 0
        assert float(seq[b]) == pytest.approx(float(ref.sum()), abs=1e-4)

    # Control: if the padding were attended to, the left-padded row's log-probs would change.
    wrong = completion_token_logps(tiny_llama, input_ids, torch.ones_like(attention_mask), completion_mask)
    ref0 = unpadded_reference(tiny_llama, prompts[0], completions[0])
    assert (wrong[0, : len(completions[0])].double() - ref0).abs().max() > 1e-3


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward does not accept ``logits_to_keep`` (older / custom models)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache)


def test_completion_logps_without_logits_to_keep_and_gradients(tiny_llama):
    """Same log-probs through the fallback for models without ``logits_to_keep``; the result is
    differentiable w.r.t. the model (Eq. 9 needs grad log pi_theta)."""
    _, _, input_ids, attention_mask, completion_mask = make_batch()
    with torch.no_grad():
        direct = completion_token_logps(tiny_llama, input_ids, attention_mask, completion_mask)
        fallback = completion_token_logps(_NoLogitsToKeep(tiny_llama), input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(fallback, direct, rtol=1e-5, atol=1e-5)
    tiny_llama.zero_grad()
    seq = sequence_logps(completion_token_logps(tiny_llama, input_ids, attention_mask, completion_mask),
                         completion_mask)
    seq.sum().backward()
    grad = tiny_llama.model.embed_tokens.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    tiny_llama.zero_grad()


def make_group_batch():
    """Rows as a trainer builds them: prompt 0 x3, prompt 1 x1, prompt 2 x2, then prompt 0 again x2 (a
    repeat that is not adjacent); prompts of lengths 2, 6, 4 left-padded, completions of 1-5 tokens."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (2, 6, 4)]
    order = [0, 0, 0, 1, 2, 2, 0, 0]
    completions = [torch.randint(1, VOCAB, (n,), generator=g) for n in (4, 1, 5, 3, 2, 5, 1, 3)]
    P, C = 6, 5
    rows, attn, cmask = [], [], []
    for i, c in zip(order, completions):
        p = prompts[i]
        rows.append(torch.cat([torch.full((P - len(p),), PAD), p, c, torch.full((C - len(c),), PAD)]))
        attn.append(torch.cat([torch.zeros(P - len(p)), torch.ones(len(p) + len(c)), torch.zeros(C - len(c))]))
        cmask.append(torch.cat([torch.ones(len(c)), torch.zeros(C - len(c))]))
    return [prompts[i] for i in order], completions, torch.stack(rows), torch.stack(attn).long(), torch.stack(cmask).long()


def test_shared_prompts_give_the_same_logps_and_gradients(tiny_llama):
    """Prefix sharing runs each run of identical consecutive prompts once and gathers its KV cache to the
    rows. In float64 it must match the plain path (every row runs prompt + completion) and the
    unpadded per-example reference, value and gradient, and it must really run fewer tokens."""
    import copy

    from gvpo.model.logprobs import prompt_owners

    model = copy.deepcopy(tiny_llama).double()
    prompts, completions, input_ids, attention_mask, completion_mask = make_group_batch()
    assert prompt_owners(input_ids[:, :6], attention_mask[:, :6]).tolist() == [0, 0, 0, 1, 2, 2, 3, 3]
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].numel()),
                                                 with_kwargs=True)
    upstream = torch.randn(completion_mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads, values = [], []
    for share in (True, False):
        model.zero_grad()
        out = completion_token_logps(model, input_ids, attention_mask, completion_mask, share_prompts=share)
        (out * upstream).sum().backward()
        values.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    hook.remove()
    assert seen == [4 * 6, 8 * 5, 8 * 11]  # shared: 4 prompts, then 8 completions; plain: 8 whole rows
    # Llama's RMSNorm computes in float32 even in a float64 model, so a different summation order (the
    # completion pass attends over a cache) can flip a float32 rounding: float32-level tolerances.
    assert values[0].dtype == values[1].dtype == torch.float64
    torch.testing.assert_close(values[0], values[1], rtol=1e-7, atol=1e-7)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ref = unpadded_reference(model, p, c)
        torch.testing.assert_close(values[0][b, : len(c)], ref, rtol=1e-7, atol=1e-7)
        assert values[0][b, len(c):].abs().sum() == 0


def test_gradient_checkpointing_and_non_transformers_models_take_the_plain_path(tiny_llama):
    """transformers drops the KV cache under gradient checkpointing, and a bare module has none."""
    import copy

    from gvpo.model.logprobs import caches_prompts

    model = copy.deepcopy(tiny_llama)
    assert caches_prompts(model) and not caches_prompts(_NoLogitsToKeep(model))
    model.gradient_checkpointing_enable()
    model.train()
    assert not caches_prompts(model)
    _, _, input_ids, attention_mask, completion_mask = make_group_batch()
    out = completion_token_logps(model, input_ids, attention_mask, completion_mask)
    with torch.no_grad():
        expected = completion_token_logps(tiny_llama, input_ids, attention_mask, completion_mask, share_prompts=False)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
