"""The authors' update schedule on the embedded task: GVPO vs Dr. GRPO vs GRPO, one or four optimizer
steps per rollout batch (issue 12).

With ``objective.reference: rollout`` and one optimizer step per batch, GVPO's gradient is Dr. GRPO's
(Eq. 9, centred rewards) times ``beta / (G (k-1))``: the log-ratio to the policy that generated the
batch is zero at the update. With ``train.mini_batches: 4`` (the authors' release: 4 steps per batch,
pi_ref = the rollout policy) steps 2-4 see a moved policy and GVPO's Eq. 12 weights pull it back toward
the rollout policy. This bench asks whether that shows at small scale. For each objective x
mini_batches x learning rate x seed it trains the embedded arithmetic model and records

- the final greedy held-out accuracy (and the start accuracy),
- the KL of the final policy to the initial one, ``E_{y ~ pi_final} [log pi_final(y|x) - log pi_init(y|x)]``,
  estimated on ``--kl-prompts`` held-out prompts with one sampled completion each (the trainer's ``kl``
  metric is to the rollout policy here, which says nothing about drift),
- unstable runs: non-finite loss (no final accuracy: left out of the means), or final accuracy below the start
  minus ``--collapse-margin`` (collapsed: counted in the means, which then show the collapse).

Objectives (all with ``reference: rollout``):

- ``gvpo``: GVPO, beta 0.1.
- ``dr_grpo``: the Dr. GRPO recipe as TRL runs it: ``objective.name=grpo``, ``loss_aggregation=dr_grpo``
  (token sum / generation budget), ``scale_rewards=none``, clip 0.2, no KL term.
- ``grpo``: GRPO as TRL runs it by default: standardised advantages, clip 0.2, ``loss_aggregation=dapo``,
  no KL term (``kl_coef=0``, TRL's default ``beta=0``).
- ``gspo`` (not in the default list; ``--objectives gvpo,dr_grpo,grpo,gspo``): GSPO as its paper and TRL's
  docs run it: ``objective.name=gspo`` (one importance ratio per completion), ``loss_aggregation=grpo``,
  clip 3e-4 / 4e-4, no KL term.

``--betas 0.1,0.5`` runs GVPO once per beta (the first at every lr, the others at ``--beta-lrs``, default all).
Any model and task go through the overrides, e.g. SmolLM2-135M-Instruct on ``chat_arithmetic`` (issue 19)::

    python bench/schedule.py --quick        # 1 seed, 10 steps
    python bench/schedule.py                # 5 seeds x 20 steps x lrs 3e-5, 1e-4, 3e-4 (90 runs)
    python bench/schedule.py --mini-batches 4 --lrs 1e-5,3e-5 --seeds 3 --steps 8 --betas 0.1,0.5 \
        --beta-lrs 3e-5 --output-dir bench/out/schedule-smollm2 model.name_or_path=PATH task.name=chat_arithmetic ...

Writes ``schedule.md``, ``schedule.png`` and ``schedule.json`` to ``--output-dir`` (default
``bench/out/schedule``). Runs go one at a time, seed by seed (so an interrupted grid has every cell at about
the same number of seeds); each finished run leaves ``runs/<label>/schedule_run.json``, the grid resumes
from them (``--fresh`` removes them), and the table and plot cover every such record in the folder
(``--report`` draws them without training). The step-0 evaluation (greedy, the initial model) is the same for
every run of a grid, so it is computed by the first run and reused (``initial_eval.json``;
``--no-reuse-initial-eval`` evaluates it in every run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts (see README: OpenMP's spinning)

from gvpo.compare import ACCURACY, REWARD, run_one  # noqa: E402
from gvpo.config import load_config, parse_override  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models  # noqa: E402

OBJECTIVES = {
    "gvpo": {"objective.name": "gvpo"},
    "dr_grpo": {"objective.name": "grpo", "objective.loss_aggregation": "dr_grpo", "objective.scale_rewards": "none",
                "objective.kl_coef": 0.0},
    "grpo": {"objective.name": "grpo", "objective.loss_aggregation": "dapo", "objective.scale_rewards": "group",
             "objective.kl_coef": 0.0},
    "gspo": {"objective.name": "gspo", "objective.loss_aggregation": "grpo", "objective.scale_rewards": "group",
             "objective.clip_epsilon": 3e-4, "objective.epsilon_high": 4e-4, "objective.kl_coef": 0.0},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--objectives", default="gvpo,dr_grpo,grpo", help=f"comma-separated, of {', '.join(OBJECTIVES)}")
    p.add_argument("--mini-batches", default="1,4", help="comma-separated train.mini_batches values")
    p.add_argument("--lrs", default="3e-5,1e-4,3e-4", help="comma-separated learning rates (the demo uses 1e-4)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5; --quick: 1)")
    p.add_argument("--steps", type=int, default=None, help="rollout steps per run (default 20; --quick: 10)")
    p.add_argument("--prompts-per-step", type=int, default=16, help="train.prompts_per_step (divisible by mini-batches)")
    p.add_argument("--k", type=int, default=8, help="rollout.k")
    p.add_argument("--eval-n", type=int, default=200, help="held-out prompts for the start and final accuracy")
    p.add_argument("--kl-prompts", type=int, default=200, help="held-out prompts for the KL-to-initial estimate")
    p.add_argument("--collapse-margin", type=float, default=0.05, help="collapsed: final accuracy < start - this")
    p.add_argument("--betas", default="0.1", help="comma-separated GVPO betas (objective.beta)")
    p.add_argument("--beta-lrs", default="", help="lrs at which the betas after the first run (default: every lr)")
    p.add_argument("--kl-temperature", type=float, default=1.0, help="sampling temperature of the KL estimate's "
                   "completions (1 = KL of the policies themselves)")
    p.add_argument("--reuse-initial-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the initial model (step 0) once per grid and reuse it")
    p.add_argument("--title", default="rollout reference: 1 vs 4 optimizer steps per rollout batch",
                   help="the plot's title")
    p.add_argument("--keep-models", action="store_true", help="keep each run's final/ and checkpoints/ (default: "
                   "deleted once its KL is measured; a 135M model leaves 2 GB per run)")
    p.add_argument("--report", action="store_true", help="no training: table and plot of the runs on disk")
    p.add_argument("--quick", action="store_true", help="1 seed, 10 steps")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs under OUTPUT_DIR/runs first")
    p.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "out" / "schedule")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides shared by every run")
    args = p.parse_args(argv)
    args.objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    args.mini_batches = [int(x) for x in args.mini_batches.split(",")]
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.betas = [float(x) for x in args.betas.split(",")]
    args.beta_lrs = [float(x) for x in args.beta_lrs.split(",") if x.strip()] or args.lrs
    args.seeds = args.seeds or (1 if args.quick else 5)
    args.steps = args.steps or (10 if args.quick else 20)
    return args


def kl_to_initial(run_dir: Path, config, *, n: int, seed: int, temperature: float = 1.0) -> float:
    """``E_{y ~ pi_final}[log pi_final(y|x) - log pi_init(y|x)]`` over ``n`` held-out prompts of the run's task,
    one completion each, sampled at ``temperature`` (1: from pi_final itself) within the run's token budget."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gvpo.model.loading import resolve_model_path
    from gvpo.model.logprobs import completion_token_logps, sequence_logps
    from gvpo.rollout import SamplingParams, hash_seed
    from gvpo.rollout.hf import HFEngine
    from gvpo.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    initial = resolve_model_path(config.model.name_or_path, config.model.gguf_file)
    start = AutoModelForCausalLM.from_pretrained(initial).eval()
    task = get_task(config.task.name, **config.task.options)
    prompts = [row["prompt"] for row in task.test[:n]]
    params = SamplingParams(max_new_tokens=config.rollout.max_new_tokens or task.max_new_tokens, temperature=temperature)
    gen = HFEngine(final, tokenizer).generate(prompts, [hash_seed(seed, 7, i) for i in range(len(prompts))], params)
    ids = torch.cat([gen.prompt_ids, gen.completion_ids], 1)
    mask = torch.cat([gen.prompt_mask, gen.completion_mask], 1)
    with torch.no_grad():
        logps = [sequence_logps(completion_token_logps(m, ids, mask, gen.completion_mask), gen.completion_mask)
                 for m in (final, start)]
    return float((logps[0] - logps[1]).mean())


