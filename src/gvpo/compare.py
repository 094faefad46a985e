"""Compare objectives apples to apples: same task, seeds and sample budget, one run folder each.

``gvpo compare --config FILE --objectives gvpo,grpo,dr_grpo --seeds 3 --output-dir DIR [key=value ...]``
trains once per objective x seed with :func:`gvpo.trainer.train`. Every run starts from the same
config (defaults, then ``--config``, then the overrides); only ``objective.name`` and ``train.seed``
change, so ``train.max_steps``, ``train.prompts_per_step`` and ``rollout.k`` (the sample budget) are
shared. Seeds are ``train.seed, train.seed + 1, ...``. The output folder then holds:

- ``<objective>-seed<s>/``: each run folder (config, metrics.jsonl, checkpoints, final model);
- ``comparison.md``: one row per objective: held-out accuracy at the start and the end (mean ± std
  over seeds), final training reward, final KL estimate, samples generated, wall time, runs that
  diverged (the trainer raised :class:`gvpo.trainer.NonFiniteError`);
- ``comparison.png``: training reward, held-out accuracy and KL against completions generated, one line
  per objective (mean over seeds) with a band (min to max over seeds);
- ``comparison.json``: the same numbers per run, for scripts.

Every objective logs the same metric keys (``reward_mean``, ``eval/accuracy``, ``kl`` = mean of
``log pi_theta(y|x) - log pi_ref(y|x)`` over the batch's completions), so the curves compare like with
like. A run folder that already has a ``compare_run.json`` (a finished or diverged run) is reused, so
an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, RunConfig, load_config
from .run.metrics import read_metrics

__all__ = ["RunResult", "compare", "plot_comparison", "run_one", "summarize", "write_table"]

ACCURACY, REWARD, KL = "eval/accuracy", "reward_mean", "kl"


@dataclass
class RunResult:
    """One training run of a comparison and the numbers read from its ``metrics.jsonl``."""

    label: str
    """Objective (or other) label the run is grouped under."""
    seed: int
    run_dir: str
    wall_s: float
    """Seconds ``train`` took, model loading and evaluations included."""
    error: str | None = None
    """Why the run stopped early (non-finite loss or gradient); ``None`` when it finished."""
    rows: list = field(default_factory=list, repr=False)
    """The run's metrics rows."""

    @property
    def diverged(self) -> bool:
        return self.error is not None

    def first(self, key: str) -> float | None:
        return next((r[key] for r in self.rows if _finite(r.get(key))), None)

    def last(self, key: str) -> float | None:
        return next((r[key] for r in reversed(self.rows) if _finite(r.get(key))), None)

    @property
    def samples(self) -> int:
        return int(self.rows[-1]["samples"]) if self.rows else 0

    def summary(self) -> dict:
        return {"label": self.label, "seed": self.seed, "run_dir": self.run_dir, "wall_s": self.wall_s,
                "error": self.error, "steps": self.rows[-1]["step"] if self.rows else 0, "samples": self.samples,
                "accuracy_start": self.first(ACCURACY), "accuracy_final": None if self.diverged else self.last(ACCURACY),
                "reward_final": self.last(REWARD), "kl_final": self.last(KL)}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)


def run_one(config: RunConfig, label: str, run_dir: Path) -> RunResult:
    """Train ``config`` into ``run_dir``; a ``NonFiniteError`` is recorded, not raised.

    Reuses ``run_dir`` when its ``compare_run.json`` says it already finished (or diverged).
    """
    from .trainer import NonFiniteError, train

    run_dir = Path(run_dir)
    marker = run_dir / "compare_run.json"
    if marker.exists():
        saved = json.loads(marker.read_text())
        rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
        return RunResult(label, saved["seed"], str(run_dir), saved["wall_s"], saved.get("error"), rows)
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} holds an unfinished run; delete it (or use another output folder) to run it again")
    config.output.dir, config.output.name = str(run_dir.parent), run_dir.name
    error = None
    start = time.perf_counter()
    try:
        train(config)
    except NonFiniteError as err:
        error = f"non-finite: {err}"
    wall = time.perf_counter() - start
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    marker.write_text(json.dumps({"label": label, "seed": config.train.seed, "wall_s": wall, "error": error}))
    return RunResult(label, config.train.seed, str(run_dir), wall, error, rows)


def _mean_std(values: list[float]) -> tuple[float, float] | None:
    values = [v for v in values if _finite(v)]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(ms: tuple[float, float] | None, digits: int = 3) -> str:
    if ms is None:
        return "–"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def summarize(results: list[RunResult]) -> list[dict]:
    """Per label (in first-seen order): seeds, diverged count, and mean/std of the final numbers.

    Means of the final accuracy leave out runs that diverged (their count is reported next to them).
    """
    out = []
    for label in dict.fromkeys(r.label for r in results):
        runs = [r for r in results if r.label == label]
        done = [r for r in runs if not r.diverged]
        out.append({
            "label": label, "seeds": [r.seed for r in runs], "diverged": len(runs) - len(done),
            "accuracy_start": _mean_std([r.first(ACCURACY) for r in runs]),
            "accuracy_final": _mean_std([r.last(ACCURACY) for r in done]),
            "reward_final": _mean_std([r.last(REWARD) for r in done]),
            "kl_final": _mean_std([r.last(KL) for r in done]),
            "samples": sorted({r.samples for r in runs}),
            "wall_s": statistics.fmean(r.wall_s for r in runs),
        })
    return out


