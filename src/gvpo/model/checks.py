"""Loading the policy with one clear line when the model is not usable: a missing or empty folder, a config
without weights, a model ``load_policy`` cannot load (whatever it raises), a tokenizer without pad or EOS.

Padding and EOS: a tokenizer without a pad token pads with its EOS token (as TRL does); a model without
an EOS token (in the tokenizer, ``config.json`` and ``generation_config.json``) trains with a warning, every
completion running to ``rollout.max_new_tokens``; with neither, left padding has no id to use and loading
stops with one line (set ``pad_token`` in the folder's ``tokenizer_config.json``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

from ..yaml_input import GvpoWarning

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


class ModelError(RuntimeError):
    """``model.name_or_path`` cannot be used; the message names it and what was expected."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_model_source(name_or_path: str, key: str = "model.name_or_path") -> None:
    """Refuse a local model folder that cannot hold a model, before transformers reports something unrelated
    (a hub connection error for a missing folder, a missing ``config.json``, ...). Hub ids pass through."""
    path = Path(name_or_path).expanduser()
    explicit = name_or_path.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name_or_path
    if not path.exists():
        if explicit or _offline() or name_or_path.count("/") > 1:
            offline = " (and the hub is off: HF_HUB_OFFLINE is set)" if _offline() and not explicit else ""
            raise ModelError(f"{key}={name_or_path}: no such folder{offline}; expected a folder with config.json, "
                             "tokenizer files and weights, or 'default'")
        return
    if not path.is_dir():
        raise ModelError(f"{key}={name_or_path}: is a file; expected a model folder (config.json, tokenizer, weights)")
    if not any(path.iterdir()):
        raise ModelError(f"{key}={name_or_path}: the folder is empty; expected config.json, tokenizer files and "
                         "weights (e.g. from save_pretrained)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{key}={name_or_path}: no config.json in the folder; expected a transformers model "
                         "folder (save_pretrained writes one)")
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ModelError(f"{key}={name_or_path}: config.json but no weights (model.safetensors or "
                         "pytorch_model.bin, or their sharded index) in the folder")


def load_checked(config, device, progress: bool = True, key: str = "model.name_or_path"):
    """``load_policy`` behind the checks above; whatever it raises becomes one :class:`ModelError` line that
    names ``key`` (the config key, or the command-line flag that gave the model)."""
    from ..config import ConfigError
    from .loading import load_policy, resolve_model_path
    from .router_loss import router_aux_loss_coef

    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from .gguf import ModelSourceError

    try:
        path = resolve_model_path(config.name_or_path, config.gguf_file)
    except ModelSourceError as err:
        raise ModelError(f"{key}={config.name_or_path}: {err}") from err
    check_model_source(path, key)
    try:
        model, tokenizer = load_policy(dataclasses.replace(config, name_or_path=path, gguf_file=""), device)  # resolved once
    except (ImportError, MemoryError, ConfigError):  # ConfigError: load_policy's own one-line refusals
        raise
    except Exception as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        why = lines[0] if lines else type(err).__name__
        raise ModelError(f"{key}={config.name_or_path}: cannot load it as a causal language model "
                         f"({type(err).__name__}: {why[:300]})") from err
    router_aux_loss_coef(model, getattr(config, "router_aux_loss_coef", None))  # a coefficient needs an MoE model
    if tokenizer.pad_token_id is None:
        raise ModelError(f"{key}={config.name_or_path}: the tokenizer has neither a pad nor an EOS token, and "
                         "left padding needs one; set pad_token (or eos_token) in its tokenizer_config.json to a "
                         "token of its vocabulary")
    generation = getattr(model, "generation_config", None)
    if tokenizer.eos_token_id is None and getattr(generation, "eos_token_id", None) is None:
        warnings.warn(f"{key}={config.name_or_path}: no EOS token (tokenizer, config.json, generation_config.json); "
                      "every completion runs to rollout.max_new_tokens", GvpoWarning, stacklevel=2)
    return model, tokenizer
