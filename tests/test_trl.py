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


# --- Mixture-of-Experts: TRL's router loss ------------------------------------------------------------------

EAGER64 = {"dtype": torch.float64, "experts_implementation": "eager"}  # transformers' grouped_mm has no float64


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_family(tmp_path_factory.mktemp("trl-moe") / "model", "qwen3_moe")


def fixed_inputs(trainer) -> dict:
    """The fixed batch as TRL hands it to ``_compute_loss`` (generated, scored, one micro-batch)."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer._generate_and_score_completions([{"prompt": p} for p in trl_fixed.PROMPTS
                                                    for _ in range(trl_fixed.K)])


def router_term_gradient(trainer, inputs) -> torch.Tensor:
    """The gradient the trainer's router term adds: its loss's gradient with the term minus without it."""
    params = list(trainer.model.parameters())

    def gradient(enabled: bool) -> torch.Tensor:
        trainer.aux_loss_enabled = enabled
        grads = torch.autograd.grad(trainer._compute_loss(trainer.model, inputs), params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])

    try:
        return gradient(True) - gradient(False)
    finally:
        trainer.aux_loss_enabled = True


def test_moe_router_term_gradient_equals_trls_for_the_same_forward(moe_dir, tmp_path, one_thread):
    """A tiny Qwen3-MoE: the gradient GVPOTrainer's router term adds equals the one TRL's GRPOTrainer adds on
    the same batch, and both equal ``coef * grad aux_loss`` of one plain forward of the padded batch (prompt +
    completion, attention mask), as TRL's forward returns it. The term's gradient is the difference of two
    float32 gradients (with and without it), so the coefficient is 1 here to stand above their rounding;
    the config's own 0.001 is the default (next test)."""
    options = {"model_init_kwargs": {"dtype": torch.float32}, "router_aux_loss_coef": 1.0}
    gvpo = trl_fixed.make_trainer(moe_dir, tmp_path / "gvpo", **options)
    grpo = trl_fixed.make_trainer(moe_dir, tmp_path / "grpo", grpo=True, **options)
    assert gvpo.aux_loss_enabled and grpo.aux_loss_enabled
    inputs = fixed_inputs(gvpo)
    ours, theirs = router_term_gradient(gvpo, inputs), router_term_gradient(grpo, inputs)
    model = gvpo.model
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    aux = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    params = list(model.parameters())
    grads = torch.autograd.grad(aux, params, allow_unused=True)  # the LM head takes no part in it
    expected = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    assert expected.norm() > 1e-5
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-4)
    assert gvpo._metrics["train"]["aux_loss"][0] == pytest.approx(aux.item(), rel=1e-6)


