"""Choosing a step's rows on a large dataset: ``gvpo.samplers.step_rows`` vs the per-row permutation it
replaced (issue 10). Goal: at most 1 ms per step for 128 prompts out of 10M rows, after the first step
of an epoch (which draws that epoch's permutation once).

The baseline, measured in the same run, is the old rule written out here: for every row of a step, draw
the whole epoch's permutation again and take one entry. It is timed on ``--baseline-rows`` rows of a step
and scaled to the step (its cost per row does not depend on the other rows).

    python bench/step_rows.py                   # 10M rows, 128 prompts per step
    python bench/step_rows.py --rows 1000000 --prompts 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gvpo.rollout import hash_seed
from gvpo.samplers import step_rows


def old_step_rows(rows: list, step: int, batch_size: int, seed: int, limit: int) -> list:
    """The replaced rule, on the first ``limit`` rows of the step only."""
    out = []
    for pos in range(step * batch_size, step * batch_size + limit):
        epoch, offset = divmod(pos, len(rows))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(hash_seed(seed, epoch)))
        out.append((pos, rows[int(order[offset])]))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000, help="dataset size")
    p.add_argument("--prompts", type=int, default=128, help="prompts per step")
    p.add_argument("--steps", type=int, default=200, help="steps timed after the first")
    p.add_argument("--baseline-rows", type=int, default=3, help="rows of one step timed with the old rule")
    args = p.parse_args(argv)
    rows = list(range(args.rows))
    start = time.perf_counter()
    first = step_rows(rows, 0, args.prompts, seed=0)
    first_s = time.perf_counter() - start
    times = []
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        step_rows(rows, step, args.prompts, seed=0)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    old = old_step_rows(rows, 0, args.prompts, 0, args.baseline_rows)
    old_step_s = (time.perf_counter() - start) / args.baseline_rows * args.prompts
    assert old == first[: args.baseline_rows], "the new rule must choose the same rows as the old one"
    steady = statistics.median(times)
    result = {"rows": args.rows, "prompts": args.prompts, "first_step_s": first_s, "step_median_ms": steady * 1e3,
              "old_step_s": old_step_s, "speedup": old_step_s / steady, "goal_met": steady <= 1e-3}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
