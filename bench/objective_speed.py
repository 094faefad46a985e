"""Speed of ``gvpo.gvpo_loss`` forward + backward vs straightforward Python loops computing the same value.

16,384 completions in groups of 8 (2,048 groups, shuffled non-contiguous labels), float64, autograd
in every implementation, all measured in this run on this machine:

* ``gvpo_loss``: segment ops (``unique`` + ``index_add``), best of ``--repeats`` runs;
* per-completion loop (the baseline of the goal): for each completion, gather its group's members,
  compute the group means of ``R_theta`` and ``R``, and add ``0.5 * residual^2 / (k - 1)``;
  the straightforward translation of the formula, one completion at a time, autograd through it;
* per-group loop (a stronger Python baseline, for context): one iteration per group, tensor ops
  within the group.

Each loop's value and gradient are checked against ``gvpo_loss`` before timing is reported.

    python bench/objective_speed.py
    python bench/objective_speed.py --completions 4096 --group-size 4 --repeats 50
"""

from __future__ import annotations

import argparse
import time

import torch

from gvpo import gvpo_loss


def per_completion_loop(logps, ref_logps, rewards, group_ids, beta):
    """The formula one completion at a time (group members looked up per completion)."""
    labels = group_ids.tolist()
    members: dict[int, list[int]] = {}
    for i, g in enumerate(labels):
        members.setdefault(g, []).append(i)
    num_valid = sum(len(m) >= 2 for m in members.values())
    total = logps.new_zeros(())
    for i in range(len(labels)):
        group = members[labels[i]]
        k = len(group)
        if k < 2:
            continue
        idx = torch.tensor(group)
        implicit = beta * (logps[idx] - ref_logps[idx])
        actual = rewards[idx]
        residual = (beta * (logps[i] - ref_logps[i]) - implicit.mean()) - (rewards[i] - actual.mean())
        total = total + 0.5 * residual**2 / (k - 1)
    return total / num_valid


def per_group_loop(logps, ref_logps, rewards, group_ids, beta):
    """One iteration per group, vectorised inside the group."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        members.setdefault(g, []).append(i)
    valid = [m for m in members.values() if len(m) >= 2]
    total = logps.new_zeros(())
    for group in valid:
        idx = torch.tensor(group)
        implicit = beta * (logps[idx] - ref_logps[idx])
        actual = rewards[idx]
        residual = (implicit - implicit.mean()) - (actual - actual.mean())
        total = total + 0.5 * (residual**2).sum() / (len(group) - 1)
    return total / len(valid)


def time_fwd_bwd(fn, inputs, beta, repeats):
    logps, ref_logps, rewards, group_ids = inputs
    best, loss, grad = float("inf"), None, None
    for _ in range(repeats):
        x = logps.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        loss = fn(x, ref_logps, rewards, group_ids, beta=beta)
        loss.backward()
        best = min(best, time.perf_counter() - t0)
        grad = x.grad
    return best, loss.detach(), grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--completions", type=int, default=16_384)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30, help="runs of gvpo_loss (best is reported)")
    parser.add_argument("--loop-repeats", type=int, default=2, help="runs of each Python loop")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    n, k = args.completions, args.group_size
    labels = torch.randperm(n // k * 10, generator=g)[: n // k] * 7 + 3  # non-contiguous labels
    group_ids = labels.repeat_interleave(k)
    perm = torch.randperm(n, generator=g)
    group_ids = group_ids[perm]
    logps = -30 * torch.rand(n, generator=g, dtype=dtype)
    ref_logps = -30 * torch.rand(n, generator=g, dtype=dtype)
    rewards = torch.randn(n, generator=g, dtype=dtype)
    inputs, beta = (logps, ref_logps, rewards, group_ids), 0.1

    time_fwd_bwd(gvpo_loss, inputs, beta, 3)  # warm-up
    t_gvpo, loss, grad = time_fwd_bwd(gvpo_loss, inputs, beta, args.repeats)
    t_comp, loss_c, grad_c = time_fwd_bwd(per_completion_loop, inputs, beta, args.loop_repeats)
    t_group, loss_g, grad_g = time_fwd_bwd(per_group_loop, inputs, beta, args.loop_repeats)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-7)
    for other_loss, other_grad in ((loss_c, grad_c), (loss_g, grad_g)):
        torch.testing.assert_close(other_loss, loss, **tol)
        torch.testing.assert_close(other_grad, grad, **tol)

    print(f"{n} completions, groups of {k}, {args.dtype}, {torch.get_num_threads()} threads; "
          f"forward+backward, best of runs; values and gradients agree")
    print(f"gvpo_loss              {t_gvpo * 1e3:10.2f} ms")
    print(f"per-completion loop    {t_comp * 1e3:10.2f} ms   ratio {t_comp / t_gvpo:8.0f}x (goal >= 300x)")
    print(f"per-group loop         {t_group * 1e3:10.2f} ms   ratio {t_group / t_gvpo:8.0f}x")


if __name__ == "__main__":
    main()
