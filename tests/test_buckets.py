"""Length buckets (:mod:`gvpo.model.buckets`): the cheapest split of the rows by completion length, and bucketed
log-probs equal to one padded pass (values and gradients, prompts shared or not) while computing fewer tokens."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch

import gvpo.model.logprobs as logprobs
import tiny
from gvpo.model.buckets import cache_rows, length_buckets
from gvpo.model.loading import Reference
from gvpo.model.logprobs import completion_token_logps


def cost(lengths, buckets, pass_cost):
    return sum(len(b) * max(lengths[i] for i in b) + pass_cost for b in buckets)


def brute_force(lengths, pass_cost) -> float:
    """Least cost over every split of the length-sorted rows into contiguous runs (2^(n-1) of them)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        buckets, current = [], [order[0]]
        for row, cut in zip(order[1:], cuts):
            if cut:
                buckets.append(current)
                current = []
            current.append(row)
        best = min(best, cost(lengths, buckets + [current], pass_cost))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_buckets_are_a_least_cost_split_of_all_rows(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 12), 12]) for _ in range(rng.randint(1, 9))]
    pass_cost = rng.choice([0, 3, 10, 40])
    buckets = length_buckets(lengths, pass_cost)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert [max(lengths[i] for i in b) for b in buckets] == sorted(max(lengths[i] for i in b) for b in buckets)
    assert cost(lengths, buckets, pass_cost) == brute_force(lengths, pass_cost)


def test_equal_lengths_or_small_savings_give_one_bucket():
    assert length_buckets([8] * 32) == [list(range(32))]
    assert len(length_buckets([64] * 31 + [63])) == 1  # 63 tokens saved < one pass
    assert length_buckets([]) == []


def grouped_batch(lengths, k=4, prompt_lens=(7, 5, 6), seed=0):
    """``len(prompt_lens)`` prompts (left-padded), ``k`` completions each, of ``lengths`` (cycled; right-padded)."""
    g = torch.Generator().manual_seed(seed)
    plen, width = max(prompt_lens), max(lengths)
    ids, attention, completion, i = [], [], [], 0
    for n in prompt_lens:
        prompt = torch.randint(3, tiny.VOCAB_SIZE, (n,), generator=g)
        for _ in range(k):
            c = lengths[i % len(lengths)]
            i += 1
            tokens = torch.randint(3, tiny.VOCAB_SIZE, (c,), generator=g)
            ids.append(torch.cat([torch.zeros(plen - n, dtype=torch.long), prompt, tokens,
                                  torch.zeros(width - c, dtype=torch.long)]))
            attention.append(torch.tensor([0] * (plen - n) + [1] * (n + c) + [0] * (width - c)))
            completion.append(torch.tensor([1] * c + [0] * (width - c)))
    return torch.stack(ids), torch.stack(attention), torch.stack(completion)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tiny.make_tiny_family(tmp_path_factory.mktemp("llama") / "model", "llama")
    return AutoModelForCausalLM.from_pretrained(path).double()


@pytest.mark.parametrize("share", [True, False], ids=["shared", "plain"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "logits"])
def test_bucketed_logps_and_gradients_equal_one_padded_pass(llama, monkeypatch, share, fused):
    """float64: with every pass free (``PASS_COST`` 0) the rows run in several buckets, each trimmed to its longest
    completion, over fewer tokens; log-probs equal the one-pass result (1e-10) and so do the gradients."""
    if not fused:
        monkeypatch.setattr(logprobs, "fused_head", lambda model, base: None)
    model = copy.deepcopy(llama)
    batch = grouped_batch([9, 2, 9, 5, 9, 1])
    tokens = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: tokens.append(kw["input_ids"].numel()),
                                                 with_kwargs=True)
    results = []
    for pass_cost in (10_000, 0):
        monkeypatch.setattr(logprobs, "PASS_COST", pass_cost)
        tokens.clear()
        model.zero_grad(set_to_none=True)
        out = completion_token_logps(model, *batch, share_prompts=share)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()], sum(tokens)))
    hook.remove()
    (one, one_grads, one_tokens), (bucketed, grads, bucketed_tokens) = results
    assert bucketed_tokens < one_tokens
    torch.testing.assert_close(bucketed, one, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, one_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("share", [True, False], ids=["shared", "plain"])
def test_policy_and_frozen_reference_agree_bit_for_bit_in_buckets(llama, monkeypatch, share):
    """GVPO's zero-signal exactness needs the trainable policy (with grad) and its frozen copy (without) to give
    identical log-probs; the buckets depend on the completion mask only, so both run the same passes."""
    monkeypatch.setattr(logprobs, "PASS_COST", 0)
    policy = copy.deepcopy(llama).float()
    reference = Reference(policy, lora=False).model
    batch = grouped_batch([9, 2, 9, 5, 9, 1])
    logps = completion_token_logps(policy, *batch, share_prompts=share)
    with torch.no_grad():
        ref_logps = completion_token_logps(reference, *batch, share_prompts=share)
    assert logps.requires_grad and torch.equal(logps.detach(), ref_logps)


def test_cache_rows_are_views_of_the_dynamic_layers(llama):
    cache = llama(input_ids=torch.randint(3, tiny.VOCAB_SIZE, (4, 5)), use_cache=True).cache
    part = cache_rows(cache, slice(1, 3))
    for whole, piece in zip(cache.layers, part.layers):
        assert torch.equal(piece.keys, whole.keys[1:3]) and piece.keys.data_ptr() == whole.keys[1].data_ptr()
    assert part.layers[0] is not cache.layers[0]

    class Other:
        layers = [object()]

    assert cache_rows(Other(), slice(0, 1)) is None
