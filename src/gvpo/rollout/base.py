"""The types every generation engine shares: sampling parameters, the ``Generation`` result, the
``Engine`` Protocol, and per-row seeds. A leaf module, so engines import it without a cycle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """How to sample; the same fields map one to one onto each engine."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    mask_truncated: bool = False
    """Not an engine setting: :func:`gvpo.samplers.generate_groups` drops the completions that hit
    ``max_new_tokens`` without EOS from their groups (``rollout.mask_truncated``)."""
    stop: tuple = ()
    """Stop strings: a row ends after the token that completes one (kept in the completion); () = EOS only."""


@dataclass
class Generation:
    """Prompts and completions as padded token tensors; row i is ``seeds[i]``'s sample."""

    prompt_ids: Tensor
    """(N, P) left-padded prompt tokens."""
    prompt_mask: Tensor
    """(N, P) 1 on real prompt tokens."""
    completion_ids: Tensor
    """(N, C) right-padded completion tokens, EOS included when generated."""
    completion_mask: Tensor
    """(N, C) 1 on completion tokens up to and including the first EOS."""
    texts: list[str]
    """Decoded completions without special tokens."""


class Engine(Protocol):
    """What the trainer needs from a generation engine."""

    def generate(self, prompts: list, seeds: list[int], params: SamplingParams) -> Generation:
        """One completion per entry of ``prompts`` (strings, conversations, or token ids: token in, token out);
        ``seeds[i]`` alone decides row i's randomness."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights."""
        ...


def completion_mask_from_ids(completion_ids: Tensor, eos_token_ids: list[int]) -> Tensor:
    """1 up to and including the first EOS of each row (all ones if none, or if there are no EOS ids).

    >>> completion_mask_from_ids(torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8]]), [2]).tolist()
    [[1, 1, 0, 0], [1, 1, 1, 1]]
    >>> completion_mask_from_ids(torch.tensor([[5, 2]]), []).tolist()
    [[1, 1]]
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, dtype=completion_ids.dtype,
                                                     device=completion_ids.device))
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    return (eos_before == 0).long()


def hash_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (no Python ``hash`` randomisation).

    >>> hash_seed(1, 2) == hash_seed(1, 2) != hash_seed(2, 1)
    True
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def is_token_ids(prompt) -> bool:
    """A prompt given as token ids (a list of ints) rather than text or a conversation.

    >>> is_token_ids([5, 6]), is_token_ids("Q"), is_token_ids([{"role": "user", "content": "Q"}])
    (True, False, False)
    """
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], int)


def left_pad(rows: list, pad: int) -> tuple[Tensor, Tensor]:
    """Token id lists as ``(N, longest)`` left-padded ids and mask.

    >>> ids, mask = left_pad([[5, 6], [7]], 0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6], [0, 7]], [[1, 1], [0, 1]])
    """
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask
