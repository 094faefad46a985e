"""The process generator: a ``torch.multiprocessing`` spawn process with its own copy of the model, its own
engine and sampler, generating while the trainer trains (a thread would not do: generation holds the GIL).

Weights travel through shared memory: ``lag + 1`` slots, each one flat CPU buffer per dtype holding every
trainable parameter, and a shared version counter per slot. The trainer publishes the weights of the start of step ``w`` into slot
``w mod (lag + 1)``; every job still queued or running uses weights of a step in ``[s - lag, s]`` when step
``s`` publishes, so the slot it overwrites is free. The worker copies a job's slot into its model before
generating and checks the slot's version before and after the copy (:class:`GeneratorError` if it ever
changed). Jobs and results go through queues; groups as plain lists (:func:`gvpo.generation.base.encode_groups`).

The worker builds its model with :func:`gvpo.model.checks.load_checked` from the run's config, so its fixed
reference is the initial model, as the trainer's is; its engine is ``rollout.engine``. With ``vllm`` the
worker runs its own vLLM engine on the GPU and ``sync_weights`` pushes each job's weights into it: written
for real but UNVERIFIED (no GPU where this was written; see README "Asynchronous rollouts").

The worker ignores SIGINT (Ctrl-C reaches the whole process group; the trainer checkpoints, which needs the
jobs in flight) and exits when the trainer's process is gone (e.g. killed with SIGKILL).
"""

from __future__ import annotations

import queue
import signal
import time
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ..batch import Group
from .base import Job, Scoring, decode_groups, encode_groups, produce, trainable

POLL_S = 1.0
"""How often a waiting side checks that the other process is still alive."""


class GeneratorError(RuntimeError):
    """The generator process failed or exited; the message says how."""


@dataclass
class WorkerSpec:
    """What the worker needs to build its parts."""

    config: object
    """The run's :class:`gvpo.config.RunConfig`."""
    device: str
    threads: int
    scoring: Scoring
    layout: list
    """``(name, shape, dtype)`` of the trainer's trainable parameters, in order: the worker's must be the same."""


