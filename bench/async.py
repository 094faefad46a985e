"""Asynchronous rollouts (issue 21, ``train.async_lag``): what a lag buys in speed, and what staleness costs.

``speed``: the synchronous loop on 2 threads against lag 1 and lag 2 with the process backend (the trainer and
the generator on 1 thread each, the default split of ``train.async_threads=0``), on the embedded 1M model
(arithmetic, 16 prompts x 8) and a random 34M Llama (completions of exactly 5 tokens: its EOS cannot be
sampled). Each run is its own subprocess. Two numbers:

- completions/s over steps 2..N of a run without evaluation (``time_s`` from the end of step 1 to the end of the
  last step), best of ``--rounds`` rounds, the modes alternating in order from round to round;
- wall time to 90% greedy held-out accuracy (1M only; evaluation after every step on ``--eval-n`` prompts):
  from the call to ``train`` (set-up and the generator's start-up included) to the end of the first step whose
  evaluation reaches 90%, with the evaluations' own time subtracted, over ``--seeds`` seeds. While the trainer
  evaluates, the generator keeps working: when generation is the slower side, this favours the lag a little
  (``gen_wait_s`` says which side waits).

Peak RSS is the trainer's plus the generator process's (each one's own peak).

``staleness``: lags 0, 1, 2, 4, 8 x {GVPO, GRPO with the sampler's ratio (``objective.importance_sampling``),
GRPO without it} x seeds x learning rates, the in-process backend (exact; the process backend gives the same
weights), 40 steps of the demo settings. Final greedy held-out accuracy (``--final-eval-n`` prompts) and the KL
of the final policy to the initial one, ``E_{y ~ pi_final}[log pi_final - log pi_init]`` on held-out prompts
(the trainer's ``kl`` averages over the batch's completions, which come from the stale sampler).

    flock /tmp/gvpo-heavy.lock python bench/async.py speed             # about 15 min on 2 idle cores
    nice -n 19 python bench/async.py staleness --jobs 2                 # 90 runs, 1 thread each
    python bench/async.py speed --quick                                 # 1 round, 1 seed, fewer steps
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models  # noqa: E402

MODES = {"sync": (0, 2, 0), "lag1": (1, 2, 0), "lag2": (2, 2, 0), "sync-1t": (0, 1, 0), "lag1-2+2": (1, 2, 2)}
"""Speed modes: name -> (``train.async_lag``, torch threads of the trainer's process, ``train.async_threads``). With a
lag and ``async_threads=0`` (the default) the process backend splits the 2 threads: 1 for the trainer, 1 for the
generator. Not run by default: ``sync-1t`` shows what the second thread gives the synchronous loop; ``lag1-2+2`` gives
both processes 2 threads (4 threads on 2 cores)."""
VARIANTS = {
    "gvpo": {"objective.name": "gvpo"},
    "grpo-is": {"objective.name": "grpo", "objective.importance_sampling": True},
    "grpo-no-is": {"objective.name": "grpo", "objective.importance_sampling": False},
    "gvpo-beta0.3": {"objective.name": "gvpo", "objective.beta": 0.3},
}
"""Staleness variants (GRPO with the library's defaults: TRL's clip 0.2, k3 KL 0.04). ``gvpo-beta0.3`` (not run by
default): a stronger pull towards the reference."""
DEFAULT_VARIANTS = "gvpo,grpo-is,grpo-no-is"
TARGET = 0.9
ACCURACY_MODES = ("sync", "lag1", "lag2")
"""The modes of the time-to-accuracy runs (the diagnostics only matter for speed)."""


# ----------------------------------------------------------------------------------------------
# child: one training run, timed without its evaluations


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    import gvpo.trainer as trainer
    from gvpo.config import load_config

    clock = {"eval_s": 0.0, "marks": {}}
    start = time.perf_counter()
    evaluate_all, end_step = trainer.evaluate_all, trainer.end_step

    def timed_evaluate(run, step):
        t = time.perf_counter()
        out = evaluate_all(run, step)
        clock["eval_s"] += time.perf_counter() - t
        return out

    def marked_end_step(run, row, bar):  # before this step's evaluation: the earlier ones are subtracted
        clock["marks"][row["step"]] = time.perf_counter() - start - clock["eval_s"]
        return end_step(run, row, bar)

    trainer.evaluate_all, trainer.end_step = timed_evaluate, marked_end_step
    load = _models.load_average()
    run_dir = trainer.train(load_config(None, spec["overrides"]))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the generator, once joined
    _models.report({"rows": _models.read_metrics(run_dir), "marks": clock["marks"], "eval_s": clock["eval_s"],
                    "load_before": load, "load_after": _models.load_average(),
                    "peak_rss": _models.peak_rss_bytes() + children})


def overrides(model: str, lag: int, out_dir: Path, name: str, *, steps: int, seed: int, eval_every: int,
              eval_n: int, max_new_tokens: int = 0, async_threads: int = 0) -> dict:
    return {"model.name_or_path": model, "model.dtype": "float32", "rollout.max_new_tokens": max_new_tokens,
            "train.max_steps": steps, "train.seed": seed, "train.eval_every": eval_every, "train.eval_n": eval_n,
            "train.checkpoint_every": 0, "train.async_lag": lag, "train.async_backend": "process",
            "train.async_threads": async_threads,
            "output.dir": str(out_dir), "output.name": name, "output.report_to": [], "output.plots": False,
            "output.progress": False}


def run(mode: str, model: str, out_dir: Path, name: str, **kw) -> dict:
    lag, threads, async_threads = MODES[mode]
    return _models.run_child(__file__, {"threads": threads, "overrides": overrides(model, lag, out_dir, name,
                                                                                   async_threads=async_threads, **kw)},
                             timeout=3600)


def rotated(items: list, r: int) -> list:
    """``items`` starting at position ``r``: each mode runs first, second, ... in turn from round to round."""
    return items[r % len(items):] + items[: r % len(items)]


# ----------------------------------------------------------------------------------------------
# speed


def speed_runs(args, tmp: Path) -> list[dict]:
    models = {"1m": "default"}
    if "34m" in args.models:
        models["34m"] = str(_models.make_model(tmp / "34m", "34m", unreachable_eos=True))
    results = []
    for model_name in [m for m in args.models if m in models]:
        steps = args.steps if model_name == "1m" else args.steps_34m
        for r in range(args.rounds):
            for mode in rotated(args.modes, r):
                out = run(mode, models[model_name], tmp, f"{model_name}-{mode}-{r}", steps=steps, seed=0, eval_every=0,
                          eval_n=1, max_new_tokens=0 if model_name == "1m" else 5)
                ss = _models.steady_state(out["rows"])
                row = {"kind": "speed", "model": model_name, "mode": mode, "round": r,
                       "completions_per_s": ss["completions"] / ss["seconds"], "s_per_step": ss["seconds"] / ss["steps"],
                       "gen_wait_s": _mean(r.get("gen_wait_s") for r in ss["rows"]),
                       "train_wait_s": _mean(r.get("train_wait_s") for r in ss["rows"]),
                       "peak_rss": out["peak_rss"], "load": (out["load_before"], out["load_after"])}
                print(json.dumps(row), flush=True)
                results.append(row)
    if "1m" in args.models:
        for seed in range(args.seeds):
            for mode in rotated([m for m in args.modes if m in ACCURACY_MODES], seed):
                out = run(mode, "default", tmp, f"acc-{mode}-{seed}", steps=args.accuracy_steps, seed=seed, eval_every=1,
                          eval_n=args.eval_n)
                hit = next((r["step"] for r in out["rows"] if r.get("eval/accuracy", 0) >= TARGET and r["step"] > 0),
                           None)
                marks = out["marks"]
                row = {"kind": "accuracy", "model": "1m", "mode": mode, "seed": seed, "steps_to_target": hit,
                       "seconds_to_target": marks[str(hit)] if hit else None,
                       "seconds_after_step_1": marks[str(hit)] - marks["1"] if hit else None,
                       "final_accuracy": out["rows"][-1].get("eval/accuracy"), "eval_s": out["eval_s"],
                       "load": (out["load_before"], out["load_after"])}
                print(json.dumps(row), flush=True)
                results.append(row)
    return results


def speed_table(results: list[dict], modes: list[str]) -> str:
    lines = ["| model | mode | completions/s, best | per round | ratio to sync, per round | median ratio | s/step (best) "
             "| gen_wait_s | train_wait_s | peak RSS | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    speed = [r for r in results if r["kind"] == "speed"]
    for model in dict.fromkeys(r["model"] for r in speed):
        runs = {m: {r["round"]: r for r in speed if r["model"] == model and r["mode"] == m} for m in modes}
        for mode in modes:
            best = max(runs[mode].values(), key=lambda r: r["completions_per_s"])
            ratios = [runs[mode][k]["completions_per_s"] / runs["sync"][k]["completions_per_s"] for k in sorted(runs[mode])
                      if k in runs["sync"]]
            loads = [x for r in runs[mode].values() for x in r["load"]]
            lines.append(f"| {model} | {mode} | {best['completions_per_s']:.1f} | "
                         f"{', '.join(format(r['completions_per_s'], '.0f') for _, r in sorted(runs[mode].items()))} | "
                         f"{', '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f}x | "
                         f"{best['s_per_step']:.3f} | {_f(best['gen_wait_s'])} | {_f(best['train_wait_s'])} | "
                         f"{_models.gib(best['peak_rss']):.2f} GiB | {min(loads):.1f}-{max(loads):.1f} |")
    accuracy = [r for r in results if r["kind"] == "accuracy"]
    if accuracy:
        lines += ["", f"| mode | reached {TARGET:.0%} | steps (per seed) | seconds to {TARGET:.0%}, from the call to `train` "
                      "(per seed) | ratio to sync (per seed) | seconds from the end of step 1 (per seed) | ratio to sync "
                      "(per seed) | final accuracy (mean) |", "|---|---|---|---|---|---|---|---|"]
        sync = {r["seed"]: r for r in accuracy if r["mode"] == "sync"}
        for mode in [m for m in modes if m in ACCURACY_MODES]:
            rows = sorted((r for r in accuracy if r["mode"] == mode), key=lambda r: r["seed"])
            cells = []
            for key in ("seconds_to_target", "seconds_after_step_1"):
                ratios = [r[key] / sync[r["seed"]][key] if r[key] and sync[r["seed"]][key] else None for r in rows]
                cells += [", ".join(_f(r[key], ".1f") for r in rows), ", ".join(_f(x, ".2f") for x in ratios)]
            lines.append(f"| {mode} | {sum(r['steps_to_target'] is not None for r in rows)}/{len(rows)} | "
                         f"{', '.join(str(r['steps_to_target']) for r in rows)} | {' | '.join(cells)} | "
                         f"{_f(_mean(r['final_accuracy'] for r in rows))} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# staleness


def staleness_job(job: tuple) -> dict:
    variant, lag, lr, seed, out_dir, steps, eval_n, kl_prompts = job
    import torch

    torch.set_num_threads(1)
    from schedule import kl_to_initial

    from gvpo.compare import run_one
    from gvpo.config import load_config

    config = load_config(None, {**VARIANTS[variant], "train.async_lag": lag, "train.async_backend": "inprocess",
                                "optim.lr": lr, "train.seed": seed, "train.max_steps": steps, "train.eval_every": 0,
                                "train.eval_n": eval_n, "train.checkpoint_every": 0, "train.keep_checkpoints": 1,
                                "output.report_to": [], "output.plots": False, "output.progress": False})
    run_dir = Path(out_dir) / f"{variant}-lag{lag}-lr{lr:g}-seed{seed}"
    result = run_one(config, variant, run_dir)
    kl = None if result.diverged else kl_to_initial(run_dir, "default", n=kl_prompts, seed=seed)
    return {"variant": variant, "lag": lag, "lr": lr, "seed": seed, "diverged": result.diverged,
            "accuracy_start": result.first("eval/accuracy"), "accuracy_final": result.last("eval/accuracy"),
            "kl_to_initial": kl, "kl_trainer": result.last("kl"), "wall_s": result.wall_s}


def staleness_runs(args) -> list[dict]:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    runs_dir = _models.runs_folder(args.output_dir, args.fresh)
    jobs = [(v, lag, lr, seed, str(runs_dir), args.staleness_steps, args.final_eval_n, args.kl_prompts)
            for lr in args.lrs for v in args.variants for lag in args.lags for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        results = []
        for row in pool.map(staleness_job, jobs):
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


def staleness_table(results: list[dict]) -> str:
    lines = ["| lr | objective | lag | runs | accuracy final (mean ± s.e.) | vs lag 0 (paired, s.e.) | "
             "KL to initial (mean ± s.e.) | trainer's kl |", "|---|---|---|---|---|---|---|---|"]
    for lr in dict.fromkeys(r["lr"] for r in results):
        for variant in dict.fromkeys(r["variant"] for r in results):
            base = {r["seed"]: r for r in results if r["lr"] == lr and r["variant"] == variant and r["lag"] == 0}
            for lag in sorted({r["lag"] for r in results}):
                rows = [r for r in results if r["lr"] == lr and r["variant"] == variant and r["lag"] == lag]
                diffs = [r["accuracy_final"] - base[r["seed"]]["accuracy_final"] for r in rows
                         if r["seed"] in base and r["accuracy_final"] is not None
                         and base[r["seed"]]["accuracy_final"] is not None]
                lines.append(f"| {lr:g} | {variant} | {lag} | {len(rows)} | {_mse([r['accuracy_final'] for r in rows])} | "
                             f"{_mse(diffs, signed=True) if lag else ''} | "
                             f"{_mse([r['kl_to_initial'] for r in rows], '.3f')} | "
                             f"{_f(_mean(r['kl_trainer'] for r in rows))} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _f(v, fmt=".3f"):
    return "–" if v is None else format(v, fmt)


def _mse(values, fmt=".3f", signed=False):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{format(statistics.fmean(values), ('+' if signed else '') + fmt)} ± {format(se, fmt)}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("part", nargs="?", default="speed", choices=["speed", "staleness"])
    parser.add_argument("--quick", action="store_true", help="speed: 1 round, 1 seed, 12 and 4 steps")
    parser.add_argument("--models", default="1m,34m", help="speed: 1m (the embedded model) and/or 34m")
    parser.add_argument("--modes", default="sync,lag1,lag2", help=f"speed: among {', '.join(MODES)} (sync always runs)")
    parser.add_argument("--rounds", type=int, default=4, help="speed: rounds per model, each running every mode")
    parser.add_argument("--steps", type=int, default=30, help="speed: steps per 1m run")
    parser.add_argument("--steps-34m", type=int, default=8, help="speed: steps per 34m run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the accuracy runs and of the staleness runs")
    parser.add_argument("--accuracy-steps", type=int, default=30, help="speed: steps of the time-to-90%% runs")
    parser.add_argument("--eval-n", type=int, default=200, help="speed: held-out prompts per evaluation")
    parser.add_argument("--lags", default="0,1,2,4,8", help="staleness: lags")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"staleness: among {', '.join(VARIANTS)}")
    parser.add_argument("--lrs", default="1e-4,3e-4", help="staleness: learning rates")
    parser.add_argument("--staleness-steps", type=int, default=40)
    parser.add_argument("--final-eval-n", type=int, default=500, help="staleness: held-out prompts at the end")
    parser.add_argument("--kl-prompts", type=int, default=200, help="staleness: prompts of the KL estimate")
    parser.add_argument("--jobs", type=int, default=2, help="staleness: runs at once (1 thread each)")
    parser.add_argument("--fresh", action="store_true", help="staleness: delete earlier runs first")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "out" / "async")
    parsed = _models.parse_args(parser, argv, child)
    if parsed is None:
        return
    args, policy = parsed
    args.models = [m.strip() for m in args.models.split(",")]
    args.modes = ["sync"] + [m.strip() for m in args.modes.split(",") if m.strip() and m.strip() != "sync"]
    args.lags = [int(x) for x in args.lags.split(",")]
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.quick:
        args.rounds, args.seeds, args.steps, args.steps_34m, args.accuracy_steps = 1, 1, 12, 4, 20
    args.output_dir.mkdir(parents=True, exist_ok=True)
    print(f"OMP_WAIT_POLICY={policy}; load {_models.load_average():.2f}", flush=True)
    if args.part == "speed":
        with tempfile.TemporaryDirectory() as tmp:
            results = speed_runs(args, Path(tmp))
        table = speed_table(results, args.modes)
    else:
        results = staleness_runs(args)
        table = staleness_table(results)
    print(table)
    (args.output_dir / f"{args.part}.md").write_text(table + "\n")
    (args.output_dir / f"{args.part}.json").write_text(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
