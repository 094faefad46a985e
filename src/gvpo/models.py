"""Loading the policy, its tokenizer and the reference policy (frozen copy or LoRA-disabled base)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import ModelConfig
from .sharding import gathered_state_dict


def resolve_model_path(name_or_path: str) -> str:
    """``default`` -> the embedded arithmetic model's folder; anything else unchanged."""
    if name_or_path == "default":
        from .tasks.arithmetic import default_model_path

        return str(default_model_path())
    return name_or_path


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout makes log-probs random, which breaks ``pi_theta / pi_ref``; turn it off everywhere."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load_policy(config: ModelConfig, device: torch.device | str = "cpu"):
    """The trainable policy (optionally with LoRA adapters) and its tokenizer."""
    device = torch.device(device)
    path = resolve_model_path(config.name_or_path)
    tokenizer = load_tokenizer(path, config.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(config.dtype, device), trust_remote_code=config.trust_remote_code
    ).to(device)
    disable_dropout(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.lora:
        from peft import LoraConfig, get_peft_model

        targets = config.lora_target_modules
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if config.gradient_checkpointing:
            model.enable_input_require_grads()
    model.train()
    return model, tokenizer


class Reference:
    """pi_ref for a fixed reference: a frozen copy of the initial policy, or, with LoRA, the same
    model with its adapters disabled (no second copy). ``scoring()`` is a context in which the
    given ``model`` computes reference log-probs."""

    def __init__(self, policy: torch.nn.Module, lora: bool):
        self.lora = lora
        self.model = None if lora else freeze(copy.deepcopy(policy))

    def scoring(self, policy: torch.nn.Module):
        if self.lora:
            return _adapters_off(policy)
        return contextlib.nullcontext(self.model)

    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the policy's current weights into the reference (``ref_sync_steps``)."""
        if self.lora:
            raise ValueError("objective.ref_sync_steps needs a full-weight policy; with model.lora the "
                             "reference is the base model and cannot move")
        self.model.load_state_dict(gathered_state_dict(policy))

    def state_dict(self) -> dict:
        return {} if self.lora else self.model.state_dict()


@contextlib.contextmanager
def _adapters_off(policy):
    with extract_model_from_parallel(policy).disable_adapter():
        yield policy


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_pretrained(model: torch.nn.Module, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """Save a folder loadable by plain ``AutoModelForCausalLM.from_pretrained`` (LoRA merged). ``state_dict``:
    the full weights when ``model`` holds only shards (:func:`gvpo.sharding.full_state_dict`)."""
    model = extract_model_from_parallel(model)
    if hasattr(model, "merge_and_unload"):
        model, state_dict = copy.deepcopy(model).merge_and_unload(), None
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(path)
