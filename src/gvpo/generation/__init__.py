"""Asynchronous rollouts without importance weights (``train.async_lag=L``).

GVPO's loss has the same unique minimiser pi* under any sampling distribution with full support
(Corollary 3.2), so completions sampled by older weights need no importance weights and no clipping. With a
lag ``L``, rollout step ``s`` trains on groups sampled with the weights of the start of step ``s - L`` (the
initial weights for the first ``L`` steps), and a separate process generates step ``s + 1``'s groups while
step ``s`` trains: a step costs about max(generate, train) instead of their sum. ``L = 0`` is the synchronous
loop (no generator at all). Runs stay deterministic: which weights sample which step does not depend on
timing. The fixed point does not move, but the path does: what staleness costs in accuracy, for GVPO and
GRPO with and without importance sampling, is measured in ``bench/README.md`` (section "``async.py``").

- :mod:`.sampler`: the trainer's side, a Sampler (``train.async_lag``'s bookkeeping, checkpoints, metrics).
- :mod:`.base`: the ``Generator`` protocol, and :func:`~.base.produce`, the work both backends do.
- :mod:`.inprocess`: weight snapshots, generation in the trainer's process; exact, the tests' reference.
- :mod:`.process`: a spawned process with its own model and engine, weights through shared memory.

Each completion carries ``policy_version`` (the optimizer steps of the weights that sampled it); no objective
reads it. Metrics: ``staleness_mean``, ``staleness_max``, ``gen_wait_s``, ``train_wait_s`` (:func:`lag_metrics`).

Reference policies under a lag. ``objective.reference=fixed``: the generator also computes the reference's
log-probs (on its own copy of the initial model), unless the reference moves (``ref_sync_steps``); the
trainer then only trains. ``rollout``: pi_ref is the policy the step starts training from, i.e. its log-probs
at the batch's first update, as without a lag, *not* the older weights that sampled the batch: the samples are
then just another pi_s (Corollary 3.2) and each step's target is pi_theta_s exp(R/beta)/Z, a step away from
the current policy, not back towards a stale one.

GRPO under a lag takes the sampler's log-probs for its ratio (``objective.importance_sampling``), as TRL's
async GRPO does; ``false`` treats stale samples as on-policy.
"""

from .base import Generator, Job, Scoring, produce
from .sampler import LaggedSampler, build, check, lag_metrics, lagged, running
from .process import GeneratorError

__all__ = ["Generator", "GeneratorError", "Job", "LaggedSampler", "Scoring", "build", "check", "lag_metrics",
           "lagged", "produce", "running"]
