"""The trainer's side of asynchronous rollouts: a :class:`gvpo.samplers.Sampler` whose groups for step ``s``
were sampled with the weights of the start of step ``s - L``, produced by a generator backend.

When the trainer asks for step ``s``'s groups, the current weights (``version`` = optimizer steps so far) are
published and every step up to ``s + L`` that has not been requested yet is requested with them: at the
start of a run steps ``0..L`` (all with the initial weights), then one step ``s + L`` per step. Step ``s``'s
groups are then taken, waiting for them if the generator is behind. So each step trains on completions
``L`` steps old (fewer in the first ``L`` steps), and a separate generator makes step ``s + 1``'s while step
``s`` trains.

A checkpoint holds the groups generated but not yet trained (it waits for those in flight), so a resumed
run trains on exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import time

from ..batch import Group, pad_token_values
from ..config import ConfigError
from ..samplers import train_rows
from .base import Generator, Job, Scoring, decode_groups, encode_groups

SAMPLER_RATIO = ("grpo", "gspo")
"""Objectives whose clipped ratio takes the sampler's log-probs under a lag (``objective.importance_sampling``)."""
NOT_COMPOSED = {
    "reference": "its samples come from the fixed reference and do not depend on the trained weights, so a "
                 "lag changes nothing",
    "offline": "offline groups are read, not generated: there is nothing to overlap",
    "replay": "its buffer is filled after each update, which a generator L steps ahead has not seen",
    "mixture": "its groups join offline completions to policy completions, and a generator for the policy "
               "half alone is not written yet",
}
"""Why each built-in sampler other than ``policy`` is refused under a lag."""


class LaggedSampler:
    """Groups of step ``s`` sampled ``lag`` steps earlier (module docstring); the Sampler protocol."""

    def __init__(self, inner, generator: Generator, *, lag: int, max_steps: int, per_update: int, model,
                 rows_for):
        self.inner, self.generator, self.lag, self.max_steps = inner, generator, lag, max_steps
        self.per_update, self.model, self.rows_for = per_update, model, rows_for
        self.version = 0
        """Optimizer steps of the trainer's weights (``per_update`` per trained step)."""
        self.pending: dict[int, list[Group]] = {}
        self.requested: set[int] = set()
        self.metrics: dict = {}
        self._idle = 0.0

    def sample(self, rows: list[tuple[int, dict]], step: int, params) -> list[Group]:
        new = [t for t in range(step, min(step + self.lag, self.max_steps - 1) + 1)
               if t not in self.pending and t not in self.requested]
        if new:
            self.generator.publish(step, self.model, self.version)
            for t in new:
                self.generator.submit(Job(t, rows if t == step else self.rows_for(t), params, step, self.version))
            self.requested.update(new)
        start = time.perf_counter()
        groups = self.pending.pop(step) if step in self.pending else self._collect(step)
        waited = time.perf_counter() - start
        idle_total = self.generator.idle_seconds()
        idle, self._idle = idle_total - self._idle, idle_total
        stale = [self.version - v for g in groups for v in g.policy_version if v is not None and v >= 0]
        self.metrics = {"staleness_mean": sum(stale) / len(stale) if stale else 0.0,
                        "staleness_max": max(stale, default=0), "gen_wait_s": waited, "train_wait_s": idle}
        return groups

    def _collect(self, step: int) -> list[Group]:
        groups = self.generator.result(step)
        self.requested.discard(step)
        return groups

    def reference_token_logps(self, groups, batch, reference, micro_batch_size):
        """The generator's fixed-reference log-probs when every completion has them, else the inner sampler's."""
        values = [v for g in groups for v in g.ref_token_logps]
        if values and all(v is not None for v in values):
            mask = batch.completion_mask
            return pad_token_values(values, mask.shape[1], mask.device)
        return self.inner.reference_token_logps(groups, batch, reference, micro_batch_size)

    def after_update(self, groups, step: int) -> None:
        self.version += self.per_update
        self.inner.after_update(groups, step)

    def state(self) -> dict:
        """The version and the groups generated for later steps (waiting for those in flight)."""
        for t in sorted(self.requested):
            self.pending[t] = self._collect(t)
        return {"version": self.version, "sampler": self.inner.state(),
                "pending": {str(t): encode_groups(groups) for t, groups in sorted(self.pending.items())}}

    def load_state(self, state: dict) -> None:
        self.version = state.get("version", 0)
        self.pending = {int(t): decode_groups(items) for t, items in state.get("pending", {}).items()}
        self.inner.load_state(state.get("sampler", {}))

    def close(self) -> None:
        self.generator.close()


