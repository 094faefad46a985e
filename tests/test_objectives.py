"""gvpo_loss / gvpo_weights / gvpo_grad_coefficients against a float64 plain-Python reference.

The reference below is written from the paper, with Python loops over groups and no gvpo helper:

* loss: ``1/G * sum_{groups, k>=2} 1/(k-1) * sum_i 0.5 * ((Rθ_i - mean Rθ) - (R_i - mean R))^2``,
  ``Rθ = beta * (logps - ref_logps)``: half of Eq. 16 (the 0.5 of Eq. 13), G = groups with k >= 2;
* weights: Eq. 12, ``w_i = (R_i - mean R) - beta * (l_i - mean l)``, ``l = logps - ref_logps``;
* gradient, derived by hand: ``dL/dlogps_i = beta/(G (k-1)) * (e_i - mean_g e)`` with
  ``e_i = (Rθ_i - mean Rθ) - (R_i - mean R)``, i.e. ``-beta * w_i / (G (k-1))`` (Eq. 13), 0 for k = 1.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from gvpo import gvpo_grad_coefficients, gvpo_loss, gvpo_weights

LABELS = [17, 3, 1000, -4, 0, 123456789, 42, 8]


# ------------------------------------------------------------------------------------------------
# Plain-Python float64 reference
# ------------------------------------------------------------------------------------------------


def _groups(group_ids):
    groups = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return groups


def ref_loss(logps, ref_logps, rewards, group_ids, beta):
    """Half of Eq. 16 with plain loops; works on Python floats or on 0-d tensors (for autograd)."""
    total, n_valid = 0.0, 0
    for members in _groups(group_ids).values():
        k = len(members)
        if k < 2:
            continue
        n_valid += 1
        implicit = [beta * (logps[i] - ref_logps[i]) for i in members]
        actual = [rewards[i] for i in members]
        mean_implicit = sum(implicit) / k
        mean_actual = sum(actual) / k
        squares = sum(((a - mean_implicit) - (b - mean_actual)) ** 2 for a, b in zip(implicit, actual))
        total = total + 0.5 * squares / (k - 1)
    return total / n_valid


def ref_weights(logps, ref_logps, rewards, group_ids, beta):
    """Eq. 12 with plain loops."""
    w = [0.0] * len(logps)
    for members in _groups(group_ids).values():
        k = len(members)
        mean_r = sum(rewards[i] for i in members) / k
        mean_l = sum(logps[i] - ref_logps[i] for i in members) / k
        for i in members:
            w[i] = (rewards[i] - mean_r) - beta * ((logps[i] - ref_logps[i]) - mean_l)
    return w


def ref_grad(logps, ref_logps, rewards, group_ids, beta):
    """Hand-derived dL/dlogps (see module docstring)."""
    groups = _groups(group_ids)
    n_valid = sum(len(m) >= 2 for m in groups.values())
    grad = [0.0] * len(logps)
    for members in groups.values():
        k = len(members)
        if k < 2:
            continue
        implicit = [beta * (logps[i] - ref_logps[i]) for i in members]
        actual = [rewards[i] for i in members]
        mi, ma = sum(implicit) / k, sum(actual) / k
        e = [(a - mi) - (b - ma) for a, b in zip(implicit, actual)]
        mean_e = sum(e) / k
        for i, e_i in zip(members, e):
            grad[i] = beta * (e_i - mean_e) / (n_valid * (k - 1))
    return grad


def random_case(seed, *, min_k=1, max_k=7, max_groups=6):
    """Variable k, singleton groups, labels from LABELS, completions shuffled (groups interleaved)."""
    rng = random.Random(seed)
    n_groups = rng.randint(1, max_groups)
    labels = rng.sample(LABELS, n_groups)
    sizes = [rng.randint(min_k, max_k) for _ in labels]
    if max(sizes) < 2:
        sizes[0] = rng.randint(2, max_k)
    group_ids = [g for g, k in zip(labels, sizes) for _ in range(k)]
    rng.shuffle(group_ids)
    n = len(group_ids)
    logps = [-abs(rng.gauss(0, 1)) * 30 for _ in range(n)]
    ref_logps = [-abs(rng.gauss(0, 1)) * 30 for _ in range(n)]
    rewards = [rng.gauss(0, 2) + rng.choice([0.0, 5.0]) for _ in range(n)]
    beta = rng.choice([0.01, 0.1, 0.5, 1.0, 3.7])
    return logps, ref_logps, rewards, group_ids, beta


def as_tensors(logps, ref_logps, rewards, group_ids, dtype=torch.float64):
    return (torch.tensor(logps, dtype=dtype), torch.tensor(ref_logps, dtype=dtype),
            torch.tensor(rewards, dtype=dtype), torch.tensor(group_ids))


def assert_vec_close(actual, expected, rel=1e-9):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rel, atol=rel * scale * 1e-3)


SEEDS = list(range(25))


# ------------------------------------------------------------------------------------------------
# Value, weights, gradient against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_loss_matches_loop_reference(seed):
    """Eq. 13 with the 1/(k-1) estimator of Eq. 16 (times the 0.5 of Eq. 13): value to 1e-9 relative,
    random variable-k cases with shuffled, non-contiguous labels and groups of one."""
    case = random_case(seed)
    expected = ref_loss(*case)
    logps, ref_logps, rewards, group_ids = as_tensors(*case[:4])
    loss = gvpo_loss(logps, ref_logps, rewards, group_ids, beta=case[4])
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert float(loss) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("seed", SEEDS)
def test_weights_match_eq12_and_sum_to_zero(seed):
    """Eq. 12 weights to 1e-9 relative; they sum to 0 in every group (section 3.1's zero-sum
    condition, which removes Z(x)); they are detached."""
    case = random_case(seed)
    logps, ref_logps, rewards, group_ids = as_tensors(*case[:4])
    logps.requires_grad_(True)
    w = gvpo_weights(logps, ref_logps, rewards, group_ids, beta=case[4])
    assert not w.requires_grad
    assert_vec_close(w, ref_weights(*case))
    for members in _groups(case[3]).values():
        scale = sum(abs(float(w[i])) for i in members) + 1.0
        assert abs(sum(float(w[i]) for i in members)) < 1e-12 * scale


@pytest.mark.parametrize("seed", SEEDS)
def test_gradient_matches_hand_derivation_autograd_of_reference_and_coefficients(seed):
    """Eq. 13: d gvpo_loss / d logps equals (a) the hand-derived formula, (b) autograd through the loop
    reference, (c) ``-beta * w_i / (G (k_g - 1))`` with Eq. 12 weights, (d) ``-gvpo_grad_coefficients``
    (all to 1e-9 relative); completions in groups of one get exactly 0."""
    case = random_case(seed)
    logps, ref_logps, rewards, group_ids = as_tensors(*case[:4])
    beta = case[4]
    logps.requires_grad_(True)
    gvpo_loss(logps, ref_logps, rewards, group_ids, beta=beta).backward()
    grad = logps.grad

    assert_vec_close(grad, ref_grad(*case))

    leaf = torch.tensor(case[0], dtype=torch.float64, requires_grad=True)
    ref_loss(list(leaf.unbind()), case[1], case[2], case[3], beta).backward()
    assert_vec_close(grad, leaf.grad)

    groups = _groups(case[3])
    n_valid = sum(len(m) >= 2 for m in groups.values())
    w = ref_weights(*case)
    expected = [0.0] * len(w)
    for members in groups.values():
        for i in members:
            expected[i] = 0.0 if len(members) < 2 else -beta * w[i] / (n_valid * (len(members) - 1))
    assert_vec_close(grad, expected)

    coeffs = gvpo_grad_coefficients(logps, ref_logps, rewards, group_ids, beta=beta)
    assert not coeffs.requires_grad
    assert_vec_close(-coeffs, grad)
    for members in groups.values():
        if len(members) == 1:
            assert float(grad[members[0]]) == 0.0 and float(coeffs[members[0]]) == 0.0


def test_surrogate_with_coefficients_has_the_loss_gradient_in_any_micro_batches():
    """Eq. 13's gradient form: ``-(c * logps).sum()`` over arbitrary micro-batches accumulates exactly the
    gradient of gvpo_loss on the whole batch (whole-group statistics live in ``c``)."""
    case = random_case(1234, min_k=2)
    logps, ref_logps, rewards, group_ids = as_tensors(*case[:4])
    full = logps.clone().requires_grad_(True)
    gvpo_loss(full, ref_logps, rewards, group_ids, beta=case[4]).backward()
    coeffs = gvpo_grad_coefficients(logps, ref_logps, rewards, group_ids, beta=case[4])
    acc = logps.clone().requires_grad_(True)
    for chunk in torch.arange(len(logps)).split(3):
        (-(coeffs[chunk] * acc[chunk]).sum()).backward()
    assert_vec_close(acc.grad, full.grad, rel=1e-12)


def test_gradcheck_float64():
    """torch.autograd.gradcheck of gvpo_loss (Eq. 13 / 16) w.r.t. logps and ref_logps, float64."""
    logps, ref_logps, rewards, group_ids = as_tensors(*random_case(7)[:4])
    logps.requires_grad_(True)
    ref_logps.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: gvpo_loss(a, b, rewards, group_ids, beta=0.37), (logps, ref_logps), eps=1e-6, atol=1e-7
    )


def test_float32_inputs_close_to_float64_reference():
    """Same value (Eq. 13/16) in float32, to float32 accuracy; the result stays float32."""
    case = random_case(99, min_k=2)
    logps, ref_logps, rewards, group_ids = as_tensors(*case[:4], dtype=torch.float32)
    loss = gvpo_loss(logps, ref_logps, rewards, group_ids, beta=case[4])
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(ref_loss(*case), rel=1e-4)


def test_worked_examples_by_hand():
    """Eq. 13 and Eq. 12 on cases computed by hand.

    Group 5: k = 2, beta = 2, Rθ = 2*(l - ref) = (2, 0), R = (0, 1): centred Rθ = (1, -1), centred
    R = (-.5, .5), residuals (1.5, -1.5), 0.5 * (2.25 + 2.25) / (k-1) = 2.25. Group 9 has one member
    and adds nothing; G = 1. Weights = -(residuals) = (-1.5, 1.5), 0 for the singleton.
    """
    logps = torch.tensor([-1.0, -3.0, -0.5], dtype=torch.float64)
    ref_logps = torch.tensor([-2.0, -3.0, -7.0], dtype=torch.float64)
    rewards = torch.tensor([0.0, 1.0, 100.0], dtype=torch.float64)
    group_ids = torch.tensor([5, 5, 9])
    assert float(gvpo_loss(logps, ref_logps, rewards, group_ids, beta=2.0)) == pytest.approx(2.25, rel=1e-15)
    w = gvpo_weights(logps, ref_logps, rewards, group_ids, beta=2.0)
    assert w.tolist() == pytest.approx([-1.5, 1.5, 0.0], abs=1e-15)
    # gradient = -beta * w / (G (k-1)) = -2 * (-1.5, 1.5, 0) / 1
    assert gvpo_grad_coefficients(logps, ref_logps, rewards, group_ids, beta=2.0).tolist() == pytest.approx(
        [-3.0, 3.0, 0.0], abs=1e-15)


def test_loss_is_zero_exactly_at_the_optimal_policy():
    """Theorem 3.1 necessity: with logps = ref_logps + R/beta - log Z (a per-group constant), every
    centred residual is zero, so the loss and the gradient are 0."""
    case = random_case(3, min_k=2)
    _, ref_logps, rewards, group_ids = as_tensors(*case[:4])
    beta = 0.25
    shift = {g: 3.0 * j for j, g in enumerate(LABELS)}
    logps = ref_logps + rewards / beta - torch.tensor([shift[g] for g in case[3]], dtype=torch.float64)
    logps.requires_grad_(True)
    loss = gvpo_loss(logps, ref_logps, rewards, group_ids, beta=beta)
    loss.backward()
    assert float(loss.detach()) < 1e-20
    assert float(logps.grad.abs().max()) < 1e-10


# ------------------------------------------------------------------------------------------------
# Invariances
# ------------------------------------------------------------------------------------------------


def _all(logps, ref_logps, rewards, group_ids, beta):
    logps = logps.clone().requires_grad_(True)
    loss = gvpo_loss(logps, ref_logps, rewards, group_ids, beta=beta)
    loss.backward()
    return float(loss.detach()), logps.grad, gvpo_weights(logps, ref_logps, rewards, group_ids, beta=beta)


@pytest.mark.parametrize("seed", range(6))
def test_permuting_completions_with_their_labels_changes_nothing(seed):
    """Eq. 16 sums over groups and over completions within a group: order is irrelevant. Loss is
    unchanged, gradients and weights move with their completions; relabelling the groups with other
    integers also changes nothing."""
    case = random_case(seed)
    t = as_tensors(*case[:4])
    beta = case[4]
    loss, grad, w = _all(*t, beta)
    perm = torch.randperm(len(case[0]), generator=torch.Generator().manual_seed(seed))
    loss_p, grad_p, w_p = _all(*(x[perm] for x in t), beta)
    assert loss_p == pytest.approx(loss, rel=1e-12)
    assert_vec_close(grad_p, grad[perm], rel=1e-12)
    assert_vec_close(w_p, w[perm], rel=1e-12)
    relabelled = t[3] * 1000 - 77
    loss_r, grad_r, _ = _all(t[0], t[1], t[2], relabelled, beta)
    assert loss_r == pytest.approx(loss, rel=1e-12)
    assert_vec_close(grad_r, grad, rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_constant_shift_of_one_groups_rewards_changes_nothing(seed):
    """Eq. 12/13 centre R within the group, so ``R_i + c`` for all i of one group is invisible.
    Control: shifting one completion's reward does change the loss (the test can fail)."""
    case = random_case(seed, min_k=2)
    logps, ref_logps, rewards, group_ids = as_tensors(*case[:4])
    loss, grad, w = _all(logps, ref_logps, rewards, group_ids, case[4])
    target = group_ids == group_ids[0]
    loss_s, grad_s, w_s = _all(logps, ref_logps, rewards + 37.5 * target, group_ids, case[4])
    assert loss_s == pytest.approx(loss, rel=1e-9)
    assert_vec_close(grad_s, grad)
    assert_vec_close(w_s, w)
    one = torch.zeros_like(rewards)
    one[0] = 1.0
    assert abs(_all(logps, ref_logps, rewards + one, group_ids, case[4])[0] - loss) > 1e-6


