"""Sample efficiency of off-policy GVPO (issue 4): generated completions until greedy held-out accuracy
first reaches a target (default 90%) on the embedded arithmetic task, for on-policy GVPO, replay and
``updates_per_batch = 2``, with the final accuracy after the same number of steps.

Corollary 3.2 lets GVPO train on completions from any distribution with full support and no importance
weights, so completions can be reused: replay keeps ``h`` stored completions per revisited prompt and
generates only ``k - h``; ``updates_per_batch`` takes several gradient steps on one generated batch.
Each variant runs :func:`gvpo.trainer.train` from the same shipped model with the demo defaults
(16 prompts x k=8, lr 1e-4 after 10 warm-up steps, beta 0.1) and the same seeds; only the sampler or
``updates_per_batch`` changes. ``samples`` in ``metrics.jsonl`` counts generated completions only
(stored or offline ones cost no generation).

For each variant it prints and writes to ``--output-dir`` (default ``bench/out/sample_efficiency``):

* completions (and steps) until the held-out accuracy first reaches ``--target``, per seed, their mean,
  and the ratio to on-policy (mean over seeds of the per-seed ratios, and the ratio of the means);
* the final accuracy (last evaluation) and the mean of the last three evaluations, against on-policy;
* ``sample_efficiency.md``, ``sample_efficiency.json`` and ``sample_efficiency.png`` (accuracy against
  generated completions, one line per seed).

Finished runs under ``<output-dir>/runs`` are reused when the bench is started again (``--fresh`` removes
them). Runs are independent, so ``--jobs 2`` trains two at once, each on one thread.

    python bench/sample_efficiency.py                 # 6 variants x 5 seeds x 40 steps: about 6 min idle
    python bench/sample_efficiency.py --seeds 5 --variants on-policy,replay-4:4
    python bench/sample_efficiency.py --quick         # 2 seeds x 24 steps
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from gvpo.compare import ACCURACY, RunResult, run_one
from gvpo.config import load_config, parse_override

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models  # noqa: E402

REPLAY_44 = {"sampler.source": "replay", "sampler.replay_historical": 4}
VARIANTS = {
    "on-policy": {},
    "replay-4:4": REPLAY_44,
    "replay-4:4-revisit-0.75": {**REPLAY_44, "sampler.replay_revisit": 0.75},
    "revisit-only-0:8": {**REPLAY_44, "sampler.replay_historical": 0},
    "on-policy-k4": {"rollout.k": 4},
    "updates-per-batch-2": {"train.updates_per_batch": 2},
    "replay-4:4+updates-per-batch-2": {**REPLAY_44, "train.updates_per_batch": 2},
}
"""Named variants: config overrides on top of the shared settings. ``on-policy`` is the baseline.
``revisit-only-0:8`` is a control: the prompts replay-4:4 would revisit, with all 8 completions fresh, which
separates the effect of seeing a prompt twice from that of reusing its completions."""
DEFAULT_VARIANTS = "on-policy,replay-4:4,updates-per-batch-2,on-policy-k4,revisit-only-0:8,replay-4:4-revisit-0.75"
BASELINE = "on-policy"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated variants among: {', '.join(VARIANTS)} (on-policy is always run)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per variant (default 5; --quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps per run (default 40; --quick: 24)")
    p.add_argument("--target", type=float, default=0.9, help="held-out greedy accuracy to reach")
    p.add_argument("--eval-every", type=int, default=1, help="held-out evaluation every N steps")
    p.add_argument("--eval-n", type=int, default=500, help="held-out prompts per evaluation (0 = all 1000)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (each on 1 thread when > 1)")
    p.add_argument("--quick", action="store_true", help="2 seeds x 24 steps")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs under OUTPUT_DIR/runs first")
    p.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "out" / "sample_efficiency")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides shared by every run (a variant's own keys win)")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.variants = [BASELINE] + [v for v in names if v != BASELINE]
    args.seeds = args.seeds or (2 if args.quick else 5)
    args.steps = args.steps or (24 if args.quick else 40)
    return args


def shared_overrides(args) -> dict:
    out = {"train.max_steps": args.steps, "train.eval_every": args.eval_every, "train.eval_n": args.eval_n,
           "train.checkpoint_every": 0, "train.keep_checkpoints": 1, "output.progress": False,
           "output.report_to": [], "output.plots": False}
    out.update(dict(parse_override(o) for o in args.overrides))
    return out


def _train(job: tuple[dict, str, str, int]) -> RunResult:
    overrides, label, run_dir, threads = job
    if threads:
        import torch

        torch.set_num_threads(threads)
    return run_one(load_config(None, overrides), label, Path(run_dir))


def reach(result: RunResult, target: float) -> tuple[int | None, int | None]:
    """(generated completions, steps) at the first evaluation with accuracy >= ``target``; Nones if never."""
    for row in result.rows:
        acc = row.get(ACCURACY)
        if isinstance(acc, (int, float)) and acc >= target:
            return row["samples"], row["step"]
    return None, None


def evaluations(result: RunResult) -> list[tuple[int, int, float]]:
    """(step, generated completions, accuracy) of every evaluation of a run."""
    return [(r["step"], r["samples"], r[ACCURACY]) for r in result.rows if isinstance(r.get(ACCURACY), (int, float))]


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(results: dict[str, list[RunResult]], target: float) -> list[dict]:
    """Per variant: completions to ``target`` per seed, ratios to on-policy, final accuracies."""
    base = {r.seed: reach(r, target)[0] for r in results[BASELINE]}
    base_mean = _mean(base.values())
    rows = []
    for name, runs in results.items():
        to_target = {r.seed: reach(r, target) for r in runs}
        completions = [c for c, _ in to_target.values()]
        paired = [c / base[s] for s, (c, _) in to_target.items() if c is not None and base.get(s)]
        finals = [evaluations(r)[-1][2] for r in runs]
        last3 = [statistics.fmean(a for _, _, a in evaluations(r)[-3:]) for r in runs]
        reached = [c for c in completions if c is not None]
        rows.append({
            "variant": name, "overrides": VARIANTS[name], "seeds": [r.seed for r in runs],
            "reached": len(reached), "completions_to_target": completions,
            "steps_to_target": [s for _, s in to_target.values()],
            "completions_to_target_mean": _mean(reached) if len(reached) == len(runs) else None,
            "ratio_paired_mean": _mean(paired) if len(paired) == len(runs) else None,
            "ratio_of_means": (_mean(reached) / base_mean if base_mean and len(reached) == len(runs) else None),
            "generated_total": [r.samples for r in runs],
            "accuracy_final": finals, "accuracy_final_mean": _mean(finals),
            "accuracy_last3": last3, "accuracy_last3_mean": _mean(last3), "wall_s": _mean([r.wall_s for r in runs]),
        })
    return rows


def _f(v, fmt=".3f"):
    return "–" if v is None else format(v, fmt)


def table(rows: list[dict], target: float) -> str:
    lines = [f"| variant | reached {target:.0%} | completions to {target:.0%} (per seed) | mean | ratio vs on-policy "
             "(paired mean / of means) | steps to target | final acc. (mean) | last-3 acc. (mean) "
             "| completions generated in the run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(_f(c, "d") for c in r["completions_to_target"])
        steps = ", ".join(_f(s, "d") for s in r["steps_to_target"])
        lines.append(f"| {r['variant']} | {r['reached']}/{len(r['seeds'])} | {per_seed} "
                     f"| {_f(r['completions_to_target_mean'], '.0f')} "
                     f"| {_f(r['ratio_paired_mean'], '.2f')}x / {_f(r['ratio_of_means'], '.2f')}x | {steps} "
                     f"| {_f(r['accuracy_final_mean'])} | {_f(r['accuracy_last3_mean'])} "
                     f"| {', '.join(str(n) for n in r['generated_total'])} |")
    return "\n".join(lines)


def verdict(rows: list[dict], target: float, goal: float = 0.5) -> list[str]:
    """One line per non-baseline variant: ratio against the issue's goal, and the final accuracy (mean of the
    last three evaluations) against on-policy, paired by seed: a loss when the mean difference is more than
    two standard errors below zero."""
    base = next(r for r in rows if r["variant"] == BASELINE)
    base_last3 = dict(zip(base["seeds"], base["accuracy_last3"]))
    out = []
    for r in rows:
        if r["variant"] == BASELINE:
            continue
        if r["ratio_paired_mean"] is None:
            ratio_text = f"reached {target:.0%} in {r['reached']}/{len(r['seeds'])} seeds only"
        else:
            met = "meets" if r["ratio_paired_mean"] <= goal else "misses"
            ratio_text = f"{r['ratio_paired_mean']:.2f}x the completions of on-policy ({met} the <= {goal}x goal)"
        diffs = [a - base_last3[s] for s, a in zip(r["seeds"], r["accuracy_last3"]) if s in base_last3]
        delta = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
        loss = "a loss" if delta + 2 * se < 0 else "no significant loss"
        out.append(f"{r['variant']}: {ratio_text}; final accuracy (last 3 evaluations) {r['accuracy_last3_mean']:.3f} "
                   f"vs {base['accuracy_last3_mean']:.3f} on-policy, paired difference {delta:+.3f} ± {se:.3f} "
                   f"(s.e., {len(diffs)} seeds): {loss}")
    return out


def plot(results: dict[str, list[RunResult]], path: Path, target: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for color, (name, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], results.items()):
        for i, run in enumerate(runs):
            ev = evaluations(run)
            label = name if i == 0 else None
            axes[0].plot([c for _, c, _ in ev], [a for _, _, a in ev], color=color, alpha=0.7, label=label)
            axes[1].plot([s for s, _, _ in ev], [a for _, _, a in ev], color=color, alpha=0.7, label=label)
    for ax, xlabel in zip(axes, ["generated completions", "step (one generated batch each)"]):
        ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy (greedy)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _models.save_figure(fig, path, title)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.output_dir
    runs_dir = _models.runs_folder(out, args.fresh)
    shared = shared_overrides(args)
    jobs = []
    for seed in range(args.seeds):
        for name in args.variants:
            overrides = {**shared, **VARIANTS[name], "train.seed": seed}
            load_config(None, overrides)  # fail on a bad override before any run starts
            run_dir = runs_dir / f"{name}-steps{args.steps}-seed{seed}"
            jobs.append((overrides, name, str(run_dir), 1 if args.jobs > 1 else 0))
    start = time.perf_counter()
    results: dict[str, list[RunResult]] = {name: [] for name in args.variants}
    pool = ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) if args.jobs > 1 else None
    done = pool.map(_train, jobs) if pool else map(_train, jobs)
    for n, result in enumerate(done, 1):
        results[result.label].append(result)
        final = evaluations(result)[-1][2] if evaluations(result) else math.nan
        print(f"[{n}/{len(jobs)}] {result.label} seed {result.seed}: reached at {reach(result, args.target)[0]} "
              f"completions, final accuracy {final:.3f} ({result.wall_s:.0f} s)", file=sys.stderr, flush=True)
    if pool:
        pool.shutdown()
    for runs in results.values():
        runs.sort(key=lambda r: r.seed)

    rows = summarize(results, args.target)
    title = (f"sample efficiency: {args.steps} steps x {shared.get('train.prompts_per_step', 16)} prompts, "
             f"{args.seeds} seeds, target {args.target:.0%}")
    text = "\n".join([f"# {title}", "", table(rows, args.target), "", *[f"- {v}" for v in verdict(rows, args.target)],
                      "", f"wall time {time.perf_counter() - start:.0f} s"])
    print(text)
    (out / "sample_efficiency.md").write_text(text + "\n")
    (out / "sample_efficiency.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                            "rows": rows}, indent=2))
    plot(results, out / "sample_efficiency.png", args.target, title)
    print(f"wrote {out / 'sample_efficiency.md'}, .json and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
