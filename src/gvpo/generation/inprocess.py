"""The in-process generator: snapshots of the trainable weights, and each step's groups generated when the
trainer asks for them, on a copy of the policy loaded with the snapshot the step was requested with.

Nothing overlaps (generation runs in the trainer's process, in turn with training), so it buys no speed.
It is the definition of lag mode written out, exact on any hardware: the reference the process backend
is tested against, and the cheapest way to study staleness (``bench/async.py``).
"""

from __future__ import annotations

import copy
import time

import torch

from ..batch import Group
from .base import Job, Scoring, produce, trainable


class InProcessGenerator:
    """Keeps the weights of every step that a job still needs (at most ``lag + 1``); see the module docstring.

    ``sampler`` samples through ``engine``, which samples with ``model`` (the policy); for a job the engine is
    pointed at a copy of the policy holding the job's snapshot (``engine.sync_weights``), then back."""

    def __init__(self, sampler, engine, model: torch.nn.Module, tokenizer, scoring: Scoring, reference=None):
        self.sampler, self.engine, self.live, self.tokenizer = sampler, engine, model, tokenizer
        self.scoring, self.reference = scoring, reference
        self.copy = copy.deepcopy(model)
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.jobs: dict[int, Job] = {}
        self.idle = 0.0
        self._since: float | None = None

    def publish(self, step: int, model: torch.nn.Module, version: int) -> None:
        self.snapshots[step] = {name: p.detach().clone() for name, p in trainable(model).items()}

    def submit(self, job: Job) -> None:
        self.jobs[job.step] = job

    @torch.no_grad()
    def result(self, step: int) -> list[Group]:
        if self._since is not None:
            self.idle += time.perf_counter() - self._since
        job = self.jobs.pop(step)
        params = trainable(self.copy)
        for name, value in self.snapshots[job.weights_step].items():
            params[name].copy_(value)
        self.engine.sync_weights(self.copy)
        try:
            groups = produce(self.sampler, job, self.scoring, model=self.copy, tokenizer=self.tokenizer,
                             reference=self.reference)
        finally:
            self.engine.sync_weights(self.live)
        needed = {j.weights_step for j in self.jobs.values()}
        self.snapshots = {s: w for s, w in self.snapshots.items() if s in needed}
        self._since = time.perf_counter()
        return groups

    def idle_seconds(self) -> float:
        """The time between jobs: here the generator waits for every training step."""
        return self.idle

    def close(self) -> None:
        self.snapshots.clear()
        self.jobs.clear()
