"""The GVPO training loop, top to bottom: :func:`setup` builds the run's parts, :func:`train` runs them.

One step: take B prompts, get k completions per prompt from the sampling distribution pi_s,
score them, compute reference log-probs, take ``updates_per_batch x mini_batches`` optimizer steps on
whole-group statistics (each on one mini-batch of whole groups, with the current parameters), log,
evaluate, checkpoint.

Where this departs from the paper, and why:
- ``reference: rollout`` (the authors' released recipe) sets pi_ref to the policy that generated
  each batch instead of the initial policy; the theory of section 3.3 is about a fixed pi_ref.
- Completions whose reward is ``None`` are dropped; their group keeps the others, so k varies
  per prompt, which Corollary 3.4's ``1/(k(x)-1)`` handles.
"""

from __future__ import annotations

import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm
from transformers import get_scheduler

from .batch import Batch, Group, all_token_logps, build_batch
from .config import ConfigError, RunConfig, flat_dict, save_config
from .episodes import (episode_metrics, load_environment_spec, reward_keywords, task_environment, task_rewards,
                       with_episodes)
from .evaluate import evaluate
from .generation import lag_metrics, lagged, running
from .model.checks import load_checked
from .model.loading import Reference
from .model.sharding import SHARDABLE, full_state_dict, is_sharded, shard
from .objectives import create_objective
from .reward_checks import RewardError
from .rewards import combine
from .rollout import SamplingParams, create_engine
from .run import checkpoint as ckpt
from .run import folder as run_folder
from .run.interrupt import Interrupted, StopRequests, resume_hint
from .run.metrics import MetricsLog, end_trackers, gather_stats, start_trackers, write_plots
from .samplers import create_sampler, train_rows
from .tasks import get_task
from .update import NonFiniteError, fill_rollout_logps, update

__all__ = ["NonFiniteError", "Run", "setup", "train"]

SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
"""``optim.scheduler`` -> the name of the schedule in ``transformers.get_scheduler``."""


def run_dir_for(config: RunConfig) -> Path:
    name = config.output.name or f"{config.task.name}-{config.objective.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(config.output.dir) / name


def fused_adam_ok(params, accelerator: Accelerator) -> bool:
    """Use torch's fused AdamW: one kernel for all tensors (faster on CPU: bench/README.md, section "Where the
    time can go down", item 2). It needs floating-point tensors on CPU or CUDA; under FSDP and DeepSpeed, which
    shard or replace the optimizer's parameters, the default stays."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    return bool(params) and not sharded and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                                and type(p) is torch.nn.Parameter for p in params)  # no DTensor


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """``transformers.get_scheduler`` counted from 1: the first step's learning rate is
    ``lr / (warmup_steps + 1)``, never 0, and warm-up ends after ``warmup_steps`` steps."""
    scheduler = get_scheduler(SCHEDULES[kind], optimizer, num_warmup_steps=warmup_steps + 1,
                              num_training_steps=max(total_steps, 1) + 1)
    with warnings.catch_warnings():  # the schedule starts at its step 1: no optimizer step came before it
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
        scheduler.step()
    return scheduler


@dataclass
class Run:
    """Everything a training run is made of; built by :func:`setup`, driven by :func:`train`."""

    config: RunConfig
    accelerator: Accelerator
    task: object
    reward_fn: object
    eval_tasks: list
    policy: torch.nn.Module
    tokenizer: object
    reference: Reference | None
    objective: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    engine: object
    params: SamplingParams
    sampler: object
    run_dir: Path
    state: dict
    log: MetricsLog | None
    lock: run_folder.RunLock | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The policy without its DDP/FSDP wrapper."""
        return self.accelerator.unwrap_model(self.policy)


