"""The shipped recipes: every file in configs/ loads, names real tasks and options, and the
accelerate files parse with accelerate's own loader (no GPU, no download)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml

from gvpo.config import RunConfig, load_config
from gvpo.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def test_the_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"arithmetic-default.yaml", "qwen2.5-0.5b-gsm8k.yaml", "qwen2.5-math-1.5b-math.yaml",
            "qwen2.5-math-7b-math.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_with_real_task_and_options(path):
    config = load_config(path)
    factory = TASKS.resolve(config.task.name)
    inspect.signature(factory).bind(**config.task.options)  # every option is a parameter of the task
    for name in config.task.eval_tasks:
        TASKS.resolve(name)
    if config.rollout.engine == "vllm":
        assert 0 < config.rollout.vllm_gpu_memory_utilization < 1


def test_arithmetic_default_is_the_defaults():
    assert load_config(CONFIGS / "arithmetic-default.yaml") == RunConfig()


@pytest.mark.parametrize("name", ["qwen2.5-math-1.5b-math.yaml", "qwen2.5-math-7b-math.yaml"])
def test_math_recipes_mirror_the_released_recipe(name):
    c = load_config(CONFIGS / name)
    assert (c.objective.name, c.objective.beta, c.objective.reference) == ("gvpo", 0.1, "rollout")
    assert c.optim.lr == 1e-6 and c.rollout.k == 4
    assert c.rollout.max_new_tokens == 1024 and c.task.options["max_new_tokens"] == 1024
    assert c.rollout.engine == "vllm" and c.model.dtype == "float32"  # float32 master weights for lr 1e-6
    assert c.train.prompts_per_step % 8 == 0  # divisible across 8 processes


def test_gsm8k_recipe_is_single_gpu_lora_vllm():
    c = load_config(CONFIGS / "qwen2.5-0.5b-gsm8k.yaml")
    assert c.model.lora and c.task.name == "gsm8k" and c.rollout.engine == "vllm"


@pytest.mark.parametrize("name, lora", [("smollm2-135m-lora.yaml", True), ("smollm2-135m-full.yaml", False)])
def test_smollm2_recipes_train_the_fetched_model_on_the_chat_task(name, lora):
    from gvpo.model.fetch import KNOWN_MODELS

    c = load_config(CONFIGS / name)
    assert c.model.name_or_path in KNOWN_MODELS and c.model.lora is lora
    assert c.task.name == "chat_arithmetic" and c.output.name == name.removesuffix(".yaml")


@pytest.mark.parametrize("name", ["fsdp.yaml", "deepspeed_zero3.yaml"])
def test_accelerate_configs_parse_for_8_gpus(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / "accelerate" / name))
    assert config.num_processes == 8 and config.num_machines == 1
    raw = yaml.safe_load((CONFIGS / "accelerate" / name).read_text())
    if name == "fsdp.yaml":
        assert raw["distributed_type"] == "FSDP" and raw["mixed_precision"] == "bf16"
    else:
        assert raw["distributed_type"] == "DEEPSPEED"
        ds = json.loads((CONFIGS.parent / raw["deepspeed_config"]["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == 3 and isinstance(ds["train_micro_batch_size_per_gpu"], int)
