"""``gvpo compare``: one run per objective x seed, a table and a plot; summaries; diverged runs recorded."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from gvpo import cli
from gvpo.compare import RunResult, run_one, summarize, write_table
from gvpo.config import load_config

import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_compare_cli_two_objectives(model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--objectives", "gvpo,grpo", "--seeds", "1", "--output-dir", str(out), "--max-steps", "2",
            f"model.name_or_path={model_dir}", "task.name=tiny.tiny_add", "task.rewards=tiny.digit_reward",
            "train.prompts_per_step=2", "rollout.k=4", "train.eval_every=1", "train.eval_n=4",
            "train.checkpoint_every=0", "output.progress=false", "output.report_to=[]", "output.plots=false"]
    assert cli.main(args) == 0
    for name in ("comparison.md", "comparison.png", "comparison.json"):
        assert (out / name).stat().st_size > 0
    table = (out / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| objective")]
    assert [r.split("|")[1].strip() for r in rows] == ["gvpo", "grpo"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == "1" and cells[2] == "0"          # one seed, none diverged
        assert cells[7] == str(2 * 2 * 4)                    # same sample budget: steps x prompts x k
        assert "±" in cells[4] and "±" in cells[5]           # final accuracy and reward were read
    runs = json.loads((out / "comparison.json").read_text())["runs"]
    assert {(r["label"], r["seed"]) for r in runs} == {("gvpo", 0), ("grpo", 0)}
    for r in runs:
        assert Path(r["run_dir"]).parent == out and (Path(r["run_dir"]) / "metrics.jsonl").exists()
        assert r["steps"] == 2 and r["samples"] == 16 and r["wall_s"] > 0 and r["accuracy_final"] is not None
    assert "comparison folder" in capsys.readouterr().out

    # a second call reuses the finished runs instead of training again
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")}
    assert cli.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")} == before


def _rows(acc: list[float], reward: float, kl: float) -> list[dict]:
    rows = [{"step": 0, "samples": 0, "eval/accuracy": acc[0]}]
    rows += [{"step": i, "samples": 8 * i, "reward_mean": reward, "kl": kl, "eval/accuracy": a}
             for i, a in enumerate(acc[1:], start=1)]
    return rows


def test_summarize_means_and_diverged_runs(tmp_path):
    results = [RunResult("a", 0, "x", 2.0, None, _rows([0.1, 0.5], 0.3, 0.01)),
               RunResult("a", 1, "x", 4.0, None, _rows([0.2, 0.7], 0.5, 0.03)),
               RunResult("a", 2, "x", 6.0, "non-finite: boom", _rows([0.3, 0.0], 0.9, 9.0)),
               RunResult("b", 0, "x", 1.0, None, _rows([0.1, 0.2], 0.1, 0.02))]
    summary = summarize(results)
    assert [s["label"] for s in summary] == ["a", "b"]
    a = summary[0]
    assert a["diverged"] == 1 and a["seeds"] == [0, 1, 2]
    assert a["accuracy_final"] == pytest.approx((0.6, statistics.stdev([0.5, 0.7])))  # the diverged run left out
    assert a["accuracy_start"] == pytest.approx((0.2, 0.1))                           # the start counts every run
    assert a["reward_final"] == pytest.approx((0.4, statistics.stdev([0.3, 0.5])))
    assert a["kl_final"][0] == pytest.approx(0.02) and a["wall_s"] == pytest.approx(4.0)
    text = write_table(summary, tmp_path / "t.md")
    assert "| a | 3 | 1 | 0.200 ± 0.100 | 0.600 ± 0.141 |" in text
    assert "| b | 1 | 0 | 0.100 ± 0.000 | 0.200 ± 0.000 |" in text


def test_run_one_records_a_non_finite_run(model_dir, tmp_path, monkeypatch):
    import gvpo.trainer

    def diverging_train(config):
        run = Path(config.output.dir) / config.output.name
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "samples": 0, "eval/accuracy": 0.25}) + "\n")
        raise gvpo.trainer.NonFiniteError("non-finite loss (nan)")

    monkeypatch.setattr(gvpo.trainer, "train", diverging_train)
    config = load_config(None, {"model.name_or_path": str(model_dir), "train.seed": 3})
    result = run_one(config, "gvpo", tmp_path / "gvpo-seed3")
    assert result.diverged and "nan" in result.error and result.seed == 3
    assert result.first("eval/accuracy") == 0.25 and result.summary()["accuracy_final"] is None
    again = run_one(config, "gvpo", tmp_path / "gvpo-seed3")  # recorded: not run again
    assert again.error == result.error and again.rows == result.rows


def test_stability_bench_classifies_and_writes_its_table(model_dir, tmp_path):
    stability = tiny.load_script("bench/stability.py")
    ok = RunResult("gvpo", 0, "x", 1.0, None, _rows([0.40, 0.36], 0.5, 0.1))
    collapsed = RunResult("gvpo", 1, "x", 1.0, None, _rows([0.40, 0.30], 0.0, 5.0))
    diverged = RunResult("gvpo", 2, "x", 1.0, "non-finite: nan", _rows([0.40, 0.40], 0.0, 5.0))
    assert [stability.classify(r, 0.05) for r in (ok, collapsed, diverged)] == ["ok", "collapsed", "diverged"]
    rows = stability.summarize([("gvpo", 1e-3, ok), ("gvpo", 1e-3, collapsed), ("gvpo", 1e-3, diverged)], 0.05)
    assert (rows[0]["runs"], rows[0]["diverged"], rows[0]["collapsed"]) == (3, 1, 1)
    assert rows[0]["accuracy_final"] == pytest.approx(0.33)  # mean of the two finished runs

    out = tmp_path / "stab"
    assert stability.main(["--lrs", "1e-3,1e-2", "--seeds", "1", "--steps", "2", "--prompts-per-step", "2", "--k", "4",
                           "--eval-n", "4", "--model", str(model_dir), "--task", "tiny.tiny_add",
                           "--output-dir", str(out), "task.rewards=tiny.digit_reward"]) == 0
    table = (out / "stability.md").read_text()
    cells = [[c.strip() for c in line.split("|")[1:3]] for line in table.splitlines()
             if line.startswith("| gvpo") or line.startswith("| grpo")]
    assert cells == [["gvpo", "0.001"], ["gvpo", "0.01"], ["grpo", "0.001"], ["grpo", "0.01"]]
    assert (out / "stability.png").stat().st_size > 0


def test_sample_efficiency_bench_counts_completions_to_the_target(model_dir, tmp_path):
    """Hand-worked: evaluations every step, 8 completions per step (``_rows``).

    on-policy seed 0 accuracies 0.2, 0.5, 0.95, 0.9 -> first >= 0.9 at step 2 = 16 completions;
    seed 1: 0.2, 0.91, 0.8, 0.92 -> step 1 = 8. replay seed 0: 0.2, 0.9, 0.7, 0.8 -> 8 (ratio 0.5);
    seed 1: 0.2, 0.95, 0.9, 0.9 -> 8 (ratio 1). Paired mean ratio 0.75; ratio of means 8 / 12.
    Last three evaluations: on-policy 0.7833 and 0.8767, replay 0.8 and 0.9167, so the paired
    differences are +0.0167 and +0.04: no loss.
    """
    se = tiny.load_script("bench/sample_efficiency.py")
    runs = {"on-policy": [RunResult("on-policy", 0, "x", 1.0, None, _rows([0.2, 0.5, 0.95, 0.9], 0, 0)),
                          RunResult("on-policy", 1, "x", 1.0, None, _rows([0.2, 0.91, 0.8, 0.92], 0, 0))],
            "replay-4:4": [RunResult("replay-4:4", 0, "x", 1.0, None, _rows([0.2, 0.9, 0.7, 0.8], 0, 0)),
                           RunResult("replay-4:4", 1, "x", 1.0, None, _rows([0.2, 0.95, 0.9, 0.9], 0, 0))],
            "updates-per-batch-2": [RunResult("updates-per-batch-2", 0, "x", 1.0, None, _rows([0.2, 0.5, 0.6, 0.7], 0, 0)),
                                    RunResult("updates-per-batch-2", 1, "x", 1.0, None, _rows([0.2, 0.3, 0.95, 0.5], 0, 0))]}
    base, replay, upb = se.summarize(runs, 0.9)
    assert base["completions_to_target"] == [16, 8] and base["steps_to_target"] == [2, 1]
    assert replay["completions_to_target"] == [8, 8] and replay["ratio_paired_mean"] == pytest.approx(0.75)
    assert replay["ratio_of_means"] == pytest.approx(8 / 12)
    assert replay["accuracy_last3"] == pytest.approx([0.8, 2.75 / 3])
    assert upb["reached"] == 1 and upb["ratio_paired_mean"] is None and upb["completions_to_target_mean"] is None
    lines = se.verdict([base, replay, upb], 0.9)
    assert lines[0].startswith("replay-4:4: 0.75x") and "misses" in lines[0] and "no significant loss" in lines[0]
    assert "1/2 seeds only" in lines[1] and lines[1].endswith("a loss")

    out = tmp_path / "se"
    assert se.main(["--variants", "replay-4:4", "--seeds", "1", "--steps", "2", "--jobs", "1", "--eval-n", "4",
                    "--output-dir", str(out), f"model.name_or_path={model_dir}", "task.name=tiny.tiny_add",
                    "task.rewards=[tiny.digit_reward]", "train.prompts_per_step=2"]) == 0
    table = (out / "sample_efficiency.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:] \
        == ["on-policy", "replay-4:4"]
    saved = json.loads((out / "sample_efficiency.json").read_text())["rows"]
    # on-policy: 2 steps x 2 prompts x 8; replay: 2 x 8 new, then 1 revisited prompt (4 fresh) + 1 new (8)
    assert [r["generated_total"] for r in saved] == [[32], [16 + 4 + 8]]
    assert (out / "sample_efficiency.png").stat().st_size > 0