def write_table(summary: list[dict], path: Path, *, title: str = "Objective comparison", notes: str = "") -> str:
    """Markdown table of :func:`summarize` rows, written to ``path``; returns the text."""
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| objective | seeds | diverged | held-out acc. (start) | held-out acc. (final) | reward (final) "
              "| KL (final) | samples | wall time (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        samples = "/".join(str(v) for v in s["samples"])
        lines.append(f"| {s['label']} | {len(s['seeds'])} | {s['diverged']} | {_fmt(s['accuracy_start'])} "
                     f"| {_fmt(s['accuracy_final'])} | {_fmt(s['reward_final'])} | {_fmt(s['kl_final'], 4)} "
                     f"| {samples} | {s['wall_s']:.1f} |")
    lines += ["", "Mean ± standard deviation over seeds; final values leave out runs that diverged. "
              "KL: mean over the last batch's completions of log pi_theta(y|x) - log pi_ref(y|x)."]
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text, encoding="utf-8")
    return text


def _curve(runs: list[RunResult], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """x (mean samples), mean, min, max over runs at each step where some run logged ``key``."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    for r in runs:
        for row in r.rows:
            if _finite(row.get(key)):
                by_step.setdefault(row["step"], []).append((row["samples"], row[key]))
    xs, mean, lo, hi = [], [], [], []
    for step in sorted(by_step):
        pts = by_step[step]
        xs.append(statistics.fmean(p[0] for p in pts))
        vals = [p[1] for p in pts]
        mean.append(statistics.fmean(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return xs, mean, lo, hi


def plot_comparison(results: list[RunResult], path: Path, *, title: str = "") -> None:
    """Reward, held-out accuracy and KL against completions generated; mean line and min–max band per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(REWARD, "reward (train batch)"), (ACCURACY, "held-out accuracy (greedy)"),
              (KL, "KL to reference (estimate)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = list(dict.fromkeys(r.label for r in results))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, name) in zip(axes, panels):
        for i, label in enumerate(labels):
            runs = [r for r in results if r.label == label]
            xs, mean, lo, hi = _curve(runs, key)
            if not xs:
                continue
            color = colors[i % len(colors)]
            ax.plot(xs, mean, color=color, marker="o" if key == ACCURACY else None, markersize=3,
                    label=f"{label} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.set_title(name)
        ax.set_xlabel("completions generated")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def compare(objectives: list[str], *, config_path: str | Path | None = None, seeds: int = 3,
            output_dir: str | Path | None = None, overrides: list[str] | dict | None = None) -> Path:
    """Train every objective with ``seeds`` seeds on one shared config; write the comparison. Returns the folder."""
    if not objectives:
        raise ConfigError("--objectives: give at least one objective, e.g. gvpo,grpo")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    base = load_config(config_path, overrides)
    for name in objectives:  # check every objective's config before the first (long) run
        load_config(config_path, _with(overrides, {"objective.name": name}))
    out = Path(output_dir) if output_dir else Path(base.output.dir) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    seed_list = [base.train.seed + i for i in range(seeds)]
    results = []
    for seed in seed_list:  # seeds outermost: an interrupted comparison has every objective for the first seeds
        for name in objectives:
            config = load_config(config_path, _with(overrides, {"objective.name": name, "train.seed": seed}))
            run_dir = out / f"{_folder_name(name)}-seed{seed}"
            print(f"gvpo compare: {name} seed {seed} -> {run_dir}", file=sys.stderr, flush=True)
            results.append(run_one(config, name, run_dir))
    budget = (f"Task `{base.task.name}`, model `{base.model.name_or_path}`: {base.train.max_steps} steps x "
              f"{base.train.prompts_per_step} prompts x k={base.rollout.k}, lr {base.optim.lr}, "
              f"seeds {', '.join(map(str, seed_list))}.")
    write_table(summarize(results), out / "comparison.md", notes=budget)
    plot_comparison(results, out / "comparison.png",
                    title=budget.split(":")[0] + " (lines: mean over seeds, bands: min to max)")
    (out / "comparison.json").write_text(json.dumps({"budget": budget, "runs": [r.summary() for r in results]},
                                                    indent=1))
    return out


def _with(overrides, extra: dict) -> dict:
    from .config import parse_override

    items = dict(overrides.items()) if isinstance(overrides, dict) else dict(parse_override(o) for o in overrides or [])
    return {**items, **extra}


def main_compare(args) -> int:
    """``gvpo compare`` entry (arguments from ``cli._compare_parser``)."""
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    out = compare(objectives, config_path=args.config, seeds=args.seeds, output_dir=args.output_dir,
                  overrides=overrides)
    print((out / "comparison.md").read_text())
    print(f"comparison folder: {out}")
    return 0
