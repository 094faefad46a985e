"""The data types every stage shares: a ``Group`` of completions, the padded ``Batch`` and an
objective's ``Prepared`` statistics. A leaf module: it imports nothing else from the trainer.

Data flow: a sampler returns ``Group`` records, rewards are attached with :meth:`Group.with_rewards`
(``None`` rewards drop completions through :meth:`Group.select`), :func:`build_batch` pads them into
one ``Batch`` row per completion, and an objective's ``prepare`` turns the batch into ``Prepared``.

Multi-turn episodes (:mod:`gvpo.episodes`) use the same records: a completion is the packed token stream
after the prompt (model turns and the environment's observations), ``action_mask`` marks the model's
tokens, and every objective takes its loss tokens from ``action_mask`` (``completion_mask`` is attention
and padding only). For a single-turn completion the two masks are equal.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .model.logprobs import completion_token_logps, sequence_logps

PER_COMPLETION = ("completion_ids", "texts", "sources", "rewards", "born_step", "offline_index", "action_mask",
                  "prompt_ids", "episode", "policy_version", "sampler_token_logps", "ref_token_logps")
"""The ``Group`` fields that hold one value per completion, in step with each other."""
DEFAULTS = {"rewards": None, "born_step": -1, "offline_index": None, "action_mask": None, "prompt_ids": None,
            "episode": None, "sampler_token_logps": None, "ref_token_logps": None}
"""What a per-completion field left empty at construction holds for every completion."""

REFERENCE_VERSION = -1
"""``policy_version`` of a completion sampled from the fixed reference."""
OFFLINE_VERSION = -2
"""``policy_version`` of a completion read from an offline dataset."""


@dataclass
class Group:
    """One prompt and its completions (token ids), with where each came from.

    Every per-completion list (:data:`PER_COMPLETION`) has one entry per completion; the ones left
    empty at construction are filled with their defaults, so :meth:`select` and ``+`` keep them in step.
    """

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
    rewards: list = field(default_factory=list)
    """Per completion: a given reward (offline, replay) or ``None`` = score it (the default)."""
    born_step: list = field(default_factory=list)
    """Step at which each completion was generated (replay age; -1 for offline data, the default)."""
    offline_index: list = field(default_factory=list)
    """Per completion: ``(group, completion)`` index into the offline data (cached reference log-probs), or None."""
    action_mask: list = field(default_factory=list)
    """Per completion: 1/0 per token of ``completion_ids``, 1 on the model's tokens, 0 on the environment's
    (an episode's observations); ``None`` = every token is the model's (single turn, the default)."""
    prompt_ids: list = field(default_factory=list)
    """Per completion: the prompt's token ids as the engine consumed them (an episode: the chat template with its
    tools and the environment's ``reset`` text); ``None`` = ``row["prompt"]`` tokenised as usual (the default)."""
    episode: list = field(default_factory=list)
    """Per completion: its :class:`gvpo.episodes.Episode` (the prompt it saw, its messages, its environment, what
    went wrong), which rewards read; ``None`` for a single-turn completion (the default)."""
    policy_version: list = field(default_factory=list)
    """Per completion: optimizer steps of the weights that sampled it (set under ``train.async_lag``, see
    :mod:`gvpo.generation`); :data:`REFERENCE_VERSION` / :data:`OFFLINE_VERSION` for reference and offline
    completions; None = sampled by the current weights and not recorded. No objective reads it."""
    sampler_token_logps: list = field(default_factory=list)
    """Per completion: ``(len,)`` token log-probs under the weights that sampled it, or None (GRPO's ratio under a lag)."""
    ref_token_logps: list = field(default_factory=list)
    """Per completion: ``(len,)`` fixed-reference token log-probs computed by the generator, or None."""
    truncated: int = 0
    """Completions generated for this prompt and then dropped because they hit ``rollout.max_new_tokens`` without
    EOS (``rollout.mask_truncated``): counted as generated, never trained."""

    def __post_init__(self):
        n = len(self.completion_ids)
        if not self.policy_version and n:
            marker = {"reference": REFERENCE_VERSION, "offline": OFFLINE_VERSION}
            self.policy_version = [marker.get(source) for source in self.sources]
        for name in PER_COMPLETION:
            values = getattr(self, name)
            if not values and n and name in DEFAULTS:
                setattr(self, name, [DEFAULTS[name]] * n)
            elif len(values) != n:
                raise ValueError(f"Group {self.group_id}: {name} has {len(values)} entries for {n} completions")

    def __len__(self) -> int:
        return len(self.completion_ids)

    def select(self, keep: list[int]) -> "Group":
        """The group with only completions ``keep`` (indices, in the given order)."""
        return dataclasses.replace(self, **{name: [getattr(self, name)[i] for i in keep] for name in PER_COMPLETION})

    def __add__(self, other: "Group") -> "Group":
        """This group's completions followed by ``other``'s (same prompt)."""
        return dataclasses.replace(self, truncated=self.truncated + other.truncated,
                                   **{name: getattr(self, name) + getattr(other, name) for name in PER_COMPLETION})

    def with_rewards(self, rewards: list) -> "Group":
        """The group with ``rewards`` (one per completion, ``None`` = cannot be scored)."""
        if len(rewards) != len(self):
            raise ValueError(f"Group {self.group_id}: {len(rewards)} rewards for {len(self)} completions")
        return dataclasses.replace(self, rewards=list(rewards))

    def scored(self) -> "Group":
        """The completions whose reward is not ``None``."""
        return self.select([i for i, r in enumerate(self.rewards) if r is not None])


@dataclass
class Batch:
    """Groups of completions ready for an update; one row per completion."""

    input_ids: Tensor
    """(N, P + C) prompt (left-padded) followed by completion (right-padded)."""
    attention_mask: Tensor
    """(N, P + C)."""
    completion_mask: Tensor
    """(N, C) 1 on completion tokens (attention and padding; an episode's observations included)."""
    rewards: Tensor
    """(N,) float."""
    group_ids: Tensor
    """(N,) integer group labels (global prompt positions)."""
    ref_token_logps: Tensor | None = None
    """(N, C) reference per-token log-probs; for ``reference: rollout`` filled at the first update."""
    old_token_logps: Tensor | None = None
    """(N, C) per-token log-probs of the policy before this batch's first update (PPO ratios)."""
    sources: list = field(default_factory=list)
    """Per row: where the completion came from (policy, reference, replay, offline)."""
    action_mask: Tensor | None = None
    """(N, C) 1 on the model's tokens: the loss tokens of every objective; ``None`` at construction = ``completion_mask``."""
    policy_versions: list = field(default_factory=list)
    """Per row: the completion's ``Group.policy_version`` (bookkeeping only: no objective reads it)."""
    sampler_token_logps: Tensor | None = None
    """(N, C) token log-probs under the weights that sampled each row, when every row has them (under a lag)."""

    def __post_init__(self):
        if self.action_mask is None:
            self.action_mask = self.completion_mask

    def __len__(self) -> int:
        return self.rewards.shape[0]

    def rows(self, sl: slice) -> tuple[Tensor, Tensor, Tensor]:
        return self.input_ids[sl], self.attention_mask[sl], self.completion_mask[sl]

    @property
    def ref_logps(self) -> Tensor:
        return sequence_logps(self.ref_token_logps, self.action_mask)


@dataclass
class Prepared:
    """Whole-batch, detached quantities an objective computed for its micro-batch losses."""

    norm: float
    """Local normaliser (groups or tokens); the trainer sums it over processes."""
    loss_sum: float
    """Objective value times ``norm`` on this process (so the global value is sum / sum of norms)."""
    coef: Tensor | None = None
    """(N,) or (N, C) per-row coefficients used by ``micro_loss``."""
    stats: dict = field(default_factory=dict)
    """Extra metrics (weights' spread, clip fraction, ...)."""


def build_batch(groups: list[Group], tokenizer, device) -> Batch:
    """Pad prompts on the left and completions on the right; one row per completion of every group.

    Every completion must have a reward (drop unscored ones first with :meth:`Group.scored`). A completion's
    ``prompt_ids`` (an episode's prompt as the engine consumed it) are used as they are; other prompts are
    tokenised from ``row["prompt"]``. ``action_mask`` is ``completion_mask`` unless a completion has its own.
    """
    prompts, given, comps, actions, rs, gids, sources, versions, sampled = [], [], [], [], [], [], [], [], []
    for group in groups:
        for i, (ids, r, src) in enumerate(zip(group.completion_ids, group.rewards, group.sources)):
            if r is None:
                raise ValueError(f"Group {group.group_id} has a completion without a reward; call .scored() first")
            prompts.append(group.row["prompt"])
            given.append(group.prompt_ids[i])
            comps.append(ids)
            actions.append(group.action_mask[i])
            rs.append(r)
            gids.append(group.group_id)
            sources.append(src)
            versions.append(group.policy_version[i])
            sampled.append(group.sampler_token_logps[i])
    prompt_ids, prompt_mask = _prompt_tensors(tokenizer, prompts, given)
    pad = tokenizer.pad_token_id
    width = max(max((len(c) for c in comps), default=1), 1)
    completion_ids = torch.full((len(comps), width), pad, dtype=torch.long)
    completion_mask = torch.zeros((len(comps), width), dtype=torch.long)
    for i, c in enumerate(comps):
        completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, : len(c)] = 1
    action_mask = None
    if any(a is not None for a in actions):
        action_mask = completion_mask.clone()
        for i, a in enumerate(actions):
            if a is not None:
                if len(a) != len(comps[i]):
                    raise ValueError(f"action_mask has {len(a)} entries for a completion of {len(comps[i])} tokens")
                action_mask[i, : len(a)] = torch.tensor(a, dtype=torch.long)
        action_mask = action_mask.to(device)
    return Batch(
        input_ids=torch.cat([prompt_ids, completion_ids], 1).to(device),
        attention_mask=torch.cat([prompt_mask, completion_mask], 1).to(device),
        completion_mask=completion_mask.to(device),
        rewards=torch.tensor(rs, dtype=torch.float32, device=device),
        group_ids=torch.tensor(gids, dtype=torch.long, device=device),
        sources=sources,
        action_mask=action_mask,
        policy_versions=versions,
        sampler_token_logps=pad_token_values(sampled, width, device) if sampled and None not in sampled else None,
    )


