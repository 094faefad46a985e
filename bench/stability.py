"""Learning-rate stability of GVPO and GRPO: a sweep of learning rates x seeds on one task.

Paper section 2.1 / 3.5: GRPO "often exhibits rapid decrease and divergence, necessitating careful tuning
of hyperparameters such as learning rates", while GVPO avoids importance weights and clipping. This
bench measures that claim on the embedded arithmetic task: for each objective, learning rate and seed it
trains with :func:`gvpo.trainer.train` (same task, seeds and sample budget for every objective) and records

- the final greedy held-out accuracy (and the start accuracy, the same for every run of a seed),
- the final KL estimate to the reference (mean of ``log pi_theta(y|x) - log pi_ref(y|x)``),
- runs that *diverged*: the trainer raised ``NonFiniteError`` (non-finite loss or gradient),
- runs that *collapsed*: final held-out accuracy below the start accuracy minus ``--collapse-margin``.

It prints a table and writes ``stability.md``, ``stability.png`` (final accuracy and KL against the
learning rate, one line per objective, error bars = std over seeds; unstable runs counted) and
``stability.json`` to ``--output-dir`` (default ``bench/out/stability``); each run keeps its folder
under ``runs/`` and a finished run is reused when the sweep is started again (``--fresh`` removes them).

    python bench/stability.py --quick          # 3 learning rates x 1 seed x 10 steps
    python bench/stability.py                  # 5 learning rates (3e-5..3e-3) x 3 seeds x 20 steps
    python bench/stability.py --lrs 1e-3,1e-2 --seeds 2 --steps 20 objective.beta=0.05

Objective settings are the library defaults (GVPO: beta 0.1, fixed reference; GRPO: clip 0.2, k3 KL
coefficient 0.04 with TRL's bias correction, ``grpo`` aggregation, group-scaled rewards) unless
overridden with ``key=value`` (shared by all runs).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from gvpo.compare import ACCURACY, KL, RunResult, run_one
from gvpo.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models  # noqa: E402

DEFAULT_LRS = "3e-5,1e-4,3e-4,1e-3,3e-3"
QUICK_LRS = "3e-5,3e-4,3e-3"
# Two orders of magnitude around the cliff measured on a ~0.44-accuracy checkpoint of the arithmetic model
# (8 steps x 16 prompts x k=8): 1e-4 improved held-out accuracy, 1e-3 and 3e-3 collapsed it for GVPO and
# GRPO alike. AdamW's first steps move every weight by about lr whatever the loss scale, so the same lr is
# a fair comparison across objectives whose losses differ in scale.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--objectives", default="gvpo,grpo", help="comma-separated objectives")
    p.add_argument("--lrs", default=None, help=f"comma-separated learning rates (default {DEFAULT_LRS}; --quick: {QUICK_LRS})")
    p.add_argument("--seeds", type=int, default=None, help="seeds per (objective, lr): 0..N-1 (default 3; --quick: 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20; --quick: 10)")
    p.add_argument("--prompts-per-step", type=int, default=16, help="train.prompts_per_step")
    p.add_argument("--k", type=int, default=8, help="rollout.k: completions per prompt")
    p.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps (and at start/end)")
    p.add_argument("--eval-n", type=int, default=200, help="held-out prompts per evaluation")
    p.add_argument("--model", default="default", help="model.name_or_path ('default' = the embedded arithmetic model)")
    p.add_argument("--task", default="arithmetic", help="task.name")
    p.add_argument("--collapse-margin", type=float, default=0.05,
                   help="a run collapsed if its final held-out accuracy < start accuracy - this")
    p.add_argument("--quick", action="store_true", help="reduced sweep: 3 learning rates, 1 seed, 10 steps")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs under OUTPUT_DIR/runs first")
    p.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "out" / "stability")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides shared by every run")
    args = p.parse_args(argv)
    args.lrs = [float(x) for x in (args.lrs or (QUICK_LRS if args.quick else DEFAULT_LRS)).split(",") if x.strip()]
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.steps = args.steps or (10 if args.quick else 20)
    args.objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    return args


def base_overrides(args) -> dict:
    from gvpo.config import parse_override

    out = {"model.name_or_path": args.model, "task.name": args.task, "train.max_steps": args.steps,
           "train.prompts_per_step": args.prompts_per_step, "rollout.k": args.k, "train.eval_every": args.eval_every,
           "train.eval_n": args.eval_n, "train.checkpoint_every": 0, "train.keep_checkpoints": 1,
           "output.progress": False, "output.report_to": [], "output.plots": False}
    out.update(dict(parse_override(o) for o in args.overrides))
    return out


def classify(result: RunResult, margin: float) -> str:
    """``diverged`` (non-finite), ``collapsed`` (final accuracy < start - margin) or ``ok``."""
    if result.diverged:
        return "diverged"
    start, final = result.first(ACCURACY), result.last(ACCURACY)
    if start is not None and final is not None and final < start - margin:
        return "collapsed"
    return "ok"


def _ms(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: list[tuple[str, float, RunResult]], margin: float) -> list[dict]:
    rows = []
    for obj in dict.fromkeys(o for o, _, _ in results):
        for lr in sorted({lr for o, lr, _ in results if o == obj}):
            runs = [r for o, l, r in results if o == obj and l == lr]
            kinds = [classify(r, margin) for r in runs]
            done = [r for r in runs if not r.diverged]
            acc, acc_sd = _ms([r.last(ACCURACY) for r in done])
            kl, kl_sd = _ms([r.last(KL) for r in done])
            start, _ = _ms([r.first(ACCURACY) for r in runs])
            rows.append({"objective": obj, "lr": lr, "runs": len(runs), "diverged": kinds.count("diverged"),
                         "collapsed": kinds.count("collapsed"), "accuracy_start": start, "accuracy_final": acc,
                         "accuracy_final_std": acc_sd, "kl_final": kl, "kl_final_std": kl_sd,
                         "kl_max": max((r.last(KL) for r in done if r.last(KL) is not None), default=None),
                         "wall_s": statistics.fmean(r.wall_s for r in runs),
                         "errors": [r.error for r in runs if r.error]})
    return rows


def _f(v, fmt=".3f"):
    return "–" if v is None else format(v, fmt)


def table(rows: list[dict]) -> str:
    lines = ["| objective | lr | runs | diverged | collapsed | acc. start | acc. final (mean ± std) "
             "| KL final (mean ± std) | KL max | wall (s/run) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['objective']} | {r['lr']:g} | {r['runs']} | {r['diverged']} | {r['collapsed']} "
                     f"| {_f(r['accuracy_start'])} | {_f(r['accuracy_final'])} ± {_f(r['accuracy_final_std'])} "
                     f"| {_f(r['kl_final'], '.4f')} ± {_f(r['kl_final_std'], '.4f')} | {_f(r['kl_max'], '.4f')} "
                     f"| {r['wall_s']:.1f} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """One line per objective: learning rates where every seed stayed stable, and the best final accuracy."""
    out = []
    for obj in dict.fromkeys(r["objective"] for r in rows):
        mine = [r for r in rows if r["objective"] == obj]
        stable = [f"{r['lr']:g}" for r in mine if r["diverged"] == 0 and r["collapsed"] == 0]
        unstable = sum(r["diverged"] + r["collapsed"] for r in mine)
        best = max((r for r in mine if r["accuracy_final"] is not None), key=lambda r: r["accuracy_final"], default=None)
        best_text = f"best final accuracy {best['accuracy_final']:.3f} at lr {best['lr']:g}" if best else "no finished run"
        out.append(f"{obj}: stable at lr {{{', '.join(stable) or 'none'}}}; unstable runs {unstable}/"
                   f"{sum(r['runs'] for r in mine)}; {best_text}")
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for obj in dict.fromkeys(r["objective"] for r in rows):
        mine = [r for r in rows if r["objective"] == obj]
        lrs = [r["lr"] for r in mine]
        acc = [r["accuracy_final"] if r["accuracy_final"] is not None else math.nan for r in mine]
        axes[0].errorbar(lrs, acc, yerr=[r["accuracy_final_std"] or 0 for r in mine], marker="o", capsize=3, label=obj)
        kl = [r["kl_final"] if r["kl_final"] is not None else math.nan for r in mine]
        axes[1].errorbar(lrs, kl, yerr=[r["kl_final_std"] or 0 for r in mine], marker="o", capsize=3, label=obj)
        axes[2].plot(lrs, [(r["diverged"] + r["collapsed"]) / r["runs"] for r in mine], marker="o", label=obj)
    starts = [r["accuracy_start"] for r in rows if r["accuracy_start"] is not None]
    if starts:
        axes[0].axhline(statistics.fmean(starts), color="gray", linestyle="--", linewidth=1, label="start")
    for ax, name in zip(axes, ["final held-out accuracy (greedy)", "final KL to reference (estimate)",
                               "unstable runs (diverged or collapsed), share"]):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("symlog", linthresh=0.1)  # the KL estimate can be <= 0 on a short run
    axes[2].set_ylim(-0.05, 1.05)
    _models.save_figure(fig, path, title)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.output_dir
    runs_dir = _models.runs_folder(out, args.fresh)
    shared = base_overrides(args)
    load_config(None, shared)  # fail on a bad override before the first run
    results = []
    start = time.perf_counter()
    total = len(args.objectives) * len(args.lrs) * args.seeds
    for seed in range(args.seeds):  # seeds outermost: a cut-short sweep still covers every (objective, lr)
        for lr in args.lrs:
            for obj in args.objectives:
                config = load_config(None, {**shared, "objective.name": obj, "optim.lr": lr, "train.seed": seed})
                run_dir = runs_dir / f"{obj}-lr{lr:g}-steps{args.steps}-seed{seed}"
                result = run_one(config, obj, run_dir)
                results.append((obj, lr, result))
                print(f"[{len(results)}/{total}] {obj} lr={lr:g} seed={seed}: {classify(result, args.collapse_margin)}, "
                      f"acc {_f(result.first(ACCURACY))} -> {_f(result.last(ACCURACY))}, kl {_f(result.last(KL), '.4f')}, "
                      f"{result.wall_s:.1f}s", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    rows = summarize(results, args.collapse_margin)
    settings = (f"task `{args.task}`, model `{args.model}`, {args.steps} steps x {args.prompts_per_step} prompts x "
                f"k={args.k} per run, seeds 0..{args.seeds - 1}, eval on {args.eval_n} held-out prompts; "
                f"collapse = final accuracy < start - {args.collapse_margin}; overrides: {args.overrides or 'none'}")
    text = "\n".join(["# Learning-rate stability: " + " vs ".join(args.objectives), "", settings, "",
                      table(rows), "", *[f"- {v}" for v in verdict(rows)], "",
                      f"Sweep wall time: {elapsed / 60:.1f} min ({total} runs)."]) + "\n"
    print(text)
    (out / "stability.md").write_text(text, encoding="utf-8")
    (out / "stability.json").write_text(json.dumps({"settings": settings, "rows": rows,
                                                    "runs": [{"objective": o, "lr": lr, **r.summary(),
                                                              "status": classify(r, args.collapse_margin)}
                                                             for o, lr, r in results]}, indent=1))
    plot(rows, out / "stability.png", f"{' vs '.join(args.objectives)}: {args.task}, {args.steps} steps, "
                                      f"{args.seeds} seed(s)")
    print(f"written: {out / 'stability.md'}, {out / 'stability.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
