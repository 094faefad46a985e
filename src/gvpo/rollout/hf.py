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
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
from transformers.generation.stopping_criteria import StopStringCriteria

from ..model.logprobs import cache_argument, caches_prompts, prompt_cache, prompt_owners
from ..model.sharding import is_sharded
from .base import Generation, SamplingParams, completion_mask_from_ids, is_token_ids, left_pad
from .kv_cache import in_place_cache


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


def render_prompt(tokenizer, prompt, tools: list | None = None) -> str:
    """A prompt as text: a string as is; a conversation through the chat template (generation prompt
    added, ``tools`` rendered when given), minus a leading BOS when the tokenizer adds one itself, so it is
    not there twice."""
    if not isinstance(prompt, list):
        return prompt
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                         **({"tools": tools} if tools else {}))
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def encode_prompts(tokenizer, prompts: list) -> dict:
    """Tokenise prompts (strings, or chat message lists through the chat template), left-padded; prompts given
    as token ids (all of them) are left-padded as they are (token in, token out)."""
    if prompts and is_token_ids(prompts[0]):
        if not all(is_token_ids(p) for p in prompts):
            raise ValueError("prompts mix token ids with text or conversations; give all of one kind")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids, mask = left_pad(prompts, pad)
        return {"input_ids": ids, "attention_mask": mask}
    texts = [render_prompt(tokenizer, p) for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=True)


class StopStrings(StoppingCriteria):
    """transformers' ``StopStringCriteria`` that also records, per row, how many new tokens it had when a stop
    string first completed (``ends``; -1 = never), so the completion keeps exactly the tokens up to it."""

    def __init__(self, tokenizer, stops, prompt_length: int):
        self.inner = StopStringCriteria(tokenizer, list(stops))
        self.prompt_length = prompt_length
        self.ends: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        done = self.inner(input_ids, scores)
        if self.ends is None:
            self.ends = torch.full((input_ids.shape[0],), -1, dtype=torch.long)
        new = done.cpu() & (self.ends < 0)
        self.ends[new] = input_ids.shape[1] - self.prompt_length
        return done

    def mask(self, rows: int, width: int) -> Tensor:
        """(rows, width) 1 on the tokens up to and including each row's stop string (all where none)."""
        ends = self.ends if self.ends is not None else torch.full((rows,), -1)
        ends = torch.where(ends < 0, torch.full_like(ends, width), ends)
        return (torch.arange(width)[None, :] < ends[:, None]).long()


def eos_ids(tokenizer, model) -> list[int]:
    """The ids that end a completion: the generation config's (when ``model`` has one), else the tokenizer's EOS;
    ``[]`` for a model without one (every completion then runs to ``max_new_tokens``)."""
    config = getattr(model, "generation_config", None)
    ids = config.eos_token_id if config is not None else None
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
        stops = StopStrings(self.tokenizer, params.stop, prompt_ids.shape[1]) if params.stop else None
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_config,
                                  logits_processor=processors, synced_gpus=synced_processes(self.model),
                                  **({"stopping_criteria": StoppingCriteriaList([stops])} if stops else {}),
                                  **in_place_cache(self.model, self._shared_prompt_cache(prompt_ids, prompt_mask),
                                                   params.max_new_tokens))
        self.model.train(was_training)
        completion_ids = out[:, prompt_ids.shape[1]:]
        mask = completion_mask_from_ids(completion_ids, eos)
        if stops is not None:
            mask = mask * stops.mask(*mask.shape).to(mask.device)
        completion_ids = completion_ids.masked_fill(mask == 0, pad)
        keep = int(mask.sum(-1).max().item()) if mask.numel() else 0
        completion_ids, mask = completion_ids[:, : max(keep, 1)], mask[:, : max(keep, 1)]
        texts = self.tokenizer.batch_decode(completion_ids.masked_fill(mask == 0, pad), skip_special_tokens=True)
        return Generation(prompt_ids.cpu(), prompt_mask.cpu(), completion_ids.cpu(), mask.cpu(), texts)
