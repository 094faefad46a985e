"""A KV cache for ``generate`` that appends in place: transformers' ``DynamicCache`` with each full-attention layer
holding its keys and values in a buffer with room for the tokens still to come.

``DynamicLayer.update`` appends a token with ``torch.cat``, which copies the whole cache of every layer at every
step: at SmolLM2's 30 layers, 32 rows and 100 positions that is about 0.3 GB of copying per token, one tenth of a
decode step on this CPU (bench/README.md, section "SmolLM2-135M against TRL"). :class:`GrowingLayer` writes the new
keys and values into its buffer and returns views of the filled part: the same values, shapes and positions as the
concatenated tensors, so attention computes what it did before, bit for bit. A buffer that is full grows (a
copy, as ``cat`` makes every time); anything that replaces the keys from outside (cropping, selecting rows) becomes
the new buffer.
"""

from __future__ import annotations

from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..model.logprobs import cache_argument, caches_prompts


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views of the first ``length`` positions of a buffer with
    room for ``reserve`` more positions than it was last grown to hold."""

    def __init__(self, reserve: int = 0, **kwargs):
        self._buffers: tuple[Tensor, Tensor] | None = None
        self._lengths = [0, 0]  # filled positions of the key and of the value buffer (equal between assignments)
        self.reserve = reserve
        super().__init__(**kwargs)

    # keys and values are views of the buffers; assigning them (DynamicLayer's own crop, batch_select_indices, ...)
    # makes the assigned tensors the buffers, without spare room
    @property
    def keys(self) -> Tensor | None:
        return None if self._buffers is None else self._buffers[0][..., : self._lengths[0], :]

    @keys.setter
    def keys(self, value: Tensor | None) -> None:
        self._set(0, value)

    @property
    def values(self) -> Tensor | None:
        return None if self._buffers is None else self._buffers[1][..., : self._lengths[1], :]

    @values.setter
    def values(self, value: Tensor | None) -> None:
        self._set(1, value)

    def _set(self, which: int, value: Tensor | None) -> None:
        if value is None or value.dim() < 4:  # DynamicLayer's empty placeholders
            self._buffers, self._lengths = None, [0, 0]
            return
        buffers = list(self._buffers) if self._buffers is not None else [value, value]
        buffers[which] = value
        self._buffers = (buffers[0], buffers[1])
        self._lengths[which] = value.shape[-2]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if self._buffers is None or end > self._buffers[0].shape[-2]:
            self._grow(key_states, value_states, end + self.reserve)
        keys, values = self._buffers
        keys[..., start:end, :].copy_(key_states)
        values[..., start:end, :].copy_(value_states)
        self._lengths = [end, end]
        return self.keys, self.values

    def _grow(self, key_states: Tensor, value_states: Tensor, capacity: int) -> None:
        """New buffers of ``capacity`` positions holding what is cached so far."""
        fresh = []
        for old, new in zip(self._buffers or (None, None), (key_states, value_states)):
            buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
            length = self.get_seq_length()
            if old is not None and length:
                buffer[..., :length, :].copy_(old[..., :length, :])
            fresh.append(buffer)
        self._buffers = (fresh[0], fresh[1])

    def get_seq_length(self) -> int:
        return self._lengths[0]


def growing_cache(cache: DynamicCache | None, config, reserve: int) -> DynamicCache:
    """``cache`` (a new empty ``DynamicCache(config=config)`` when None) with every plain ``DynamicLayer`` replaced by
    a :class:`GrowingLayer` holding the same keys and values and room for ``reserve`` more positions; layers of other
    kinds (sliding windows, linear attention) stay as they are."""
    cache = DynamicCache(config=config) if cache is None else cache
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            grown = GrowingLayer(reserve=reserve)
            if layer.is_initialized:
                grown.lazy_initialization(layer.keys, layer.values)
                if layer.get_seq_length():
                    grown.update(layer.keys, layer.values)
            cache.layers[i] = grown
    if cache.layer_class_to_replicate is DynamicLayer:  # a cache built without a config grows its layers lazily
        cache.layer_class_to_replicate = lambda: GrowingLayer(reserve=reserve)
    return cache



def in_place_cache(model, cache_kwargs: dict, max_new_tokens: int) -> dict:
    """``generate``'s cache keyword for ``model``: the given prompt cache (``cache_kwargs``, maybe ``{}``) or a new
    cache, either one as a :func:`growing_cache` with room for ``max_new_tokens``; ``cache_kwargs`` as given for a
    model whose ``generate`` takes no ``DynamicCache`` (no KV cache, encoder-decoder, a custom cache)."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if not caches_prompts(model) or supports is None or not supports():
        return cache_kwargs
    key = cache_argument(model)
    config = model.config.get_text_config(decoder=True)
    return {key: growing_cache(cache_kwargs.get(key), config, reserve=max_new_tokens + 1)}
