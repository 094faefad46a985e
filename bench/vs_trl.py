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

GPU mode (``--gpu``, what ``scripts/gpu_check.sh`` runs): the Qwen2-shaped 0.5B model (``_models.
QWEN2_PRESETS``, random init, Qwen2's 151,936-token vocabulary), bf16 weights on both sides (gvpo
``model.dtype: bfloat16``; TRL ``bf16=True`` with the model loaded in bf16), 8 prompts x k=8 x 128 tokens,
10 steps, 1 round, TRL without gradient checkpointing; memory is the peak of
``torch.cuda.max_memory_allocated`` in each run's process. ``--cpu-dry-run`` runs the same path on the
CPU with ``qwen2-tiny`` and 3 steps of 8 tokens, to show the script works before a GPU is available
(its numbers mean nothing).

SmolLM2 mode (``--smollm2``, issue 19): the real chat model SmolLM2-135M-Instruct (134.5M parameters, 30 layers,
49,152-token vocabulary, float32), from ``--model-path`` or ``$GVPO_SMOLLM2``: the folder that
``gvpo model get smollm2-135m-instruct`` prints. Both sides train on the chat prompts of ``_chat_task`` ("What is
47 + 38?" through the model's ChatML template, about 40 tokens with its default system message; TRL gets the
conversations and applies the same template) with ``last_number_reward``: 4 prompts x k=8 x up to 64 new tokens
per step; completions end at the model's EOS (``<|im_end|>``) or at 64 tokens, as the model writes them (mean
about 53), 4 steps (3 timed), 3 rounds, each a gvpo/TRL pair in alternating order. It reports the median over
rounds of the within-round ratios, and peak RSS both for the whole process and before gvpo's final checkpoint
and ``final/`` save (TRL's runs here save nothing).

    python bench/vs_trl.py                         # 1m and 34m, 20 steps, 2 rounds
    python bench/vs_trl.py --smollm2 --model-path "$(gvpo model get smollm2-135m-instruct)"
    python bench/vs_trl.py --models 1m --steps 10 --rounds 1
    python bench/vs_trl.py --gpu --json out.json   # on a GPU
    python bench/vs_trl.py --gpu --cpu-dry-run     # the GPU path on a CPU, tiny model
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
import _chat_task as smol  # noqa: E402
import _models  # noqa: E402

GOALS = {"1m": 1.5, "34m": 1.2}
"""Completions/s ratio gvpo / TRL asked for (issue 5), at no more peak memory."""
REFERENCE = {"1m": (250, 0.53), "34m": (17, 1.43)}
"""TRL 1.16 measured here earlier (DESIGN.md): completions/s, peak GiB."""


def prompt_rows(steps: int, prompts: int, seed: int, task_overrides: dict | None = None) -> list[dict]:
    """The rows gvpo trains on, step by step, in order (what TRL gets as an unshuffled dataset)."""
    from gvpo.samplers import step_rows
    from gvpo.tasks import get_task

    task_overrides = task_overrides or ARITHMETIC
    task = get_task(task_overrides["task.name"], **task_overrides.get("task.options", {}))
    return [row for step in range(steps) for _, row in step_rows(task.train, step, prompts, seed)]


ARITHMETIC = {"task.name": "arithmetic"}
"""The task of the built models (``spec["task"]`` when none is given); ``smollm2`` trains on chat prompts."""


# ----------------------------------------------------------------------------------------------
# children


def gvpo_child(spec: dict) -> dict:
    from gvpo.config import load_config
    from gvpo.trainer import train

    config = load_config(overrides={
        "model.name_or_path": spec["model"], "model.dtype": spec["dtype"], **spec.get("task", ARITHMETIC),
        "rollout.k": spec["k"], "rollout.max_new_tokens": spec["tokens"],
        "train.prompts_per_step": spec["prompts"], "train.max_steps": spec["steps"], "train.seed": spec["seed"],
        "train.micro_batch_size": 0, "train.eval_every": 0, "train.eval_n": 1, "train.checkpoint_every": 0,
        "objective.name": "gvpo", "objective.beta": spec["beta"], "optim.lr": spec["lr"],
        "output.dir": spec["out_dir"], "output.name": "gvpo", "output.report_to": [],
        "output.plots": False, "output.progress": False,
    })
    before_save = peak_before_final_save()
    run_dir = train(config)
    peak = _models.peak_rss_bytes()
    ss = _models.steady_state(_models.read_metrics(run_dir))
    return {"seconds": ss["seconds"], "steps": ss["steps"], "completions": ss["completions"], "peak_rss": peak,
            "peak_rss_steps": before_save.get("peak_rss", peak), "peak_gpu": peak_gpu_bytes(),
            "mean_completion_len": statistics.mean(r["completion_len"] for r in ss["rows"])}


def peak_before_final_save() -> dict:
    """Wrap ``gvpo.trainer.finish`` (the final checkpoint and ``final/``, which TRL's runs here do not write) to note
    the process's peak RSS before it, under ``"peak_rss"`` of the returned dict."""
    import gvpo.trainer

    noted, finish = {}, gvpo.trainer.finish

    def noting(run):
        noted["peak_rss"] = _models.peak_rss_bytes()
        finish(run)

    gvpo.trainer.finish = noting
    return noted


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

    rows = prompt_rows(spec["steps"], spec["prompts"], spec["seed"], spec.get("task"))
    reward = smol.last_number_reward if spec.get("task") else exact_match_reward
    per_step = spec["prompts"] * spec["k"]
    args = GRPOConfig(
        output_dir=spec["out_dir"], use_cpu=spec["device"] == "cpu", bf16=spec["dtype"] == "bfloat16", fp16=False,
        seed=spec["seed"],
        per_device_train_batch_size=per_step, gradient_accumulation_steps=1, num_generations=spec["k"],
        max_completion_length=spec["tokens"], beta=spec["beta"], learning_rate=spec["lr"], max_steps=spec["steps"],
        gradient_checkpointing=spec["gradient_checkpointing"], shuffle_dataset=False,
        temperature=1.0, top_p=1.0, top_k=0, max_grad_norm=1.0,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, model_init_kwargs={"dtype": spec["dtype"]},
    )
    clock = StepClock()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(spec["model"]), callbacks=[clock])
    trainer.train()
    peak = _models.peak_rss_bytes()
    lengths = [float(log["completions/mean_length"]) for log in clock.logs if "completions/mean_length" in log]
    if len(clock.ends) < 2:
        raise RuntimeError(f"TRL ran {len(clock.ends)} steps; need at least 2")
    return {"seconds": clock.ends[-1] - clock.ends[0], "steps": len(clock.ends) - 1,
            "completions": per_step * (len(clock.ends) - 1), "peak_rss": peak, "peak_rss_steps": peak,
            "peak_gpu": peak_gpu_bytes(),
            "mean_completion_len": statistics.mean(lengths) if lengths else float("nan"),  # the end-of-run log
            "trl_version": trl.__version__}


