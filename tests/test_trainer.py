"""The trainer: exact micro-batching, exact resume after SIGKILL, exact multi-process groups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gvpo.config import ConfigError, load_config
from gvpo.run.metrics import read_metrics
from gvpo.trainer import train

import tiny

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def overrides(model_dir: Path, out: Path, name: str, **extra) -> dict:
    base = {"model.name_or_path": str(model_dir), "task.name": "tiny.tiny_add", "task.rewards": ["tiny.digit_reward"],
            "train.max_steps": 4, "train.prompts_per_step": 4, "rollout.k": 4, "output.dir": str(out),
            "output.name": name, "train.eval_every": 2, "train.eval_n": 8, "train.checkpoint_every": 2,
            "output.progress": False, "output.report_to": [], "output.plots": False, "optim.lr": 1e-2}
    base.update(extra)
    return base


def final_params(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_params(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    moved = 0.0
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)
        moved = max(moved, float((a[key] - b[key]).abs().max()))
    assert moved <= atol


def test_training_changes_parameters_and_logs_rows(model_dir, tmp_path):
    run = train(load_config(None, overrides(model_dir, tmp_path, "r")))
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("samples", "reward_mean", "loss", "kl", "lr", "time_s"):
        assert key in rows[1]
    assert rows[-1]["samples"] == 4 * 4 * 4
    assert "eval/accuracy" in rows[2] and "eval/accuracy" in rows[4]
    initial = load_file(str(model_dir / "model.safetensors"))
    after = final_params(run)
    assert any(not torch.equal(initial[k], after[k]) for k in initial if k in after)
    assert (run / "config.yaml").exists()


def test_micro_batch_size_does_not_change_the_update(model_dir, tmp_path):
    """Whole-group weights: micro-batches of 1 completion give the same parameters as one of B*k.

    Prefix sharing (on by default) needs several rows of a group in one forward, so the exact comparison
    turns it off on both sides; the shared whole batch is then compared at float32-level tolerance,
    because Llama's RMSNorm rounds to float32 even in a float64 model."""
    f64 = {"model.dtype": "float64", "train.share_prompts": False}  # Adam turns float32 rounding in
    # near-zero gradients into lr-sized steps
    whole = train(load_config(None, overrides(model_dir, tmp_path, "whole", **f64, **{"train.micro_batch_size": 0})))
    ones = train(load_config(None, overrides(model_dir, tmp_path, "ones", **f64, **{"train.micro_batch_size": 1})))
    assert_same_params(final_params(whole), final_params(ones), atol=1e-9)
    a, b = read_metrics(whole / "metrics.jsonl"), read_metrics(ones / "metrics.jsonl")
    assert [r.get("reward_mean") for r in a] == [r.get("reward_mean") for r in b]
    shared = train(load_config(None, overrides(model_dir, tmp_path, "shared", **{**f64, "train.share_prompts": True})))
    assert_same_params(final_params(whole), final_params(shared), atol=1e-6)
    assert [r.get("reward_mean") for r in read_metrics(shared / "metrics.jsonl")] == [r.get("reward_mean") for r in a]


def test_updates_per_batch_two_runs(model_dir, tmp_path):
    run = train(load_config(None, overrides(model_dir, tmp_path, "u2", **{"train.updates_per_batch": 2,
                                                                         "train.micro_batch_size": 8})))
    assert len(read_metrics(run / "metrics.jsonl")) == 5


def _cli(args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "gvpo.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _kv(d: dict) -> list[str]:
    return [f"{k}={v if not isinstance(v, list) else ','.join(v)}" for k, v in d.items()]


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def test_resume_after_sigkill_matches_uninterrupted_run(model_dir, tmp_path):
    """Kill a run with SIGKILL after its step-4 checkpoint, resume: same parameters and metrics rows."""
    steps = {"train.max_steps": 8, "train.checkpoint_every": 2}
    ref = _cli(["train", *_kv(overrides(model_dir, tmp_path, "straight", **steps))])
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    run_dir = tmp_path / "killed"
    victim = _cli(["train", *_kv(overrides(model_dir, tmp_path, "killed", **steps, **{"train.eval_every": 1}))])
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step-000004").exists():
        assert victim.poll() is None, "run finished before it could be killed: " + victim.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (run_dir / "final").exists()
    resumed = _cli(["train", "--resume", str(run_dir)])
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()

    assert_same_params(final_params(tmp_path / "straight"), final_params(run_dir), atol=1e-6)
    straight_rows = _comparable(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    resumed_rows = [{k: v for k, v in r.items() if not k.startswith("eval/") or r["step"] % 2 == 0 or r["step"] == 0}
                    for r in _comparable(read_metrics(run_dir / "metrics.jsonl"))]
    assert [r["step"] for r in resumed_rows] == list(range(9))  # no gap, no duplicate
    assert resumed_rows == straight_rows


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_two_processes_match_one(model_dir, tmp_path, mini_batches):
    """2 CPU processes (gloo) and 1 process, same global batch and seed: same parameters. GPUs are
    hidden, so the test means the same on a machine with one GPU (two NCCL ranks cannot share it)."""
    f64 = {"train.max_steps": 3, "model.dtype": "float64", "train.mini_batches": mini_batches}
    cpu_only = {"CUDA_VISIBLE_DEVICES": ""}
    args = _kv(overrides(model_dir, tmp_path, "one", **f64))
    one = _cli(["train", *args], env=cpu_only)
    assert one.wait(timeout=300) == 0, one.stdout.read()
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **cpu_only}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", "-m", "gvpo.cli", "train",
                          *_kv(overrides(model_dir, tmp_path, "two", **f64))],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["processes"] == 2
    assert_same_params(final_params(tmp_path / "one"), final_params(tmp_path / "two"), atol=1e-9)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(model_dir, tmp_path):
    from gvpo.trainer import NonFiniteError

    good = train(load_config(None, overrides(model_dir, tmp_path, "good", **{"train.max_steps": 2})))
    ckpt = good / "checkpoints" / "step-000002"
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    config = load_config(good / "config.yaml", {"train.max_steps": 4, "objective.name": "tiny.nan_objective"})
    with pytest.raises(NonFiniteError, match="non-finite loss"):  # the objective may change only when allowed
        train(config, resume=good, allow_changes=("objective.name",))
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (good / "checkpoints").iterdir()) == ["step-000002"]


