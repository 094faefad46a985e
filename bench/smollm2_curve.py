"""Held-out accuracy of training runs against wall time and against completions generated, from their metrics.

    python bench/smollm2_curve.py runs/smollm2-135m-lora runs/smollm2-135m-full --out bench/smollm2_curve.png

Reads each run folder's ``metrics.jsonl`` (the rows with ``eval/accuracy``: step 0 before training, then every
``train.eval_every`` steps and the last), draws two panels (accuracy vs minutes, accuracy vs completions) with
one line per run, saves the figure, and prints a Markdown table per run: step, completions, minutes, accuracy,
and the change from step 0. ``time_s`` is the trainer's wall time from the start of step 1, so it includes the
evaluations after step 0 (and checkpoints) but not model loading or the first evaluation; ``--label`` names the
lines (default: the folder names).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gvpo.run.metrics import read_metrics


def eval_rows(run: Path) -> list[dict]:
    """The rows of ``run/metrics.jsonl`` that hold a held-out accuracy, in step order."""
    return sorted((r for r in read_metrics(run / "metrics.jsonl") if "eval/accuracy" in r), key=lambda r: r["step"])


def table(rows: list[dict]) -> str:
    """A Markdown table of ``rows`` (from :func:`eval_rows`)."""
    start = rows[0]["eval/accuracy"]
    lines = ["| step | completions | minutes | held-out accuracy | change |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['samples']:,} | {r['time_s'] / 60:.1f} | {r['eval/accuracy']:.3f} | "
                     f"{100 * (r['eval/accuracy'] - start):+.1f} points |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_samples) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for label, rows in runs.items():
        acc = [r["eval/accuracy"] for r in rows]
        by_time.plot([r["time_s"] / 60 for r in rows], acc, marker="o", label=label)
        by_samples.plot([r["samples"] for r in rows], acc, marker="o", label=label)
    by_time.set_xlabel("wall time (minutes, evaluations included)")
    by_samples.set_xlabel("completions generated")
    by_time.set_ylabel("held-out greedy accuracy")
    for ax in (by_time, by_samples):
        ax.grid(alpha=0.3)
    by_samples.legend()
    fig.suptitle("SmolLM2-135M-Instruct, chat_arithmetic, GVPO on 2 CPU cores")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.jsonl)")
    p.add_argument("--label", action="append", default=[], help="a line's label, once per run, in order")
    p.add_argument("--out", type=Path, default=Path("bench/smollm2_curve.png"), help="figure to write")
    args = p.parse_args()
    labels = args.label or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        p.error(f"{len(labels)} --label for {len(args.runs)} runs")
    runs = {label: eval_rows(run) for label, run in zip(labels, args.runs)}
    for label, rows in runs.items():
        print(f"### {label}\n\n{table(rows)}\n")
    plot(runs, args.out)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
