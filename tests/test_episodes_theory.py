"""Theorem 3.1 on multi-turn episodes, checked on a tabular two-turn MDP (the style of ``test_theory.py``).

An episode of prompt ``x`` is ``tau = (a1, o, a2)``: a first action ``a1`` (3 choices), an observation ``o``
(2 values) drawn from the environment's ``P(o | x, a1)``, a second action ``a2`` (3 choices) that sees ``o``.
The policy is two free tables, ``pi(a1|x) = softmax(theta1[x])`` and ``pi(a2|x,a1,o) = softmax(theta2[x,a1,o])``.
Episodes are scored the way the trainer scores them: a row of per-token log-probs ``[a1, o, a2]`` whose
``o`` entry is what the language model itself assigns to the observation's tokens (a third table,
``q(o|x,a1) = softmax(theta_o[x,a1])``, trainable like the others, and ``q_ref`` for the reference: not the
environment's ``P``), with ``action_mask`` ``[1, 0, 1]`` (:func:`gvpo.model.logprobs.sequence_logps`), and
:func:`gvpo.gvpo_loss` on those masked sums. Summing the ``o`` entry too (no mask) would let ``theta_o`` absorb
part of the rewards and move the minimiser off pi*: ``test_summing_the_observation_tokens_misses_pi_star``.

The KL-regularised optimum over the policy's own factors (maximise ``E[R] - beta KL``), by backward induction:
``pi*(a2|x,a1,o) ∝ pi_ref(a2|.) exp(R/beta)``, ``Z(x,a1,o) = sum_a2 pi_ref exp(R/beta)``, and
``pi*(a1|x) ∝ pi_ref(a1|x) exp(E_o log Z(x,a1,o))``. With a deterministic ``P`` this is Eq. 7 over episodes.
"""

from __future__ import annotations

import pytest
import torch

from gvpo import gvpo_loss
from gvpo.model.logprobs import sequence_logps

X, A, O, B = 2, 3, 2, 3
BETA = 1.0
MASK = torch.tensor([1, 0, 1])


def ref_obs(seed: int = 0) -> torch.Tensor:
    """The reference model's own log-probs of the observation tokens, ``(X, A, O)``."""
    return torch.randn(X, A, O, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64).log_softmax(-1)


def make_mdp(stochastic: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ref1 = torch.randn(X, A, generator=g, dtype=torch.float64).log_softmax(-1)
    ref2 = torch.randn(X, A, O, B, generator=g, dtype=torch.float64).log_softmax(-1)
    rewards = torch.randn(X, A, O, B, generator=g, dtype=torch.float64) + 1.0
    if stochastic:
        p_obs = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]], dtype=torch.float64).expand(X, A, O)
    else:  # o = (x + a1) mod 2
        p_obs = torch.zeros(X, A, O, dtype=torch.float64)
        for x in range(X):
            for a in range(A):
                p_obs[x, a, (x + a) % 2] = 1.0
    return ref1, ref2, p_obs, rewards


def optimum(ref1, ref2, p_obs, rewards):
    """(log pi*(a1|x), log pi*(a2|x,a1,o)) by backward induction (module docstring)."""
    log2 = (ref2 + rewards / BETA).log_softmax(-1)
    log_z = torch.logsumexp(ref2 + rewards / BETA, -1)  # (X, A, O)
    log1 = (ref1 + (p_obs * log_z).sum(-1)).log_softmax(-1)
    return log1, log2


def episodes(p1, p2, p_obs):
    """Every episode's probability ``(X, A, O, B)`` under a policy (p1, p2) and the environment."""
    return p1[:, :, None, None] * p_obs[:, :, :, None] * p2


