"""Sharding the policy across processes with FSDP2 where accelerate does not, and gathering it back.

accelerate's FSDP plugin engages only on GPUs: with ``use_cpu`` it falls back to plain DDP, and
``accelerate launch`` starts a single CPU process unless MPI is set up. ``train.fsdp`` therefore makes
the trainer call torch's ``fully_shard`` itself when the distributed type is plain DDP (``torchrun``
with gloo on CPU processes, or NCCL): one shard unit per decoder layer (the classes named in the
model's ``_no_split_modules``, what accelerate's ``TRANSFORMER_BASED_WRAP`` wraps), then the root
(embeddings, final norm, head). Under accelerate's own FSDP (``distributed_type: FSDP``) the model
is already sharded and this module only gathers.

Every function here that touches a sharded model is a collective: all ranks must call it.
"""

from __future__ import annotations

import torch
from accelerate import DistributedType
from accelerate.utils import extract_model_from_parallel
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard

SHARDABLE = (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
"""Distributed types under which ``train.fsdp`` shards the policy itself (accelerate prepared no sharding)."""


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model: instances of the classes in ``_no_split_modules``.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=3,
    ...                                  num_attention_heads=2, num_key_value_heads=2))
    >>> [type(layer).__name__ for layer in decoder_layers(m)]
    ['LlamaDecoderLayer', 'LlamaDecoderLayer', 'LlamaDecoderLayer']
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"train.fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules); "
                         "cannot choose shard units")
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: torch.nn.Module, *, reshard_after_forward: bool = True) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the root, in place over the default process group; returns
    ``model``. Create the optimizer afterwards: its parameters become DTensor shards."""
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any part of ``model`` is an FSDP2 (``fully_shard``) or FSDP1 module, or ZeRO-3 partitioned."""
    model = extract_model_from_parallel(model)
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()) or any(
        hasattr(p, "ds_id") for p in model.parameters())


def full_state_dict(model: torch.nn.Module, accelerator) -> dict:
    """The complete state dict of the unwrapped ``model``, on the main process's CPU (``{}`` on the others),
    for saving. A collective when the model is sharded."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        state = accelerator.get_state_dict(model)  # ZeRO-3 gathers
        return state if accelerator.is_main_process else {}
    inner = extract_model_from_parallel(model)
    if not is_sharded(inner):
        return inner.state_dict() if accelerator.is_main_process else {}
    state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # gathered tied weights are separate copies, which save_pretrained would keep twice: keep the first name
    aliases = {n for n, _ in inner.named_parameters(remove_duplicate=False)} - {n for n, _ in inner.named_parameters()}
    return {k: v for k, v in state.items() if k not in aliases}


def gathered_state_dict(model: torch.nn.Module) -> dict:
    """The complete state dict of the unwrapped ``model`` on every process, on its device (to copy into a
    reference model). A collective when the model is sharded."""
    inner = extract_model_from_parallel(model)
    if any(hasattr(p, "ds_id") for p in inner.parameters()):
        raise NotImplementedError("objective.ref_sync_steps under DeepSpeed ZeRO-3: gathering the weights on every "
                                  "process is not implemented; use FSDP, or no ref_sync_steps")
    if not is_sharded(inner):
        return inner.state_dict()
    return get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True))
