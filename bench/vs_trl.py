"""gvpo against TRL's ``GRPOTrainer`` on the same models, prompts and batch shape, on CPU.

Both sides train Llamas built here from a config (``_models.PRESETS``: ``1m`` = 1.07M parameters,
``34m`` = 33.7M; character tokenizer, float32, no download) on the ``arithmetic`` task's prompts in
the same order (gvpo's ``step_rows``; TRL gets them as an unshuffled dataset), with k=8 completions of
8 tokens for each of 4 prompts per step (TRL: ``per_device_train_batch_size=32``, which it counts in
completions, ``num_generations=8``), the same learning rate, seed and a KL coefficient of 0.04 on
both sides (TRL's ``beta``; gvpo's ``objective.beta``). Every run is its own subprocess, one after the
other, so peak RSS (``ru_maxrss``) is that run's alone.

Exactly 8 tokens per completion on both sides (``--fixed-length``, the default): the saved tokenizer's
EOS is a token whose id lies outside the model's 100 outputs, so neither sampler can end a
completion early, and neither needs an extra logits processor.

Steady state: the first step is a warm-up. gvpo's time is ``time_s`` (metrics.jsonl) from the end
of step 1 to the end of the last step; TRL's is the same span from a callback's ``on_step_end``
clock. Evaluation, checkpoints and logging are off on both sides (gvpo evaluates one prompt before
step 1 and after the last step, outside the timed span).

Both sides run with the same ``OMP_WAIT_POLICY`` (``--omp-wait-policy``, default passive: on these
shared cores OpenMP's default spinning made 2-thread steps about 8x slower for both).

TRL runs in two settings: ``trl`` with ``gradient_checkpointing=False`` (the same work as gvpo,
which does not checkpoint by default) and ``trl-gc`` with GRPOConfig's own default
``gradient_checkpointing=True`` (less memory, more time). Ratios are gvpo / TRL.

    python bench/vs_trl.py                         # 1m and 34m, 20 steps, 2 rounds
    python bench/vs_trl.py --models 1m --steps 10 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models  # noqa: E402

GOALS = {"1m": 1.5, "34m": 1.2}
"""Completions/s ratio gvpo / TRL asked for (issue 5), at no more peak memory."""
REFERENCE = {"1m": (250, 0.53), "34m": (17, 1.43)}
"""TRL 1.16 measured here earlier (DESIGN.md): completions/s, peak GiB."""


def prompt_rows(steps: int, prompts: int, seed: int) -> list[dict]:
    """The rows gvpo trains on, step by step, in order (what TRL gets as an unshuffled dataset)."""
    from gvpo.samplers import step_rows
    from gvpo.tasks import get_task

    task = get_task("arithmetic")
    return [row for step in range(steps) for _, row in step_rows(task.train, step, prompts, seed)]


# ----------------------------------------------------------------------------------------------
# children


def gvpo_child(spec: dict) -> dict:
    from gvpo.config import load_config
    from gvpo.trainer import train

    config = load_config(overrides={
        "model.name_or_path": spec["model"], "model.dtype": "float32", "task.name": "arithmetic",
        "rollout.k": spec["k"], "rollout.max_new_tokens": spec["tokens"],
        "train.prompts_per_step": spec["prompts"], "train.max_steps": spec["steps"], "train.seed": spec["seed"],
        "train.micro_batch_size": 0, "train.eval_every": 0, "train.eval_n": 1, "train.checkpoint_every": 0,
        "objective.name": "gvpo", "objective.beta": spec["beta"], "optim.lr": spec["lr"],
        "output.dir": spec["out_dir"], "output.name": "gvpo", "output.report_to": [],
        "output.plots": False, "output.progress": False,
    })
    run_dir = train(config)
    peak = _models.peak_rss_bytes()
    ss = _models.steady_state(_models.read_metrics(run_dir))
    return {"seconds": ss["seconds"], "steps": ss["steps"], "completions": ss["completions"], "peak_rss": peak,
            "mean_completion_len": statistics.mean(r["completion_len"] for r in ss["rows"])}


def trl_child(spec: dict) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gvpo.rewards.basic import exact_match

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.logs = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    def exact_match_reward(prompts, completions, answer, **_):
        return exact_match(prompts, completions, answer=answer)

    rows = prompt_rows(spec["steps"], spec["prompts"], spec["seed"])
    per_step = spec["prompts"] * spec["k"]
    args = GRPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, bf16=False, fp16=False, seed=spec["seed"],
        per_device_train_batch_size=per_step, gradient_accumulation_steps=1, num_generations=spec["k"],
        max_completion_length=spec["tokens"], beta=spec["beta"], learning_rate=spec["lr"], max_steps=spec["steps"],
        gradient_checkpointing=spec["gradient_checkpointing"], shuffle_dataset=False,
        temperature=1.0, top_p=1.0, top_k=0, max_grad_norm=1.0,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, model_init_kwargs={"dtype": "float32"},
    )
    clock = StepClock()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=exact_match_reward, args=args,
                          train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(spec["model"]), callbacks=[clock])
    trainer.train()
    peak = _models.peak_rss_bytes()
    lengths = [float(log["completions/mean_length"]) for log in clock.logs if "completions/mean_length" in log]
    if len(clock.ends) < 2:
        raise RuntimeError(f"TRL ran {len(clock.ends)} steps; need at least 2")
    return {"seconds": clock.ends[-1] - clock.ends[0], "steps": len(clock.ends) - 1,
            "completions": per_step * (len(clock.ends) - 1), "peak_rss": peak,
            "mean_completion_len": statistics.mean(lengths) if lengths else float("nan"),  # the end-of-run log
            "trl_version": trl.__version__}


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    before = _models.load_average()
    out = gvpo_child(spec) if spec["side"] == "gvpo" else trl_child(spec)
    _models.report({**out, "load_before": before, "load_after": _models.load_average()})


# ----------------------------------------------------------------------------------------------
# parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", default="1m,34m", help="comma-separated presets (1m, 30m, 34m); default 1m,34m")
    p.add_argument("--steps", type=int, default=20, help="steps per run; the first is not timed (default 20)")
    p.add_argument("--rounds", type=int, default=2,
                   help="repeat every run this many times, alternating the order; report the best (default 2)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
    p.add_argument("--k", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--tokens", type=int, default=8, help="completion length in tokens (default 8)")
    p.add_argument("--beta", type=float, default=0.04, help="TRL beta and gvpo objective.beta (default 0.04)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate of both (default 1e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    p.add_argument("--trl", default="trl,trl-gc",
                   help="TRL settings to run: trl (no gradient checkpointing, as gvpo), trl-gc (GRPOConfig's "
                        "default gradient checkpointing); default both")
    p.add_argument("--natural-eos", action="store_true",
                   help="let completions end at EOS (default: EOS unreachable, exactly --tokens tokens)")
    parsed = _models.parse_args(p, argv, child)
    if parsed is None:
        return 0
    args, omp = parsed
    import importlib.metadata as md

    sides = ["gvpo"] + [s.strip() for s in args.trl.split(",") if s.strip()]
    print(f"TRL {md.version('trl')}, transformers {md.version('transformers')}, torch {md.version('torch')}; "
          f"{args.prompts} prompts x k={args.k} x {args.tokens} tokens per step, {args.steps} steps "
          f"(first not timed), beta {args.beta}, {args.threads} threads, OMP_WAIT_POLICY {omp}, "
          f"{args.rounds} round(s); load average {_models.load_average():.2f} on {os.cpu_count()} cores", flush=True)
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="gvpo-vs-trl-") as tmp:
        tmp = Path(tmp)
        for preset in [m.strip() for m in args.models.split(",") if m.strip()]:
            model = _models.make_llama(tmp / preset, preset, seed=args.seed, unreachable_eos=not args.natural_eos)
            params, _ = _models.count_params(model)
            results[preset] = {side: [] for side in sides}
            results[preset]["params"] = params
            for rnd in range(args.rounds):
                order = sides if rnd % 2 == 0 else sides[::-1]
                for side in order:
                    spec = {"side": "gvpo" if side == "gvpo" else "trl", "model": str(model), "steps": args.steps,
                            "prompts": args.prompts, "k": args.k, "tokens": args.tokens, "beta": args.beta,
                            "lr": args.lr, "seed": args.seed, "threads": args.threads,
                            "gradient_checkpointing": side == "trl-gc",
                            "out_dir": str(tmp / f"{preset}-{side}-{rnd}")}
                    r = _models.run_child(__file__, spec)
                    r["completions_per_s"] = r["completions"] / r["seconds"]
                    results[preset][side].append(r)
                    print(f"  {preset} {side:7s} round {rnd + 1}: {r['completions_per_s']:7.1f} completions/s, "
                          f"{r['seconds'] / r['steps']:.3f} s/step, peak {_models.gib(r['peak_rss']):.2f} GiB, "
                          f"mean length {r['mean_completion_len']:.2f}, load {r['load_before']:.1f}-"
                          f"{r['load_after']:.1f}", flush=True)

    print("\nbest round of each (completions/s; peak RSS of that round); ratios gvpo / TRL")
    header = ("model", "params", "run", "compl/s", "s/step", "peak GiB", "speed ratio", "memory ratio", "goal")
    table, summary = [], {}
    for preset, runs in results.items():
        best = {side: max(runs[side], key=lambda r: r["completions_per_s"]) for side in sides}
        g = best["gvpo"]
        for side in sides:
            b = best[side]
            speed = g["completions_per_s"] / b["completions_per_s"]
            mem = g["peak_rss"] / b["peak_rss"]
            goal = ""
            if side == "trl" and preset in GOALS:
                ok = speed >= GOALS[preset] and mem <= 1.0
                goal = f">= {GOALS[preset]}x, mem <= 1: {'met' if ok else 'NOT met'}"
            table.append((preset, f"{runs['params'] / 1e6:.2f}M", side, f"{b['completions_per_s']:.1f}",
                          f"{b['seconds'] / b['steps']:.3f}", f"{_models.gib(b['peak_rss']):.2f}",
                          "" if side == "gvpo" else f"{speed:.2f}x", "" if side == "gvpo" else f"{mem:.2f}", goal))
            summary.setdefault(preset, {})[side] = {"completions_per_s": b["completions_per_s"],
                                                    "peak_rss": b["peak_rss"], "speed_ratio": speed,
                                                    "memory_ratio": mem}
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    refs = ", ".join(f"{m}: {c} completions/s, {g} GiB" for m, (c, g) in REFERENCE.items())
    print(f"\nreference (DESIGN.md, TRL 1.16, measured here earlier): {refs}")
    if args.json:
        Path(args.json).write_text(json.dumps({"omp_wait_policy": omp, "load_end": _models.load_average(),
                                               "args": vars(args), "runs": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