@contextlib.contextmanager
def initial_eval_once(cache: Path, enabled: bool = True):
    """While active, the trainer's step-0 evaluation (greedy, on the initial model: the same in every run of a
    grid) is computed once per model, task and ``eval_n`` and read back from ``cache`` in the other runs."""
    import gvpo.trainer as trainer

    evaluate_all = trainer.evaluate_all

    def once(run, step):
        if step != 0:
            return evaluate_all(run, step)
        c = run.config
        key = json.dumps([c.model.name_or_path, c.model.gguf_file, c.task.name, c.task.options, c.task.eval_tasks,
                          c.train.eval_n, c.rollout.max_new_tokens], sort_keys=True, default=str)
        saved = json.loads(cache.read_text()) if cache.exists() else {}
        if key not in saved:
            saved[key] = evaluate_all(run, 0)
            cache.write_text(json.dumps(saved, indent=1))
        return saved[key]

    trainer.evaluate_all = once if enabled else evaluate_all
    try:
        yield
    finally:
        trainer.evaluate_all = evaluate_all


def cells(args) -> list[tuple[str, float, dict, int, float]]:
    """``(label, beta, objective overrides, mini_batches, lr)`` of every setting, in table order."""
    out = []
    for name in args.objectives:
        for i, beta in enumerate(args.betas if name == "gvpo" else [None]):
            label = name if beta is None or i == 0 and beta == 0.1 else f"{name}-b{beta:g}"
            extra = {} if beta is None else {"objective.beta": beta}
            for mb in args.mini_batches:
                for lr in args.lrs if i == 0 else args.beta_lrs:
                    out.append((label, beta, {**OBJECTIVES[name], **extra}, mb, lr))
    return out


