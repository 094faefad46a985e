"""Segment operations (gvpo.groups) against plain-Python loops: the group statistics every equation uses
(the group means of Eq. 12, the per-group k of Eq. 16, GRPO's std of Eq. 3)."""

from __future__ import annotations

import random
import statistics

import pytest
import torch

from gvpo.groups import center, dense_index, group_mean, group_sizes, group_std, group_sum


def random_labels(seed, n=40):
    rng = random.Random(seed)
    labels = rng.sample([17, 3, 1000, -4, 0, 2**40, 42], rng.randint(1, 7))
    return [rng.choice(labels) for _ in range(n)], rng


@pytest.mark.parametrize("seed", range(8))
def test_dense_index_maps_labels_to_sorted_dense_ids(seed):
    """Arbitrary integer labels (negative, huge, gaps, any order) -> 0..G-1 in sorted label order."""
    labels, _ = random_labels(seed)
    index, num_groups = dense_index(torch.tensor(labels))
    uniq = sorted(set(labels))
    assert num_groups == len(uniq)
    assert index.tolist() == [uniq.index(x) for x in labels]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_dense_index_accepts_integer_dtypes(dtype):
    index, num_groups = dense_index(torch.tensor([9, 2, 9, 5], dtype=dtype))
    assert index.tolist() == [2, 0, 2, 1] and num_groups == 3


@pytest.mark.parametrize("seed", range(8))
def test_sizes_sums_means_center_std_match_loops(seed):
    """k_g, sums, means, centring (Eq. 12's ``x - mean_g x``) and unbiased std (Eq. 3) per group,
    float64 to 1e-12; the std of a group of one is 0."""
    labels, rng = random_labels(seed)
    values = [rng.gauss(0, 3) for _ in labels]
    index, num_groups = dense_index(torch.tensor(labels))
    x = torch.tensor(values, dtype=torch.float64)
    members = {}
    for i, g in enumerate(index.tolist()):
        members.setdefault(g, []).append(i)
    sizes = group_sizes(index, num_groups)
    sums = group_sum(x, index, num_groups)
    means = group_mean(x, index, num_groups)
    stds = group_std(x, index, num_groups)
    centred = center(x, index, num_groups)
    for g in range(num_groups):
        vals = [values[i] for i in members[g]]
        assert int(sizes[g]) == len(vals)
        assert float(sums[g]) == pytest.approx(sum(vals), rel=1e-12, abs=1e-12)
        assert float(means[g]) == pytest.approx(sum(vals) / len(vals), rel=1e-12, abs=1e-12)
        expected_std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        assert float(stds[g]) == pytest.approx(expected_std, rel=1e-12, abs=1e-12)
        for i in members[g]:
            assert float(centred[i]) == pytest.approx(values[i] - sum(vals) / len(vals), rel=1e-12, abs=1e-12)


def test_group_sum_and_center_are_differentiable():
    """d/dx_j sum_i (center(x)_i * a_i) = a_j - mean_g(a): the Jacobian of centring, as Eq. 13 uses it."""
    x = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([1.0, -1.0, 3.0, 5.0], dtype=torch.float64)
    index = torch.tensor([0, 1, 0, 1])
    (center(x, index, 2) * a).sum().backward()
    assert x.grad.tolist() == pytest.approx([1.0 - 2.0, -1.0 - 2.0, 3.0 - 2.0, 5.0 - 2.0])


def test_empty_groups_in_dense_range_do_not_break_sizes():
    """group_sizes returns G entries even when the last dense ids are unused by a sub-batch."""
    assert group_sizes(torch.tensor([0, 0, 2]), 4).tolist() == [2, 0, 1, 0]