def check(config, world: int, episodes: bool = False) -> None:
    """Refuse, naming the setting, what does not compose with ``train.async_lag`` yet (``episodes``: the engine
    runs multi-turn episodes, also those of a task's own environment)."""
    lag = config.train.async_lag
    if world > 1:
        raise ConfigError(f"train.async_lag={lag} with {world} processes: not composed yet (each process would need "
                          "its own generator and the same lag); run one process, or train.async_lag=0")
    if episodes or config.task.environment or config.task.tools:
        raise ConfigError(f"train.async_lag={lag} with task.environment/task.tools: not composed yet (the generator "
                          "would run the episodes' environments in its own process, and checkpoints would have to "
                          "hold their state); use train.async_lag=0 for multi-turn episodes")
    source = config.sampler.source
    if source != "policy":
        why = NOT_COMPOSED.get(source, "a custom sampler may keep state that a generator L steps ahead does not have")
        raise ConfigError(f"train.async_lag={lag} with sampler.source={source}: {why}; use sampler.source=policy "
                          "or train.async_lag=0")


def lagged(config, sampler, **parts):
    """``sampler`` itself when ``train.async_lag`` is 0, else :func:`build` around it (``parts``: its keywords)."""
    lag = config.train.async_lag
    return sampler if lag == 0 else build(config, sampler, lag=lag, backend=config.train.async_backend, **parts)


def build(config, sampler, *, lag: int, backend: str, task, engine, model, reference, tokenizer,
          world: int) -> LaggedSampler:
    """A :class:`LaggedSampler` around ``sampler`` with ``lag`` and the ``backend`` (``process`` or ``inprocess``);
    any ``lag >= 0``, so that lag 0 through this machinery can be checked against the synchronous loop."""
    check(config, world, episodes=hasattr(engine, "rollout"))
    train, objective = config.train, config.objective
    scoring = Scoring(train.mini_batches, train.micro_batch_size, train.share_prompts,
                      sampler_logps=objective.name in SAMPLER_RATIO and objective.importance_sampling,
                      reference=reference is not None and not objective.ref_sync_steps)
    if backend == "inprocess":
        from .inprocess import InProcessGenerator

        generator = InProcessGenerator(sampler, engine, model, tokenizer, scoring, reference)
    else:
        from .process import ProcessGenerator

        generator = ProcessGenerator(config, model, lag, scoring)
    return LaggedSampler(sampler, generator, lag=lag, max_steps=train.max_steps,
                         per_update=train.updates_per_batch * train.mini_batches, model=model,
                         rows_for=lambda s: train_rows(task.train, s, train))  # one process (check)


def lag_metrics(sampler) -> dict:
    """``staleness_mean``, ``staleness_max`` (optimizer steps between the sampling and the trained weights),
    ``gen_wait_s`` (the trainer waiting for the step's groups), ``train_wait_s`` (the generator waiting for work)
    of the last step; nothing without a lag."""
    return dict(sampler.metrics) if isinstance(sampler, LaggedSampler) else {}


@contextlib.contextmanager
def running(sampler):
    """Stop the generator (its process) when the block ends, however it ends; nothing without a lag."""
    try:
        yield
    finally:
        if isinstance(sampler, LaggedSampler):
            sampler.close()