@pytest.mark.parametrize("seed", range(6))
def test_partition_function_cancels(seed):
    """Section 3.1 / Eq. 11: a per-prompt constant in the implicit reward (beta log Z(x)) cancels because
    the weights sum to zero. Adding a constant to all ref_logps (or all logps) of one group leaves
    loss, gradient and weights unchanged; a constant on one completion alone does not."""
    case = random_case(seed, min_k=2)
    logps, ref_logps, rewards, group_ids = as_tensors(*case[:4])
    beta = case[4]
    loss, grad, w = _all(logps, ref_logps, rewards, group_ids, beta)
    target = group_ids == group_ids[-1]
    for shifted in ((logps, ref_logps + 11.25 * target), (logps - 4.5 * target, ref_logps)):
        loss_s, grad_s, w_s = _all(*shifted, rewards, group_ids, beta)
        assert loss_s == pytest.approx(loss, rel=1e-9)
        assert_vec_close(grad_s, grad)
        assert_vec_close(w_s, w)
    one = torch.zeros_like(ref_logps)
    one[-1] = 1.0
    assert abs(_all(logps, ref_logps + one, rewards, group_ids, beta)[0] - loss) > 1e-6


def test_singleton_groups_contribute_nothing():
    """Corollary 3.4 with k(x) = 1 has no variance term: adding singleton groups (any values) changes
    neither the loss nor the other completions' gradients, and G counts only groups with k >= 2."""
    case = random_case(5, min_k=2)
    logps, ref_logps, rewards, group_ids = as_tensors(*case[:4])
    loss, grad, _ = _all(logps, ref_logps, rewards, group_ids, case[4])
    extra = torch.tensor([-123.0, -0.5], dtype=torch.float64)
    loss_e, grad_e, _ = _all(torch.cat([logps, extra]), torch.cat([ref_logps, extra * 2]),
                             torch.cat([rewards, torch.tensor([9.0, -9.0], dtype=torch.float64)]),
                             torch.cat([group_ids, torch.tensor([555, 556])]), case[4])
    assert loss_e == pytest.approx(loss, rel=1e-12)
    assert_vec_close(grad_e[: len(logps)], grad, rel=1e-12)
    assert grad_e[len(logps):].tolist() == [0.0, 0.0]


