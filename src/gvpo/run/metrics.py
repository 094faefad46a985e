"""Where metrics go: ``metrics.jsonl`` (one JSON object per line, flushed), the experiment trackers of
``output.report_to`` (through accelerate: TensorBoard, Weights & Biases, MLflow, ...), ``plots.png``.
A failed write is one line (:mod:`gvpo.run.write_errors`)."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..batch import Batch
from ..groups import center, dense_index, group_sum
from ..model.logprobs import sequence_logps
from ..yaml_input import GvpoWarning
from .write_errors import WRITE_ERRORS, reason, remove, writing


def within_group_correlation(implicit: Tensor, rewards: Tensor, group_ids: Tensor) -> float:
    """Mean over groups of the Pearson correlation of implicit and actual rewards (groups where both vary).

    >>> within_group_correlation(torch.tensor([1., 2., 3., 0., 1.]), torch.tensor([2., 4., 6., 1., 0.]),
    ...                          torch.tensor([0, 0, 0, 1, 1]))
    0.0
    """
    index, num_groups = dense_index(group_ids)
    a, b = center(implicit.double(), index, num_groups), center(rewards.double(), index, num_groups)
    cov = group_sum(a * b, index, num_groups)
    var_a, var_b = group_sum(a * a, index, num_groups), group_sum(b * b, index, num_groups)
    ok = (var_a > 1e-12) & (var_b > 1e-12)
    if not ok.any():
        return float("nan")
    return float((cov[ok] / torch.sqrt(var_a[ok] * var_b[ok])).mean())


class MetricsLog:
    """Appends rows to ``metrics.jsonl`` and sends their numbers to the accelerator's trackers."""

    def __init__(self, run_dir: Path, accelerator=None):
        self.path = run_dir / "metrics.jsonl"
        self.accelerator = accelerator

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (they are recomputed when a run resumes from that step)."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def log(self, row: dict) -> None:
        """Append ``row``; non-finite floats are written as ``null`` (strict JSON). A failed append is cut off
        again (a resume then reads whole rows) and raises :class:`gvpo.run.write_errors.RunWriteError`."""
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        size = self.path.stat().st_size if self.path.exists() else 0
        with writing(str(self.path), self.path.parent):
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            except WRITE_ERRORS:
                if self.path.exists():
                    os.truncate(self.path, size)  # a half-appended row would break the next resume's reading
                raise
        if self.accelerator is not None:
            numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
            with writing("the tracker logs (output.report_to)", self.path.parent):
                self.accelerator.log(numbers, step=row["step"])


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def start_trackers(accelerator, run_dir: Path, config: dict) -> None:
    """Start the trackers of ``output.report_to`` (accelerate's ``init_trackers``), which write their first files.
    ``config``: ``section.key -> value`` (:func:`gvpo.config.flat_dict`); lists and mappings go as strings."""
    config = {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in config.items()}
    with writing("the tracker logs (output.report_to)", run_dir):
        accelerator.init_trackers("tensorboard", config=config)


def end_trackers(accelerator, run_dir: Path) -> None:
    """Close the trackers of ``output.report_to`` (their last writes happen here: TensorBoard writes from a
    thread and reports a failed write at the next call or at the end)."""
    with writing("the tracker logs (output.report_to)", run_dir):
        accelerator.end_training()


def write_plots(run_dir: Path) -> None:
    """``run_dir/plots.png`` from its ``metrics.jsonl``. The run is complete when it is drawn, so a failed write
    is a warning (the half-written file removed), not an error."""
    path = run_dir / "plots.png"
    try:
        plot_metrics(read_metrics(run_dir / "metrics.jsonl"), path, title=run_dir.name)
    except WRITE_ERRORS as err:
        remove(path)
        warnings.warn(f"could not write {path}: {reason(err)}; the run itself is complete", GvpoWarning, stacklevel=2)


def plot_metrics(rows: list[dict], path: Path, title: str = "") -> None:
    """Reward and eval accuracy against samples, KL, implicit/actual reward correlation, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward_mean", "reward (train batch)"), ("eval/accuracy", "held-out accuracy (greedy)"),
              ("kl", "KL to reference (estimate)"), ("implicit_reward_corr", "corr(implicit, actual reward)")]
    x_key = "samples" if any(r.get("samples") for r in rows) else "step"  # offline runs generate nothing
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, panels):
        pts = [(r[x_key], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        extra = sorted({k for r in rows for k in r if k.startswith("eval/") and k.endswith("/accuracy")
                        and k != "eval/accuracy"}) if key == "eval/accuracy" else []
        if pts:
            ax.plot(*zip(*pts), marker="o" if key.startswith("eval") else None, markersize=3, label=key)
        for k in extra:
            epts = [(r[x_key], r[k]) for r in rows if k in r]
            ax.plot(*zip(*epts), marker="o", markersize=3, label=k)
        if extra:
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xlabel("completions generated" if x_key == "samples" else "step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def gather_stats(updates: list[tuple[dict, Batch]], accelerator) -> dict:
    """Step metrics over all processes' completions, from the last epoch's updates (one per mini-batch):
    batch statistics over all its rows, the objective's scalars averaged over its optimizer steps."""
    log_ratio = torch.cat([sequence_logps(stats["logps"], b.action_mask) - b.ref_logps for stats, b in updates])
    rewards = torch.cat([b.rewards for _, b in updates])
    group_ids = torch.cat([b.group_ids for _, b in updates])
    lengths = torch.cat([b.action_mask.sum(-1).float() for _, b in updates])
    sums = torch.stack([rewards.sum(), (rewards**2).sum(), log_ratio.sum(), lengths.sum(),
                        torch.tensor(float(len(rewards)), device=rewards.device)]).double()
    sums = accelerator.reduce(sums.to(accelerator.device), "sum")
    n = max(float(sums[4]), 1.0)
    mean = float(sums[0]) / n
    corr = within_group_correlation(log_ratio, rewards, group_ids)
    out = {"reward_mean": mean, "reward_std": math.sqrt(max(float(sums[1]) / n - mean**2, 0.0)),
           "kl": float(sums[2]) / n, "completion_len": float(sums[3]) / n, "implicit_reward_corr": corr}
    scalars = [k for k, v in updates[0][0].items() if isinstance(v, (int, float))]
    out.update({k: sum(stats[k] for stats, _ in updates) / len(updates) for k in scalars})
    sources = {}
    for _, b in updates:
        for s in b.sources:
            sources[s] = sources.get(s, 0) + 1
    if len(sources) > 1 or "policy" not in sources:
        out.update({f"source/{k}": v / len(rewards) for k, v in sources.items()})
    return out