def setup(config: RunConfig, *, resume: str | Path | None = None, overwrite: bool = False,
          allow_changes: tuple = ()) -> Run:
    """Build the run: task and rewards, policy and reference, optimizer, engine, sampler, run folder;
    restore the newest intact checkpoint when ``resume`` (a run folder) is given.

    A new run refuses a folder that holds a run unless ``overwrite``; a resumed one refuses config changes
    outside :data:`gvpo.run.folder.RESUMABLE` and ``allow_changes``; the folder is locked until the run ends."""
    run_dir = Path(resume) if resume else run_dir_for(config)
    changed = run_folder.check(run_dir, config, resume=bool(resume), overwrite=overwrite, allowed=allow_changes)
    report_to = [t for t in config.output.report_to if t != "none"]
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=report_to or None, project_dir=run_dir)
    if accelerator.num_processes > 1:  # the dated default name comes from each process's clock: take the main one's
        run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    world, cfg_train, cfg_obj = accelerator.num_processes, config.train, config.objective
    if cfg_train.prompts_per_step % (world * cfg_train.mini_batches):
        raise ConfigError(f"train.prompts_per_step={cfg_train.prompts_per_step} must be divisible by "
                          f"train.mini_batches ({cfg_train.mini_batches}) x the number of processes ({world}), so that "
                          "every mini-batch holds whole groups and every group stays on one process")
    torch.manual_seed(cfg_train.seed)

    task = get_task(config.task.name, **config.task.options)
    spec = load_environment_spec(task_environment(task, config.task.environment, config.task.tools), config.task.tools,
                                 config.task.env_timeout_s)
    reward_fn = combine(*task_rewards(config.task, task, spec), timeout_s=config.task.reward_timeout_s)
    eval_tasks = [get_task(name) for name in config.task.eval_tasks]
    max_new_tokens = config.rollout.max_new_tokens or task.max_new_tokens

    policy, tokenizer = load_checked(config.model, accelerator.device, progress=config.output.progress)
    reference = Reference(policy, config.model.lora) if cfg_obj.reference == "fixed" else None
    shard_here = cfg_train.fsdp and world > 1 and accelerator.distributed_type in SHARDABLE
    if cfg_train.fsdp and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("train.fsdp with a DeepSpeed accelerate config: DeepSpeed partitions the model itself; "
                         "drop train.fsdp or use an FSDP config")
    if shard_here:  # accelerate prepared no sharding (CPU processes, plain DDP): torch's fully_shard does it
        shard(policy)
    objective = create_objective(cfg_obj, max_completion_length=max_new_tokens)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.optim.lr, betas=(config.optim.adam_beta1, config.optim.adam_beta2),
                                  weight_decay=config.optim.weight_decay,
                                  fused=fused_adam_ok(trainable, accelerator) or None)
    optimizer_steps = cfg_train.max_steps * cfg_train.updates_per_batch * cfg_train.mini_batches
    scheduler = make_scheduler(optimizer, config.optim.scheduler, config.optim.warmup_steps, optimizer_steps)
    if shard_here:  # wrapping the sharded model in DDP as well would all-reduce DTensor gradients
        optimizer = accelerator.prepare(optimizer)
    else:
        policy, optimizer = accelerator.prepare(policy, optimizer)
    model = accelerator.unwrap_model(policy)
    engine = with_episodes(create_engine(config.rollout.engine, model, tokenizer, share_prompts=cfg_train.share_prompts,
                                         gpu_memory_utilization=config.rollout.vllm_gpu_memory_utilization),
                           tokenizer, spec, config.rollout)
    sampler = create_sampler(config.sampler, engine=engine, reference=reference, tokenizer=tokenizer,
                             k=config.rollout.k, seed=cfg_train.seed, max_new_tokens=max_new_tokens,
                             cache_dir=Path(config.output.dir) / ".ref_cache")
    sampler = lagged(config, sampler, task=task, engine=engine, model=model, reference=reference, tokenizer=tokenizer,
                     world=world)  # train.async_lag: groups sampled L steps earlier, by a generator (gvpo.generation)

    state = {"step": 0, "samples": 0, "trained": 0, "optimizer_steps": 0, "skipped_steps": 0, "elapsed_s": 0.0,
             "processes": world}
    lock = None
    if accelerator.is_main_process:
        lock = run_folder.open_locked(run_dir, resume=bool(resume), overwrite=overwrite)
        if not resume:
            save_config(config, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    with run_folder.released_on_error(lock):
        last = run_folder.resume_point(run_dir, say=say if accelerator.is_main_process else None) if resume else None
        if last is not None:
            state, sampler_state = ckpt.load_checkpoint(last, accelerator=accelerator, policy=policy,
                                                        optimizer=optimizer, scheduler=scheduler,
                                                        reference_model=reference.model if reference else None)
            state["processes"] = world
            sampler.load_state(sampler_state)
        log = None
        if accelerator.is_main_process:
            log = MetricsLog(run_dir, accelerator)
            log.truncate_after(state["step"] if last is not None else -1)
            if resume:
                run_folder.record_resume(run_dir, state["step"], changed)
        start_trackers(accelerator, run_dir, flat_dict(config))
    return Run(config, accelerator, task, reward_fn, eval_tasks, policy, tokenizer, reference, objective, optimizer,
               scheduler, engine, SamplingParams(max_new_tokens, config.rollout.temperature, config.rollout.top_p,
                                                 mask_truncated=config.rollout.mask_truncated),
               sampler, run_dir, state, log, lock)


def train(config: RunConfig, *, resume: str | Path | None = None, overwrite: bool = False,
          allow_changes: tuple = ()) -> Path:
    """Train with ``config``; returns the run folder. ``resume`` = a run folder to continue; ``overwrite``
    replaces a finished or abandoned run in the same folder. SIGTERM/Ctrl-C end the run after a checkpoint
    with :class:`gvpo.run.interrupt.Interrupted` (see :mod:`gvpo.run.interrupt`)."""
    run = setup(config, resume=resume, overwrite=overwrite, allow_changes=allow_changes)
    with run_folder.held(run.lock), StopRequests() as stop, running(run.sampler):
        try:
            run_loop(run, stop)
        except KeyboardInterrupt:  # a second signal (or Ctrl-C without handlers): no new checkpoint
            last = ckpt.manifest.newest_intact(run.run_dir / "checkpoints", hashes=False)[0]
            raise Interrupted(f"stopped at once in step {run.state['step'] + 1}; "
                              + resume_hint(run.run_dir, last), stop.signum or signal.SIGINT) from None
    return run.run_dir


def run_loop(run: Run, stop: StopRequests) -> None:
    """The steps of :func:`train`, from the run's current step to ``train.max_steps``, then :func:`finish`."""
    config = run.config
    cfg_train, accelerator, state = config.train, run.accelerator, run.state
    rank, world = accelerator.process_index, accelerator.num_processes
    if state["step"] == 0:
        initial = evaluate_all(run, 0)  # on every process: each forward of a sharded policy is a collective
        if run.log:
            run.log.log({"step": 0, "samples": 0, "time_s": 0.0, **initial})

    bar = tqdm(total=cfg_train.max_steps, initial=state["step"], desc="gvpo",
               disable=not (config.output.progress and accelerator.is_main_process))
    start = time.perf_counter() - state["elapsed_s"]
    while state["step"] < cfg_train.max_steps and not stop.requested(accelerator):
        step = state["step"]
        # 1. sample: this process's share of the step's prompts, whole groups only, in mini-batch order
        rows = train_rows(run.task.train, step, cfg_train, rank, world)
        groups = run.sampler.sample(rows, step, run.params)

        # 2. score: given rewards (offline, replay) or the task's reward functions; None drops a completion
        truncated = sum(g.truncated for g in groups)  # generated, then dropped by rollout.mask_truncated
        generated = truncated + sum(s in ("policy", "reference") for g in groups for s in g.sources)
        scored = [g.with_rewards(r) for g, r in zip(groups, score(groups, run.reward_fn, state))]
        groups = [g.scored() for g in scored]
        dropped = sum(len(a) - len(b) for a, b in zip(scored, groups))
        if nothing_scored(groups, accelerator):  # every completion's reward is None: no update, step counted
            skip_step(run, step, generated, dropped, bar, truncated)
            continue

        # 3. one batch per mini-batch of whole groups, with reference log-probs (fixed reference); pi_old and a
        #    rollout reference of the later mini-batches are taken now, before any update moves the policy (the
        #    first mini-batch's come from its own update's forward, at the same parameters)
        size = len(groups) // cfg_train.mini_batches
        chunks = [groups[j * size : (j + 1) * size] for j in range(cfg_train.mini_batches)]
        batches = [build_batch(chunk, run.tokenizer, accelerator.device) for chunk in chunks]
        check_micro_batches(run, batches)
        for j, (chunk, batch) in enumerate(zip(chunks, batches)):
            if run.reference is not None:
                batch.ref_token_logps = reference_token_logps(run, chunk, batch)
            if j > 0:
                fill_rollout_logps(batch, all_token_logps(run.policy, batch, cfg_train.micro_batch_size,
                                                          cfg_train.share_prompts))

        # 4. update on whole-group statistics: updates_per_batch epochs of one optimizer step per mini-batch
        for _ in range(cfg_train.updates_per_batch):
            updates = []
            for batch in batches:
                stats = update(run.policy, run.optimizer, batch, run.objective,
                               micro_batch_size=cfg_train.micro_batch_size, share_prompts=cfg_train.share_prompts,
                               max_grad_norm=config.optim.max_grad_norm, accelerator=accelerator,
                               router_coef=config.model.router_aux_loss_coef)
                run.scheduler.step()
                state["optimizer_steps"] += 1
                updates.append((stats, batch))
        run.engine.sync_weights(run.model)  # vLLM: push the new weights; HF: shares the policy, no-op
        run.sampler.after_update(groups, step)
        if run.reference is not None and config.objective.ref_sync_steps and (step + 1) % config.objective.ref_sync_steps == 0:
            run.reference.sync(run.model)

        # 5. log
        trained = float(sum(len(b) for b in batches))
        totals = accelerator.reduce(torch.tensor([float(generated), float(dropped), trained, float(truncated)],
                                                 device=accelerator.device), "sum")
        state["samples"] += int(totals[0].item())
        state["trained"] += int(totals[2].item())
        state["step"] = step + 1
        state["elapsed_s"] = time.perf_counter() - start
        row = {"step": step + 1, "samples": state["samples"], "completions_trained": state["trained"],
               "optimizer_steps": state["optimizer_steps"], **gather_stats(updates, accelerator),
               **({"truncated": int(totals[3].item())} if config.rollout.mask_truncated else {}),
               **episode_metrics(run.engine, scored, accelerator),
               "reward_none": int(totals[1].item()), "lr": run.scheduler.get_last_lr()[0], "time_s": state["elapsed_s"],
               **lag_metrics(run.sampler)}

        # 6. evaluate, log, checkpoint
        end_step(run, row, bar)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=row.get("eval/accuracy", ""), kl=f"{row['kl']:.3f}")
    bar.close()
    if stop.signum is not None:
        stop_with_checkpoint(run, stop.signum)
    finish(run)