class ProcessGenerator:
    """The trainer's side: shared weight slots, job and result queues, the worker process (started at once, so
    that its start-up overlaps the rest of the trainer's set-up; stopped by :meth:`close` or when dropped)."""

    def __init__(self, config, model: torch.nn.Module, lag: int, scoring: Scoring):
        buffers = [flat_buffers(trainable(model)) for _ in range(lag + 1)]
        self.slots = [slot_views(trainable(model), b) for b in buffers]
        self.versions = torch.full((lag + 1,), -1, dtype=torch.long).share_memory_()
        context = mp.get_context("spawn")
        self.jobs, self.results = context.Queue(), context.Queue()
        self.idle = context.Value("d", 0.0)
        self.done: dict[int, list[Group]] = {}
        threads, before = config.train.async_threads, None
        if not threads:  # half of this process's threads, the trainer keeps the rest
            before = torch.get_num_threads()
            threads = max(1, before // 2)
            torch.set_num_threads(max(1, before - threads))
        spec = WorkerSpec(config, str(next(model.parameters()).device), threads, scoring, layout(trainable(model)))
        self.process = context.Process(target=worker_main, name="gvpo-generator", daemon=True,
                                       args=(spec, buffers, self.versions, self.jobs, self.results, self.idle))
        self.process.start()
        # close(): stop the worker (after its running job, or at once after 5 s) and give the threads back
        self.close = weakref.finalize(self, _stop, self.process, self.jobs, self.results, before)

    @torch.no_grad()
    def publish(self, step: int, model: torch.nn.Module, version: int) -> None:
        slot = step % len(self.slots)
        self.versions[slot] = -1  # being written
        for name, p in trainable(model).items():
            self.slots[slot][name].copy_(p.detach())
        self.versions[slot] = version

    def submit(self, job: Job) -> None:
        self.jobs.put((job, job.weights_step % len(self.slots)))  # the slot publish() wrote

    def result(self, step: int) -> list[Group]:
        while step not in self.done:
            kind, done_step, payload = self._receive()
            if kind == "error":
                when = "while starting" if done_step is None else f"generating step {done_step + 1}"
                raise GeneratorError(f"the generator process failed {when}: {payload}")
            self.done[done_step] = decode_groups(payload)
        return self.done.pop(step)

    def _receive(self):
        while True:
            try:
                return self.results.get(timeout=POLL_S)
            except queue.Empty:
                if not self.process.is_alive():
                    raise GeneratorError(f"the generator process exited (exit code {self.process.exitcode}) before "
                                         "sending its groups; its error, if any, is above") from None

    def idle_seconds(self) -> float:
        return self.idle.value


def _stop(process, jobs, results, threads_before: int | None) -> None:
    """:meth:`ProcessGenerator.close`."""
    if process.is_alive():
        jobs.put(None)
        process.join(timeout=5)
    if process.is_alive():
        process.terminate()
        process.join()
    for q in (jobs, results):
        q.cancel_join_thread()
        q.close()
    if threads_before is not None:
        torch.set_num_threads(threads_before)


def flat_buffers(params: dict[str, torch.Tensor]) -> dict[torch.dtype, torch.Tensor]:
    """One shared-memory CPU buffer per dtype, large enough for all of ``params`` (one file descriptor each,
    however many tensors the model has)."""
    sizes: dict[torch.dtype, int] = {}
    for p in params.values():
        sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return {dtype: torch.empty(size, dtype=dtype).share_memory_() for dtype, size in sizes.items()}


def layout(params: dict[str, torch.Tensor]) -> list:
    return [(name, tuple(p.shape), str(p.dtype)) for name, p in params.items()]


def slot_views(params: dict[str, torch.Tensor], buffers: dict[torch.dtype, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: view}``: each parameter's place in ``buffers``, in ``params``' order (the same on both sides)."""
    offsets = dict.fromkeys(buffers, 0)
    views = {}
    for name, p in params.items():
        start = offsets[p.dtype]
        views[name] = buffers[p.dtype][start : start + p.numel()].view(p.shape)
        offsets[p.dtype] = start + p.numel()
    return views


def worker_main(spec: WorkerSpec, buffers: list[dict], versions: torch.Tensor, jobs, results, idle) -> None:
    """The generator process: build model, engine, sampler; then one job at a time until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(spec.threads)
    step = None
    try:
        sampler, model, tokenizer, engine, reference = _build(spec)
        params = trainable(model)
        if layout(params) != spec.layout:
            raise GeneratorError("the generator's model has other trainable parameters than the trainer's")
        slots = [slot_views(params, b) for b in buffers]
        while True:
            start = time.perf_counter()
            item = _next(jobs)
            with idle.get_lock():
                idle.value += time.perf_counter() - start
            if item is None:
                return
            job, slot = item
            step = job.step
            _load(params, slots[slot], versions, slot, job.version)
            engine.sync_weights(model)
            groups = produce(sampler, job, spec.scoring, model=model, tokenizer=tokenizer, reference=reference)
            results.put(("groups", job.step, encode_groups(groups)))
    except BaseException as err:  # the trainer raises it; the traceback goes to this process's stderr
        traceback.print_exc()
        results.put(("error", step, f"{type(err).__name__}: {err}"))


def _build(spec: WorkerSpec):
    from ..model.checks import load_checked
    from ..model.loading import Reference
    from ..rollout import create_engine
    from ..samplers import create_sampler

    config = spec.config
    model, tokenizer = load_checked(config.model, torch.device(spec.device), progress=False)
    reference = Reference(model, config.model.lora) if spec.scoring.reference else None  # the initial weights
    engine = create_engine(config.rollout.engine, model, tokenizer, share_prompts=config.train.share_prompts,
                           gpu_memory_utilization=config.rollout.vllm_gpu_memory_utilization)
    sampler = create_sampler(config.sampler, engine=engine, reference=reference, tokenizer=tokenizer,
                             k=config.rollout.k, seed=config.train.seed, max_new_tokens=config.rollout.max_new_tokens,
                             cache_dir=Path(config.output.dir) / ".ref_cache")
    return sampler, model, tokenizer, engine, reference


def _next(jobs):
    """The next job, or None when told to stop or when the trainer's process is gone."""
    parent = mp.parent_process()
    while True:
        try:
            return jobs.get(timeout=POLL_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return None


@torch.no_grad()
def _load(params: dict, slot: dict, versions: torch.Tensor, index: int, version: int) -> None:
    """Copy weight slot ``index`` into ``params``; it must hold ``version`` before and after the copy."""
    _check_version(versions, index, version, "before")
    for name, value in slot.items():
        params[name].copy_(value)
    _check_version(versions, index, version, "after")


def _check_version(versions: torch.Tensor, index: int, version: int, when: str) -> None:
    if int(versions[index]) != version:
        raise GeneratorError(f"weight slot {index} holds version {int(versions[index])} {when} the copy; the job "
                             f"needs version {version}")