def run_all(args) -> None:
    """Train every cell x seed not yet on disk, seed by seed; each leaves ``runs/<label>/schedule_run.json``."""
    runs_dir = _models.runs_folder(args.output_dir, args.fresh)
    shared = {"model.name_or_path": "default", "task.name": "arithmetic", "train.max_steps": args.steps,
              "train.prompts_per_step": args.prompts_per_step, "rollout.k": args.k, "train.eval_every": 0,
              "train.eval_n": args.eval_n, "train.checkpoint_every": 0, "train.keep_checkpoints": 1,
              "objective.reference": "rollout", "output.progress": False, "output.report_to": [],
              "output.plots": False, **dict(parse_override(o) for o in args.overrides)}
    with initial_eval_once(args.output_dir / "initial_eval.json", args.reuse_initial_eval):
        for seed in range(args.seeds):
            for name, beta, objective, mb, lr in cells(args):
                label = f"{name}-m{mb}-lr{lr:g}-s{seed}"
                record_file = runs_dir / label / "schedule_run.json"
                if record_file.exists():
                    continue
                config = load_config(None, {**shared, **objective, "train.mini_batches": mb, "optim.lr": lr,
                                            "train.seed": seed})
                result = run_one(config, label, runs_dir / label)
                kl = None
                if not result.diverged:
                    kl = kl_to_initial(Path(result.run_dir), config, n=args.kl_prompts, seed=seed,
                                       temperature=args.kl_temperature)
                start, final = result.first(ACCURACY), None if result.diverged else result.last(ACCURACY)
                unstable = result.diverged or (final is not None and final < start - args.collapse_margin)
                record = {"objective": name, "beta": beta, "mini_batches": mb, "lr": lr, "seed": seed,
                          "accuracy_start": start, "accuracy_final": final, "kl_to_initial": kl,
                          "reward_final": result.last(REWARD), "completion_len_final": result.last("completion_len"),
                          "unstable": bool(unstable), "wall_s": result.wall_s, "error": result.error,
                          "load_average": os.getloadavg()[0]}
                record_file.write_text(json.dumps(record))
                if not args.keep_models:
                    for folder in ("final", "checkpoints"):
                        shutil.rmtree(Path(result.run_dir) / folder, ignore_errors=True)
                print(f"{label}: acc {start} -> {final}, KL {kl}, {'UNSTABLE' if unstable else 'ok'}, "
                      f"{result.wall_s:.0f} s, load {record['load_average']:.1f}", flush=True)