def masked_logps(log1, log_o, log2, mask=MASK):
    """Episode log-probs as the trainer computes them: rows ``[a1, o, a2]`` (the model's own log-probs of each
    token, the observation's included) summed under ``action_mask``."""
    rows = torch.stack(torch.broadcast_tensors(log1[:, :, None, None], log_o[:, :, :, None], log2), -1)
    return sequence_logps(rows.reshape(-1, 3), mask.expand(rows.numel() // 3, 3)).reshape(X, A, O, B)


def kl_episodes(star, theta, p_obs) -> float:
    """``KL(pi* || pi_theta)`` over whole episodes, averaged over prompts."""
    (s1, s2), (t1, t2) = star, theta
    p = episodes(s1.exp(), s2.exp(), p_obs)
    log_ratio = (s1 - t1)[:, :, None, None] + (s2 - t2)
    return float((p * log_ratio).sum((1, 2, 3)).mean())


def expected_loss(theta1, theta2, ref1, ref2, p_obs, rewards, pi_s, theta_o=None, mask=MASK):
    """Eq. 14 (times 1/2) exactly, over all episodes weighted by the sampling distribution pi_s (``theta_o``: the
    policy's observation table, the reference's when None)."""
    log1, log2 = theta1.log_softmax(-1), theta2.log_softmax(-1)
    log_o = ref_obs() if theta_o is None else theta_o.log_softmax(-1)
    implicit = BETA * (masked_logps(log1, log_o, log2, mask) - masked_logps(ref1, ref_obs(), ref2, mask))
    d = implicit - rewards
    w = episodes(*pi_s, p_obs)
    mean = (w * d).sum((1, 2, 3), keepdim=True)
    return 0.5 * (w * (d - mean) ** 2).sum((1, 2, 3)).mean()


def minimise(ref1, ref2, p_obs, rewards, pi_s, steps: int = 500, mask=MASK):
    theta1 = torch.zeros(X, A, dtype=torch.float64, requires_grad=True)
    theta2 = torch.zeros(X, A, O, B, dtype=torch.float64, requires_grad=True)
    theta_o = torch.zeros(X, A, O, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta1, theta2, theta_o], lr=1.0, max_iter=steps, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = expected_loss(theta1, theta2, ref1, ref2, p_obs, rewards, pi_s, theta_o, mask)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        loss = float(expected_loss(theta1, theta2, ref1, ref2, p_obs, rewards, pi_s, theta_o, mask))
    return (theta1.detach().log_softmax(-1), theta2.detach().log_softmax(-1)), loss


def samplers(ref1, ref2):
    uniform = (torch.full((X, A), 1 / A, dtype=torch.float64), torch.full((X, A, O, B), 1 / B, dtype=torch.float64))
    return {"pi_ref": (ref1.exp(), ref2.exp()), "uniform": uniform}


@pytest.mark.parametrize("kind", ["pi_ref", "uniform"])
def test_deterministic_observations_reach_pi_star(kind):
    """Deterministic transitions: the masked GVPO objective's minimiser is pi* for pi_s = pi_ref (Theorem 3.1) and
    for the uniform pi_s (Corollary 3.2); the expected loss is 0 there, so pi* is reached exactly."""
    ref1, ref2, p_obs, rewards = make_mdp(stochastic=False)
    star = optimum(ref1, ref2, p_obs, rewards)
    theta, loss = minimise(ref1, ref2, p_obs, rewards, samplers(ref1, ref2)[kind])
    assert loss < 1e-14
    assert kl_episodes(star, theta, p_obs) < 1e-10


def test_sampled_gvpo_on_masked_episodes_reaches_pi_star(one_thread):
    """The same, by training: groups of k = 8 sampled episodes per prompt from pi_ref, ``gvpo_loss`` on their
    masked log-prob sums (observations in the rows, masked out), AMSGrad as in test_theory.py."""
    ref1, ref2, p_obs, rewards = make_mdp(stochastic=False)
    star = optimum(ref1, ref2, p_obs, rewards)
    gen = torch.Generator().manual_seed(1)
    theta1 = torch.zeros(X, A, dtype=torch.float64, requires_grad=True)
    theta2 = torch.zeros(X, A, O, B, dtype=torch.float64, requires_grad=True)
    theta_o = torch.zeros(X, A, O, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta1, theta2, theta_o], lr=0.05, amsgrad=True)
    k = 8
    p_ref = episodes(ref1.exp(), ref2.exp(), p_obs).reshape(X, -1)
    group_ids = torch.arange(X).repeat_interleave(k)
    for _ in range(1500):
        flat = torch.multinomial(p_ref, k, replacement=True, generator=gen)  # (X, k) episode indices
        x = torch.arange(X)[:, None].expand(X, k)
        a1, rest = flat // (O * B), flat % (O * B)
        o, a2 = rest // B, rest % B
        log1, log2 = theta1.log_softmax(-1), theta2.log_softmax(-1)
        logps = masked_logps(log1, theta_o.log_softmax(-1), log2)[x, a1, o, a2].reshape(-1)
        ref_logps = masked_logps(ref1, ref_obs(), ref2)[x, a1, o, a2].reshape(-1)
        loss = gvpo_loss(logps, ref_logps, rewards[x, a1, o, a2].reshape(-1), group_ids, beta=BETA)
        opt.zero_grad()
        loss.backward()
        opt.step()
    theta = (theta1.detach().log_softmax(-1), theta2.detach().log_softmax(-1))
    assert kl_episodes(star, theta, p_obs) < 1e-4  # only visited histories matter; all are visited here


def test_stochastic_observations_give_a_projection_not_pi_star():
    """Characterisation (documented in gvpo.episodes): with a random ``o``, ``beta log(pi_theta/pi_ref)`` sees only
    the policy's factors, so no policy makes ``R_theta - R`` constant over episodes. At pi*, the residual of an
    episode is ``beta (E_o log Z(x,a1,o) - log Z(x,a1,o))`` up to a constant: zero on average over ``o``, so the
    first turn's gradient vanishes there, but the second turn can lower the loss by absorbing part of it, so pi*
    is not stationary. The minimiser tilts the later turn (and through it the first), keeps a positive loss, and
    depends on the sampling distribution: a pi_s-weighted projection, not pi*. Numbers pinned for this MDP (seed 0,
    P(o|a1) = (.8,.2), (.3,.7), (.5,.5)): minimum loss 0.0217 (pi_s = pi_ref) and 0.0175 (uniform), against
    0.0270 and 0.0302 at pi*; KL(pi* || minimiser) 0.0041 and 0.0040 nats per prompt."""
    ref1, ref2, p_obs, rewards = make_mdp(stochastic=True)
    star = optimum(ref1, ref2, p_obs, rewards)
    pinned = {"pi_ref": (0.0217, 0.0041, 0.0270), "uniform": (0.0175, 0.0040, 0.0302)}
    found = {}
    for kind, pi_s in samplers(ref1, ref2).items():
        theta, loss = minimise(ref1, ref2, p_obs, rewards, pi_s)
        found[kind] = theta
        theta1, theta2 = star[0].clone().requires_grad_(True), star[1].clone().requires_grad_(True)
        at_star = expected_loss(theta1, theta2, ref1, ref2, p_obs, rewards, pi_s)
        at_star.backward()
        assert float(theta1.grad.abs().max()) < 1e-12 and float(theta2.grad.abs().max()) > 1e-3, kind
        want_loss, want_kl, want_star = pinned[kind]
        assert loss == pytest.approx(want_loss, abs=2e-4) and float(at_star) == pytest.approx(want_star, abs=2e-4)
        assert kl_episodes(star, theta, p_obs) == pytest.approx(want_kl, abs=2e-4)
    assert float((found["pi_ref"][1] - found["uniform"][1]).abs().max()) > 1e-2  # depends on pi_s: a projection


def test_summing_the_observation_tokens_misses_pi_star():
    """The control for the tests above: with ``action_mask`` all ones the observation's own log-probs enter the
    sums, ``theta_o`` takes up part of what the rewards ask of the first turn, and the minimiser is not pi*."""
    ref1, ref2, p_obs, rewards = make_mdp(stochastic=False)
    star = optimum(ref1, ref2, p_obs, rewards)
    masked, _ = minimise(ref1, ref2, p_obs, rewards, samplers(ref1, ref2)["pi_ref"])
    summed, _ = minimise(ref1, ref2, p_obs, rewards, samplers(ref1, ref2)["pi_ref"], mask=torch.tensor([1, 1, 1]))
    assert kl_episodes(star, masked, p_obs) < 1e-10 < 1e-3 < kl_episodes(star, summed, p_obs)