def test_a_hanging_reward_stops_the_run_with_a_clear_error(model_dir, tmp_path):
    config = load_config(None, overrides(model_dir, tmp_path, "slow", **{"task.rewards": ["tiny.slow_reward"],
                                                                       "task.reward_timeout_s": 0.5}))
    with pytest.raises(TimeoutError, match="tiny.slow_reward"):
        train(config)


def test_fused_adam_only_where_torch_supports_it_and_nothing_shards_it():
    from types import SimpleNamespace

    from accelerate import DistributedType

    from gvpo.trainer import fused_adam_ok

    plain = SimpleNamespace(distributed_type=DistributedType.NO)
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))]
    assert fused_adam_ok(params, plain)
    assert fused_adam_ok(params, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    assert not fused_adam_ok(params, SimpleNamespace(distributed_type=DistributedType.FSDP))
    assert not fused_adam_ok(params, SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    assert not fused_adam_ok([], plain)
    assert not fused_adam_ok(params + [torch.zeros(2, dtype=torch.long)], plain)


def test_a_custom_objective_by_dotted_path_trains_like_the_builtin_it_reimplements(model_dir, tmp_path):
    """``tiny.centred_nll`` (written as the README's custom objective) is Eq. 9 with centred rewards, the
    built-in ``dr_grpo``: two steps of each from the same start give the same parameters."""
    extra = {"train.max_steps": 2, "train.checkpoint_every": 0, "train.eval_every": 0}
    custom = train(load_config(None, overrides(model_dir, tmp_path, "custom", **extra,
                                               **{"objective.name": "tiny.centred_nll"})))
    builtin = train(load_config(None, overrides(model_dir, tmp_path, "builtin", **extra,
                                                **{"objective.name": "dr_grpo"})))
    start = load_file(str(model_dir / "model.safetensors"))
    moved = final_params(custom)
    assert any(not torch.equal(moved[k], start[k]) for k in start)
    assert_same_params(moved, final_params(builtin), atol=1e-7)


def test_a_custom_sampler_by_dotted_path_feeds_the_trainer(model_dir, tmp_path):
    """``tiny.answer_sampler`` gives each prompt its right answer once and k-1 wrong ones, so with the
    exact-match reward every step's mean reward is exactly 1/k and every completion is tagged ``custom``."""
    run = train(load_config(None, overrides(model_dir, tmp_path, "sampler", **{
        "train.max_steps": 2, "train.checkpoint_every": 0, "sampler.source": "tiny.answer_sampler",
        "task.rewards": ["exact_match"]})))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["reward_mean"] == pytest.approx(1 / 4) and r["source/custom"] == 1.0 for r in rows)
    assert all(r["samples"] == 0 for r in rows)  # nothing was generated


def test_unknown_objective_and_sampler_names_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match="objective.name: 'gvp0' is not valid; choose one of dpo, dr_grpo"):
        load_config(None, ["objective.name=gvp0"])
    with pytest.raises(ConfigError, match="sampler.source: 'replya' is not valid"):
        load_config(None, ["sampler.source=replya"])


def test_metrics_reach_the_trackers_named_in_report_to(model_dir, tmp_path):
    """``output.report_to=[tensorboard]`` (through accelerate's tracker) gets the same numbers as
    ``metrics.jsonl`` at the same steps; ``[]`` writes no events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = {"train.max_steps": 2, "train.checkpoint_every": 0}
    run = train(load_config(None, overrides(model_dir, tmp_path, "tb", **extra, **{"output.report_to": ["tensorboard"]})))
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in logged] == [r["step"] for r in rows]
    assert [v for _, v in logged] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    quiet = train(load_config(None, overrides(model_dir, tmp_path, "quiet", **extra)))
    assert not (quiet / "tensorboard").exists()
