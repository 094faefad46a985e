"""``bench/schedule.py``: the grid of objectives x learning rates x seeds, GVPO's beta variants, resuming from
the records on disk, one step-0 evaluation per grid, and the mean ± standard error table (issues 12 and 19)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest

import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def schedule():
    return tiny.load_script("bench/schedule.py")


def _record(objective, lr, seed, final, kl, unstable=False, beta=None, error=None):
    return {"objective": objective, "beta": beta, "mini_batches": 4, "lr": lr, "seed": seed, "accuracy_start": 0.2,
            "accuracy_final": final, "kl_to_initial": kl, "completion_len_final": 10.0, "unstable": unstable,
            "error": error}


def test_summarize_gives_mean_and_standard_error_of_the_finished_runs(schedule):
    """Hand-worked: finals 0.4, 0.6 and a collapsed 0.2 -> mean 0.4, stdev 0.2, s.e. 0.2 / sqrt(3) = 0.1155; KLs 1, 3,
    5 -> 3 ± 2 / sqrt(3) = 1.1547. The diverged run (no final model) counts in ``runs`` and ``unstable`` only."""
    records = [_record("gvpo", 1e-4, 0, 0.4, 1.0, beta=0.1), _record("gvpo", 1e-4, 1, 0.6, 3.0, beta=0.1),
               _record("gvpo", 1e-4, 2, 0.2, 5.0, unstable=True, beta=0.1),
               _record("gvpo", 1e-4, 3, None, None, unstable=True, beta=0.1, error="non-finite: nan"),
               _record("grpo", 3e-5, 0, 0.5, 0.5)]
    rows = schedule.summarize(records, order=[("grpo", 4, 3e-5), ("dr_grpo", 4, 3e-5)])
    assert [(r["objective"], r["lr"]) for r in rows] == [("grpo", 3e-5), ("gvpo", 1e-4)]  # order first, no empty rows
    gvpo = rows[1]
    assert (gvpo["runs"], gvpo["unstable"], gvpo["beta"]) == (4, 2, 0.1)
    assert gvpo["accuracy_final"] == pytest.approx(0.4) and gvpo["accuracy_final_se"] == pytest.approx(0.2 / math.sqrt(3))
    assert gvpo["kl_to_initial"] == pytest.approx(3.0) and gvpo["kl_to_initial_se"] == pytest.approx(2 / math.sqrt(3))
    assert statistics.stdev([0.4, 0.6, 0.2]) == pytest.approx(0.2)
    text = schedule.table(rows)
    assert "| gvpo | 0.1 | 4 | 0.0001 | 4 | 2 | 0.200 | 0.400 ± 0.115 | 3.0000 ± 1.1547 | 10.0 |" in text
    assert "| grpo | – | 4 | 3e-05 | 1 | 0 | 0.200 | 0.500 ± 0.000 | 0.5000 ± 0.0000 | 10.0 |" in text


def test_grid_runs_beta_variants_resumes_and_evaluates_the_start_once(schedule, model_dir, tmp_path, monkeypatch):
    import gvpo.trainer

    calls = []
    evaluate = gvpo.trainer.evaluate
    monkeypatch.setattr(gvpo.trainer, "evaluate", lambda *a, **kw: calls.append(1) or evaluate(*a, **kw))
    out = tmp_path / "grid"
    argv = ["--objectives", "gvpo,grpo", "--mini-batches", "2", "--lrs", "1e-3,1e-2", "--betas", "0.1,0.5",
            "--beta-lrs", "1e-2", "--seeds", "1", "--steps", "1", "--prompts-per-step", "2", "--k", "4",
            "--eval-n", "4", "--kl-prompts", "3", "--output-dir", str(out), f"model.name_or_path={model_dir}",
            "task.name=tiny.tiny_add", "task.rewards=[tiny.digit_reward]"]
    schedule.main(argv)
    cells = [("gvpo", 1e-3), ("gvpo", 1e-2), ("gvpo-b0.5", 1e-2), ("grpo", 1e-3), ("grpo", 1e-2)]
    assert len(calls) == 1 + len(cells)  # the step-0 evaluation once, the final one per run
    saved = json.loads((out / "schedule.json").read_text())
    assert [(r["objective"], r["lr"]) for r in saved["summary"]] == cells
    assert {(r["objective"], r["beta"]) for r in saved["runs"]} == {("gvpo", 0.1), ("gvpo-b0.5", 0.5), ("grpo", None)}
    beta_run = out / "runs" / "gvpo-b0.5-m2-lr0.01-s0"
    assert "beta: 0.5" in (beta_run / "config.yaml").read_text()
    assert not (beta_run / "final").exists()  # models deleted once measured (no --keep-models)
    starts = {r["accuracy_start"] for r in saved["runs"]}
    assert len(starts) == 1 and all(r["kl_to_initial"] is not None for r in saved["runs"])
    table = (out / "schedule.md").read_text()
    assert "| gvpo-b0.5 | 0.5 | 2 | 0.01 | 1 | " in table and (out / "schedule.png").stat().st_size > 0

    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    calls.clear()
    schedule.main(argv)  # everything on disk: nothing trains or evaluates again, the same table
    assert calls == [] and {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")} == before
    assert (out / "schedule.md").read_text() == table

    shutil.rmtree(out / "runs" / "grpo-m2-lr0.01-s0")  # an interrupted grid: only the missing run trains
    schedule.main(argv)
    assert len(calls) == 1 and (out / "runs" / "grpo-m2-lr0.01-s0" / "schedule_run.json").exists()


def test_kl_to_initial_is_zero_for_the_initial_model(schedule, model_dir, tmp_path):
    """``E_{y ~ pi}[log pi(y|x) - log pi(y|x)] = 0``: a run whose final model is the initial one."""
    from gvpo.config import load_config

    shutil.copytree(model_dir, tmp_path / "run" / "final")
    config = load_config(None, {"model.name_or_path": str(model_dir), "task.name": "tiny.tiny_add"})
    assert schedule.kl_to_initial(tmp_path / "run", config, n=5, seed=0) == 0.0


def test_paired_differences_match_seeds(schedule):
    """Hand-worked: seed 0: grpo 0.9 - gvpo 0.45 = 0.45, seed 1: 0.75 - 0.5 = 0.25 -> 0.35 ± 0.1 (stdev 0.1414 / sqrt 2);
    seed 2 has no grpo run, seed 3's grpo run diverged: both left out. KL: 1 - 3 = -2 and 2 - 3 = -1 -> -1.5 ± 0.5."""
    records = [_record("gvpo", 3e-4, 0, 0.45, 3.0), _record("gvpo", 3e-4, 1, 0.5, 3.0), _record("gvpo", 3e-4, 2, 0.9, 1.0),
               _record("gvpo", 3e-4, 3, 0.9, 1.0), _record("grpo", 3e-4, 0, 0.9, 1.0), _record("grpo", 3e-4, 1, 0.75, 2.0),
               _record("grpo", 3e-4, 3, None, None, unstable=True, error="non-finite: inf")]
    (row,) = schedule.paired(records, [("gvpo", 4, 3e-4), ("grpo", 4, 3e-4)])
    assert (row["objective"], row["seeds"]) == ("grpo", 2)
    assert row["accuracy_diff"] == pytest.approx(0.35) and row["accuracy_diff_se"] == pytest.approx(0.1)
    assert row["kl_diff"] == pytest.approx(-1.5) and row["kl_diff_se"] == pytest.approx(0.5)
    assert "| grpo | 4 | 0.0003 | 2 | +0.350 ± 0.100 | -1.500 ± 0.500 |" in schedule.paired_table([row])
