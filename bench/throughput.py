"""Throughput of ``gvpo.trainer.train``: steps/s, completions/s, peak RSS and model-FLOPs utilisation.

Each configuration runs ``train`` in its own subprocess (so peak RSS is that run's alone) for
``--steps`` steps; the first step is a warm-up and is not timed: times are ``time_s`` differences in
``metrics.jsonl`` between the end of step 1 and the end of the last step, which leave out the
start-up, the evaluations at the start and the end and the final save.

MFU = model FLOPs of the timed steps / their wall time / a float32 matmul peak measured in this run
(``torch.matmul`` of ``--peak-n`` square matrices on ``--threads`` threads, best of a few seconds, in
a child process like the runs, before and after them; the higher is the roofline). Model FLOPs per token, with ``N`` the
parameters that take part in matmuls (all but the input embedding) and attention scores ignored:
2N for each forward (generation, the fixed reference's scoring) and 6N for each forward+backward
(the update). Tokens are the ones computed, padding not counted: each group's prompt once (prefix
sharing, ``train.share_prompts``, the default; every row's with ``--no-share-prompts``) + every completion.

    python bench/throughput.py                      # the default model and a ~30M Llama, 10 steps
    python bench/throughput.py --models 30m --steps 5 --prompts 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models  # noqa: E402


# ----------------------------------------------------------------------------------------------
# child: one training run


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    from gvpo.config import load_config
    from gvpo.model.loading import load_tokenizer, resolve_model_path
    from gvpo.samplers import step_rows
    from gvpo.tasks import get_task
    from gvpo.trainer import train

    load_before = _models.load_average()
    overrides = {
        "model.name_or_path": spec["model"], "model.dtype": "float32",
        "task.name": spec["task"],
        "rollout.k": spec["k"], "rollout.max_new_tokens": spec["max_new_tokens"],
        "train.max_steps": spec["steps"], "train.prompts_per_step": spec["prompts"],
        "train.micro_batch_size": spec["micro_batch_size"], "train.seed": spec["seed"],
        "train.share_prompts": spec["share_prompts"],
        "train.eval_every": 0, "train.eval_n": 1, "train.checkpoint_every": 0,
        "objective.name": spec["objective"], "objective.reference": spec["reference"],
        "output.dir": spec["out_dir"], "output.name": "run",
        "output.report_to": [], "output.plots": False, "output.progress": False,
    }
    config = load_config(overrides=overrides)
    run_dir = train(config)
    peak = _models.peak_rss_bytes()
    ss = _models.steady_state(_models.read_metrics(run_dir))

    # tokens of the timed steps: real prompt tokens (as encode_prompts sees them) + completion tokens
    tokenizer = load_tokenizer(resolve_model_path(spec["model"]))
    task = get_task(spec["task"])
    tokens = 0.0
    for row in ss["rows"]:
        rows = step_rows(task.train, row["step"] - 1, spec["prompts"], spec["seed"])
        prompt_lens = tokenizer([r["prompt"] for _, r in rows], add_special_tokens=True)["attention_mask"]
        # prefix sharing runs each group's prompt once; without it every completion repeats its prompt
        tokens += (1 if spec["share_prompts"] else spec["k"]) * sum(map(sum, prompt_lens))
    completion_tokens = sum(r["completion_len"] * (r["completions_trained"] - prev["completions_trained"])
                            for prev, r in zip([_first_row(run_dir)] + ss["rows"][:-1], ss["rows"]))
    tokens += completion_tokens
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(spec["model"]))
    n_matmul, n_all = _models.matmul_params(model), sum(p.numel() for p in model.parameters())
    passes = 2  # generation
    passes += 2 if spec["reference"] == "fixed" else 0  # reference scoring
    passes += 6  # update: one forward + backward (micro_batch_size 0: the same forward gives the statistics)
    if spec["micro_batch_size"]:
        passes += 2  # statistics forward over all rows before the micro-batched backward
    report = {
        "params": n_all, "matmul_params": n_matmul, "seconds": ss["seconds"], "steps": ss["steps"],
        "completions": ss["completions"], "tokens": tokens, "completion_tokens": completion_tokens,
        "flops": passes * n_matmul * tokens, "peak_rss": peak,
        "mean_completion_len": sum(r["completion_len"] for r in ss["rows"]) / len(ss["rows"]),
        "load_before": load_before, "load_after": _models.load_average(),
    }
    _models.report(report)


def _first_row(run_dir) -> dict:
    return next(r for r in _models.read_metrics(run_dir) if r.get("step") == 1)


# ----------------------------------------------------------------------------------------------
# parent


def model_specs(names: list[str], tmp: Path) -> list[tuple[str, str, str]]:
    """``(label, model path or 'default', note)`` per requested model."""
    out = []
    for name in names:
        if name == "default":
            from gvpo.tasks.arithmetic import default_model_path

            if (default_model_path() / "config.json").exists():
                out.append(("default", "default", "embedded arithmetic model"))
            else:
                path = _models.make_llama(tmp / "standin-1m", "1m")
                out.append(("default*", str(path), "STAND-IN: untrained 1m Llama of the same shape "
                            "(src/gvpo/assets/arithmetic-llama not there yet)"))
        elif name in _models.PRESETS:
            out.append((name, str(_models.make_llama(tmp / name, name)), f"random {name} Llama, char tokenizer"))
        else:
            out.append((Path(name).name, name, "model folder"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", default="default,30m",
                   help="comma-separated: 'default' (embedded model), a preset (1m, 30m, 34m) or a model folder")
    p.add_argument("--task", default="arithmetic", help="task name (default arithmetic)")
    p.add_argument("--steps", type=int, default=10, help="training steps per run; the first is not timed (default 10)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step, train.prompts_per_step (default 16)")
    p.add_argument("--k", type=int, default=8, help="completions per prompt, rollout.k (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="completion length limit, rollout.max_new_tokens; 0 = the task's (5 for arithmetic)")
    p.add_argument("--micro-batch-size", type=int, default=0, help="train.micro_batch_size (default 0 = whole batch)")
    p.add_argument("--objective", default="gvpo", help="objective.name (default gvpo)")
    p.add_argument("--reference", default="fixed", choices=["fixed", "rollout"], help="objective.reference")
    p.add_argument("--no-share-prompts", action="store_true",
                   help="train.share_prompts=false: every completion runs its prompt again (counted in the FLOPs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in every run and the matmul peak (default 2)")
    p.add_argument("--peak-n", type=int, default=2048, help="matrix size of the matmul peak (default 2048)")
    parsed = _models.parse_args(p, argv, child)
    if parsed is None:
        return 0
    args, omp = parsed

    peak_before = _models.measure_peak(n=args.peak_n, threads=args.threads)
    print(f"float32 matmul peak ({args.peak_n}^2, {args.threads} threads): {peak_before / 1e9:.0f} GFLOP/s; "
          f"load average {_models.load_average():.2f} on {os.cpu_count()} cores; OMP_WAIT_POLICY {omp}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="gvpo-bench-") as tmp:
        tmp = Path(tmp)
        for label, path, note in model_specs([m.strip() for m in args.models.split(",") if m.strip()], tmp):
            spec = {"model": path, "task": args.task, "steps": args.steps, "prompts": args.prompts, "k": args.k,
                    "max_new_tokens": args.max_new_tokens, "micro_batch_size": args.micro_batch_size,
                    "objective": args.objective, "reference": args.reference, "seed": args.seed,
                    "threads": args.threads, "share_prompts": not args.no_share_prompts,
                    "out_dir": str(tmp / f"runs-{label}")}
            print(f"running {label} ({note}) ...", flush=True)
            r = _models.run_child(__file__, spec)
            results.append({"label": label, "note": note, **r})
    peak_after = _models.measure_peak(n=args.peak_n, threads=args.threads)
    peak = max(peak_before, peak_after)

    print(f"\nfloat32 matmul peak: {peak_before / 1e9:.0f} GFLOP/s before, {peak_after / 1e9:.0f} after; "
          f"MFU against {peak / 1e9:.0f}")
    print(f"{args.prompts} prompts x k={args.k} per step, {args.steps} steps (first not timed), "
          f"max_new_tokens={args.max_new_tokens or 'task default'}, objective {args.objective}, "
          f"reference {args.reference}, {args.threads} threads, OMP_WAIT_POLICY {omp}\n")
    header = ("model", "params", "steps/s", "s/step", "compl/s", "mean len", "peak RSS GiB", "GFLOP/step",
              "GFLOP/s", "MFU", "load")
    rows = []
    for r in results:
        sps = r["steps"] / r["seconds"]
        rows.append((r["label"], f"{r['params'] / 1e6:.2f}M", f"{sps:.3f}", f"{1 / sps:.3f}",
                     f"{r['completions'] / r['seconds']:.1f}", f"{r['mean_completion_len']:.2f}",
                     f"{_models.gib(r['peak_rss']):.2f}", f"{r['flops'] / r['steps'] / 1e9:.2f}",
                     f"{r['flops'] / r['seconds'] / 1e9:.1f}", f"{100 * r['flops'] / r['seconds'] / peak:.1f}%",
                     f"{r['load_before']:.1f}-{r['load_after']:.1f}"))
        r.update(steps_per_s=sps, completions_per_s=r["completions"] / r["seconds"],
                 mfu=r["flops"] / r["seconds"] / peak)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for r in results:
        if r["label"].endswith("*"):
            print(f"* {r['note']}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "omp_wait_policy": omp, "load_end": _models.load_average(), "peak_flops": peak,
            "peak_before": peak_before, "peak_after": peak_after, "args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
