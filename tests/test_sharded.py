"""Sharded training (``train.fsdp``: torch's FSDP2 ``fully_shard`` on 2 CPU processes with gloo) and its checkpoints.

Tolerance: 1 process and 2 sharded processes run the same float32 arithmetic except for the order of two
sums: FSDP2 reduce-scatters each gradient as the mean of two half-batch gradients, and the two processes'
``[norm, loss_sum]`` statistics are summed by gloo. Each reordering moves a float32 gradient entry by a few
ulps (relative 1e-7); AdamW divides by sqrt(v), so a moved gradient moves the step by at most about the same
relative amount of ``lr`` (1e-2 here) per step, and 4 steps stay well under 1e-5 in absolute terms on
weights of size ~0.1-1. Sampling is per-row seeded (``HFEngine``), so both runs train on the same
completions. Resuming within one process count is bit-exact (same reduction order), so those comparisons use
1e-6 as the single-process resume test does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from gvpo.config import load_config
from gvpo.run.metrics import read_metrics
from gvpo.trainer import train

import tiny
from test_trainer import _cli, _comparable, _kv, assert_same_params, final_params, overrides

TESTS = Path(__file__).resolve().parent
ACROSS_PROCESS_COUNTS = 1e-5  # see the module docstring
STEPS = {"train.max_steps": 4, "train.checkpoint_every": 2, "train.eval_every": 2, "objective.ref_sync_steps": 2}
"""The reference is synced at step 2, just before the step-2 checkpoint: sharded runs gather the policy into it,
and every resume must restore it from the checkpoint."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def _env(small_files: bool = False) -> dict:
    """``small_files``: checkpoints in many files per process (``tests/small_checkpoint_files``)."""
    first = [str(TESTS / "small_checkpoint_files")] if small_files else []
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*first, str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _free_port() -> int:
    """A port nothing listens on now (other test runs on this machine may be using fixed ones)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two(args: list[str], small_files: bool = False) -> subprocess.Popen:
    """``gvpo train ARGS`` on 2 CPU processes (torchrun, gloo; GPUs hidden), in its own process group."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(_free_port()), "-m", "gvpo.cli", "train", *args], env=_env(small_files),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]


def _one(args: list[str]) -> None:
    """``gvpo train ARGS`` in 1 process with GPUs hidden (on a GPU machine the comparison stays CPU to CPU)."""
    _finish(_cli(["train", *args], env={"CUDA_VISIBLE_DEVICES": ""}))


@pytest.fixture(scope="module")
def one(model_dir, runs) -> Path:
    """1 process, float32, 4 steps."""
    _one(_kv(overrides(model_dir, runs, "one", **STEPS)))
    return runs / "one"


@pytest.fixture(scope="module")
def two(model_dir, runs) -> Path:
    """2 sharded processes, same global batch and seed, 4 steps, uninterrupted."""
    _finish(_two(_kv(overrides(model_dir, runs, "two", **STEPS, **{"train.fsdp": True}))))
    return runs / "two"


def _copy_at_step_2(run_dir: Path, dest: Path) -> Path:
    """A copy of ``run_dir`` as it was after its step-2 checkpoint (later checkpoints and final/ removed)."""
    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "final")
    for ckpt in (dest / "checkpoints").glob("step-*"):
        if ckpt.name != "step-000002":
            shutil.rmtree(ckpt)
    return dest


def test_two_sharded_processes_match_one_and_hold_half_of_each_weight(one, two):
    assert json.loads((two / "checkpoints" / "step-000004" / "trainer_state.json").read_text())["processes"] == 2
    assert_same_params(final_params(one), final_params(two), atol=ACROSS_PROCESS_COUNTS)
    # sharded, not replicated: each process wrote its own half of every weight matrix (FSDP2 shards dim 0)
    shards = sorted((two / "checkpoints" / "step-000004" / "shards").glob("*.safetensors"))
    assert len(shards) == 2
    full = final_params(two)
    name = "model.layers.0.mlp.up_proj.weight"
    rows = []
    for path in shards:
        with safe_open(str(path), "pt") as f:
            rows.append(f.get_slice(f"model.{name}").get_shape()[0])
    assert rows == [full[name].shape[0] // 2] * 2
    # final/ is the gathered model: plain from_pretrained loads it, with every weight
    loaded = AutoModelForCausalLM.from_pretrained(two / "final")
    state = loaded.state_dict()
    for key, value in full.items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)
    assert_same_params({k: state[k] for k in final_params(one)}, final_params(one), atol=ACROSS_PROCESS_COUNTS)


