"""Mixture: ``mixture_offline`` completions of an offline group plus ``k - mixture_offline`` completions
sampled from the policy for the same prompt, in one group (no importance weights, Corollary 3.2)."""

from __future__ import annotations

from ..batch import Group
from ..rollout import Engine, SamplingParams
from .base import SAMPLERS, StatelessSampler
from .offline import OfflineSampler, load_offline_sampler
from .policy import generate_groups


class MixtureSampler(StatelessSampler):
    """Offline completions followed by fresh policy completions of the same prompt."""

    def __init__(self, offline: OfflineSampler, engine: Engine, k: int, seed: int, offline_per_group: int):
        if not 0 < offline_per_group < k:
            raise ValueError(f"sampler.mixture_offline must be in [1, rollout.k), got {offline_per_group}")
        self.offline, self.engine, self.k, self.seed, self.offline_per_group = offline, engine, k, seed, offline_per_group

    def sample(self, rows: list[tuple[int, dict]], step: int, params: SamplingParams) -> list[Group]:
        stored = [self.offline.group_at(pos, self.offline_per_group) for pos, _ in rows]
        fresh = generate_groups(self.engine, [(g.group_id, g.row) for g in stored], self.k - self.offline_per_group,
                                params, seed=self.seed, step=step, source="policy")
        return [old + new for old, new in zip(stored, fresh)]


@SAMPLERS.register("mixture")
def mixture(spec, *, engine, reference, tokenizer, k, seed, max_new_tokens, cache_dir) -> MixtureSampler:
    offline = load_offline_sampler(spec, engine=engine, tokenizer=tokenizer, seed=seed,
                                   max_new_tokens=max_new_tokens, cache_dir=cache_dir)
    return MixtureSampler(offline, engine, k, seed, spec.mixture_offline)
