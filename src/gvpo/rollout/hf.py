"""Rollouts with transformers ``generate``, reproducible per row whatever the batch split.

Sampling uses the Gumbel-max trick: after the temperature and top-p warpers, each row adds Gumbel
noise drawn from its own ``torch.Generator`` seeded by the caller, and greedy decoding takes the
argmax, which is an exact sample from the warped softmax. A row's completion then depends only on
its seed, not on which other prompts share its batch or process, so one process and two processes
generate the same groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from ..logprobs import cache_argument, caches_prompts, prompt_cache, prompt_owners
from ..sharding import is_sharded
from .base import Generation, SamplingParams, completion_mask_from_ids


class SeededGumbelNoise(LogitsProcessor):
    """Adds per-row Gumbel(0, 1) noise from per-row generators; argmax then samples the softmax.

    Row ``i``'s uniforms are ``torch.rand(vocab, generator=generators[i])``, drawn straight into one
    reused ``(rows, vocab)`` buffer and turned into Gumbel noise in place (the same operations in the
    same order as ``-log(-log(u))``, so the samples are bit-identical to drawing each row separately).
    At a 152k vocabulary and 32 rows that takes less time per token than stacking separate draws:
    measured in bench/README.md, section "Where the time can go down", item 4 (``SeededGumbelNoise``).
    """

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self._uniform: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        rows, vocab = scores.shape
        if rows != len(self.generators):
            raise ValueError(f"scores have {rows} rows but {len(self.generators)} seeds were given")
        if self._uniform is None or self._uniform.shape != (rows, vocab):
            self._uniform = torch.empty(rows, vocab)
        for row, generator in zip(self._uniform, self.generators):
            torch.rand(vocab, generator=generator, out=row)
        # in place on the CPU buffer (as before, the noise is computed on CPU whatever the device, so a
        # seed gives the same noise on every device), then one copy to the scores' device
        gumbel = self._uniform.clamp_(min=1e-20, max=1 - 1e-7).log_().neg_().log_().neg_()
        return scores.float() + gumbel.to(scores.device)  # a fresh tensor: callers may keep it


def render_prompt(tokenizer, prompt) -> str:
    """A prompt as text: a string as is; a conversation through the chat template (generation prompt
    added), minus a leading BOS when the tokenizer adds one itself, so it is not there twice."""
    if not isinstance(prompt, list):
        return prompt
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def encode_prompts(tokenizer, prompts: list) -> dict:
    """Tokenise prompts (strings, or chat message lists through the chat template), left-padded."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=True)


def eos_ids(tokenizer, model) -> list[int]:
    """The ids that end a completion: the generation config's, else the tokenizer's EOS; ``[]`` for a model
    without one (every completion then runs to ``max_new_tokens``)."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if ids is not None else tokenizer.eos_token_id
    return sorted({i for i in (ids if isinstance(ids, list) else [ids]) if i is not None})


def synced_processes(model) -> bool:
    """Whether ``generate`` must keep every process stepping until all are done: each forward of a sharded
    model (FSDP, ZeRO-3) gathers weights with the others. transformers detects ZeRO-3 and its own FSDP2
    wrapping but not accelerate's or gvpo's ``fully_shard``, so gvpo tells it."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and is_sharded(model)


class HFEngine:
    """Batched ``model.generate`` on the policy itself: there are no separate weights to sync."""

    def __init__(self, model, tokenizer, share_prompts: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.share_prompts = share_prompts

    def sync_weights(self, model) -> None:
        self.model = model

    def _shared_prompt_cache(self, prompt_ids: Tensor, prompt_mask: Tensor) -> dict:
        """``generate`` keyword for a KV cache of every prompt but its last token, computed once per run of
        identical consecutive prompts (a group's k rows) and gathered to all rows; ``{}`` when no prompt
        repeats or the model cannot take a cache. ``generate`` then runs only the last prompt token and
        the new ones, as it would after any cached prefix."""
        if not self.share_prompts or prompt_ids.shape[1] < 2 or not caches_prompts(self.model):
            return {}
        owner = prompt_owners(prompt_ids, prompt_mask)
        if owner is None:
            return {}
        _, cache = prompt_cache(self.model, prompt_ids[:, :-1], prompt_mask[:, :-1], owner)
        return {cache_argument(self.model): cache}

    @torch.no_grad()
    def generate(self, prompts: list, seeds: list[int], params: SamplingParams) -> Generation:
        enc = encode_prompts(self.tokenizer, prompts)
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        eos = eos_ids(self.tokenizer, self.model)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        processors = LogitsProcessorList()
        if not params.greedy:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            processors.append(SeededGumbelNoise(seeds))
        gen_config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False,
                                      eos_token_id=eos or None, pad_token_id=pad)
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_config,
                                  logits_processor=processors, synced_gpus=synced_processes(self.model),
                                  **self._shared_prompt_cache(prompt_ids, prompt_mask))
        self.model.train(was_training)
        completion_ids = out[:, prompt_ids.shape[1]:]
        mask = completion_mask_from_ids(completion_ids, eos)
        completion_ids = completion_ids.masked_fill(mask == 0, pad)
        keep = int(mask.sum(-1).max().item()) if mask.numel() else 0
        completion_ids, mask = completion_ids[:, : max(keep, 1)], mask[:, : max(keep, 1)]
        texts = self.tokenizer.batch_decode(completion_ids.masked_fill(mask == 0, pad), skip_special_tokens=True)
        return Generation(prompt_ids.cpu(), prompt_mask.cpu(), completion_ids.cpu(), mask.cpu(), texts)