def test_sharded_run_killed_after_its_step_2_checkpoint_resumes_to_the_same_parameters(model_dir, runs, two):
    run_dir = runs / "killed"
    victim = _two(_kv(overrides(model_dir, runs, "killed", **{**STEPS, "train.fsdp": True, "train.eval_every": 1})))
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step-000002").exists():
        assert victim.poll() is None, "run finished before it could be killed: " + victim.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)  # torchrun and both workers
    victim.wait()
    assert not (run_dir / "final").exists()
    _finish(_two(["--resume", str(run_dir)]))

    assert_same_params(final_params(two), final_params(run_dir), atol=1e-6)
    straight = _comparable(read_metrics(two / "metrics.jsonl"))
    resumed = [{k: v for k, v in r.items() if not k.startswith("eval/") or r["step"] % 2 == 0}
               for r in _comparable(read_metrics(run_dir / "metrics.jsonl"))]
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]  # none missing, none doubled
    assert resumed == straight


def test_a_sharded_checkpoint_resumes_in_one_process_and_the_reverse(one, two, runs):
    """2 sharded processes -> 1 process, and 1 process -> 2 sharded processes, from the step-2 checkpoint."""
    down = _copy_at_step_2(two, runs / "two-then-one")
    _one(["--resume", str(down)])
    assert_same_params(final_params(two), final_params(down), atol=ACROSS_PROCESS_COUNTS)
    assert [r["step"] for r in read_metrics(down / "metrics.jsonl")] == [0, 1, 2, 3, 4]

    up = _copy_at_step_2(one, runs / "one-then-two")
    _finish(_two(["--resume", str(up), "train.fsdp=true"]))
    assert_same_params(final_params(one), final_params(up), atol=ACROSS_PROCESS_COUNTS)
    assert json.loads((up / "checkpoints" / "step-000004" / "trainer_state.json").read_text())["processes"] == 2


def test_checkpoints_in_many_files_per_process_train_and_reshard_alike(model_dir, runs, one, two):
    """Checkpoints split into files of at most 4 KiB of tensors (issue 23: the writer holds one file in memory)
    give the same run as one file per process, and resume on one process (which writes one file) as well."""
    small = runs / "small-files"
    _finish(_two(_kv(overrides(model_dir, runs, "small-files", **STEPS, **{"train.fsdp": True})), small_files=True))
    for rank in (1, 2):
        assert len(list((small / "checkpoints" / "step-000004" / "shards").glob(f"shard-0000{rank}-*"))) > 5
    assert_same_params(final_params(two), final_params(small), atol=0)
    down = _copy_at_step_2(small, runs / "small-files-then-one")
    _one(["--resume", str(down)])
    assert_same_params(final_params(one), final_params(down), atol=ACROSS_PROCESS_COUNTS)


def test_a_replay_buffer_cannot_change_its_number_of_processes(model_dir, runs, two):
    """The replay sampler's buffer is per process; a resume with another count names both counts."""
    from gvpo.run.checkpoint_manifest import write_manifest

    folder = _copy_at_step_2(two, runs / "replay")
    ckpt = folder / "checkpoints" / "step-000002"
    (ckpt / "sampler-1.json").write_text(json.dumps({"buffer": [["k", {"x": 1}]]}))
    write_manifest(ckpt)  # as if the run had stored it: the checkpoint stays intact
    with pytest.raises(ValueError, match="written by 2 processes and this run has 1"):
        train(load_config(folder / "config.yaml"), resume=folder)


def test_every_micro_batch_but_the_last_is_marked_as_accumulating(model_dir, tmp_path, monkeypatch):
    """accelerate's DeepSpeed wrapper steps the optimizer inside ``backward`` when ``sync_gradients`` is set
    (``DeepSpeedEngineWrapper.backward``): with 4 micro-batches per step it must be unset, set only on the
    4th, and set again for the optimizer step."""
    from accelerate import Accelerator

    flags, steps = [], []
    backward = Accelerator.backward
    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kw: (flags.append(self.sync_gradients),
                                                                            backward(self, loss, **kw))[1])
    original_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **kw: (steps.append(1),
                                                                            original_step(self, *a, **kw))[1])
    train(load_config(None, overrides(model_dir, tmp_path, "mb", **{"train.max_steps": 2,
                                                                    "train.micro_batch_size": 4})))
    assert flags == [False, False, False, True] * 2
    assert len(steps) == 2
