"""The paper's theory (sections 3.3-3.5) checked on a tabular softmax policy.

Set-up: ``P = 3`` prompts x ``Y = 5`` responses, a random ``pi_ref``, random rewards ``R`` (shifted by
+1 so that ``log Z(x)`` is far from 0, which matters for the section 3.4 contrast), and a policy
``pi_theta(.|x) = softmax(theta[x])`` with a free ``(P, Y)`` parameter table. The KL-regularised
optimum is ``pi*(y|x) = pi_ref(y|x) exp(R(x,y)/beta) / Z(x)`` (Eq. 7).

Scale convention: Eq. 14 of the paper is ``E_x E_y[(...)^2] = E_x Var_{pi_s}(R_theta - R)`` with no 1/2,
and Eq. 15/16 estimate it with ``1/(k-1) * sum_i (...)^2``. ``gvpo_loss`` is *half* of Eq. 16 (the
``0.5`` of Eq. 13), so ``E[gvpo_loss] = 0.5 * Eq. 14``.
"""

from __future__ import annotations

import pytest
import torch

from gvpo import gvpo_loss

P, Y = 3, 5


def make_problem(beta: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    log_ref = torch.randn(P, Y, generator=g, dtype=torch.float64).log_softmax(-1)
    rewards = torch.randn(P, Y, generator=g, dtype=torch.float64) + 1.0
    log_star = (log_ref + rewards / beta).log_softmax(-1)  # pi* = pi_ref exp(R/beta) / Z, Eq. 7
    return log_ref, rewards, log_star


def kl_star(log_star: torch.Tensor, theta: torch.Tensor) -> float:
    """``KL(pi* || pi_theta)`` averaged over prompts."""
    log_pi = theta.detach().log_softmax(-1)
    return float((log_star.exp() * (log_star - log_pi)).sum(-1).mean())


SKEWED = torch.tensor([0.6, 0.25, 0.1, 0.04, 0.01], dtype=torch.float64)


def sampling_probs(kind: str, log_ref: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    if kind == "pi_ref":
        return log_ref.exp()
    if kind == "uniform":
        return torch.full((P, Y), 1.0 / Y, dtype=torch.float64)
    if kind == "current_policy":  # on-policy: sample from pi_theta, no gradient through the sampler
        return theta.detach().softmax(-1)
    if kind == "skewed":  # full support, most mass on response 0, 1% on response 4
        return SKEWED.expand(P, Y)
    raise AssertionError(kind)


FINISH_TIME = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64)
"""Mean generation time of each response (for the "first k of n to finish" sampler): response 4 is 16x slower."""


def first_k_of_n(probs: torch.Tensor, k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``(P, k)`` responses: ``n`` sampled per prompt from ``probs``, each finishing after ``FINISH_TIME[y] * Exp(1)``,
    and the first ``k`` to finish kept (what an asynchronous generator that stops waiting returns). The kept
    responses are a dependent set, biased towards fast ones, with full support."""
    ys = torch.multinomial(probs, n, replacement=True, generator=gen)
    times = FINISH_TIME[ys] * -torch.rand(ys.shape, generator=gen, dtype=torch.float64).log()
    return ys.gather(1, times.argsort(dim=1)[:, :k])


def train_sampled(loss_name, kind, *, beta=1.0, steps=1500, k=8, lr=0.05, seed=1, optimizer="amsgrad", lag=0,
                  kept=None):
    """Train ``theta`` (from uniform) on groups of ``k`` responses per prompt *sampled* from ``pi_s``.

    Returns ``(theta, log_star)``. ``loss_name``: ``"gvpo"`` (``gvpo_loss``) or ``"uncentred_mse"``
    (``mean 0.5 * (R_theta - R)^2``, the naive loss of section 3.4). ``lag``: step t samples with the
    parameters of the start of step ``t - lag`` (the initial ones before), as ``train.async_lag`` does.
    ``kept``: a list that receives each step's sampled responses.
    """
    log_ref, rewards, log_star = make_problem(beta)
    gen = torch.Generator().manual_seed(seed)
    theta = torch.zeros(P, Y, dtype=torch.float64, requires_grad=True)
    if optimizer == "sgd":
        opt = torch.optim.SGD([theta], lr=lr)
    else:
        opt = torch.optim.Adam([theta], lr=lr, amsgrad=optimizer == "amsgrad")
    group_ids = torch.arange(P).repeat_interleave(k) * 7 + 3  # non-contiguous labels
    history = []
    for _ in range(steps):
        history = (history + [theta.detach().clone()])[-(lag + 1):]
        sampler_theta = history[0]  # the parameters of lag steps ago (the oldest kept)
        probs = sampling_probs(kind if kind != "first_k_of_n" else "current_policy", log_ref, sampler_theta)
        if kind == "first_k_of_n":
            ys = first_k_of_n(probs, k, 2 * k, gen)
        else:
            ys = torch.multinomial(probs, k, replacement=True, generator=gen)
        if kept is not None:
            kept.append(ys)
        logps = theta.log_softmax(-1).gather(1, ys).reshape(-1)
        ref_logps = log_ref.gather(1, ys).reshape(-1)
        r = rewards.gather(1, ys).reshape(-1)
        if loss_name == "gvpo":
            loss = gvpo_loss(logps, ref_logps, r, group_ids, beta=beta)
        else:
            loss = 0.5 * ((beta * (logps - ref_logps) - r) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return theta, log_star


SAMPLERS = ["pi_ref", "uniform", "current_policy", "skewed"]


@pytest.mark.parametrize("kind", SAMPLERS)
def test_sampled_gvpo_training_reaches_pi_star(kind, one_thread):
    """Theorem 3.1 (pi_s = pi_ref) and Corollary 3.2 (any full-support pi_s): the minimiser of GVPO is pi*.

    Genuinely sampled groups (k = 8 per prompt, fresh each step), 1,500 steps of Adam (AMSGrad
    variant) at a constant lr, from the uniform policy. This converges to pi* itself, not to a noise
    ball, because every per-sample loss is zero at pi* (R_theta - R is constant in y there), so the
    stochastic gradient vanishes at pi*. Tolerance: KL(pi* || pi_theta) < 1e-6 averaged over prompts.

    (Plain Adam is not used: a rarely sampled response gets no gradient for many steps, and when it
    is sampled again Adam's normalised step is about 3 * lr whatever the gradient's size, which can
    kick an already converged policy off pi*. AMSGrad's non-decreasing second moment, like SGD,
    makes steps shrink with the gradient.)
    """
    theta, log_star = train_sampled("gvpo", kind)
    assert kl_star(log_star, theta) < 1e-6


@pytest.mark.parametrize("kind", SAMPLERS)
def test_sampled_gvpo_with_plain_sgd_constant_lr(kind, one_thread):
    """Theorem 3.1 / Corollary 3.2 with plain SGD at a constant lr (no decay, no adaptivity): the
    stochastic gradient of Eq. 16 is zero at pi* for every sampled group, so SGD on sampled groups
    converges to pi* itself (KL < 1e-6)."""
    theta, log_star = train_sampled("gvpo", kind, optimizer="sgd", lr=3.0)
    assert kl_star(log_star, theta) < 1e-6


@pytest.mark.parametrize("lag", [1, 4, 16])
def test_lagged_sampling_without_importance_weights_reaches_pi_star(lag, one_thread):
    """Asynchronous rollouts (``train.async_lag``, issue 21): every group is sampled by the policy of ``lag`` steps
    earlier and trained on as it is, with no importance weights and no clipping. Corollary 3.2 still applies (a
    stale softmax policy has full support, and every per-sample loss is zero at pi*), so training converges to pi*
    itself, as on-policy training does: KL(pi* || pi_theta) < 1e-6 after the same 1,500 steps."""
    theta, log_star = train_sampled("gvpo", "current_policy", lag=lag)
    assert kl_star(log_star, theta) < 1e-6


def test_first_k_of_n_to_finish_reaches_pi_star(one_thread):
    """An asynchronous generator that starts 2k completions per prompt and keeps the k that finish first (generation
    time ``FINISH_TIME[y] * Exp(1)``): the kept groups are biased towards fast responses and are not independent
    draws, and GVPO still reaches pi* (KL < 1e-6; slower than on-policy, as the slow responses are seen less: 2,500
    steps). The bias is real: at the end, the slowest response's share among the kept completions is under half its
    probability under the policy."""
    kept = []
    theta, log_star = train_sampled("gvpo", "first_k_of_n", kept=kept, steps=2500)
    assert kl_star(log_star, theta) < 1e-6
    last = torch.stack(kept[-500:])  # (500, P, k)
    kept_share = (last == Y - 1).double().mean(dim=(0, 2))
    policy_share = theta.detach().softmax(-1)[:, Y - 1]
    assert (kept_share < 0.5 * policy_share).all(), (kept_share, policy_share)


def test_uncentred_mse_misses_pi_star_but_gvpo_reaches_it(one_thread):
    """Section 3.4, insight 2: minimising ``(beta log pi_theta/pi_ref - R)^2`` cannot reach pi*
    (at pi*, ``R_theta = R - beta log Z(x)`` and the residual ``-beta log Z`` is not zero), while
    GVPO's centred residuals (Eq. 13) are zero there. Same problem, same samples, same optimiser."""
    theta_mse, log_star = train_sampled("uncentred_mse", "pi_ref")
    theta_gvpo, _ = train_sampled("gvpo", "pi_ref")
    kl_mse, kl_gvpo = kl_star(log_star, theta_mse), kl_star(log_star, theta_gvpo)
    assert kl_mse > 1e-2, kl_mse
    assert kl_gvpo < 1e-6, kl_gvpo

    # Not a sampling-noise effect: pi* is not even a stationary point of the exact expected MSE.
    beta = 1.0
    log_ref, rewards, _ = make_problem(beta)
    theta = log_star.clone().requires_grad_(True)
    d = beta * (theta.log_softmax(-1) - log_ref) - rewards
    pi_s = log_ref.exp()
    (grad_mse,) = torch.autograd.grad(0.5 * (pi_s * d**2).sum(-1).mean(), theta, retain_graph=True)
    (grad_gvpo,) = torch.autograd.grad(0.5 * (pi_s * (d - (pi_s * d).sum(-1, keepdim=True)) ** 2).sum(-1).mean(), theta)
    assert grad_mse.abs().max() > 1e-2
    assert grad_gvpo.abs().max() < 1e-12


def test_exact_expected_loss_is_zero_only_at_pi_star():
    """Theorem 3.1 necessity and sufficiency on Eq. 14, computed exactly (no sampling): the loss is 0 at
    pi*, positive for a perturbation that is not a per-prompt constant shift of log pi, and a
    per-prompt constant shift of theta (the same policy) keeps it 0."""
    beta = 0.7
    log_ref, rewards, log_star = make_problem(beta)
    pi_s = SKEWED.expand(P, Y)

    def eq14(log_pi):
        d = beta * (log_pi - log_ref) - rewards
        mean = (pi_s * d).sum(-1, keepdim=True)
        return float((pi_s * (d - mean) ** 2).sum(-1).mean())

    assert eq14(log_star) < 1e-25
    assert eq14((log_star + torch.tensor([[1.0], [-2.0], [5.0]], dtype=torch.float64)).log_softmax(-1)) < 1e-25
    perturbed = log_star.clone()
    perturbed[1, 2] += 1e-3
    assert eq14(perturbed.log_softmax(-1)) > 1e-9


def _per_group_estimates(d: torch.Tensor) -> torch.Tensor:
    """``0.5 * 1/(k-1) * sum_i (d_i - mean d)^2`` for each row of ``d (n, k)``: half of Eq. 15's summand."""
    return 0.5 * d.var(dim=1, unbiased=True)


@pytest.mark.parametrize("sampler", ["pi_ref", "skewed"])
def test_estimator_is_unbiased_for_expected_loss(sampler):
    """Theorem 3.3: the mean of the Eq. 15 estimator over many sampled groups matches Eq. 14 exactly.

    Scale made explicit: Eq. 14 = ``E_x Var_{pi_s}(R_theta - R)`` (no 1/2); ``gvpo_loss`` is half of
    Eq. 15, so we compare ``gvpo_loss`` with ``0.5 * Eq. 14``. 20,000 groups of k = 4, for a policy
    that is not pi*; pass if within 3 standard errors. The biased ``1/k`` normaliser (a 25% shortfall
    at k = 4) must fail the same check, so the check can tell the two apart.
    """
    beta, k, n_groups = 0.8, 4, 20_000
    log_ref, rewards, log_star = make_problem(beta)
    gen = torch.Generator().manual_seed(123)
    log_pi = (log_star + 0.7 * torch.randn(P, Y, generator=gen, dtype=torch.float64)).log_softmax(-1)
    pi_s = log_ref.exp() if sampler == "pi_ref" else SKEWED.expand(P, Y)

    d_table = beta * (log_pi - log_ref) - rewards  # R_theta - R
    mean_d = (pi_s * d_table).sum(-1, keepdim=True)
    exact_eq14 = float((pi_s * (d_table - mean_d) ** 2).sum(-1).mean())  # E_x over uniform prompts
    assert exact_eq14 > 1e-2  # the policy is really not pi*

    prompts = torch.arange(n_groups) % P
    ys = torch.multinomial(pi_s[prompts], k, replacement=True, generator=gen)  # (n_groups, k)
    logps, ref_logps, r = log_pi[prompts[:, None], ys], log_ref[prompts[:, None], ys], rewards[prompts[:, None], ys]
    group_ids = torch.arange(n_groups).repeat_interleave(k)
    estimate = gvpo_loss(logps.reshape(-1), ref_logps.reshape(-1), r.reshape(-1), group_ids, beta=beta)

    per_group = _per_group_estimates(beta * (logps - ref_logps) - r)
    assert float(estimate) == pytest.approx(float(per_group.mean()), rel=1e-9)
    standard_error = float(per_group.std() / n_groups**0.5)
    target = 0.5 * exact_eq14
    assert abs(float(estimate) - target) < 3 * standard_error, (float(estimate), target, standard_error)
    biased = float(estimate) * (k - 1) / k  # the 1/k normaliser Corollary 3.4 warns against
    assert abs(biased - target) > 3 * standard_error


def test_estimator_is_unbiased_with_variable_group_sizes():
    """Corollary 3.4 (Eq. 16): with k(x) varying per group (2, 3, 5, 8), ``1/(k(x)-1)`` keeps the
    estimator unbiased; the mean of ``gvpo_loss`` over 12,000 groups matches ``0.5 * Eq. 14`` within
    3 standard errors."""
    beta = 1.3
    log_ref, rewards, log_star = make_problem(beta, seed=5)
    gen = torch.Generator().manual_seed(7)
    log_pi = (log_star + torch.randn(P, Y, generator=gen, dtype=torch.float64)).log_softmax(-1)
    pi_s = torch.full((P, Y), 1.0 / Y, dtype=torch.float64)
    d_table = beta * (log_pi - log_ref) - rewards
    mean_d = (pi_s * d_table).sum(-1, keepdim=True)
    target = 0.5 * float((pi_s * (d_table - mean_d) ** 2).sum(-1).mean())

    parts, per_group, offset = [], [], 0
    for k in (2, 3, 5, 8):
        n = 3000
        prompts = torch.arange(n) % P
        ys = torch.multinomial(pi_s[prompts], k, replacement=True, generator=gen)
        d = beta * (log_pi[prompts[:, None], ys] - log_ref[prompts[:, None], ys]) - rewards[prompts[:, None], ys]
        per_group.append(_per_group_estimates(d))
        parts.append((log_pi[prompts[:, None], ys].reshape(-1), log_ref[prompts[:, None], ys].reshape(-1),
                      rewards[prompts[:, None], ys].reshape(-1), (torch.arange(n) + offset).repeat_interleave(k)))
        offset += n
    logps, ref_logps, r, group_ids = (torch.cat(x) for x in zip(*parts))
    perm = torch.randperm(logps.numel(), generator=gen)  # groups interleaved, sizes mixed
    estimate = float(gvpo_loss(logps[perm], ref_logps[perm], r[perm], group_ids[perm], beta=beta))
    per_group = torch.cat(per_group)
    assert estimate == pytest.approx(float(per_group.mean()), rel=1e-9)
    standard_error = float(per_group.std() / per_group.numel() ** 0.5)
    assert abs(estimate - target) < 3 * standard_error, (estimate, target, standard_error)


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_on_policy_gvpo_gradient_is_the_policy_gradient(beta):
    """Section 3.5, Eq. 18-21: with pi_s = pi_theta (sampler held fixed), the gradient of the expected
    GVPO loss ``0.5 * Eq. 14`` is ``-beta * grad J``, where ``J = E_x sum_y pi_theta(y|x) (R -
    beta log pi_theta/pi_ref)`` is the KL-regularised objective of Eq. 5 (Eq. 18 is its gradient at
    beta = 1). So classical policy gradient is GVPO with pi_s = pi_theta; a fixed pi_s != pi_theta
    gives a different gradient."""
    log_ref, rewards, log_star = make_problem(beta, seed=3)
    gen = torch.Generator().manual_seed(11)
    theta = torch.randn(P, Y, generator=gen, dtype=torch.float64, requires_grad=True)

    def expected_gvpo(pi_s):
        d = beta * (theta.log_softmax(-1) - log_ref) - rewards
        mean = (pi_s * d).sum(-1, keepdim=True)
        return 0.5 * (pi_s * (d - mean) ** 2).sum(-1).mean()

    log_pi = theta.log_softmax(-1)
    objective = (log_pi.exp() * (rewards - beta * (log_pi - log_ref))).sum(-1).mean()
    (grad_j,) = torch.autograd.grad(objective, theta)
    (grad_gvpo,) = torch.autograd.grad(expected_gvpo(theta.detach().softmax(-1)), theta)
    torch.testing.assert_close(grad_gvpo, -beta * grad_j, rtol=1e-10, atol=1e-12)
    (grad_off,) = torch.autograd.grad(expected_gvpo(torch.full((P, Y), 1.0 / Y, dtype=torch.float64)), theta)
    assert (grad_off + beta * grad_j).abs().max() > 1e-3
