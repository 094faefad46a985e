"""The Eq. 9 weight schemes (gvpo, grpo, dr_grpo, rs, sft, dpo), weighted_nll, and the Registry.

Every scheme is checked against a float64 plain-Python loop written here from the paper (section 2.3).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from gvpo import WEIGHT_SCHEMES, Registry, gvpo_loss, weighted_nll

LABELS = [17, 3, 1000, -4, 0, 123456789, 42]


def _groups(group_ids):
    groups = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return groups


def random_case(seed, *, min_k=1, ties=False):
    rng = random.Random(seed)
    labels = rng.sample(LABELS, rng.randint(1, 6))
    sizes = [rng.randint(min_k, 7) for _ in labels]
    group_ids = [g for g, k in zip(labels, sizes) for _ in range(k)]
    rng.shuffle(group_ids)
    n = len(group_ids)
    logps = [-abs(rng.gauss(0, 20)) for _ in range(n)]
    ref_logps = [-abs(rng.gauss(0, 20)) for _ in range(n)]
    if ties:  # few distinct values: ties for best and worst, and groups whose rewards are all equal
        rewards = [float(rng.choice([0, 1, 1, 2])) for _ in range(n)]
    else:
        rewards = [rng.gauss(0, 2) for _ in range(n)]
    return logps, ref_logps, rewards, group_ids, rng.choice([0.05, 0.5, 2.0])


# ------------------------------------------------------------------------------------------------
# Loop references (section 2.3 / Eq. 1, 2, 3, 12)
# ------------------------------------------------------------------------------------------------


def ref_gvpo(logps, ref_logps, rewards, group_ids, beta):
    w = [0.0] * len(logps)
    for m in _groups(group_ids).values():
        mr = sum(rewards[i] for i in m) / len(m)
        ml = sum(logps[i] - ref_logps[i] for i in m) / len(m)
        for i in m:
            w[i] = (rewards[i] - mr) - beta * (logps[i] - ref_logps[i] - ml)
    return w


def ref_grpo(logps, ref_logps, rewards, group_ids, beta, eps=1e-4):
    w = [0.0] * len(logps)
    for m in _groups(group_ids).values():
        k = len(m)
        mr = sum(rewards[i] for i in m) / k
        std = math.sqrt(sum((rewards[i] - mr) ** 2 for i in m) / (k - 1)) if k > 1 else 0.0
        for i in m:
            w[i] = (rewards[i] - mr) / (std + eps)
    return w


def ref_dr_grpo(logps, ref_logps, rewards, group_ids, beta):
    w = [0.0] * len(logps)
    for m in _groups(group_ids).values():
        mr = sum(rewards[i] for i in m) / len(m)
        for i in m:
            w[i] = rewards[i] - mr
    return w


def _first_best_worst(m, rewards):
    best = worst = m[0]
    for i in m:  # m is in completion order: strict comparisons keep the first
        if rewards[i] > rewards[best]:
            best = i
        if rewards[i] < rewards[worst]:
            worst = i
    return best, worst


def ref_rs(logps, ref_logps, rewards, group_ids, beta):
    w = [0.0] * len(logps)
    for m in _groups(group_ids).values():
        w[_first_best_worst(m, rewards)[0]] = 1.0
    return w


def ref_sft(logps, ref_logps, rewards, group_ids, beta):
    return [1.0] * len(logps)


def ref_dpo(logps, ref_logps, rewards, group_ids, beta):
    w = [0.0] * len(logps)
    for m in _groups(group_ids).values():
        best, worst = _first_best_worst(m, rewards)
        if best == worst:
            continue
        x = beta * (logps[worst] - ref_logps[worst]) - beta * (logps[best] - ref_logps[best])
        w[best] = 1.0 / (1.0 + math.exp(-x))
        w[worst] = -w[best]
    return w


REFERENCES = {"gvpo": ref_gvpo, "grpo": ref_grpo, "dr_grpo": ref_dr_grpo, "rs": ref_rs, "sft": ref_sft,
              "dpo": ref_dpo}


def tensors(case):
    logps, ref_logps, rewards, group_ids, _ = case
    f = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return f(logps), f(ref_logps), f(rewards), torch.tensor(group_ids)


def test_registry_holds_exactly_the_six_schemes():
    """Section 2.3 lists SFT, RS, GRPO, DPO in the Eq. 9 form; Dr.GRPO (section 3.5) and GVPO (Eq. 12)."""
    assert set(WEIGHT_SCHEMES.names()) == set(REFERENCES)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_scheme_matches_loop_reference(name, seed, ties):
    """Eq. 9 weights of each scheme vs a float64 loop: GVPO Eq. 12; GRPO Eq. 3 (unbiased std + 1e-4);
    Dr.GRPO centred rewards; RS Eq. 2 (1 for the first best); SFT Eq. 1 (1); DPO section 2.3
    (``w_w = sigmoid(beta l_l - beta l_w)``, ``w_l = -w_w`` on the first best/first worst pair).
    Cases with reward ties, groups of one and shuffled non-contiguous labels. Weights are detached."""
    case = random_case(seed, ties=ties)
    logps, ref_logps, rewards, group_ids = tensors(case)
    logps.requires_grad_(True)
    w = WEIGHT_SCHEMES.resolve(name)(logps, ref_logps, rewards, group_ids, beta=case[4])
    assert w.shape == logps.shape and not w.requires_grad
    expected = torch.tensor(REFERENCES[name](*case), dtype=torch.float64)
    torch.testing.assert_close(w.to(torch.float64), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["gvpo", "dr_grpo", "grpo", "dpo"])
def test_zero_sum_schemes_sum_to_zero_per_group(name):
    """Section 3.1: GVPO (and Dr.GRPO, GRPO, DPO) weights sum to 0 in each group, so Z(x) cancels."""
    case = random_case(77, ties=True)
    logps, ref_logps, rewards, group_ids = tensors(case)
    w = WEIGHT_SCHEMES.resolve(name)(logps, ref_logps, rewards, group_ids, beta=case[4])
    for m in _groups(case[3]).values():
        assert abs(float(w[m].sum())) < 1e-9


def test_schemes_validate_inputs():
    """Schemes share the objectives' input contract (ValueError naming the argument)."""
    case = random_case(1)
    logps, ref_logps, rewards, group_ids = tensors(case)
    for name in REFERENCES:
        with pytest.raises(ValueError, match="rewards"):
            WEIGHT_SCHEMES.resolve(name)(logps, ref_logps, rewards[:-1], group_ids, beta=1.0)


