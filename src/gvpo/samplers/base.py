"""What every sampling distribution pi_s must do, documented once, and the registry ``sampler.source`` picks from.

GVPO's minimiser is pi* for any pi_s whose support covers pi_ref's, with no importance weights
(Corollary 3.2). A sampler produces, for each prompt row of a step, a :class:`gvpo.batch.Group` of
completions with a source tag each; a group may mix sources.

``SAMPLERS`` maps ``sampler.source`` to a factory called with keywords::

    factory(spec, *, engine, reference, tokenizer, k, seed, max_new_tokens, cache_dir) -> Sampler

``spec`` is the :class:`gvpo.config.SamplerConfig` section, ``engine`` the policy's generation
engine, ``reference`` the fixed reference (:class:`gvpo.model.loading.Reference`) or ``None``, ``k`` the
group size, ``cache_dir`` a folder for caches that outlive a run. ``sampler.source`` may also be a
dotted path ``my_pkg.module.factory``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from ..batch import Batch, Group
from ..registry import Registry
from ..rollout import SamplingParams


@runtime_checkable
class Sampler(Protocol):
    def sample(self, rows: list[tuple[int, dict]], step: int, params: SamplingParams) -> list[Group]:
        """One group per ``(stream position, row)``; completion ``j`` of position ``p`` is seeded from
        ``(seed, p, j)`` so a group never depends on how the batch is split over processes."""
        ...

    def reference_token_logps(self, groups: list[Group], batch: Batch, reference,
                              micro_batch_size: int) -> Tensor | None:
        """``(N, C)`` reference log-probs of ``batch`` if the sampler has them (e.g. cached for offline
        data), else ``None`` and the trainer computes them."""
        ...

    def after_update(self, groups: list[Group], step: int) -> None:
        """Called after the step's update with the scored groups (e.g. to fill a replay buffer)."""
        ...

    def state(self) -> dict:
        """JSON-serialisable state saved in checkpoints (e.g. the replay buffer)."""
        ...

    def load_state(self, state: dict) -> None:
        """Restore :meth:`state` on resume."""
        ...


SAMPLERS: Registry = Registry("sampler source")


class StatelessSampler:
    """Defaults for the :class:`Sampler` methods of a sampler that keeps nothing between steps and has no
    reference log-probs of its own; subclass it and write ``sample``."""

    def reference_token_logps(self, groups, batch, reference, micro_batch_size):
        """None: the trainer computes the reference log-probs."""
        return None

    def after_update(self, groups, step) -> None:
        """Nothing to remember."""

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        """Nothing to restore."""