def load_records(output_dir: Path) -> list[dict]:
    """Every finished run's record under ``output_dir/runs``, with its training reward per step (``reward_curve``,
    from the run's ``metrics.jsonl``)."""
    records = []
    for f in sorted((Path(output_dir) / "runs").glob("*/schedule_run.json")):
        metrics = f.parent / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
        records.append({**json.loads(f.read_text()), "reward_curve": [r[REWARD] for r in rows if REWARD in r]})
    return records


def _mean_se(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def summarize(results: list[dict], order: list | None = None) -> list[dict]:
    """One row per (objective, mini_batches, lr), in ``order`` (keys ``(objective, mini_batches, lr)``) first."""
    keys = list(dict.fromkeys((order or []) + [(r["objective"], r["mini_batches"], r["lr"]) for r in results]))
    rows = []
    for key in keys:
        runs = [r for r in results if (r["objective"], r["mini_batches"], r["lr"]) == key]
        if not runs:
            continue
        finished = [r for r in runs if not r.get("error")]  # collapsed runs count; diverged ones have no final model
        acc, acc_se = _mean_se([r["accuracy_final"] for r in finished])
        kl, kl_se = _mean_se([r["kl_to_initial"] for r in finished])
        rows.append({"objective": key[0], "beta": runs[0].get("beta"), "mini_batches": key[1], "lr": key[2],
                     "runs": len(runs), "unstable": sum(r["unstable"] for r in runs),
                     "accuracy_start": _mean_se([r["accuracy_start"] for r in runs])[0],
                     "accuracy_final": acc, "accuracy_final_se": acc_se, "kl_to_initial": kl, "kl_to_initial_se": kl_se,
                     "completion_len_final": _mean_se([r.get("completion_len_final") for r in finished])[0]})
    return rows


def _f(v, fmt=".3f"):
    return "–" if v is None else format(v, fmt)


def table(rows: list[dict]) -> str:
    lines = ["| objective | beta | mini-batches | lr | runs | unstable | acc. start | acc. final (mean ± s.e.) "
             "| KL to initial (mean ± s.e.) | final completion length |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        beta = "–" if r.get("beta") is None else f"{r['beta']:g}"
        lines.append(f"| {r['objective']} | {beta} | {r['mini_batches']} | {r['lr']:g} | {r['runs']} | {r['unstable']} "
                     f"| {_f(r['accuracy_start'])} | {_f(r['accuracy_final'])} ± {_f(r['accuracy_final_se'])} "
                     f"| {_f(r['kl_to_initial'], '.4f')} ± {_f(r['kl_to_initial_se'], '.4f')} "
                     f"| {_f(r.get('completion_len_final'), '.1f')} |")
    return "\n".join(lines)


def paired(results: list[dict], keys: list, baseline: str = "gvpo") -> list[dict]:
    """Per ``(objective, mini_batches, lr)`` of ``keys``, ``objective - baseline`` final accuracy and KL, paired by
    seed (same prompts, same held-out set): mean ± s.e. over the seeds where both runs finished (not diverged)."""
    by_key = {(r["objective"], r["mini_batches"], r["lr"], r["seed"]): r for r in results if not r.get("error")}
    out = []
    for name, mb, lr in keys:
        if name == baseline:
            continue
        pairs = [(by_key[(name, mb, lr, seed)], base) for (b, m, l, seed), base in by_key.items()
                 if (b, m, l) == (baseline, mb, lr) and (name, mb, lr, seed) in by_key]
        if pairs:
            acc, acc_se = _mean_se([a["accuracy_final"] - b["accuracy_final"] for a, b in pairs])
            kl, kl_se = _mean_se([a["kl_to_initial"] - b["kl_to_initial"] for a, b in pairs
                                  if a["kl_to_initial"] is not None and b["kl_to_initial"] is not None])
            out.append({"objective": name, "mini_batches": mb, "lr": lr, "seeds": len(pairs), "accuracy_diff": acc,
                        "accuracy_diff_se": acc_se, "kl_diff": kl, "kl_diff_se": kl_se})
    return out


def paired_table(rows: list[dict], baseline: str = "gvpo") -> str:
    lines = [f"| objective − {baseline} | mini-batches | lr | seeds | acc. final difference (mean ± s.e.) "
             "| KL difference (mean ± s.e.) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['objective']} | {r['mini_batches']} | {r['lr']:g} | {r['seeds']} "
                     f"| {_f(r['accuracy_diff'], '+.3f')} ± {_f(r['accuracy_diff_se'])} "
                     f"| {_f(r['kl_diff'], '+.3f')} ± {_f(r['kl_diff_se'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str = "rollout reference: 1 vs 4 optimizer steps per rollout batch",
         results: list[dict] = ()) -> None:
    """Bars: mean ± s.e. per objective and setting; dots: the single runs of ``results``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    settings = list(dict.fromkeys((r["mini_batches"], r["lr"]) for r in rows))
    names = list(dict.fromkeys(r["objective"] for r in rows))
    width = 0.8 / max(len(names), 1)
    for ax, key, label in ((axes[0], "accuracy_final", "final held-out accuracy"),
                           (axes[1], "kl_to_initial", "KL(final || initial)")):
        for j, name in enumerate(names):
            points = [next((r for r in rows if r["objective"] == name and (r["mini_batches"], r["lr"]) == s), None)
                      for s in settings]
            values = [p[key] if p and p[key] is not None else float("nan") for p in points]
            errors = [p[f"{key}_se"] or 0.0 if p else 0.0 for p in points]
            bars = ax.bar([i + j * width for i in range(len(settings))], values, width, yerr=errors, label=name,
                          capsize=2, alpha=0.8)
            for i, s in enumerate(settings):
                dots = [r[key] for r in results if r["objective"] == name and (r["mini_batches"], r["lr"]) == s
                        and r[key] is not None]
                ax.plot([i + j * width] * len(dots), dots, "o", color="black", markersize=2.5,
                        markerfacecolor=bars.patches[0].get_facecolor())
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(settings))])
        ax.set_xticklabels([f"m={m}\nlr={lr:g}" for m, lr in settings])
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="y")
    start = [r["accuracy_start"] for r in rows if r["accuracy_start"] is not None]
    if start:
        axes[0].axhline(statistics.fmean(start), color="grey", linestyle="--", linewidth=1, label="start")
    axes[0].legend(fontsize=8)
    _reward_curves(axes[2], results, names)
    _models.save_figure(fig, path, title)


def _reward_curves(ax, results: list[dict], names: list[str]) -> None:
    """Mean training reward (sampled completions) per rollout step, one line per objective (colours as the bars,
    ``names`` order) and lr (line style)."""
    styles = ["-", "--", ":", "-."]
    lrs = sorted({r["lr"] for r in results})
    for j, name in enumerate(names):
        for lr in lrs:
            curves = [r["reward_curve"] for r in results if r["objective"] == name and r["lr"] == lr
                      and r.get("reward_curve")]
            if curves:
                n = min(len(c) for c in curves)
                ax.plot(range(1, n + 1), [statistics.fmean(c[i] for c in curves) for i in range(n)],
                        styles[lrs.index(lr) % len(styles)], color=f"C{j}", label=f"{name}, lr {lr:g}")
    ax.set_xlabel("rollout step")
    ax.set_title("training reward (mean over seeds)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.report:
        run_all(args)
    results = load_records(args.output_dir)
    rows = summarize(results, [(label, mb, lr) for label, _, _, mb, lr in cells(args)])
    text = table(rows) + "\n\nPaired by seed:\n\n" + paired_table(
        paired(results, [(r["objective"], r["mini_batches"], r["lr"]) for r in rows]))
    print(text)
    out = args.output_dir
    (out / "schedule.md").write_text(text + "\n")
    (out / "schedule.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                   "runs": results, "summary": rows}, indent=1))
    plot(rows, out / "schedule.png", args.title, results)


if __name__ == "__main__":
    main()
