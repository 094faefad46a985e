"""Rows of a scoring batch in buckets of similar completion length, each run at its own width.

A batch pads every completion to the longest one. When a chat model's completions end at EOS anywhere
between a few tokens and the length limit (SmolLM2 on chat prompts: a third end early, mean 53 of 64),
a sixth of the tokens that the reference forward and the update's forward and backward compute are
padding. :func:`length_buckets` sorts the rows by length and cuts them into runs that each pass at the
longest length in the run, choosing the cuts that minimise the tokens computed plus ``pass_cost`` tokens
for every pass (a pass has a fixed cost: Python and kernel launches for every layer, smaller matmuls).
Equal lengths, or savings below a pass, give one bucket: the batch runs as one pass, as before.

:func:`cache_rows` gives a bucket its rows of a shared prompt's KV cache, as views, so gradients flow back
to the one prompt pass.
"""

from __future__ import annotations

import copy

from transformers.cache_utils import DynamicLayer

PASS_COST = 64
"""Tokens' worth of compute charged per extra forward pass when choosing buckets."""


def length_buckets(lengths: list[int], pass_cost: int = PASS_COST) -> list[list[int]]:
    """Row indices in buckets of increasing length (rows sorted by length, stable), minimising
    ``sum(rows x longest length) + pass_cost x buckets``; one bucket when nothing is worth a pass.

    >>> length_buckets([64, 9, 64, 12, 64, 64, 10, 64], pass_cost=16)
    [[1, 6, 3], [0, 2, 4, 5, 7]]
    >>> length_buckets([5, 4, 5], pass_cost=16)
    [[1, 0, 2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    values = [lengths[i] for i in order]
    n = len(values)
    # cost[j]: least cost of the first j sorted rows; a bucket always ends after its longest (last) row, and only a
    # row whose successor is longer (or the last row) can end one
    ends = [j for j in range(1, n + 1) if j == n or values[j] > values[j - 1]]
    cost, cut = {0: 0.0}, {0: 0}
    for j in ends:
        cost[j], cut[j] = min((cost[i] + (j - i) * values[j - 1] + pass_cost, i) for i in cost if i < j)
    buckets, j = [], n
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1] if n else []


def cache_rows(cache, rows: slice):
    """A shallow copy of ``cache`` holding rows ``rows`` of every layer's keys and values (views), or None when a
    layer is not one of transformers' dynamic layers (whose state is those two tensors)."""
    if not all(isinstance(layer, DynamicLayer) for layer in cache.layers):
        return None
    part = copy.copy(cache)
    part.layers = []
    for layer in cache.layers:
        piece = copy.copy(layer)
        if layer.is_initialized and layer.get_seq_length() > 0:
            piece.keys, piece.values = layer.keys[rows], layer.values[rows]
        part.layers.append(piece)
    return part