def test_unbiased_normaliser_is_one_over_k_minus_one():
    """Corollary 3.4: each group is normalised by 1/(k-1), not 1/k: duplicating every completion of a
    single group (k -> 2k) changes the value from S/(k-1) to 2S'/(2k-1) (S' = same centred sum)."""
    logps = torch.tensor([-1.0, -2.0, -4.0], dtype=torch.float64)
    ref_logps = torch.zeros(3, dtype=torch.float64)
    rewards = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    e = (logps - logps.mean()) - (rewards - rewards.mean())
    s = float(0.5 * (e**2).sum())
    one = float(gvpo_loss(logps, ref_logps, rewards, torch.zeros(3, dtype=torch.long), beta=1.0))
    two = float(gvpo_loss(logps.repeat(2), ref_logps.repeat(2), rewards.repeat(2),
                          torch.zeros(6, dtype=torch.long), beta=1.0))
    assert one == pytest.approx(s / 2, rel=1e-14)
    assert two == pytest.approx(2 * s / 5, rel=1e-14)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

FUNCTIONS = [gvpo_loss, gvpo_weights, gvpo_grad_coefficients]


def _good():
    return (torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([-1.5, -2.5, -3.0, -3.0]),
            torch.tensor([1.0, 0.0, 0.5, 2.0]), torch.tensor([3, 3, 8, 8]))