def say(message: str) -> None:
    print(f"gvpo: {message}", file=sys.stderr, flush=True)


def nothing_scored(groups: list[Group], accelerator) -> bool:
    """Whether no process has a completion with a reward this step."""
    count = torch.tensor([float(sum(len(g) for g in groups))], device=accelerator.device)
    return float(accelerator.reduce(count, "sum")[0]) == 0


def skip_step(run: Run, step: int, generated: int, dropped: int, bar, truncated: int = 0) -> None:
    """A step whose every completion was dropped: no update; the step, its samples and ``skipped_steps`` count."""
    accelerator, state = run.accelerator, run.state
    totals = accelerator.reduce(torch.tensor([float(generated), float(dropped), float(truncated)],
                                             device=accelerator.device), "sum")
    state["samples"] += int(totals[0].item())
    state["skipped_steps"] += 1
    state["step"] = step + 1
    if accelerator.is_main_process:
        cut = f", {int(totals[2].item())} truncated (rollout.mask_truncated)" if totals[2] else ""
        say(f"step {step + 1}: {'no completion left' if cut else 'every reward was None'} ({int(totals[1].item())} "
            f"completions dropped{cut}); step skipped ({state['skipped_steps']} so far)")
    row = {"step": step + 1, "samples": state["samples"], "completions_trained": state["trained"],
           "reward_none": int(totals[1].item()), "skipped_steps": state["skipped_steps"],
           "lr": run.scheduler.get_last_lr()[0], "time_s": state["elapsed_s"]}
    end_step(run, row, bar)


