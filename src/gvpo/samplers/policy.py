"""On-policy sampling (pi_s = the current policy) and sampling from the fixed reference, plus the
group-generation helpers the other samplers reuse."""

from __future__ import annotations

import dataclasses

from ..batch import Group
from ..episodes import episode_groups
from ..rollout import Engine, SamplingParams, hash_seed
from .base import SAMPLERS, StatelessSampler


def generate_groups(engine: Engine, rows: list[tuple[int, dict]], k: int, params: SamplingParams, *, seed: int,
                    step: int, source: str, first_completion: int = 0) -> list[Group]:
    """``k`` completions for each ``(position, row)``; completion j of the row at position p uses
    seed ``hash_seed(seed, p, j)``, so a group never depends on how the batch is split. An engine that runs
    episodes (:class:`gvpo.episodes.EpisodeEngine`) gives k episodes per row, with the same seeds for their first
    turn. With ``params.mask_truncated`` the completions (episodes: their packed ids) that hit
    ``params.max_new_tokens`` without EOS are dropped from their groups and counted in ``Group.truncated``."""
    if k == 0:
        return [Group(pos, row, [], [], []) for pos, row in rows]
    seeds = [hash_seed(seed, pos, j + first_completion) for pos, _ in rows for j in range(k)]
    if hasattr(engine, "rollout"):
        groups = episode_groups(engine, rows, k, seeds, params, step=step, source=source)
    else:
        gen = engine.generate([row["prompt"] for _, row in rows for _ in range(k)], seeds, params)
        groups = []
        for g, (pos, row) in enumerate(rows):
            sl = range(g * k, (g + 1) * k)
            ids = [gen.completion_ids[i][gen.completion_mask[i].bool()].tolist() for i in sl]
            groups.append(Group(pos, row, ids, [gen.texts[i] for i in sl], [source] * k, born_step=[step] * k))
    if params.mask_truncated:
        eos = set(eos_token_ids(engine))
        groups = [drop_truncated(group, params.max_new_tokens, eos) for group in groups]
    return groups


def drop_truncated(group: Group, max_new_tokens: int, eos: set) -> Group:
    """``group`` without the completions that reached ``max_new_tokens`` tokens without ending in EOS (TRL's
    ``mask_truncated_completions``), counted in ``Group.truncated``."""
    keep = [j for j, c in enumerate(group.completion_ids) if len(c) < max_new_tokens or c[-1] in eos]
    return dataclasses.replace(group.select(keep), truncated=group.truncated + len(group) - len(keep))


def eos_token_ids(engine: Engine) -> list[int]:
    """The tokens generation stops at: the engine's own ``eos_token_ids()`` (vLLM), else the HF engine's
    rule (:func:`gvpo.rollout.hf.eos_ids`)."""
    if hasattr(engine, "eos_token_ids"):
        return list(engine.eos_token_ids())
    from ..rollout.hf import eos_ids

    return eos_ids(engine.tokenizer, getattr(engine, "model", None))


def generate_by_count(engine: Engine, rows: list[tuple[int, dict]], counts: list[int], params: SamplingParams, *,
                      seed: int, step: int, first: list[int]) -> list[Group]:
    """Like :func:`generate_groups` with a per-row number of completions ``counts`` whose seeds start at
    completion index ``first`` (one generate call per distinct count and start)."""
    out: list[Group | None] = [None] * len(rows)
    for count in sorted(set(counts)):
        idx = [i for i, c in enumerate(counts) if c == count]
        for offset in sorted({first[i] for i in idx}):
            sub = [i for i in idx if first[i] == offset]
            made = generate_groups(engine, [rows[i] for i in sub], count, params, seed=seed, step=step,
                                   source="policy", first_completion=offset)
            for i, group in zip(sub, made):
                out[i] = group
    return out  # type: ignore[return-value]


class PolicySampler(StatelessSampler):
    """pi_s = the current policy (on-policy), or the fixed reference (``source: reference``)."""

    def __init__(self, engine: Engine, k: int, seed: int, source: str = "policy", reference=None):
        if source == "reference" and reference is None:
            raise ValueError("sampler.source=reference needs objective.reference=fixed (a reference policy to sample from)")
        self.engine, self.k, self.seed, self.source, self.reference = engine, k, seed, source, reference
        # a frozen reference copy gets its own engine once; with LoRA the policy's engine samples with adapters off
        make = getattr(engine, "for_model", None) or (lambda model: type(engine)(model, engine.tokenizer))
        self.reference_engine = make(reference.model) if source == "reference" and not reference.lora else None

    def sample(self, rows: list[tuple[int, dict]], step: int, params: SamplingParams) -> list[Group]:
        if self.source == "policy":
            return generate_groups(self.engine, rows, self.k, params, seed=self.seed, step=step, source="policy")
        if self.reference_engine is not None:
            return generate_groups(self.reference_engine, rows, self.k, params, seed=self.seed, step=step,
                                   source="reference")
        with self.reference.scoring(self.engine.model):
            return generate_groups(self.engine, rows, self.k, params, seed=self.seed, step=step, source="reference")


@SAMPLERS.register("policy")
def policy(spec, *, engine, reference, tokenizer, k, seed, max_new_tokens, cache_dir) -> PolicySampler:
    return PolicySampler(engine, k, seed, "policy")


@SAMPLERS.register("reference")
def from_reference(spec, *, engine, reference, tokenizer, k, seed, max_new_tokens, cache_dir) -> PolicySampler:
    return PolicySampler(engine, k, seed, "reference", reference)
