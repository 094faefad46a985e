"""Episodes in the trainer: a degenerate environment trains bit-identically to the single-turn path; multi-turn
tool episodes give the same update for micro-batch 1 and all, and on 1 and 2 processes; replay stores episodes;
the reference sampler and ``gvpo eval`` run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
import tiny_chat as tc
from gvpo.config import load_config
from gvpo.run.metrics import read_metrics
from gvpo.trainer import train

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> Path:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the same numbers on any machine, and faster for a tiny model
    try:
        return tc.make_tool_caller(tmp_path_factory.mktemp("tool") / "model", steps=60)
    finally:
        torch.set_num_threads(previous)


def tool_overrides(model: Path, out: Path, name: str, **extra) -> dict:
    base = {"model.name_or_path": str(model), "task.name": "tiny_chat.tool_task", "task.environment":
            "tiny_chat.CalculatorEnv", "train.max_steps": 2, "train.prompts_per_step": 2, "rollout.k": 4,
            "output.dir": str(out), "output.name": name, "train.eval_every": 0, "train.eval_n": 2,
            "output.progress": False, "output.report_to": [], "output.plots": False, "optim.lr": 1e-2,
            "model.dtype": "float64", "train.share_prompts": False}
    base.update(extra)
    return base


def params(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


def test_a_degenerate_environment_trains_bit_identically_to_single_turn(tmp_path, one_thread):
    """An environment with no tools and no observation (done after turn 1): the same episodes, rewards, weights
    and metrics.jsonl rows as today's single-turn path, bit for bit; the only extra keys are ``episodes/...``."""
    model = tiny.make_tiny_model(tmp_path / "m")
    base = {"model.name_or_path": str(model), "task.name": "tiny.tiny_add", "task.rewards": ["tiny.digit_reward"],
            "train.max_steps": 3, "train.prompts_per_step": 4, "rollout.k": 4, "output.dir": str(tmp_path),
            "train.eval_every": 2, "train.eval_n": 4, "output.progress": False, "output.report_to": [],
            "output.plots": False, "optim.lr": 1e-2}
    plain = train(load_config(None, {**base, "output.name": "plain"}))
    env = train(load_config(None, {**base, "output.name": "env", "task.environment": "tiny_chat.NoToolEnv"}))
    a, b = params(plain), params(env)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = read_metrics(plain / "metrics.jsonl"), read_metrics(env / "metrics.jsonl")
    assert len(rows_a) == len(rows_b) == 4
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k != "time_s"} == {k: v for k, v in rb.items()
                                                                   if k != "time_s" and not k.startswith("episodes/")}
        assert all(k in ra or k.startswith("episodes/") for k in rb)
    assert rows_b[1]["episodes/turns"] == 1.0 and rows_b[1]["episodes/tool_calls"] == 0.0
    assert not any(k.startswith("episodes/") for k in rows_a[1])


def test_tool_episodes_train_with_the_same_update_for_any_micro_batch(tool_model, tmp_path, one_thread):
    """Multi-turn rows (calls, observations, answers; some episodes going astray): micro-batches of one
    completion and one of the whole batch give the same parameters (float64, as the single-turn test), the
    episodes' metrics are logged, and the environment's get_reward is in the reward."""
    whole = train(load_config(None, tool_overrides(tool_model, tmp_path, "whole")))
    ones = train(load_config(None, tool_overrides(tool_model, tmp_path, "ones", **{"train.micro_batch_size": 1})))
    same(params(whole), params(ones), atol=1e-9)
    rows = read_metrics(whole / "metrics.jsonl")
    assert rows[1]["episodes/tool_calls"] > 0.5 and rows[1]["episodes/turns"] > 1.5
    assert rows[1]["reward_mean"] > 1.0  # exact_match plus CalculatorEnv.get_reward: both count for good episodes
    # float64: the same losses up to the order of summation (length buckets group rows differently per micro-batch)
    ones_losses = [r.get("loss") for r in read_metrics(ones / "metrics.jsonl")]
    assert [r.get("loss") for r in rows] == [None if v is None else pytest.approx(v, rel=1e-12) for v in ones_losses]
    assert not all(torch.equal(v, params(whole)[k]) for k, v in load_file(str(tool_model / "model.safetensors")).items())


def test_tool_episodes_on_two_processes_match_one(tool_model, tmp_path):
    """Each process runs its share of the step's prompts; the episodes' seeds depend only on (seed, prompt,
    completion, turn), so 2 gloo processes train exactly as 1."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

    def args(name):
        return [f"{k}={v if not isinstance(v, list) else ','.join(v)}"
                for k, v in tool_overrides(tool_model, tmp_path, name).items()]

    one = train(load_config(None, tool_overrides(tool_model, tmp_path, "one")))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29600 + os.getpid() % 300), "-m", "gvpo.cli", "train", *args("two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    state = json.loads(next((tmp_path / "two" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["processes"] == 2
    same(params(one), params(tmp_path / "two"), atol=1e-9)
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r.get("episodes/tool_calls") for r in a] == [r.get("episodes/tool_calls") for r in b]


def test_replay_stores_episodes_and_the_reference_sampler_runs_them(tool_model, tmp_path, one_thread):
    """Replay keeps each episode's prompt ids and action mask and trains on them again; the fixed reference
    samples episodes with its own engine."""
    from gvpo.trainer import setup

    replay = tool_overrides(tool_model, tmp_path, "replay", **{"sampler.source": "replay", "sampler.replay_historical": 2,
                                                               "sampler.replay_revisit": 0.5, "train.max_steps": 3})
    run = train(load_config(None, replay))
    rows = read_metrics(run / "metrics.jsonl")
    assert rows[-1].get("source/replay", 0) > 0
    run_parts = setup(load_config(None, {**replay, "output.name": "replay-probe", "train.max_steps": 1}))
    groups = run_parts.sampler.sample([(0, tc.tool_task().train[0])], 0, run_parts.params)
    run_parts.sampler.after_update([g.with_rewards([1.0] * len(g)) for g in groups], 0)
    item = next(iter(run_parts.sampler.buffer.values()))["items"][0]
    assert item["prompt_ids"] == groups[0].prompt_ids[0] and item["action_mask"] == groups[0].action_mask[0]
    run_parts.lock.release() if run_parts.lock else None
    reference = train(load_config(None, tool_overrides(tool_model, tmp_path, "ref", **{"sampler.source": "reference",
                                                                                      "train.max_steps": 1})))
    assert read_metrics(reference / "metrics.jsonl")[1]["source/reference"] == 1.0


def test_gvpo_eval_runs_episodes(tool_model, tmp_path, capsys):
    from gvpo import cli

    assert cli.main(["eval", "--model", str(tool_model), "--task", "tiny_chat.tool_task", "--environment",
                     "tiny_chat.CalculatorEnv", "--n", "2", "--items", str(tmp_path / "items.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert result["n"] == 2 and result["accuracy"] == sum(it["correct"] for it in items) / 2
    assert any("<tool_call>" in it["completion"] for it in items)
