"""``gvpo.trl``: GVPO's loss inside TRL's GRPOTrainer.

One optimizer step of ``GVPOTrainer`` on a fixed batch (tests/trl_fixed.py: a float64 tiny Llama,
given completions and rewards, SGD with lr 1) must move the parameters exactly as one SGD step on
``gvpo.gvpo_loss`` computed by plain PyTorch, whatever way TRL spreads the groups: whole in one
micro-batch, split over 2 gradient-accumulation steps, over 2 gloo processes, reused for 2 iterations
(the weights then use the updated parameters), with a fixed or a rollout reference.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("trl")

import tiny  # noqa: E402
import trl_fixed  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("trl-tiny") / "model")


@functools.lru_cache(maxsize=None)
def expected_params(model_dir: Path, steps: tuple[str, ...]) -> dict:
    return trl_fixed.reference_params(model_dir, list(steps))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


BATCH = len(trl_fixed.PROMPTS) * trl_fixed.K

CASES = {
    # name: (GVPOConfig options, the reference of each optimizer step as trl_fixed.reference_params reads it)
    "one_step": ({}, ["fixed"]),
    "two_iterations": ({"num_iterations": 2, "max_steps": 2}, ["fixed", "fixed"]),
    "two_accumulation_steps": ({"per_device_train_batch_size": BATCH // 2, "gradient_accumulation_steps": 2},
                               ["fixed"]),
    "rollout_two_batches_two_iterations": ({"reference": "rollout", "num_iterations": 2, "max_steps": 4, "batches": 2},
                                           ["new", "same", "new", "same"]),
    "rollout_accumulation_two_iterations": ({"reference": "rollout", "num_iterations": 2, "max_steps": 4, "batches": 2,
                                             "per_device_train_batch_size": BATCH // 2,
                                             "gradient_accumulation_steps": 2}, ["new", "same", "new", "same"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_update_equals_sgd_on_gvpo_loss(model_dir, tmp_path, case):
    options, steps = CASES[case]
    trainer = trl_fixed.make_trainer(model_dir, tmp_path / case, **options)
    trainer.train()
    expected = expected_params(model_dir, tuple(steps))
    assert max_diff(expected, expected_params(model_dir, ())) > 1e-3  # the steps move the parameters
    if steps.count("new") > 1:  # a trainer that ignored reference="rollout" would not pass
        assert max_diff(expected, expected_params(model_dir, ("fixed",) * len(steps))) > 1e-4
    assert max_diff(trl_fixed.trained_params(trainer), expected) < 1e-9


def test_float32_model_uses_trl_kernel_and_matches_to_float32_precision(model_dir, tmp_path):
    """Models below float64 keep TRL's fused float32 log-prob kernel: same update to ~1e-6."""
    trainer = trl_fixed.make_trainer(model_dir, tmp_path / "f32", model_init_kwargs={"dtype": torch.float32})
    trainer.train()
    assert max_diff(trl_fixed.trained_params(trainer), expected_params(model_dir, ("fixed",))) < 1e-5


def test_two_gloo_processes_match_the_single_process_reference(model_dir, tmp_path):
    """2 processes, 12 completions: each holds 6, so the second group straddles them; with 3 per
    micro-batch and 2 accumulation steps groups straddle processes and micro-batches."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS),
                                                        os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    runs = [f"per_process:per_device_train_batch_size={BATCH // 2}",
            f"accumulated:per_device_train_batch_size={BATCH // 4},gradient_accumulation_steps=2"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29541", str(TESTS / "trl_fixed.py"), str(model_dir), str(tmp_path), *runs],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("per_process", "accumulated"):
        assert (tmp_path / f"{name}.processes").read_text() == "2"
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        assert max_diff(got, expected_params(model_dir, ("fixed",))) < 1e-9, name


def test_rollout_reference_loads_no_reference_model(model_dir, tmp_path):
    trainer = trl_fixed.make_trainer(model_dir, tmp_path, reference="rollout")
    assert trainer.ref_model is None and trainer.args.beta == trl_fixed.BETA == trainer.gvpo_beta


@pytest.mark.parametrize("field, value, message", [
    ("beta", 0.0, "beta must be a finite number > 0"),
    ("reference", "initial", "reference must be 'fixed' or 'rollout'"),
    ("scale_rewards", "group", "scale_rewards must be 'none'"),
    ("vllm_importance_sampling_correction", True, "vllm_importance_sampling_correction must be False"),
    ("top_entropy_quantile", 0.2, "top_entropy_quantile must be 1.0"),
    ("entropy_coef", 0.01, "entropy_coef must be 0.0"),
])
def test_config_rejects_what_would_change_gvpo_loss(tmp_path, field, value, message):
    from gvpo.trl import GVPOConfig

    assert GVPOConfig(output_dir=str(tmp_path), use_cpu=True).beta == 0.1
    with pytest.raises(ValueError, match=message):
        GVPOConfig(output_dir=str(tmp_path), use_cpu=True, **{field: value})


def test_unsupported_trl_version_fails_at_import_with_the_range(monkeypatch):
    import importlib.metadata

    import gvpo.trl

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.99.0")
    with pytest.raises(ImportError, match=r"supports TRL >=1\.16,<1\.17, but TRL 1\.99\.0 is installed"):
        gvpo.trl._check_trl_version()


def test_readme_script_trains_the_embedded_model_five_steps_with_finite_metrics(tmp_path, monkeypatch):
    """The README's "Using GVPO from TRL" script (<= 25 lines), run as written but for 5 steps of one
    prompt, logging each, in a temporary folder: TRL samples from gvpo's embedded model, a TRL reward function scores."""
    readme = (TESTS.parent / "README.md").read_text()
    script = readme.split("## Using GVPO from TRL", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len(script.strip().splitlines()) <= 25
    short = (script.replace("max_steps=60", "max_steps=5").replace("logging_steps=10", "logging_steps=1")
             .replace("per_device_train_batch_size=32", "per_device_train_batch_size=8"))  # one prompt a step
    assert short.count("max_steps=5") == 1 and "logging_steps=1," in short and "batch_size=8," in short
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(short, "README.md", "exec"), namespace)
    steps = [row for row in namespace["trainer"].state.log_history if "gvpo/loss" in row]
    assert len(steps) == 5
    for row in steps:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        assert {"loss", "reward", "gvpo/loss", "gvpo/log_ratio_mean"} <= numbers.keys()
        assert all(math.isfinite(v) for v in numbers.values()), row
    assert any(row["gvpo/log_ratio_mean"] != 0 for row in steps[1:])  # the policy moved away from the reference
