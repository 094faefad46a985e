"""Offline GVPO on real rated data: the ``configs/qwen25-math-rm8-offline.yaml`` recipe on 80 of the
100 rm8 prompts, scored on those 80 and on the 20 held out (``--preset gsm8k_model_solutions``: the
gsm8k recipe, likewise 80/20 of the prompts used).

Steps: split the file by prompt (``--held-out``, default 20%, seeded) into ``<out>/data/{train,held_out}.jsonl``;
build the tokenizer + random-init Llama from the *training* split only (``<out>/model``, reused when
present; ``--model-dir`` to use another), so nothing about the held-out prompts reaches the model;
train with the recipe (``--epochs`` over the 80 groups); then score both splits with
``implicit_reward_correlation`` (final policy against the initial = reference model) and print:

* within-group Pearson correlation of ``beta * log(pi_theta/pi_ref)`` with the RM scores, next to
  its ceiling (repeated responses with different scores cap it) and to two baselines: the reference
  model's own ``log pi_ref`` and the completion length;
* the GVPO loss (Eq. 16) on all training groups before and after, the per-epoch mean of the logged
  per-step loss, and what ``on_too_long=skip`` dropped;
* wall times of each stage. Results also go to ``<out>/results.json``.

The trainer runs single-threaded by default (``--threads``): on a busy 2-core machine one thread was
2-3x faster than two for this model size.

    python bench/offline_real.py                     # rm8: about 20 min on 2 busy CPU cores
    python bench/offline_real.py --epochs 2 --out /tmp/quick
    python bench/offline_real.py --preset gsm8k_model_solutions      # about 10 min

Recorded (this machine: 2 CPU cores shared with other jobs, torch 2.13 CPU, one thread; defaults,
split seed 0; deterministic, a second run gave the same numbers)::

    rm8   (79 train groups, 20 held out; max_new_tokens 768 skipped 16 train completions = 1 group,
           and 2 held-out completions; 1185 steps = 30 epochs, beta 0.1, lr 3e-4 cosine)
                  corr  ceiling  ref-logp  loss@ref    loss
      train     0.9695   0.9876    0.0258   0.25361  0.00042
      held-out  0.0287   0.9996   -0.0865   0.05110  0.07609
      per-epoch mean step loss 0.245 0.223 0.142 0.128 0.095 ... 0.0026 0.0024 0.0015 0.0005 0.0009
                               0.0002 0.0007 0.0002 0.0006
      times: step 1 with reference log-probs 100 s, 0.9 s/step after, train 1188 s, scoring 26 s
      (since then the reference log-probs of the 624 training completions are scored in chunks of similar
       length with shared prompts: 6.0 s against 23.7 s for the former single padded batch, same
       model, same run, idle machine, 1 thread: 3.9x; they agree to 1.4e-6. A 1-epoch run's step 1
       now takes 6.6 s.)

    gsm8k (240 train groups, 124 with mixed correctness; 60 held out, 33 mixed; nothing skipped at
           400; 900 steps = 15 epochs)
      train     0.9997   1.0000    0.0035   0.07101  0.00009
      held-out  0.1649   1.0000   -0.3114   0.07708  0.08548
      times: step 1 with reference log-probs 33 s, 0.6 s/step after, train 559 s, scoring 23 s

On the training groups the loss falls to 0.17% (rm8) and 0.13% (gsm8k) of its value at pi_ref and
the implicit rewards line up with the given rewards. 8 of the 79 rm8 groups stay below 0.9: three
at their ceiling (MATH idx 9, 46, 69: copies of one response scored differently cap them at 0.76,
0.68, 0.84), four with reward std 0.015-0.03 not yet fitted that finely (0.69-0.90), and idx 5 (std
0.13) at 0.88; every other group with std >= 0.035 reaches 0.93 or more. The random-init
model learns nothing that transfers: held-out correlations are at chance (rm8 per-group values range
-0.55..0.64 over 20 groups; gsm8k 0.16 over 33 groups of 4, within about 1.5 standard errors of 0)
and the held-out loss rises above its value at pi_ref.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import gvpo.offline_model as bom  # noqa: E402


RECIPES = {"qwen25_math_rm8": "qwen25-math-rm8-offline.yaml", "gsm8k_model_solutions": "gsm8k-solutions-offline.yaml"}


def epoch_means(values: list[float], steps_per_epoch: int) -> list[float]:
    return [sum(chunk) / len(chunk) for chunk in
            (values[i : i + steps_per_epoch] for i in range(0, len(values), steps_per_epoch)) if chunk]


def fmt(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen25_math_rm8", choices=sorted(RECIPES),
                   help="which file and recipe (default qwen25_math_rm8)")
    p.add_argument("--config", default=None, help="recipe (default: configs/<the preset's recipe>)")
    p.add_argument("--data", default=None, help="the file (default: the preset's file in tests/data)")
    p.add_argument("--limit", type=int, default=None, help="use only the file's first N prompts")
    p.add_argument("--out", default=None, help="work folder (splits, model, run, results); "
                                               "default runs/bench-offline-real-<preset>")
    p.add_argument("--model-dir", default=None, help="use this built model instead of <out>/model")
    p.add_argument("--held-out", type=int, default=None, help="prompts held out (default 20%% of those used)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=None,
                   help="passes over the training groups (default: the recipe's, train.max_steps x "
                        "prompts_per_step / prompts in the file: 30 for rm8, 15 for gsm8k)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. objective.beta=1 optim.lr=1e-4)")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from gvpo.config import load_config
    from gvpo.run.metrics import read_metrics
    from gvpo.trainer import train
    from transformers import AutoTokenizer

    times = {}
    args.config = args.config or str(REPO / "configs" / RECIPES[args.preset])
    out = Path(args.out or f"runs/bench-offline-real-{args.preset}")
    data = Path(args.data) if args.data else REPO / "tests" / "data" / Path(*bom.DEFAULT_FILES[args.preset])
    n_lines = sum(1 for ln in data.read_text(encoding="utf-8").splitlines() if ln.strip())
    used = min(args.limit or n_lines, n_lines)
    held_out = args.held_out if args.held_out is not None else round(0.2 * used)
    train_path, held_path = bom.split_offline_file(data, out / "data", held_out=held_out, seed=args.split_seed,
                                                   limit=used)
    base = load_config(args.config, args.overrides)
    preset = base.sampler.offline_preset

    model_dir = Path(args.model_dir) if args.model_dir else out / "model"
    t = time.perf_counter()
    if not (model_dir / "model.safetensors").exists():
        print(f"building {model_dir} from {train_path}", flush=True)
        bom.build_offline_model(train_path, model_dir, preset=preset)
    times["build_model_s"] = time.perf_counter() - t
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_new = base.rollout.max_new_tokens
    raw_train = bom.load_groups(train_path, preset)
    train_groups = bom.load_groups(train_path, preset, tokenizer, max_new)
    held_groups = bom.load_groups(held_path, preset, tokenizer, max_new)
    skipped = {"train_completions": sum(g.k for g in raw_train) - sum(g.k for g in train_groups),
               "train_groups": len(raw_train) - len(train_groups),
               "held_out_completions": sum(g.k for g in bom.load_groups(held_path, preset)) - sum(g.k for g in held_groups)}
    per_step = base.train.prompts_per_step
    steps_per_epoch = math.ceil(len(train_groups) / per_step)
    if args.epochs is None:
        args.epochs = round(base.train.max_steps * per_step / n_lines, 1)
    steps = max(1, round(args.epochs * len(train_groups) / per_step))
    overrides = {"model.name_or_path": str(model_dir), "sampler.offline_path": str(train_path),
                 "train.max_steps": steps, "output.dir": str(out), "output.name": "run", "output.progress": False,
                 "train.checkpoint_every": 0}
    config = load_config(args.config, [*args.overrides, *(f"{k}={v}" for k, v in overrides.items())])
    beta = config.objective.beta
    run_dir = out / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    print(f"training {steps} steps ({args.epochs:g} epochs of {len(train_groups)} groups, {per_step} per step), "
          f"beta={beta}, lr={config.optim.lr}, threads={torch.get_num_threads()}", flush=True)
    t = time.perf_counter()
    train(config)
    times["train_s"] = time.perf_counter() - t
    rows = read_metrics(run_dir / "metrics.jsonl")
    step_rows = [r for r in rows if "loss" in r]
    # the one-time reference log-probs of every training completion are computed inside step 1
    times["step1_with_reference_logps_s"] = step_rows[0]["time_s"]
    times["steps_after_first_s"] = step_rows[-1]["time_s"] - step_rows[0]["time_s"]
    times["s_per_step"] = times["steps_after_first_s"] / max(len(step_rows) - 1, 1)

    t = time.perf_counter()
    result_train = bom.implicit_reward_correlation(run_dir / "final", model_dir, train_groups, beta)
    result_held = bom.implicit_reward_correlation(run_dir / "final", model_dir, held_groups, beta)
    times["score_s"] = time.perf_counter() - t
    ceiling_train, ceiling_held = bom.attainable_correlation(train_groups), bom.attainable_correlation(held_groups)
    losses = [r["loss"] for r in step_rows]
    results = {
        "preset": args.preset, "config": str(args.config), "overrides": args.overrides, "prompts_used": used, "beta": beta, "lr": config.optim.lr,
        "steps": steps, "epochs": args.epochs, "prompts_per_step": per_step, "threads": torch.get_num_threads(),
        "max_new_tokens": max_new, "model": json.loads((model_dir / "build_info.json").read_text())
        if (model_dir / "build_info.json").exists() else str(model_dir),
        "groups": {"train": len(train_groups), "held_out": len(held_groups)}, "skipped": skipped,
        "train": {**result_train, "ceiling": ceiling_train},
        "held_out": {**result_held, "ceiling": ceiling_held},
        "loss_per_epoch": epoch_means(losses, steps_per_epoch),
        "logged_corr_last_epoch": sum(r["implicit_reward_corr"] for r in step_rows[-steps_per_epoch:]
                                      if r.get("implicit_reward_corr") is not None) / max(1, min(steps_per_epoch, len(step_rows))),
        "times": times,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    print(f"\ngroups: train {len(train_groups)}, held-out {len(held_groups)}; on_too_long=skip dropped "
          f"{skipped['train_completions']} train completions ({skipped['train_groups']} groups) and "
          f"{skipped['held_out_completions']} held-out completions at max_new_tokens={max_new}")
    print(f"{'':10} {'corr':>8} {'ceiling':>8} {'ref logp':>9} {'length':>8} {'loss@ref':>9} {'loss':>9}")
    for name, r, c in (("train", result_train, ceiling_train), ("held-out", result_held, ceiling_held)):
        print(f"{name:10} {fmt(r['corr']):>8} {fmt(c['corr']):>8} {fmt(r['ref_logp_corr']):>9} "
              f"{fmt(r['length_corr']):>8} {r['loss_at_reference']:>9.5f} {r['loss']:>9.5f}")
    print("  corr = within-group Pearson(beta*log(pi/pi_ref), reward), mean over groups whose rewards vary "
          f"({result_train['groups_scored']} train, {result_held['groups_scored']} held-out); ceiling = best any "
          "policy can reach; ref logp = Pearson(log pi_ref, reward) (the untrained model); "
          "length = Pearson(implicit reward, completion length)")
    print(f"train loss floor (repeated texts): {ceiling_train['loss_floor']:.2e}")
    print("per-step loss, mean per epoch:", " ".join(f"{x:.5f}" for x in results["loss_per_epoch"]))
    print("times (s):", ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    print(f"results: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
