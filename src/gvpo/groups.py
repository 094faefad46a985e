"""Segment operations over group labels: sizes, means and centring without Python loops.

A *group* is all completions of one prompt. ``group_ids`` are integer labels of shape ``(N,)``
in any order, not necessarily contiguous; every function here maps them to dense indices
``0..G-1`` with :func:`torch.unique` and reduces with ``index_add_``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary integer labels ``(N,)`` to dense indices ``(N,)`` in ``0..G-1`` and ``G``.

    >>> idx, G = dense_index(torch.tensor([7, 3, 7, 9]))
    >>> idx.tolist(), G
    ([1, 0, 1, 2], 3)
    """
    uniq, index = torch.unique(group_ids, return_inverse=True)
    return index, int(uniq.numel())


def group_sizes(index: Tensor, num_groups: int) -> Tensor:
    """Number of completions ``k_g`` per dense group, shape ``(G,)``."""
    return torch.bincount(index, minlength=num_groups)


def group_sum(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Per-group sums of ``values (N,)``, shape ``(G,)``; differentiable in ``values``."""
    return values.new_zeros(num_groups).index_add(0, index, values)


def group_mean(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Per-group means of ``values (N,)``, shape ``(G,)``."""
    sizes = group_sizes(index, num_groups).to(values.dtype)
    return group_sum(values, index, num_groups) / sizes


def center(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """``values_i - mean of values in i's group``, shape ``(N,)``.

    >>> center(torch.tensor([1., 3., 10.]), torch.tensor([0, 0, 1]), 2).tolist()
    [-1.0, 1.0, 0.0]
    """
    return values - group_mean(values, index, num_groups).index_select(0, index)


def group_std(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Unbiased (``k-1``) per-group standard deviation of ``values (N,)``, shape ``(G,)``; 0 for k=1."""
    sizes = group_sizes(index, num_groups).to(values.dtype)
    sq = group_sum(center(values, index, num_groups) ** 2, index, num_groups)
    return torch.sqrt(sq / (sizes - 1).clamp(min=1))