def _with(**changes):
    names = ("logps", "ref_logps", "rewards", "group_ids")
    args = dict(zip(names, _good()))
    args.update(changes)
    return [args[n] for n in names]


def _nan_at(t, i, value=math.nan):
    t = t.clone()
    t[i] = value
    return t


ERROR_CASES = {
    "rewards too long": (_with(rewards=torch.zeros(5)), 1.0, r"\brewards\b"),
    "ref_logps too short": (_with(ref_logps=torch.zeros(3)), 1.0, r"\bref_logps\b"),
    "group_ids too long": (_with(group_ids=torch.zeros(5, dtype=torch.long)), 1.0, r"\bgroup_ids\b"),
    "logps 2-d": (_with(logps=torch.zeros(4, 1)), 1.0, r"\blogps\b"),
    "rewards 2-d": (_with(rewards=torch.zeros(2, 2)), 1.0, r"\brewards\b"),
    "rewards not a tensor": (_with(rewards=[1.0, 0.0, 0.5, 2.0]), 1.0, r"\brewards\b"),
    "nan reward": (_with(rewards=_nan_at(_good()[2], 2)), 1.0, r"\brewards\b"),
    "inf reward": (_with(rewards=_nan_at(_good()[2], 0, math.inf)), 1.0, r"\brewards\b"),
    "nan logps": (_with(logps=_nan_at(_good()[0], 1)), 1.0, r"^logps\b"),
    "-inf logps": (_with(logps=_nan_at(_good()[0], 3, -math.inf)), 1.0, r"^logps\b"),
    "inf ref_logps": (_with(ref_logps=_nan_at(_good()[1], 0, -math.inf)), 1.0, r"\bref_logps\b"),
    "integer logps": (_with(logps=torch.tensor([-1, -2, -3, -4])), 1.0, r"^logps\b"),
    "beta zero": (_with(), 0.0, r"\bbeta\b"),
    "beta negative": (_with(), -0.1, r"\bbeta\b"),
    "beta nan": (_with(), math.nan, r"\bbeta\b"),
    "beta inf": (_with(), math.inf, r"\bbeta\b"),
    "float group ids": (_with(group_ids=torch.tensor([3.0, 3.0, 8.0, 8.0])), 1.0, r"\bgroup_ids\b"),
    "bool group ids": (_with(group_ids=torch.tensor([True, True, False, False])), 1.0, r"\bgroup_ids\b"),
    "no group with k >= 2": (_with(group_ids=torch.tensor([1, 2, 3, 4])), 1.0, r"\bgroup_ids\b.*k >= 2"),
    "empty": ([torch.zeros(0)] * 3 + [torch.zeros(0, dtype=torch.long)], 1.0, r"^logps\b"),
}


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", list(ERROR_CASES), ids=str)
def test_bad_inputs_raise_value_error_naming_the_argument(fn, case):
    """Input contract of Eq. 12/13/16: shapes (N,), finite floats, integer labels, beta > 0, at least
    one group with k >= 2; a ValueError whose message names the offending argument."""
    args, beta, pattern = ERROR_CASES[case]
    if case == "no group with k >= 2" and fn is gvpo_weights:
        # Eq. 12 weights are defined (all 0) for singletons; only the loss needs k >= 2.
        assert gvpo_weights(*args, beta=beta).tolist() == [0.0] * 4
        return
    with pytest.raises(ValueError, match=pattern):
        fn(*args, beta=beta)
