"""Generation engines behind one small Protocol, so the trainer never knows which one runs.

``hf`` uses transformers ``generate``; ``vllm`` (optional extra, GPU) lives in ``rollout.vllm``.
"""

from __future__ import annotations

from .base import Engine, Generation, SamplingParams, completion_mask_from_ids, hash_seed, is_token_ids, left_pad

__all__ = ["Engine", "Generation", "SamplingParams", "completion_mask_from_ids", "create_engine", "hash_seed",
           "is_token_ids", "left_pad"]


def create_engine(name: str, model, tokenizer, *, share_prompts: bool = True, **options) -> Engine:
    """Engine by name: ``hf`` (``share_prompts``: prefill each group's prompt once) or ``vllm``."""
    if name == "hf":
        from .hf import HFEngine

        return HFEngine(model, tokenizer, share_prompts=share_prompts)
    if name == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, **options)
    raise ValueError(f"rollout.engine: unknown engine {name!r}; choose hf or vllm")
