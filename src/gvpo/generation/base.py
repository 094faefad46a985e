"""What every generator backend does, documented once, and the work they share.

A generator turns a :class:`Job` (a step's rows, and which published weights to sample them with) into
that step's groups. The trainer-side bookkeeping (which step needs which weights, checkpoints, metrics)
is :class:`gvpo.generation.sampler.LaggedSampler`; a backend only keeps weights and runs jobs:

- :meth:`Generator.publish` records the trainer's current trainable weights as those of the start of
  step ``step`` (``version`` = optimizer steps taken so far);
- :meth:`Generator.submit` queues a job; :meth:`Generator.result` returns its groups (waiting if needed);
- :meth:`Generator.idle_seconds` is how long the generator has waited for work in total.

Both backends run the same :func:`produce` on a model that holds the job's weights, so they give the same
groups bit for bit (on the same hardware and thread count).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..batch import PER_COMPLETION, Group, all_token_logps, build_batch
from ..rollout import SamplingParams


@dataclass
class Job:
    """Generate the groups of ``step`` for ``rows`` with the weights published at the start of ``weights_step``."""

    step: int
    rows: list
    params: SamplingParams
    weights_step: int
    version: int
    """Optimizer steps of those weights: every policy completion's ``policy_version``."""


@dataclass
class Scoring:
    """What :func:`produce` computes besides the groups, chunked as the trainer chunks a step."""

    mini_batches: int
    micro_batch_size: int
    share_prompts: bool
    sampler_logps: bool
    """Token log-probs under the sampling weights (GRPO's ratio under a lag)."""
    reference: bool
    """Fixed-reference token log-probs (the trainer then does not compute them)."""


class Generator(Protocol):
    def publish(self, step: int, model: torch.nn.Module, version: int) -> None:
        """Keep ``model``'s trainable weights as those of the start of ``step``."""
        ...

    def submit(self, job: Job) -> None:
        """Queue ``job``; its weights were published before."""
        ...

    def result(self, step: int) -> list[Group]:
        """The groups of the submitted job for ``step``, waiting until they are made."""
        ...

    def idle_seconds(self) -> float:
        """Total seconds the generator has spent waiting for a job."""
        ...

    def close(self) -> None:
        """Free what the generator holds (its process, its snapshots)."""
        ...


def trainable(model: torch.nn.Module) -> dict[str, Tensor]:
    """``{name: parameter}`` of the parameters the optimizer moves (all, or the LoRA adapters)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def produce(sampler, job: Job, scoring: Scoring, *, model, tokenizer, reference=None) -> list[Group]:
    """``sampler.sample`` for ``job`` (its engine must sample with ``model``, which holds the job's weights),
    each policy completion stamped with ``job.version``, plus the log-probs ``scoring`` asks for.

    Log-probs are computed per mini-batch of whole groups, with the trainer's micro-batch size, so the fixed
    reference's equal the trainer's own when no completion is dropped (a ``None`` reward).
    """
    groups = [_stamp(g, job.version) for g in sampler.sample(job.rows, job.step, job.params)]
    if not (scoring.sampler_logps or scoring.reference):
        return groups
    size = len(groups) // scoring.mini_batches
    out = []
    for j in range(scoring.mini_batches):
        chunk = groups[j * size : (j + 1) * size]
        # rewards do not enter log-probs; build_batch needs one per completion
        batch = build_batch([g.with_rewards([0.0] * len(g)) for g in chunk], tokenizer, next(model.parameters()).device)
        fields = {}
        if scoring.sampler_logps:
            fields["sampler_token_logps"] = all_token_logps(model, batch, scoring.micro_batch_size,
                                                            scoring.share_prompts)
        if scoring.reference:
            with reference.scoring(model) as ref_model:
                fields["ref_token_logps"] = all_token_logps(ref_model, batch, scoring.micro_batch_size,
                                                            scoring.share_prompts)
        out.extend(_with_rows(chunk, fields))
    return out


def _stamp(group: Group, version: int) -> Group:
    """``group`` with ``version`` on its completions sampled by the policy."""
    versions = [version if src == "policy" else v for src, v in zip(group.sources, group.policy_version)]
    return dataclasses.replace(group, policy_version=versions)


def _with_rows(chunk: list[Group], fields: dict[str, Tensor]) -> list[Group]:
    """The groups of ``chunk`` with each ``(N, C)`` field's rows cut to their completions' lengths, on the CPU."""
    out, row = [], 0
    for group in chunk:
        values = {name: [t[row + i, : len(ids)].cpu().clone() for i, ids in enumerate(group.completion_ids)]
                  for name, t in fields.items()}
        out.append(dataclasses.replace(group, **values))
        row += len(group)
    return out


def encode_groups(groups: list[Group]) -> list[dict]:
    """Groups as JSON-able dicts (tensors as ``{"tensor": values, "dtype": name}``): for checkpoints and pipes."""
    def plain(value):
        return {"tensor": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")} \
            if isinstance(value, Tensor) else value

    return [{"group_id": g.group_id, "row": g.row, "truncated": g.truncated,
             **{name: [plain(v) for v in getattr(g, name)] for name in PER_COMPLETION}} for g in groups]


def decode_groups(items: list[dict]) -> list[Group]:
    """The inverse of :func:`encode_groups`; float values come back bit for bit."""
    def value(v):
        return torch.tensor(v["tensor"], dtype=getattr(torch, v["dtype"])) if isinstance(v, dict) and "tensor" in v \
            else v

    return [Group(item["group_id"], item["row"], truncated=item.get("truncated", 0),
                  **{name: [value(v) for v in item.get(name, [])] for name in PER_COMPLETION}) for item in items]
