"""The in-place KV cache (:mod:`gvpo.rollout.kv_cache`): the same keys, values and generated scores as
transformers' ``DynamicCache``, bit for bit, with one buffer per layer instead of a copy per token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicCache, DynamicLayer

import tiny
from gvpo.rollout import SamplingParams
from gvpo.rollout.hf import HFEngine
from gvpo.rollout.kv_cache import GrowingLayer, growing_cache, in_place_cache


@pytest.mark.parametrize("reserve", [0, 2, 50])
def test_growing_layer_holds_what_a_dynamic_layer_holds(reserve):
    """Updates of 3, 1, 1, ... positions, a row selection and a crop in between: ``keys``/``values`` equal the
    concatenating layer's after every call, whatever the spare room (0 = grow at every token)."""
    g = torch.Generator().manual_seed(0)
    grown, plain = GrowingLayer(reserve=reserve), DynamicLayer()
    for step, n in enumerate([3, 1, 1, 2, 1, 1, 1]):
        rows = 4 if step < 3 else 3
        k, v = torch.randn(rows, 2, n, 5, generator=g), torch.randn(rows, 2, n, 5, generator=g)
        out = grown.update(k, v), plain.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(*out))
        assert grown.get_seq_length() == plain.get_seq_length()
        if step == 2:  # the trainer's prompt sharing selects rows; speculative decoding crops
            for layer in (grown, plain):
                layer.batch_select_indices(torch.tensor([0, 0, 3]))
        if step == 4:
            for layer in (grown, plain):
                layer.crop(-1)
        assert torch.equal(grown.keys, plain.keys) and torch.equal(grown.values, plain.values)


def test_room_for_the_reserve_means_no_regrowth(monkeypatch):
    grows = []
    original = GrowingLayer._grow
    monkeypatch.setattr(GrowingLayer, "_grow", lambda self, *a: (grows.append(a[-1]), original(self, *a))[1])
    layer = GrowingLayer(reserve=10)
    layer.update(torch.zeros(2, 1, 4, 3), torch.zeros(2, 1, 4, 3))
    for _ in range(10):
        layer.update(torch.ones(2, 1, 1, 3), torch.ones(2, 1, 1, 3))
    assert grows == [14] and layer.get_seq_length() == 14
    layer.update(torch.ones(2, 1, 1, 3), torch.ones(2, 1, 1, 3))
    assert grows == [14, 25]


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    path = tiny.make_tiny_family(tmp_path_factory.mktemp("llama") / "model", "llama")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_generate_scores_are_bit_identical_to_the_dynamic_cache(model_and_tokenizer):
    """Greedy ``generate`` with left-padded prompts: every step's scores equal the default cache's exactly, for a
    new cache, and for a prompt prefix cached beforehand (as the engine shares prompts) then converted by
    :func:`growing_cache`, against the same prefix left in transformers' cache."""
    from gvpo.model.logprobs import position_ids_from_mask

    model, _ = model_and_tokenizer
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, tiny.VOCAB_SIZE, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[:2, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=9, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    config = model.config.get_text_config(decoder=True)

    def prefix():
        head = mask[:, :-1]
        return model(input_ids=ids[:, :-1], attention_mask=head, position_ids=position_ids_from_mask(head),
                     use_cache=True).cache

    with torch.no_grad():
        pairs = [(model.generate(input_ids=ids, **kwargs),
                  model.generate(input_ids=ids, cache=growing_cache(None, config, reserve=9), **kwargs))]
        filled = growing_cache(prefix(), config, reserve=10)
        assert all(isinstance(layer, GrowingLayer) for layer in filled.layers)
        pairs.append((model.generate(input_ids=ids, cache=prefix(), **kwargs),
                      model.generate(input_ids=ids, cache=filled, **kwargs)))
    for plain, grown in pairs:
        assert torch.equal(grown.sequences, plain.sequences)
        assert all(torch.equal(a, b) for a, b in zip(grown.scores, plain.scores))


def test_the_engine_generates_with_a_growing_cache(model_and_tokenizer):
    """``HFEngine`` hands ``generate`` a growing cache, prompts shared or not; a model whose ``generate`` takes no
    ``DynamicCache`` keeps what it was given."""
    model, tok = model_and_tokenizer
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("cache")), with_kwargs=True)
    try:
        for share in (True, False):
            seen.clear()
            HFEngine(model, tok, share_prompts=share).generate(["Q: 1+2= A:"] * 3, [1, 2, 3],
                                                               SamplingParams(max_new_tokens=4))
            caches = [c for c in seen if c is not None]
            assert caches and all(isinstance(c, DynamicCache) for c in caches)
            assert all(isinstance(layer, GrowingLayer) for layer in caches[-1].layers)
    finally:
        hook.remove()

    class NoDynamicCache(torch.nn.Module):
        _supports_default_dynamic_cache = staticmethod(lambda: False)

    assert in_place_cache(NoDynamicCache(), {}, 4) == {}