def end_step(run: Run, row: dict, bar) -> None:
    """After step ``row["step"]``: held-out evaluation when due (every ``eval_every`` steps and at the end), the
    metrics row, the progress bar, and a checkpoint when due."""
    cfg_train, step = run.config.train, row["step"]
    if cfg_train.eval_every and step % cfg_train.eval_every == 0 or step == cfg_train.max_steps:
        row.update(evaluate_all(run, step))
    if run.log:
        run.log.log(row)
    bar.update(1)
    if cfg_train.checkpoint_every and step % cfg_train.checkpoint_every == 0:
        save_checkpoint(run)


def stop_with_checkpoint(run: Run, signum: int) -> None:
    """After a SIGTERM/Ctrl-C: checkpoint the finished steps (unless the last one is saved), raise Interrupted."""
    step = run.state["step"]
    path = run.run_dir / "checkpoints" / f"step-{step:06d}"
    if not path.exists():
        save_checkpoint(run)
    end_trackers(run.accelerator, run.run_dir)
    raise Interrupted(f"stopped by {signal.Signals(signum).name} after step {step}; "
                      + resume_hint(run.run_dir, path), signum)


def check_micro_batches(run: Run, batches: list[Batch]) -> None:
    """A sharded policy's every forward is a collective, so all processes must run as many micro-batches in each
    mini-batch; with completions dropped (``None`` rewards) their row counts, and so their micro-batch counts,
    can differ. Stops with the counts instead of hanging."""
    size, accelerator = run.config.train.micro_batch_size, run.accelerator
    if not size or accelerator.num_processes == 1 or not is_sharded(run.policy):
        return
    mine = torch.tensor([-(-len(b) // size) for b in batches], device=accelerator.device)
    counts = accelerator.gather(mine[None]).reshape(accelerator.num_processes, -1)
    if bool((counts != counts[0]).any()):
        raise RuntimeError(f"sharded training: the processes have {counts.tolist()} micro-batches per mini-batch "
                           f"this step (train.micro_batch_size={size}); every process must run the same number of "
                           "forward passes. Use train.micro_batch_size=0 (one pass per process and mini-batch)")


def score(groups: list[Group], reward_fn, state: dict | None = None) -> list[list]:
    """Rewards per group, one per completion: given ones kept, the rest from ``reward_fn`` (called with
    TRL's keywords, see :mod:`gvpo.rewards`; ``state`` is the trainer state; ``None`` = the completion
    cannot be scored). Nothing is changed in ``groups``. A reward that raises or returns something unusable is a
    ``RewardError`` naming it and the step."""
    todo = [(g, i) for g in groups for i in range(len(g)) if g.rewards[i] is None]
    try:  # TRL's keywords; an episode's prompt, messages and environment (gvpo.episodes.reward_keywords)
        values = reward_fn(**reward_keywords(todo), trainer_state=state) if todo else []
    except RewardError as err:
        raise RewardError(f"step {state['step'] + 1}: {err}" if state else str(err)) from err
    for (g, i), v in zip(todo, values):
        if v is not None and not math.isfinite(v):
            raise NonFiniteError(f"reward {v} for completion {g.texts[i]!r} of prompt {g.row['prompt']!r}: rewards "
                                 "must be finite numbers or None (None drops the completion)")
    scored = {(id(g), i): v for (g, i), v in zip(todo, values)}
    return [[float(r) if (r := scored.get((id(g), i), g.rewards[i])) is not None else None for i in range(len(g))]
            for g in groups]


def reference_token_logps(run: Run, groups: list[Group], batch: Batch) -> torch.Tensor:
    """``(N, C)`` fixed-reference log-probs: the sampler's cached ones, or computed now."""
    cfg_train = run.config.train
    cached = run.sampler.reference_token_logps(groups, batch, run.reference, cfg_train.micro_batch_size)
    if cached is not None:
        return cached
    with run.reference.scoring(run.model) as ref_model:
        return all_token_logps(ref_model, batch, cfg_train.micro_batch_size, cfg_train.share_prompts)


def evaluate_all(run: Run, step: int) -> dict:
    """Held-out accuracy of the task and of every ``task.eval_tasks`` entry; every process evaluates the
    same prompts, only the main one logs."""
    out = {}
    for t, key in [(run.task, "eval/accuracy")] + [(t, f"eval/{t.name}/accuracy") for t in run.eval_tasks]:
        out[key] = evaluate(run.engine, t, n=run.config.train.eval_n, seed=run.config.train.seed)["accuracy"]
    return out


def save_checkpoint(run: Run) -> None:
    """Atomic checkpoint of the current step: every process writes its shards, the main process the rest."""
    moving = run.reference is not None and run.config.objective.ref_sync_steps and run.accelerator.is_main_process
    ckpt.save_checkpoint(run.run_dir / "checkpoints", run.state["step"], accelerator=run.accelerator, policy=run.policy,
                         optimizer=run.optimizer, scheduler=run.scheduler, trainer_state=run.state,
                         keep=run.config.train.keep_checkpoints, sampler_state=run.sampler.state(),
                         reference_model=run.reference.model if moving else None)


def finish(run: Run) -> None:
    """Final checkpoint (unless the last periodic one covers it), ``final/`` weights, plots."""
    every = run.config.train.checkpoint_every
    if not (every and run.state["step"] % every == 0):
        save_checkpoint(run)
    weights = full_state_dict(run.policy, run.accelerator)  # gathered from every process's shards
    if run.accelerator.is_main_process:
        ckpt.save_final(run.model, run.tokenizer, run.run_dir, state_dict=weights)
        if run.config.output.plots:
            write_plots(run.run_dir)
    run.accelerator.wait_for_everyone()
    end_trackers(run.accelerator, run.run_dir)