# ------------------------------------------------------------------------------------------------
# weighted_nll (Eq. 9)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_weighted_nll_gradient_is_minus_w_over_g(seed):
    """Eq. 9: ``grad = -sum w_i grad log pi``: d weighted_nll / d logps_i = -w_i / G, G = all groups
    (groups of one included); weights act as constants even if they require grad."""
    case = random_case(seed)
    logps, _, _, group_ids = tensors(case)
    logps.requires_grad_(True)
    w = torch.randn(len(logps), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    w_param = w.clone().requires_grad_(True)
    loss = weighted_nll(logps, w_param, group_ids)
    loss.backward()
    num_groups = len(set(case[3]))
    assert float(loss.detach()) == pytest.approx(-float((w * logps.detach()).sum()) / num_groups, rel=1e-12)
    torch.testing.assert_close(logps.grad, -w / num_groups, rtol=1e-12, atol=0)
    assert w_param.grad is None


def test_weighted_nll_shape_mismatch_is_value_error():
    with pytest.raises(ValueError, match="weights"):
        weighted_nll(torch.zeros(3), torch.zeros(2), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("seed", range(8))
def test_gvpo_scheme_through_weighted_nll_gives_gvpo_loss_gradient(seed):
    """Eq. 12 -> Eq. 13: GVPO-scheme weights scaled by beta/(k_g - 1), through weighted_nll (which
    divides by G), give exactly the gradient of gvpo_loss (all groups have k >= 2 here, so both G agree)."""
    case = random_case(seed, min_k=2)
    logps, ref_logps, rewards, group_ids = tensors(case)
    beta = case[4]
    a = logps.clone().requires_grad_(True)
    gvpo_loss(a, ref_logps, rewards, group_ids, beta=beta).backward()
    b = logps.clone().requires_grad_(True)
    w = WEIGHT_SCHEMES.resolve("gvpo")(b, ref_logps, rewards, group_ids, beta=beta)
    sizes = {g: len(m) for g, m in _groups(case[3]).items()}
    scale = torch.tensor([beta / (sizes[g] - 1) for g in case[3]], dtype=torch.float64)
    weighted_nll(b, w * scale, group_ids).backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------


def test_registry_refuses_duplicate_names():
    r = Registry("thing")
    r.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="'a' is already registered"):
        r.register("a")(lambda: 2)
    assert r.resolve("a")() == 1
    with pytest.raises(ValueError, match="already registered"):
        WEIGHT_SCHEMES.register("gvpo")(lambda *a, **k: None)


def test_registry_resolves_dotted_paths():
    r = Registry("thing")
    import os.path

    import gvpo.objectives

    assert r.resolve("os.path.join") is os.path.join
    assert r.resolve("gvpo.objectives.gvpo_loss") is gvpo.objectives.gvpo_loss
    assert r.resolve("gvpo.objectives:gvpo_weights") is gvpo.objectives.gvpo_weights
    assert WEIGHT_SCHEMES.resolve("math.sqrt") is math.sqrt
    with pytest.raises(KeyError, match="cannot import"):
        r.resolve("gvpo.objectives.no_such_function")
    with pytest.raises(KeyError, match="cannot import"):
        r.resolve("no_such_module_xyz.fn")


def test_unknown_name_lists_the_choices():
    with pytest.raises(KeyError) as err:
        WEIGHT_SCHEMES.resolve("ppo")
    message = err.value.args[0]
    assert "'ppo'" in message and "weight scheme" in message
    for name in REFERENCES:
        assert name in message


def test_registry_iterates_sorted_and_supports_in():
    r = Registry("thing")
    for name in ("b", "c", "a"):
        r.register(name)(name)
    assert list(r) == ["a", "b", "c"] and r.names() == ["a", "b", "c"]
    assert "a" in r and "z" not in r


def test_dotted_paths_find_modules_in_the_working_directory(tmp_path, monkeypatch):
    """The ``gvpo`` command's folder is on sys.path, the user's is not: ``my_rewards.f`` still resolves."""
    import sys

    (tmp_path / "my_cwd_rewards.py").write_text("def f(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    r = Registry("reward")
    assert r.resolve("my_cwd_rewards.f")(completions=["a"]) == [1.0]
    with pytest.raises(KeyError, match="No module named 'no_such_module_here'.*working directory"):
        r.resolve("no_such_module_here.f")
