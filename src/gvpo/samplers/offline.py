"""Offline: groups read (and validated) by :func:`gvpo.data.load_offline`, in a seeded shuffle per epoch,
with reference log-probs computed once per dataset and cached on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..batch import Group, all_token_logps, build_batch
from ..rollout import SamplingParams
from .base import SAMPLERS, StatelessSampler
from .order import EpochOrder
from .replay import prompt_key


class OfflineSampler(StatelessSampler):
    """Groups from a rated-completions file; ``model`` is the policy module whose ``reference.scoring``
    context gives the reference (with LoRA: the same module with adapters off)."""

    def __init__(self, groups, tokenizer, seed: int, *, model=None, cache_key: dict | None = None, cache_dir=None):
        self.groups, self.tokenizer, self.model = groups, tokenizer, model
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]  # a model without EOS: none appended
        self.ids = [[tokenizer(c, add_special_tokens=False)["input_ids"] + eos for c in g.completions]
                    for g in groups]
        self.offsets = [0]
        for g in groups:
            self.offsets.append(self.offsets[-1] + g.k)
        self.order = EpochOrder(len(groups), seed)
        self.cache_key, self.cache_dir = cache_key, cache_dir
        self._ref: torch.Tensor | None = None  # (total completions, max length) reference token log-probs

    def sample(self, rows: list[tuple[int, dict]], step: int, params: SamplingParams) -> list[Group]:
        return [self.group_at(pos) for pos, _ in rows]

    def group_at(self, position: int, limit: int | None = None) -> Group:
        """The offline group at stream ``position`` (its first ``limit`` completions, or all)."""
        i = self.order[position]
        g = self.groups[i]
        take = range(g.k if limit is None else min(limit, g.k))
        row = {"prompt": g.prompt, **{k: v for k, v in g.extra.items() if k != "prompt"}}
        return Group(position, row, [self.ids[i][j] for j in take], [g.completions[j] for j in take],
                     ["offline"] * len(take), rewards=[g.rewards[j] for j in take],
                     offline_index=[(i, j) for j in take])

    def reference_token_logps(self, groups: list[Group], batch, reference, micro_batch_size: int):
        """Reference log-probs of ``batch`` from a per-dataset cache, computed once (and kept on disk,
        keyed by model and data fingerprints); ``None`` when some rows are not offline data."""
        index = [ix for g in groups for ix in g.offline_index]
        if reference is None or any(ix is None for ix in index):
            return None
        if self._ref is None:
            self._ref = self._all_reference_logps(reference, micro_batch_size)
        rows = torch.tensor([self.offsets[i] + j for i, j in index])
        width = batch.completion_mask.shape[1]
        ref = self._ref[rows][:, :width]
        return ref.to(batch.completion_mask.device) * batch.completion_mask

    def _all_reference_logps(self, reference, micro_batch_size: int) -> torch.Tensor:
        from ..data import RefLogpCache, fingerprint_model

        def compute():
            with reference.scoring(self.model) as ref_model:
                return self._score_all(ref_model, micro_batch_size or 16)

        if self.cache_dir is None:
            return compute()
        with reference.scoring(self.model) as ref_model:
            key = {**self.cache_key, "model": fingerprint_model(ref_model)}
        return RefLogpCache(self.cache_dir).get_or_compute(key, compute).cpu()

    def _score_all(self, model, chunk: int) -> torch.Tensor:
        """(total completions, longest completion) token log-probs of every completion under ``model``.

        Rows are scored in chunks of similar length (sorted by prompt characters + completion tokens),
        so a chunk pads to its own longest row rather than the dataset's.
        """
        rows = [(i, j) for i, g in enumerate(self.groups) for j in range(g.k)]
        rows.sort(key=lambda ij: (len(prompt_key(self.groups[ij[0]].prompt)), len(self.ids[ij[0]][ij[1]])))
        width = max(len(c) for ids in self.ids for c in ids)
        weight = next(model.parameters())
        out = torch.zeros(self.offsets[-1], width, dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32)
        device = weight.device
        for start in tqdm(range(0, len(rows), chunk), desc="reference log-probs", unit="chunk", leave=False):
            part = rows[start : start + chunk]
            groups = [Group(n, {"prompt": self.groups[i].prompt}, [self.ids[i][j]], [""], ["offline"], rewards=[0.0])
                      for n, (i, j) in enumerate(part)]
            batch = build_batch(groups, self.tokenizer, device)
            logps = all_token_logps(model, batch, 0).cpu()
            out[[self.offsets[i] + j for i, j in part], : logps.shape[1]] = logps
        return out





def load_offline_sampler(spec, *, engine, tokenizer, seed, max_new_tokens, cache_dir) -> OfflineSampler:
    """Read and validate ``spec.offline_path`` and wrap it in an :class:`OfflineSampler`."""
    from ..data import fingerprint_file, load_offline

    groups, _ = load_offline(spec.offline_path, format=spec.offline_format, preset=spec.offline_preset or None,
                             tokenizer=tokenizer, max_completion_tokens=max_new_tokens - 1,
                             on_too_long=spec.on_too_long)
    cache_key = {"data": fingerprint_file(spec.offline_path), "preset": spec.offline_preset,
                 "format": spec.offline_format, "max_new_tokens": max_new_tokens, "on_too_long": spec.on_too_long,
                 "tokenizer": len(tokenizer)}
    return OfflineSampler(groups, tokenizer, seed, model=engine.model, cache_key=cache_key,
                          cache_dir=Path(cache_dir) if cache_dir else None)


@SAMPLERS.register("offline")
def offline(spec, *, engine, reference, tokenizer, k, seed, max_new_tokens, cache_dir) -> OfflineSampler:
    return load_offline_sampler(spec, engine=engine, tokenizer=tokenizer, seed=seed, max_new_tokens=max_new_tokens,
                                cache_dir=cache_dir)
