"""Sampling distributions pi_s (Corollary 3.2), one module each, behind one Protocol (:mod:`.base`).

``SAMPLERS`` (by ``sampler.source``): ``policy`` (on-policy), ``reference`` (the fixed reference),
``replay`` (:mod:`.replay`), ``offline`` (:mod:`.offline`), ``mixture`` (:mod:`.mixture`), or a
dotted path to a factory.
"""

from .base import SAMPLERS, Sampler, StatelessSampler
from .mixture import MixtureSampler
from .offline import OfflineSampler
from .order import EpochOrder, process_rows, step_rows, train_rows
from .policy import PolicySampler, generate_by_count, generate_groups
from .replay import ReplaySampler

__all__ = ["SAMPLERS", "EpochOrder", "MixtureSampler", "OfflineSampler", "PolicySampler", "ReplaySampler",
           "Sampler", "StatelessSampler", "create_sampler", "generate_by_count", "generate_groups", "process_rows", "step_rows",
           "train_rows"]


def create_sampler(spec, **parts) -> Sampler:
    """The sampler ``spec.source`` names, built from ``spec`` (a :class:`gvpo.config.SamplerConfig`) and the
    keyword ``parts`` listed in :mod:`gvpo.samplers.base`."""
    sampler = SAMPLERS.resolve(spec.source)(spec, **parts)
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler.source={spec.source!r} gave {type(sampler).__name__}, which lacks the methods "
                        "of gvpo.samplers.base.Sampler")
    return sampler
