"""Sampling distributions pi_s (Corollary 3.2) and turning groups into a padded ``Batch``.

GVPO's minimiser is pi* for any pi_s whose support covers pi_ref's, with no importance weights. A
*source* produces, for each prompt row of a step, a group of completions with a source tag each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .rollout import Engine, SamplingParams, hash_seed
from .update import Batch


@dataclass
class Group:
    """One prompt and its completions (token ids), with where each came from."""

    group_id: int
    """Global position of the prompt in the data stream (unique per step and prompt)."""
    row: dict
    """The task row: ``prompt`` plus the columns the rewards read."""
    completion_ids: list
    """One list of token ids per completion (EOS included when generated)."""
    texts: list
    """Decoded completions."""
    sources: list
    """One tag per completion: policy, reference, replay or offline."""
    rewards: list | None = None
    """Per completion: a given reward (offline, replay) or ``None`` = score it; ``None`` for the list = score all."""
    born_step: list = field(default_factory=list)
    """Step at which each completion was generated (replay age; -1 for offline data)."""
    offline_index: list = field(default_factory=list)
    """Per completion: ``(group, completion)`` index into the offline data (for cached reference log-probs), or None."""


def step_rows(rows: list[dict], step: int, batch_size: int, seed: int) -> list[tuple[int, dict]]:
    """The ``batch_size`` rows of ``step`` as ``(stream position, row)``; each epoch is a seeded shuffle."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, len(rows))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(hash_seed(seed, epoch)))
        out.append((pos, rows[int(order[offset])]))
    return out


def generate_groups(engine: Engine, rows: list[tuple[int, dict]], k: int, params: SamplingParams, *, seed: int,
                    step: int, source: str, first_completion: int = 0) -> list[Group]:
    """``k`` completions for each ``(position, row)``; completion j of the row at position p uses
    seed ``hash_seed(seed, p, j)``, so a group never depends on how the batch is split."""
    if k == 0:
        return [Group(pos, row, [], [], [], born_step=[]) for pos, row in rows]
    prompts = [row["prompt"] for _, row in rows for _ in range(k)]
    seeds = [hash_seed(seed, pos, j + first_completion) for pos, _ in rows for j in range(k)]
    gen = engine.generate(prompts, seeds, params)
    groups = []
    for g, (pos, row) in enumerate(rows):
        sl = range(g * k, (g + 1) * k)
        ids = [gen.completion_ids[i][gen.completion_mask[i].bool()].tolist() for i in sl]
        groups.append(Group(pos, row, ids, [gen.texts[i] for i in sl], [source] * k, born_step=[step] * k))
    return groups


def build_batch(groups: list[Group], rewards: list[list[float]], tokenizer, device) -> Batch:
    """Pad prompts on the left and completions on the right; one row per completion."""
    from .rollout.hf import encode_prompts

    prompts, comps, rs, gids, sources = [], [], [], [], []
    for group, group_rewards in zip(groups, rewards):
        for ids, r, src in zip(group.completion_ids, group_rewards, group.sources):
            prompts.append(group.row["prompt"])
            comps.append(ids)
            rs.append(r)
            gids.append(group.group_id)
            sources.append(src)
    enc = encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id
    width = max(max((len(c) for c in comps), default=1), 1)
    completion_ids = torch.full((len(comps), width), pad, dtype=torch.long)
    completion_mask = torch.zeros((len(comps), width), dtype=torch.long)
    for i, c in enumerate(comps):
        completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, : len(c)] = 1
    return Batch(
        input_ids=torch.cat([enc["input_ids"], completion_ids], 1).to(device),
        attention_mask=torch.cat([enc["attention_mask"], completion_mask], 1).to(device),
        completion_mask=completion_mask.to(device),
        rewards=torch.tensor(rs, dtype=torch.float32, device=device),
        group_ids=torch.tensor(gids, dtype=torch.long, device=device),
        sources=sources,
    )


class PolicySampler:
    """pi_s = the current policy (on-policy), or the fixed reference (``source: reference``)."""

    def __init__(self, engine: Engine, k: int, seed: int, source: str = "policy", reference=None):
        if source == "reference" and reference is None:
            raise ValueError("sampler.source=reference needs objective.reference=fixed (a reference policy to sample from)")
        self.engine, self.k, self.seed, self.source, self.reference = engine, k, seed, source, reference
        # a frozen reference copy gets its own engine once; with LoRA the policy's engine samples with adapters off
        self.reference_engine = (type(engine)(reference.model, engine.tokenizer)
                                 if source == "reference" and not reference.lora else None)

    def sample(self, rows: list[tuple[int, dict]], step: int, params: SamplingParams) -> list[Group]:
        if self.source == "policy":
            return generate_groups(self.engine, rows, self.k, params, seed=self.seed, step=step, source="policy")
        if self.reference_engine is not None:
            return generate_groups(self.reference_engine, rows, self.k, params, seed=self.seed, step=step,
                                   source="reference")
        with self.reference.scoring(self.engine.model):
            return generate_groups(self.engine, rows, self.k, params, seed=self.seed, step=step, source="reference")

    def after_update(self, groups, rewards, step) -> None:
        """Nothing to remember for on-policy sampling."""

    def reference_token_logps(self, groups, batch, reference, micro_batch_size):
        """No cache: the trainer computes reference log-probs of fresh samples."""
        return None

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        """Stateless."""


def create_sampler(config, engine: Engine, reference, tokenizer, max_new_tokens: int):
    """The sampling distribution named by ``config.sampler.source``."""
    source = config.sampler.source
    if source in ("policy", "reference"):
        return PolicySampler(engine, config.rollout.k, config.train.seed, source, reference)
    from .offpolicy import create_offpolicy_sampler

    return create_offpolicy_sampler(config, engine, reference, tokenizer, max_new_tokens)
