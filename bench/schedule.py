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
- unstable runs: non-finite loss, or final accuracy below the start minus ``--collapse-margin``.

Objectives (all with ``reference: rollout``):

- ``gvpo``: GVPO, beta 0.1.
- ``dr_grpo``: the Dr. GRPO recipe as TRL runs it: ``objective.name=grpo``, ``loss_aggregation=dr_grpo``
  (token sum / generation budget), ``scale_rewards=none``, clip 0.2, no KL term.
- ``grpo``: GRPO as TRL runs it by default: standardised advantages, clip 0.2, ``loss_aggregation=dapo``,
  no KL term (``kl_coef=0``, TRL's default ``beta=0``).
- ``gspo`` (not in the default list; ``--objectives gvpo,dr_grpo,grpo,gspo``): GSPO as its paper and TRL's
  docs run it: ``objective.name=gspo`` (one importance ratio per completion), ``loss_aggregation=grpo``,
  clip 3e-4 / 4e-4, no KL term.

    python bench/schedule.py --quick        # 1 seed, 10 steps
    python bench/schedule.py                # 5 seeds x 20 steps x lrs 3e-5, 1e-4, 3e-4 (90 runs)

Writes ``schedule.md``, ``schedule.png`` and ``schedule.json`` to ``--output-dir`` (default
``bench/out/schedule``); finished runs under ``runs/`` are reused (``--fresh`` removes them).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from gvpo.compare import ACCURACY, run_one
from gvpo.config import load_config, parse_override

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
    p.add_argument("--quick", action="store_true", help="1 seed, 10 steps")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs under OUTPUT_DIR/runs first")
    p.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "out" / "schedule")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides shared by every run")
    args = p.parse_args(argv)
    args.objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    args.mini_batches = [int(x) for x in args.mini_batches.split(",")]
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.seeds = args.seeds or (1 if args.quick else 5)
    args.steps = args.steps or (10 if args.quick else 20)
    return args


def kl_to_initial(run_dir: Path, initial: str, *, n: int, seed: int) -> float:
    """``E_{y ~ pi_final}[log pi_final(y|x) - log pi_init(y|x)]`` over ``n`` held-out prompts, one sample each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gvpo.logprobs import completion_token_logps, sequence_logps
    from gvpo.models import resolve_model_path
    from gvpo.rollout import SamplingParams, hash_seed
    from gvpo.rollout.hf import HFEngine
    from gvpo.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    start = AutoModelForCausalLM.from_pretrained(resolve_model_path(initial)).eval()
    task = get_task("arithmetic")
    prompts = [row["prompt"] for row in task.test[:n]]
    gen = HFEngine(final, tokenizer).generate(prompts, [hash_seed(seed, 7, i) for i in range(len(prompts))],
                                              SamplingParams(max_new_tokens=task.max_new_tokens))
    ids = torch.cat([gen.prompt_ids, gen.completion_ids], 1)
    mask = torch.cat([gen.prompt_mask, gen.completion_mask], 1)
    with torch.no_grad():
        logps = [sequence_logps(completion_token_logps(m, ids, mask, gen.completion_mask), gen.completion_mask)
                 for m in (final, start)]
    return float((logps[0] - logps[1]).mean())


def run_all(args) -> list[dict]:
    runs_dir = _models.runs_folder(args.output_dir, args.fresh)
    shared = {"model.name_or_path": "default", "task.name": "arithmetic", "train.max_steps": args.steps,
              "train.prompts_per_step": args.prompts_per_step, "rollout.k": args.k, "train.eval_every": 0,
              "train.eval_n": args.eval_n, "train.checkpoint_every": 0, "train.keep_checkpoints": 1,
              "objective.reference": "rollout", "output.progress": False, "output.report_to": [],
              "output.plots": False, **dict(parse_override(o) for o in args.overrides)}
    results = []
    for name in args.objectives:
        for mb in args.mini_batches:
            for lr in args.lrs:
                for seed in range(args.seeds):
                    label = f"{name}-m{mb}-lr{lr:g}-s{seed}"
                    config = load_config(None, {**shared, **OBJECTIVES[name], "train.mini_batches": mb,
                                                "optim.lr": lr, "train.seed": seed})
                    result = run_one(config, label, runs_dir / label)
                    kl_file = Path(result.run_dir) / "kl_to_initial.json"
                    if not result.diverged and not kl_file.exists():
                        kl_file.write_text(json.dumps({"kl": kl_to_initial(Path(result.run_dir), "default",
                                                                           n=args.kl_prompts, seed=seed)}))
                    kl = json.loads(kl_file.read_text())["kl"] if kl_file.exists() else None
                    start, final = result.first(ACCURACY), None if result.diverged else result.last(ACCURACY)
                    unstable = result.diverged or (final is not None and final < start - args.collapse_margin)
                    results.append({"objective": name, "mini_batches": mb, "lr": lr, "seed": seed,
                                    "accuracy_start": start, "accuracy_final": final, "kl_to_initial": kl,
                                    "unstable": bool(unstable), "wall_s": result.wall_s, "error": result.error})
                    print(f"{label}: acc {start} -> {final}, KL {kl}, {'UNSTABLE' if unstable else 'ok'}", flush=True)
    return results


def _mean_se(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for key in dict.fromkeys((r["objective"], r["mini_batches"], r["lr"]) for r in results):
        runs = [r for r in results if (r["objective"], r["mini_batches"], r["lr"]) == key]
        acc, acc_se = _mean_se([r["accuracy_final"] for r in runs if not r["unstable"]])
        kl, kl_se = _mean_se([r["kl_to_initial"] for r in runs if not r["unstable"]])
        rows.append({"objective": key[0], "mini_batches": key[1], "lr": key[2], "runs": len(runs),
                     "unstable": sum(r["unstable"] for r in runs), "accuracy_start": _mean_se([r["accuracy_start"] for r in runs])[0],
                     "accuracy_final": acc, "accuracy_final_se": acc_se, "kl_to_initial": kl, "kl_to_initial_se": kl_se})
    return rows


def _f(v, fmt=".3f"):
    return "–" if v is None else format(v, fmt)


def table(rows: list[dict]) -> str:
    lines = ["| objective | mini-batches | lr | runs | unstable | acc. start | acc. final (stable runs, mean ± s.e.) "
             "| KL to initial (mean ± s.e.) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['objective']} | {r['mini_batches']} | {r['lr']:g} | {r['runs']} | {r['unstable']} "
                     f"| {_f(r['accuracy_start'])} | {_f(r['accuracy_final'])} ± {_f(r['accuracy_final_se'])} "
                     f"| {_f(r['kl_to_initial'], '.4f')} ± {_f(r['kl_to_initial_se'], '.4f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
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
            ax.bar([i + j * width for i in range(len(settings))], values, width, yerr=errors, label=name, capsize=2)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(settings))])
        ax.set_xticklabels([f"m={m}\nlr={lr:g}" for m, lr in settings])
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    _models.save_figure(fig, path, "rollout reference: 1 vs 4 optimizer steps per rollout batch")


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run_all(args)
    rows = summarize(results)
    text = table(rows)
    print(text)
    out = args.output_dir
    (out / "schedule.md").write_text(text + "\n")
    (out / "schedule.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                   "runs": results, "summary": rows}, indent=1))
    plot(rows, out / "schedule.png")


if __name__ == "__main__":
    main()