def test_moe_update_equals_sgd_on_gvpo_loss_plus_router_loss(moe_dir, tmp_path, one_thread):
    """One SGD step of GVPOTrainer on a float64 Qwen3-MoE = one SGD step on ``gvpo_loss + 0.001 * aux_loss``
    (the padded batch's forward); without the router term the step would differ by over 1e-6. transformers
    computes the load-balancing statistics in float32 even in a float64 model, and TRL shuffles the batch's
    rows, so the router term agrees to float32 rounding (the GVPO part alone agrees to 1e-9: tests above)."""
    from transformers import AutoTokenizer

    from gvpo import gvpo_loss

    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    rewards = torch.tensor(trl_fixed.REWARDS, dtype=torch.float64).flatten()
    group_ids = torch.arange(len(trl_fixed.PROMPTS)).repeat_interleave(trl_fixed.K)

    def loss(coef):
        def fn(logps, ref, policy, table):
            ids, mask = trl_fixed.padded_batch(tokenizer, table)
            aux = policy(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
            return gvpo_loss(logps, ref, rewards, group_ids, beta=trl_fixed.BETA) + coef * aux
        return fn

    trainer = trl_fixed.make_trainer(moe_dir, tmp_path, model_init_kwargs=EAGER64)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.001  # the model config's, as in TRL
    trainer.train()
    load = {"experts_implementation": "eager"}
    expected = trl_fixed.sgd_step(moe_dir, loss(0.001), **load)
    assert max_diff(expected, trl_fixed.sgd_step(moe_dir, loss(0.0), **load)) > 1e-6  # the router term matters
    assert max_diff(trl_fixed.trained_params(trainer), expected) < 1e-8


# --- masked truncated completions, k = 1 evaluation ----------------------------------------------------------

ENDS = [[True, False, True, False], [False, True, False, False], [True, True, True, False]]
"""Which completions end with EOS; the others are truncated for ``mask_truncated_completions``: group 0
keeps 2 (k = 2), group 1 keeps 1 (no variance: contributes 0), group 2 keeps 3."""
GROUP_IDS = [g for g in range(len(trl_fixed.PROMPTS)) for _ in range(trl_fixed.K)]


@pytest.mark.parametrize("ends, accumulation", [(ENDS, 1), (ENDS, 2), ([[False] * trl_fixed.K] * 3, 1)],
                         ids=["some", "some_accumulated", "all"])
def test_masked_truncated_completions_leave_their_groups(model_dir, tmp_path, ends, accumulation, one_thread):
    """``mask_truncated_completions=True``: the step equals SGD on the float64 loop over the kept completions
    (``tiny.kept_gvpo_loss_loop``), also with the batch split over 2 accumulation steps (the kept flags then
    come from the buffered batch); with every completion truncated the loss is 0 and no parameter moves."""
    from transformers import AutoTokenizer

    table = trl_fixed.with_eos(trl_fixed.completion_table(AutoTokenizer.from_pretrained(model_dir)), ends)
    rewards = torch.tensor(trl_fixed.REWARDS, dtype=torch.float64).flatten()
    trainer = trl_fixed.make_trainer(model_dir, tmp_path, table=table, mask_truncated_completions=True,
                                     max_completion_length=6, logging_strategy="steps", logging_steps=1,
                                     per_device_train_batch_size=BATCH // accumulation,
                                     gradient_accumulation_steps=accumulation)
    trainer.train()
    expected = trl_fixed.sgd_step(model_dir, lambda logps, ref, policy, _: tiny.kept_gvpo_loss_loop(
        logps, ref, rewards, GROUP_IDS, sum(ends, []), trl_fixed.BETA), table=table)
    assert max_diff(trl_fixed.trained_params(trainer), expected) < 1e-9
    logged = next(row for row in trainer.state.log_history if "gvpo/loss" in row)
    assert logged["gvpo/groups"] == (2 if ends is ENDS else 0)
    if ends is not ENDS:
        assert logged["loss"] == logged["gvpo/loss"] == 0.0
        assert max_diff(trl_fixed.trained_params(trainer), expected_params(model_dir, ())) == 0.0
    else:  # the masked completions matter: training on all of them would land elsewhere
        assert max_diff(expected, trl_fixed.sgd_step(model_dir, lambda logps, ref, policy, _: tiny.kept_gvpo_loss_loop(
            logps, ref, rewards, GROUP_IDS, [True] * BATCH, trl_fixed.BETA), table=table)) > 1e-4


def test_evaluation_with_one_completion_per_prompt_logs_loss_zero_and_rewards(model_dir, tmp_path, one_thread):
    """``num_generations_eval=1``: no group has variance, so the GVPO loss is 0 over 0 groups (GRPO's is 0
    too: its advantages are 0), and the rewards are evaluated as usual: the logged mean is the mean of what
    the reward function returned for the three completions."""
    from datasets import Dataset

    trainer = trl_fixed.make_trainer(model_dir, tmp_path, num_generations_eval=1, per_device_eval_batch_size=3)
    lookup, seen = trainer.reward_funcs[0], []

    def table_reward(**kwargs):
        seen.extend(lookup(**kwargs))
        return seen[-len(kwargs["completion_ids"]):]

    trainer.reward_funcs[0] = table_reward
    metrics = trainer.evaluate(Dataset.from_list([{"prompt": p} for p in trl_fixed.PROMPTS]))
    assert metrics["eval_loss"] == metrics["eval_gvpo/loss"] == 0.0
    assert metrics["eval_gvpo/groups"] == 0.0
    assert len(seen) == 3 and len(set(seen)) > 1
    assert metrics["eval_reward"] == pytest.approx(sum(seen) / 3)
