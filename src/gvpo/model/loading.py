"""Loading the policy, its tokenizer and the reference policy (frozen copy or LoRA-disabled base)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from ..config import ConfigError, ModelConfig
from .sharding import gathered_state_dict


def resolve_model_path(name_or_path: str, gguf_file: str = "") -> str:
    """``default`` -> the embedded arithmetic model's folder; a GGUF file (``*.gguf``, or a folder and
    ``gguf_file``) -> its cached plain folder (:mod:`gvpo.model.gguf`); the name of a model ``gvpo model get``
    fetched (not a local folder) -> its folder (:mod:`gvpo.model.fetch`); anything else unchanged."""
    if name_or_path == "default" and not gguf_file:
        from ..tasks.arithmetic import default_model_path

        return str(default_model_path())
    from .gguf import gguf_source, plain_folder
    from .fetch import KNOWN_MODELS, fetched_folder

    if name_or_path in KNOWN_MODELS and not gguf_file and not Path(name_or_path).exists():
        return str(fetched_folder(name_or_path))
    source = gguf_source(name_or_path, gguf_file)
    return name_or_path if source is None else str(plain_folder(source))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _rate_names(obj) -> list[str]:
    """``obj``'s float attributes named like a dropout rate (``attention_dropout``, ``attn_pdrop``, ``layerdrop``)."""
    return [name for name, value in vars(obj).items()
            if "drop" in name.lower() and isinstance(value, float) and not isinstance(value, bool)]


def _configs(model: torch.nn.Module) -> list[PretrainedConfig]:
    """The transformers configs the modules of ``model`` hold, with their sub-configs (``text_config``...)."""
    found, todo = {}, [getattr(m, "config", None) for m in model.modules()]
    while todo:
        config = todo.pop()
        if isinstance(config, PretrainedConfig) and id(config) not in found:
            found[id(config)] = config
            todo.extend(v for v in vars(config).values() if isinstance(v, PretrainedConfig))
    return list(found.values())


def _dropout_holders(model: torch.nn.Module):
    """``(object, attribute)`` for every dropout rate in ``model``: ``nn.Dropout``-like modules' ``p``,
    modules' float rate attributes (read by functional dropout at each forward: OPT's ``dropout`` and
    ``layerdrop``, Falcon's ``hidden_dropout``, Llama's ``attention_dropout`` ...), and the same names in
    the configs (a few models read ``self.config.dropout`` at each forward)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            yield module, "p"
        for name in _rate_names(module):
            yield module, name
    for config in _configs(model):
        for name in _rate_names(config):
            yield config, name


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether any dropout rate in ``model`` is nonzero (see :func:`disable_dropout`)."""
    return any(getattr(obj, name) > 0 for obj, name in _dropout_holders(model))


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout rate in ``model`` to 0, so that log-probs in train mode are deterministic and
    equal eval mode's (``pi_theta / pi_ref`` must not carry dropout noise). Zeroing only ``nn.Dropout``
    misses rates kept as floats and passed to ``F.dropout`` or attention kernels at each forward."""
    for obj, name in list(_dropout_holders(model)):
        setattr(obj, name, 0.0)


def check_causal_lm(config: PretrainedConfig, path: str) -> None:
    """Raise a one-line error unless ``config`` describes a decoder-only causal LM: GVPO scores a
    completion token by token given the prompt, which encoder-decoders and masked (bidirectional) LMs
    do not do, even where transformers offers them a causal-LM head."""
    kind = getattr(config, "model_type", "?")
    expected = "expected a causal (decoder-only) LM that AutoModelForCausalLM loads, e.g. Llama, Qwen, Gemma"
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"model.name_or_path={path}: {kind} is an encoder-decoder model; {expected}")
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        raise ConfigError(f"model.name_or_path={path}: {kind} has no causal LM head in transformers; {expected}")
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not (config.is_decoder or getattr(config, "causal", False)):
        raise ConfigError(f"model.name_or_path={path}: {kind} is a masked (bidirectional) LM; {expected}")


def own_aligned_memory(model: torch.nn.Module) -> None:
    """Move parameters and buffers that do not start on a 64-byte boundary into memory torch allocates.

    ``from_pretrained`` on CPU can leave tensors at the (8-byte aligned) offsets of the safetensors file,
    and CPU BLAS takes another path for unaligned data (e.g. a one-row ``lm_head`` matmul), so the policy
    and its freshly allocated reference copy would round the same weights differently. Tied weights stay
    tied (one ``Parameter`` object).
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()


def load_policy(config: ModelConfig, device: torch.device | str = "cpu"):
    """The trainable policy (optionally with LoRA adapters) and its tokenizer, in train mode, with dropout
    off unless ``config.disable_dropout`` is false."""
    device = torch.device(device)
    path = resolve_model_path(config.name_or_path, config.gguf_file)
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    check_causal_lm(model_config, path)
    if config.lora and config.lora_dropout and config.disable_dropout:
        raise ConfigError(f"model.lora_dropout={config.lora_dropout} needs model.disable_dropout=false (dropout is "
                         "off by default so that log-probs are deterministic)")
    tokenizer = load_tokenizer(path, config.trust_remote_code)
    dtype = resolve_dtype(config.dtype, device)
    eager = {"experts_implementation": "eager"} if dtype == torch.float64 else {}  # MoE: grouped_mm has no float64
    model = AutoModelForCausalLM.from_pretrained(
        path, config=model_config, dtype=dtype, trust_remote_code=config.trust_remote_code, **eager
    ).to(device)
    own_aligned_memory(model)
    if config.disable_dropout:
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
    the full weights when ``model`` holds only shards (:func:`gvpo.model.sharding.full_state_dict`)."""
    model = extract_model_from_parallel(model)
    if hasattr(model, "merge_and_unload"):
        model, state_dict = copy.deepcopy(model).merge_and_unload(), None
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(path)