def peak_gpu_bytes() -> int | None:
    """Peak of ``torch.cuda.max_memory_allocated`` in this process (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def child(spec: dict) -> None:
    if spec["device"] == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # both trainers pick CUDA when they see it
    import torch

    torch.set_num_threads(spec["threads"])
    before = _models.load_average()
    out = gvpo_child(spec) if spec["side"] == "gvpo" else trl_child(spec)
    _models.report({**out, "load_before": before, "load_after": _models.load_average()})


# ----------------------------------------------------------------------------------------------
# parent

GPU_MODE = {"models": "qwen2-0.5b", "steps": 10, "rounds": 1, "prompts": 8, "k": 8, "tokens": 128, "trl": "trl"}
"""``--gpu`` defaults; ``--cpu-dry-run`` swaps in the tiny model, 3 steps and 8 tokens."""
DRY_RUN = {"models": "qwen2-tiny", "steps": 3, "tokens": 8}


DOC_BEGIN, DOC_END = "<!-- vs_trl table: begin -->", "<!-- vs_trl table: end -->"


def table_markdown(header, table, device: str, dtype: str, args, omp: str) -> str:
    """The results as a markdown table, with what produced them."""
    import importlib.metadata as md
    import platform
    from datetime import date

    import torch

    where = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    versions = ", ".join(f"{name} {md.version(name)}" for name in ("torch", "transformers", "trl", "accelerate"))
    lines = [f"Measured {date.today()} by `bench/vs_trl.py --gpu` on {where}: {versions}, Python "
             f"{platform.python_version()}; {dtype}, {args.prompts} prompts x k={args.k} x {args.tokens} tokens per "
             f"step, {args.steps} steps (the first not timed), best of {args.rounds} round(s). Ratios are gvpo / TRL.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines)


def fill_doc(path: Path, text: str) -> None:
    """Replace what lies between ``DOC_BEGIN`` and ``DOC_END`` in ``path`` with ``text``."""
    doc = path.read_text()
    if DOC_BEGIN not in doc or DOC_END not in doc:
        raise SystemExit(f"{path}: no {DOC_BEGIN} ... {DOC_END} block to fill")
    head, rest = doc.split(DOC_BEGIN, 1)
    path.write_text(f"{head}{DOC_BEGIN}\n{text}\n{DOC_END}{rest.split(DOC_END, 1)[1]}")


def apply_gpu_mode(args, argv: list[str]) -> None:
    """Set the ``--gpu`` (and ``--cpu-dry-run``) defaults on ``args`` for every option not given in ``argv``."""
    if args.cpu_dry_run and not args.gpu:
        raise SystemExit("--cpu-dry-run goes with --gpu")
    if not args.gpu:
        return
    given = given_options(argv)
    for key, value in {**GPU_MODE, **(DRY_RUN if args.cpu_dry_run else {})}.items():
        if key not in given:
            setattr(args, key, value)



# ---- SmolLM2-135M-Instruct (issue 19) ---------------------------------------------------------

SMOLLM2 = "smollm2"
"""The ``--models`` name of the real chat model: loaded from ``--model-path`` / ``$GVPO_SMOLLM2`` (the folder
``gvpo model get smollm2-135m-instruct`` prints), trained on ``_chat_task``'s chat arithmetic prompts with
``last_number_reward``, completions ending at the model's own EOS (``<|im_end|>``) or at ``--tokens``."""
SMOLLM2_MODE = {"models": SMOLLM2, "steps": 4, "rounds": 3, "prompts": 4, "k": 8, "tokens": 64, "trl": "trl"}
"""``--smollm2`` defaults: 4 prompts x k=8 x up to 64 new tokens, 4 steps (3 timed), 3 alternating pairs."""
SMOLLM2_GOAL = (1.5, 0.8)
"""Issue 19: gvpo at least 1.5x TRL's completions/s at no more than 0.8x its peak memory."""