def _prompt_tensors(tokenizer, prompts: list, given: list) -> tuple[Tensor, Tensor]:
    """``(N, P)`` left-padded prompt ids and mask: ``given[i]`` (token ids) where not ``None``, else ``prompts[i]``
    tokenised (:func:`gvpo.rollout.hf.encode_prompts`)."""
    from .rollout.base import left_pad
    from .rollout.hf import encode_prompts

    todo = [i for i, g in enumerate(given) if g is None]
    if len(todo) == len(prompts):
        enc = encode_prompts(tokenizer, prompts)
        return enc["input_ids"], enc["attention_mask"]
    given = list(given)
    if todo:
        enc = encode_prompts(tokenizer, [prompts[i] for i in todo])
        for j, i in enumerate(todo):
            given[i] = enc["input_ids"][j][enc["attention_mask"][j].bool()].tolist()
    return left_pad(given, tokenizer.pad_token_id)


def pad_token_values(values: list[Tensor], width: int, device) -> Tensor:
    """``(N, width)``: row i holds ``values[i]`` (a ``(len_i,)`` tensor) followed by zeros, in their dtype.

    >>> pad_token_values([torch.tensor([1., 2.]), torch.tensor([3.])], 3, "cpu")
    tensor([[1., 2., 0.],
            [3., 0., 0.]])
    """
    out = torch.zeros(len(values), width, dtype=values[0].dtype if values else torch.float32)
    for i, v in enumerate(values):
        out[i, : len(v)] = v
    return out.to(device)


def token_logps_for(model, batch: Batch, rows: slice, share_prompts: bool = True, one_pass: bool = False) -> Tensor:
    """(n, C) per-token log-probs of ``batch`` rows ``rows`` (with grad if enabled); ``share_prompts`` runs
    each group's prompt once, ``one_pass`` all rows in one plain forward (see
    :func:`gvpo.model.logprobs.completion_token_logps`)."""
    return completion_token_logps(model, *batch.rows(rows), share_prompts=share_prompts, one_pass=one_pass)


@torch.no_grad()
def all_token_logps(model, batch: Batch, micro_batch_size: int, share_prompts: bool = True,
                    one_pass: bool = False) -> Tensor:
    """(N, C) per-token log-probs of every row, computed micro-batch by micro-batch without grad."""
    n = len(batch)
    step = micro_batch_size or n
    return torch.cat([token_logps_for(model, batch, slice(s, s + step), share_prompts, one_pass)
                      for s in range(0, n, step)])
