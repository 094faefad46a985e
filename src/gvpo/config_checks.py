"""Checks of a whole config that a single field's type cannot express: ranges, registry names, combinations.

:func:`validate` runs after every load (:func:`gvpo.config.load_config`); each failure is a :class:`ConfigError`
naming the key, the value and what is allowed.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config key or value is not valid; the message names the key and what is allowed."""


NON_NEGATIVE = ("train.max_steps", "train.micro_batch_size", "train.eval_every", "train.eval_n",
                "train.checkpoint_every", "train.keep_checkpoints", "rollout.max_new_tokens", "optim.warmup_steps",
                "optim.weight_decay", "optim.max_grad_norm", "objective.ref_sync_steps", "task.reward_timeout_s",
                "sampler.replay_capacity", "sampler.replay_max_age", "sampler.mixture_offline", "task.env_timeout_s",
                "rollout.max_turns", "rollout.max_observation_tokens", "train.async_lag", "train.async_threads")
"""Counts and limits where a negative value has no meaning (0 keeps its documented meaning, e.g. "all")."""


def validate(config):
    """Cross-field checks of ``config`` (a :class:`gvpo.config.RunConfig`) that a single field's type cannot
    express; returns it unchanged."""
    positive = {"rollout.k": config.rollout.k, "train.prompts_per_step": config.train.prompts_per_step,
                "train.updates_per_batch": config.train.updates_per_batch,
                "train.mini_batches": config.train.mini_batches}
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"{key} must be >= 1, got {v}")
    if config.rollout.k < 2 and config.objective.name in ("gvpo", "grpo", "gspo", "dr_grpo"):
        raise ConfigError(f"rollout.k must be >= 2 for objective {config.objective.name!r} (groups need variance)")
    if config.objective.beta <= 0:
        raise ConfigError(f"objective.beta must be > 0, got {config.objective.beta}")
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {config.optim.lr}")
    if not 0 < config.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {config.rollout.top_p}")
    coef = config.model.router_aux_loss_coef
    if coef is not None and not coef >= 0:
        raise ConfigError(f"model.router_aux_loss_coef must be >= 0 (or null = the model's own), got {coef}")
    if config.rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature must be > 0, got {config.rollout.temperature}")
    for key in NON_NEGATIVE:
        if _get(config, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(config, key)}")
    if config.train.prompts_per_step % config.train.mini_batches:
        raise ConfigError(f"train.prompts_per_step={config.train.prompts_per_step} must be divisible by "
                          f"train.mini_batches={config.train.mini_batches} (each mini-batch holds whole groups)")
    for key, registry in (("objective.name", "objectives:OBJECTIVES"), ("sampler.source", "samplers:SAMPLERS")):
        _check_name(key, _get(config, key), registry)
    if config.sampler.source in ("offline", "mixture") and not config.sampler.offline_path:
        raise ConfigError(f"sampler.offline_path is required with sampler.source={config.sampler.source}")
    if config.sampler.source == "replay" and not 0 <= config.sampler.replay_historical < config.rollout.k:
        raise ConfigError(f"sampler.replay_historical must be in [0, rollout.k), got {config.sampler.replay_historical}")
    if config.sampler.source == "replay" and not 0 <= config.sampler.replay_revisit < 1:
        raise ConfigError(f"sampler.replay_revisit must be in [0, 1), got {config.sampler.replay_revisit}: at 1 no "
                          "new prompt enters after the first step, so training would cycle over its prompts")
    if config.train.fsdp and config.model.lora:
        raise ConfigError("train.fsdp with model.lora: sharded LoRA adapters are not supported (merging them for "
                          "final/ needs the full weights); use one of the two")
    if config.task.reward_weights and len(config.task.reward_weights) != len(config.task.rewards):
        raise ConfigError(f"task.reward_weights has {len(config.task.reward_weights)} values for "
                          f"{len(config.task.rewards)} task.rewards")
    return config


def _get(config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _check_name(key: str, name: str, registry: str) -> None:
    """A registered name or a dotted path (imported when the run starts); else list the choices."""
    import importlib

    module, attr = registry.split(":")
    names = getattr(importlib.import_module(f"gvpo.{module}"), attr).names()
    if name not in names and "." not in name and ":" not in name:
        raise ConfigError(f"{key}: {name!r} is not valid; choose one of {', '.join(names)}, or a dotted path "
                          "like 'my_pkg.module.factory'")