def paired_ratios(runs: dict, side: str, memory: str) -> dict:
    """gvpo / ``side`` speed and memory ratios of each round (the two ran back to back, in alternating order),
    and their medians: less sensitive to the load of a shared machine than ratios of separate bests."""
    pairs = list(zip(runs["gvpo"], runs[side]))
    speed = [g["completions_per_s"] / b["completions_per_s"] for g, b in pairs]
    mem = [g[memory] / b[memory] for g, b in pairs]
    steps = [g.get("peak_rss_steps", g["peak_rss"]) / b.get("peak_rss_steps", b["peak_rss"]) for g, b in pairs]
    return {"speed_ratios": speed, "memory_ratios": mem, "median_speed_ratio": statistics.median(speed),
            "median_memory_ratio": statistics.median(mem), "median_steps_memory_ratio": statistics.median(steps)}


def smollm2_goal(paired: dict) -> str:
    speed, memory = SMOLLM2_GOAL
    ok = paired["median_speed_ratio"] >= speed and paired["median_memory_ratio"] <= memory
    return f"; goal >= {speed}x at <= {memory}x memory: {'met' if ok else 'NOT met'}"


def rate(completions_per_s: float) -> str:
    """Completions/s with one decimal, or three below 10 (SmolLM2 on 2 cores makes about half a completion a second)."""
    return f"{completions_per_s:.1f}" if completions_per_s >= 10 else f"{completions_per_s:.3f}"


def given_options(argv: list[str]) -> set[str]:
    """The option names (``tokens``, ``model_path``) on a command line."""
    return {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}


