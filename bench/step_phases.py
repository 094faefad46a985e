"""Where a training step's seconds and peak memory go, for gvpo and for TRL's ``GRPOTrainer``, on the runs
``vs_trl.py`` makes (same spec, same children): generation, reference forward, the update's forward, backward
and optimizer step, and the rest.

Each side runs in its own process with timers wrapped around the functions that do each phase (nothing in
gvpo or TRL is changed): for gvpo ``HFEngine.generate`` (inside it, the Gumbel noise), the trainer's
``reference_token_logps``, ``update`` (inside it, ``Accelerator.backward``, ``clip_grad_norm_`` and the optimizer
step); for TRL ``generate`` of the model class, ``_get_per_token_logps_and_entropies`` on the reference model
and on the policy, the reward call, ``Accelerator.backward`` and the optimizer step. The step is the span
between two step ends (gvpo's ``end_step`` less its evaluation; TRL's ``on_step_end``), so "other" is what no
timer covers (rewards, padding, logging). Seconds are the mean over the steps after the first.

Memory: the process's peak RSS (``VmHWM``) is read before and after every phase, and the phase during which it
rose last is named, with the high-water mark after each phase; ``--torch-profile`` adds torch.profiler's
top operators for one step (the second) of each side.

FLOPs: during the first (untimed) step every phase runs under ``torch.utils.flop_counter.FlopCounterMode``
(matmuls and attention, forward and backward, as torch counts them); each phase's GFLOP/s is that count over
the phase's mean seconds in the timed steps (whose completions differ in length a little from the first's),
shown as a share of the float32 matmul peak measured in a child process before the runs.

    python bench/step_phases.py --model-path $(gvpo model get smollm2-135m-instruct)   # smollm2, 3 steps
    python bench/step_phases.py --sides gvpo --steps 2 --tokens 64 --torch-profile
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _chat_task as smol  # noqa: E402
import _models  # noqa: E402
import vs_trl  # noqa: E402


def vm_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmHWM`` = peak RSS, ``VmRSS`` = now)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Phases:
    """Seconds per phase and step, and which phase raised the peak RSS to what."""

    def __init__(self, profile_step: int | None = None):
        self.step = 0
        self.seconds = defaultdict(lambda: defaultdict(float))  # step -> phase -> s
        self.step_end: dict[int, float] = {}
        self.excluded = defaultdict(float)  # step -> s spent outside the step proper (evaluation)
        self.peaks: list[tuple[str, int]] = []  # (phase, VmHWM KiB after it) each time it rose
        self.profile_step, self.profiler, self.table = profile_step, None, ""
        self.outside = 0  # > 0 inside an excluded phase: nested timers do not count
        self.flops = defaultdict(int)  # phase -> FLOPs counted in the first step

    def wrap(self, owner, name: str, phase, *, exclude: bool = False) -> None:
        """Time every call of ``owner.name`` as ``phase`` (a name, or a function of the call's args giving one)."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if self.outside and not exclude:
                return original(*args, **kwargs)
            label = phase(*args, **kwargs) if callable(phase) else phase
            hwm, start = vm_kib("VmHWM"), time.perf_counter()
            self.outside += exclude
            counter = FlopCounterMode(display=False) if self.step == 0 and not exclude else contextlib.nullcontext()
            try:
                with counter:
                    return original(*args, **kwargs)
            finally:
                self.outside -= exclude
                if isinstance(counter, FlopCounterMode):
                    self.flops[label] += counter.get_total_flops()
                elapsed = time.perf_counter() - start
                if exclude:
                    self.excluded[self.step] += elapsed
                else:
                    self.seconds[self.step][label] += elapsed
                after = vm_kib("VmHWM")
                if after > hwm:
                    self.peaks.append((label, after))

        setattr(owner, name, timed)

    def end_step(self) -> None:
        self.step_end[self.step] = time.perf_counter() - sum(self.excluded[s] for s in range(self.step + 1))
        self.step += 1
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            self.profiler = None
        if self.profile_step is not None and self.step == self.profile_step - 1:
            import torch.profiler

            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()

    def summary(self) -> dict:
        """Mean seconds per phase over steps 2..N (index 1..), the step time, and the peaks."""
        steps = [s for s in sorted(self.step_end) if s >= 1]
        if not steps:
            raise RuntimeError("need at least 2 steps: the first is a warm-up")
        phases = sorted({p for s in steps for p in self.seconds[s]})
        mean = {p: sum(self.seconds[s][p] for s in steps) / len(steps) for p in phases}
        step_s = (self.step_end[steps[-1]] - self.step_end[0]) / len(steps)
        return {"step_s": step_s, "phases": mean, "peaks": self.peaks, "peak_rss": _models.peak_rss_bytes(),
                "flops": dict(self.flops), "torch_profile": self.table}


def instrument_gvpo(phases: Phases) -> None:
    import accelerate
    from accelerate.optimizer import AcceleratedOptimizer

    import gvpo.trainer as trainer
    from gvpo.rollout import hf

    phases.wrap(hf.HFEngine, "generate", "generate")
    phases.wrap(hf.SeededGumbelNoise, "__call__", "generate: noise (inside generate)")
    phases.wrap(trainer, "reference_token_logps", "reference forward")
    phases.wrap(trainer, "score", "rewards")
    phases.wrap(trainer, "update", "update (all)")
    phases.wrap(accelerate.Accelerator, "backward", "update: backward")
    phases.wrap(accelerate.Accelerator, "clip_grad_norm_", "update: clip")
    phases.wrap(AcceleratedOptimizer, "step", "update: optimizer")
    phases.wrap(trainer, "evaluate_all", "evaluation", exclude=True)
    phases.wrap(trainer, "finish", "final save")
    original = trainer.end_step

    def end_step(run, row, bar):
        original(run, row, bar)
        phases.end_step()

    trainer.end_step = end_step


def instrument_trl(phases: Phases) -> None:
    import accelerate
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import GenerationMixin
    from trl import GRPOTrainer

    phases.wrap(GenerationMixin, "generate", "generate")
    phases.wrap(GRPOTrainer, "_get_per_token_logps_and_entropies",
                lambda self, model, *a, **k: "reference forward" if model is self.ref_model else "update: forward")
    phases.wrap(GRPOTrainer, "_calculate_rewards", "rewards")
    phases.wrap(accelerate.Accelerator, "backward", "update: backward")
    phases.wrap(accelerate.Accelerator, "clip_grad_norm_", "update: clip")
    phases.wrap(AcceleratedOptimizer, "step", "update: optimizer")
    original = GRPOTrainer.__init__

    def init(self, *args, callbacks=None, **kwargs):
        from transformers import TrainerCallback

        class End(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                phases.end_step()

        original(self, *args, callbacks=[*(callbacks or []), End()], **kwargs)

    GRPOTrainer.__init__ = init


def child(spec: dict) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    torch.set_num_threads(spec["threads"])
    phases = Phases(2 if spec.pop("torch_profile") else None)
    (instrument_gvpo if spec["side"] == "gvpo" else instrument_trl)(phases)
    before = _models.load_average()
    (vs_trl.gvpo_child if spec["side"] == "gvpo" else vs_trl.trl_child)(spec)
    _models.report({**phases.summary(), "load_before": before, "load_after": _models.load_average()})


def show(side: str, r: dict, peak_flops: float) -> None:
    """Print one side's seconds per phase (share of the step), "other" = what no timer covers, the GFLOP/s of each
    phase as a share of the matmul peak, and the peaks of RSS."""
    phases, step_s, flops = dict(r["phases"]), r["step_s"], dict(r["flops"])
    print(f"\n{side}: {step_s:.2f} s/step (steps after the first), peak RSS {_models.gib(r['peak_rss']):.2f} GiB, "
          f"load {r['load_before']:.1f}-{r['load_after']:.1f}")
    for values in (phases, flops):
        if "update (all)" in values:  # gvpo: the update's forward and loss = all of it less the timed parts inside
            values["update: forward and loss"] = values.pop("update (all)") - sum(
                v for p, v in values.items() if p.startswith("update:"))
    top = sum(s for p, s in phases.items() if "(inside" not in p)
    print(f"  {'phase':40s} {'s/step':>7s}  {'share':>5s}  {'GFLOP':>7s}  {'GFLOP/s':>7s}  of peak")
    for name in sorted(phases) + ["other"]:
        s = phases.get(name, step_s - top)
        f = flops.get(name, 0) / 1e9
        rate = f"{f / s:7.1f}  {100 * f / s / (peak_flops / 1e9):5.1f}%" if f and s > 0 else ""
        print(f"  {name:40s} {s:7.2f}  {100 * s / step_s:4.1f}%  {f:7.1f}  {rate}")
    total = sum(v for p, v in flops.items() if "(inside" not in p) / 1e9
    print(f"  {'step':40s} {step_s:7.2f}  100.0%  {total:7.1f}  {total / step_s:7.1f}  "
          f"{100 * total / step_s / (peak_flops / 1e9):5.1f}%   (matmul peak {peak_flops / 1e9:.0f} GFLOP/s)")
    print("  peak RSS rose during: " + ", ".join(f"{p} ({k / 2**20:.2f} GiB)" for p, k in r["peaks"][-6:]))
    if r.get("torch_profile"):
        print(r["torch_profile"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model-path", help=f"SmolLM2-135M-Instruct folder (default ${smol.MODEL_ENV})")
    p.add_argument("--sides", default="gvpo,trl", help="gvpo, trl, trl-gc (comma-separated; default gvpo,trl)")
    p.add_argument("--steps", type=int, default=3, help="steps per run; the first is not counted (default 3)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="max new tokens (default 64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torch-profile", action="store_true", help="print torch.profiler's top operators of step 2")
    parsed = _models.parse_args(p, argv, child)
    if parsed is None:
        return 0
    args, omp = parsed
    model = smol.model_path(args.model_path)
    print(f"{args.prompts} prompts x k={args.k} x up to {args.tokens} tokens, {args.steps} steps, {args.threads} "
          f"threads, OMP_WAIT_POLICY {omp}, load {_models.load_average():.2f}", flush=True)
    peak_flops = _models.measure_peak(threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="gvpo-phases-") as tmp:
        task = smol.gvpo_task_overrides(smol.write_prompts(tmp))
        for side in [s.strip() for s in args.sides.split(",") if s.strip()]:
            spec = {"side": "gvpo" if side == "gvpo" else "trl", "model": str(model), "steps": args.steps,
                    "prompts": args.prompts, "k": args.k, "tokens": args.tokens, "beta": 0.04, "lr": 1e-5, "seed": 0,
                    "threads": args.threads, "device": "cpu", "dtype": "float32", "task": task,
                    "gradient_checkpointing": side == "trl-gc", "out_dir": str(Path(tmp) / side),
                    "torch_profile": args.torch_profile}
            with contextlib.suppress(KeyboardInterrupt):
                show(side, _models.run_child(__file__, spec), peak_flops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
