"""Peak resident memory of a whole ``gvpo train`` command next to TRL 1.16's ``GRPOTrainer`` on the same
model and batch shape (issue 23: a regression of half the peak went unnoticed; run this at every change
that touches the trainer and record the numbers in bench/README.md, section "`memory.py`").

gvpo runs the command a user types, ``python -m gvpo.cli train ...`` (issue 23's settings: the arithmetic
task, k=8 completions of at most 8 tokens for 4 prompts per step, beta 0.04, float32, evaluation of one
prompt at the start and the end, the final checkpoint, ``final/``, ``plots.png`` and the TensorBoard
tracker, as by default). TRL runs ``bench/vs_trl.py``'s TRL child (same prompts in the same order, its
``beta`` 0.04, no gradient checkpointing, no logging or saving). Every run is a fresh process and its peak
RSS is the kernel's ``ru_maxrss`` of that process (``os.wait4``), as ``/usr/bin/time -f %M`` reports it.
Models: ``_models.PRESETS`` Llamas with the character tokenizer, random init: ``1m`` has the embedded
default model's shape (1.07M parameters), ``34m`` issue 23's (33.7M; its embeddings are untied, the issue's
were tied: 0.05M parameters, under 1 MiB with AdamW state). Both sides use the same saved folder, whose EOS
is unreachable (``_models.NEVER_EOS``), so both generate exactly ``--tokens`` tokens per completion
(``--natural-eos``: the usual EOS).

    python bench/memory.py                       # 1m and 34m, 12 steps, 2 rounds (2.5 minutes at load 3-5)
    python bench/memory.py --models 34m --rounds 1

Prints each run's peak and, per model, the larger of the rounds, the ratio gvpo / TRL and the goal (issue 23:
below TRL, and at most 1300 MiB at 34m). Run it under ``flock /tmp/gvpo-heavy.lock`` on a shared machine
(peak RSS barely depends on load; time does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _models

HERE = Path(__file__).resolve().parent
MiB = 2**20
GOALS = {"34m": 1300 * MiB}
"""Peak RSS at most this (issue 23), besides staying below TRL's for every model."""


def gvpo_command(model: Path, out: Path, args) -> list[str]:
    """Issue 23's command line (``--steps`` steps), run as a user would."""
    return [sys.executable, "-m", "gvpo.cli", "train", "--output-dir", str(out), f"model.name_or_path={model}",
            "task.name=arithmetic", f"rollout.k={args.k}", f"rollout.max_new_tokens={args.tokens}",
            f"train.prompts_per_step={args.prompts}", f"objective.beta={args.beta}", "model.dtype=float32",
            "train.eval_every=0", "train.eval_n=1", "train.checkpoint_every=0", f"train.max_steps={args.steps}",
            "output.progress=false"]


def trl_command(model: Path, out: Path, args) -> list[str]:
    """``vs_trl.py``'s TRL child with the same shapes."""
    spec = {"side": "trl", "model": str(model), "steps": args.steps, "prompts": args.prompts, "k": args.k,
            "tokens": args.tokens, "beta": args.beta, "lr": 1e-4, "seed": 0, "threads": args.threads,
            "device": "cpu", "dtype": "float32", "gradient_checkpointing": False, "out_dir": str(out)}
    return [sys.executable, str(HERE / "vs_trl.py"), "--child", json.dumps(spec)]


def peak_rss(cmd: list[str], log: Path) -> int:
    """Run ``cmd`` to its end; its peak RSS in bytes (``ru_maxrss`` of that process, KiB on Linux)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_models.child_env())
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd[:6])} ...\n{log.read_text()[-4000:]}")
    return usage.ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", default="1m,34m", help="comma-separated presets of _models.PRESETS (default 1m,34m)")
    p.add_argument("--steps", type=int, default=12, help="training steps per run (default 12, as issue 23)")
    p.add_argument("--rounds", type=int, default=2, help="runs per side and model, alternating the order")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--threads", type=int, default=2, help="TRL child's torch threads (gvpo: torch's default)")
    p.add_argument("--natural-eos", action="store_true", help="let completions end at EOS (default: exactly --tokens)")
    parsed = _models.parse_args(p, argv, child=lambda spec: sys.exit("bench/memory.py has no child mode"))
    if parsed is None:
        return 0
    args, omp = parsed
    print(f"peak RSS, {args.prompts} prompts x k={args.k} x {args.tokens} tokens, {args.steps} steps, "
          f"OMP_WAIT_POLICY {omp}; load average {_models.load_average():.2f} on {os.cpu_count()} cores", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="gvpo-memory-") as tmp:
        tmp = Path(tmp)
        for preset in [m.strip() for m in args.models.split(",") if m.strip()]:
            model = _models.make_model(tmp / preset, preset, unreachable_eos=not args.natural_eos)
            runs = {"gvpo": [], "trl": []}
            for rnd in range(args.rounds):
                for side in ("gvpo", "trl") if rnd % 2 == 0 else ("trl", "gvpo"):
                    out = tmp / f"{preset}-{side}-{rnd}"
                    command = gvpo_command if side == "gvpo" else trl_command
                    load = _models.load_average()
                    peak = peak_rss(command(model, out, args), tmp / f"{preset}-{side}-{rnd}.log")
                    runs[side].append(peak)
                    print(f"  {preset} {side:4s} round {rnd + 1}: peak RSS {peak / MiB:7.0f} MiB (load {load:.1f})",
                          flush=True)
            results[preset] = {side: max(peaks) for side, peaks in runs.items()}
    print("\nmodel  gvpo MiB  TRL MiB  gvpo / TRL  goal   (the larger of the rounds)")
    for preset, r in results.items():
        limit = min(r["trl"], GOALS.get(preset, r["trl"]))
        print(f"{preset:5s}  {r['gvpo'] / MiB:8.0f}  {r['trl'] / MiB:7.0f}  {r['gvpo'] / r['trl']:10.2f}  "
              f"{'met' if r['gvpo'] <= limit else 'NOT met'} (<= {limit / MiB:.0f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "omp_wait_policy": omp, "peak_rss": results,
                                               "load_end": _models.load_average()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