def apply_smollm2_mode(args, argv: list[str]) -> None:
    """Set the ``--smollm2`` defaults on ``args`` for every option not given in ``argv``."""
    if args.smollm2:
        if args.gpu:
            raise SystemExit("--smollm2 and --gpu are separate modes; give one")
        given = given_options(argv)
        for key, value in SMOLLM2_MODE.items():
            if key not in given:
                setattr(args, key, value)


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
    p.add_argument("--gpu", action="store_true",
                   help="GPU mode: Qwen2-shaped 0.5B, bf16, 8 prompts x 8 x 128 tokens, 10 steps, 1 round, TRL "
                        "without gradient checkpointing, peak GPU memory (explicit options override these)")
    p.add_argument("--doc", help="write the results table between the vs_trl markers of this markdown file "
                                 "(docs/gpu.md's numbers table)")
    p.add_argument("--smollm2", action="store_true",
                   help="SmolLM2-135M-Instruct mode (issue 19): chat arithmetic prompts, 4 prompts x 8 x up to 64 "
                        "tokens, 4 steps, 3 alternating pairs against trl (explicit options override these)")
    p.add_argument("--model-path", help=f"the SmolLM2-135M-Instruct folder for --models {SMOLLM2} (default: "
                                        f"${smol.MODEL_ENV}; `gvpo model get smollm2-135m-instruct` prints it)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="with --gpu: the same path on the CPU with qwen2-tiny, 3 steps of 8 tokens (numbers meaningless)")
    parsed = _models.parse_args(p, argv, child)
    if parsed is None:
        return 0
    args, omp = parsed
    apply_gpu_mode(args, argv if argv is not None else sys.argv[1:])
    apply_smollm2_mode(args, argv if argv is not None else sys.argv[1:])
    device = "cuda" if args.gpu and not args.cpu_dry_run else "cpu"
    dtype = "bfloat16" if args.gpu else "float32"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device here (use --cpu-dry-run to try the path on the CPU)")
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
            task = None
            if preset == SMOLLM2:
                model, task = smol.model_path(args.model_path), smol.gvpo_task_overrides(smol.write_prompts(tmp))
            else:
                model = _models.make_model(tmp / preset, preset, seed=args.seed, unreachable_eos=not args.natural_eos)
            params, _ = _models.count_params(model)
            results[preset] = {side: [] for side in sides}
            results[preset]["params"] = params
            for rnd in range(args.rounds):
                order = sides if rnd % 2 == 0 else sides[::-1]
                for side in order:
                    spec = {"side": "gvpo" if side == "gvpo" else "trl", "model": str(model), "steps": args.steps,
                            "prompts": args.prompts, "k": args.k, "tokens": args.tokens, "beta": args.beta,
                            "lr": args.lr, "seed": args.seed, "threads": args.threads, "device": device,
                            "dtype": dtype,
                            "gradient_checkpointing": side == "trl-gc", **({"task": task} if task else {}),
                            "out_dir": str(tmp / f"{preset}-{side}-{rnd}")}
                    r = _models.run_child(__file__, spec)
                    r["completions_per_s"] = r["completions"] / r["seconds"]
                    results[preset][side].append(r)
                    gpu = f", peak GPU {_models.gib(r['peak_gpu']):.2f} GiB" if r.get("peak_gpu") else ""
                    steps_peak = (f" ({_models.gib(r['peak_rss_steps']):.2f} before the final save)"
                                  if r.get("peak_rss_steps", r["peak_rss"]) != r["peak_rss"] else "")
                    print(f"  {preset} {side:7s} round {rnd + 1}: {rate(r['completions_per_s']):>7s} completions/s, "
                          f"{r['seconds'] / r['steps']:.3f} s/step, peak RSS {_models.gib(r['peak_rss']):.2f} GiB"
                          f"{steps_peak}{gpu}, "
                          f"mean length {r['mean_completion_len']:.2f}, load {r['load_before']:.1f}-"
                          f"{r['load_after']:.1f}", flush=True)

    print("\nbest round of each (completions/s; peak RSS of that round); ratios gvpo / TRL")
    memory = "peak_gpu" if device == "cuda" else "peak_rss"
    header = ("model", "params", "run", "compl/s", "s/step", "peak GPU GiB" if device == "cuda" else "peak GiB",
              "speed ratio", "memory ratio", "goal")
    table, summary = [], {}
    for preset, runs in results.items():
        best = {side: max(runs[side], key=lambda r: r["completions_per_s"]) for side in sides}
        g = best["gvpo"]
        for side in sides:
            b = best[side]
            speed = g["completions_per_s"] / b["completions_per_s"]
            mem = g[memory] / b[memory]
            goal = ""
            if side == "trl" and preset in GOALS:
                ok = speed >= GOALS[preset] and mem <= 1.0
                goal = f">= {GOALS[preset]}x, mem <= 1: {'met' if ok else 'NOT met'}"
            table.append((preset, f"{runs['params'] / 1e6:.2f}M", side, rate(b['completions_per_s']),
                          f"{b['seconds'] / b['steps']:.3f}", f"{_models.gib(b[memory]):.2f}",
                          "" if side == "gvpo" else f"{speed:.2f}x", "" if side == "gvpo" else f"{mem:.2f}", goal))
            summary.setdefault(preset, {})[side] = {"completions_per_s": b["completions_per_s"],
                                                    "peak_rss": b["peak_rss"], "peak_gpu": b.get("peak_gpu"),
                                                    "speed_ratio": speed,
                                                    "memory_ratio": mem}
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for preset, runs in results.items():
        for side in sides[1:]:
            paired = paired_ratios(runs, side, memory)
            summary[preset][side].update(paired)
            print(f"{preset} gvpo / {side}, median over {len(paired['speed_ratios'])} round(s) of the ratio within "
                  f"each round: speed {paired['median_speed_ratio']:.2f}x, memory {paired['median_memory_ratio']:.2f} "
                  f"(before gvpo's final save: {paired['median_steps_memory_ratio']:.2f}) "
                  f"(per round: {', '.join(f'{r:.2f}' for r in paired['speed_ratios'])})"
                  + (smollm2_goal(paired) if preset == SMOLLM2 and side == "trl" else ""))
    refs = ", ".join(f"{m}: {c} completions/s, {g} GiB" for m, (c, g) in REFERENCE.items())
    print(f"\nreference (DESIGN.md, TRL 1.16, measured here earlier): {refs}")
    if args.doc:
        fill_doc(Path(args.doc), table_markdown(header, table, device, dtype, args, omp))
        print(f"table written to {args.doc}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "dtype": dtype, "omp_wait_policy": omp, "load_end": _models.load_average(),
                                               "args": vars(args), "runs": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
