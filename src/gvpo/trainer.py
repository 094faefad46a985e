"""The GVPO training loop, top to bottom.

One step: take B prompts, get k completions per prompt from the sampling distribution pi_s,
score them, compute reference log-probs, update the policy ``updates_per_batch`` times on the
whole-group statistics, log, evaluate, checkpoint.

Where this departs from the paper, and why:
- ``reference: rollout`` (the authors' released recipe) sets pi_ref to the policy that generated
  each batch instead of the initial policy; the theory of section 3.3 is about a fixed pi_ref.
- Completions whose reward is ``None`` are dropped; their group keeps the others, so k varies
  per prompt, which Corollary 3.4's ``1/(k(x)-1)`` handles.
"""

from __future__ import annotations

import contextlib
import math
import time
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import GVPOConfig, save_config
from .evaluate import evaluate
from .metrics import MetricsLog, plot_metrics, read_metrics, within_group_correlation
from .models import Reference, load_policy, save_pretrained, unwrap
from .rewards import combine
from .rollout import SamplingParams, create_engine
from .sampling import build_batch, create_sampler, step_rows
from .tasks import get_task
from .update import Batch, all_token_logps, create_objective, token_logps_for


class NonFiniteError(RuntimeError):
    """Loss or gradient became NaN/inf; the run stops and the last checkpoint stays as it was."""


def run_dir_for(config: GVPOConfig) -> Path:
    name = config.output.name or f"{config.task.name}-{config.objective.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(config.output.dir) / name


def fused_adam_ok(params, accelerator: Accelerator) -> bool:
    """Use torch's fused AdamW: one kernel for all tensors (the single-tensor loop torch uses on CPU took
    3-4x as long, ``bench/README.md``). It needs floating-point tensors on CPU or CUDA; under FSDP and
    DeepSpeed, which shard or replace the optimizer's parameters, the default stays."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    return bool(params) and not sharded and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                                for p in params)


def make_scheduler(optimizer, config: GVPOConfig):
    warmup, total, kind = config.optim.warmup_steps, max(config.train.max_steps, 1), config.optim.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[kind]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(config: GVPOConfig, *, resume: str | Path | None = None) -> Path:
    """Train with ``config``; returns the run folder. ``resume`` = a run folder to continue."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg_train, cfg_obj = config.train, config.objective
    if cfg_train.prompts_per_step % world:
        raise ValueError(f"train.prompts_per_step={cfg_train.prompts_per_step} must be divisible by the "
                         f"number of processes ({world}) so that every group stays on one process")
    torch.manual_seed(cfg_train.seed)

    # --- what to train on -------------------------------------------------------------------
    task = get_task(config.task.name, **config.task.options)
    reward_fn = combine(config.task.rewards or task.rewards, config.task.reward_weights or
                        (None if config.task.rewards else task.reward_weights), timeout_s=config.task.reward_timeout_s)
    eval_tasks = [get_task(name) for name in config.task.eval_tasks]
    max_new_tokens = config.rollout.max_new_tokens or task.max_new_tokens

    # --- models -------------------------------------------------------------------------------
    policy, tokenizer = load_policy(config.model, accelerator.device)
    reference = Reference(policy, config.model.lora) if cfg_obj.reference == "fixed" else None
    objective = create_objective(cfg_obj)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.optim.lr, betas=(config.optim.adam_beta1, config.optim.adam_beta2),
                                  weight_decay=config.optim.weight_decay,
                                  fused=fused_adam_ok(trainable, accelerator) or None)
    scheduler = make_scheduler(optimizer, config)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    engine = create_engine(config.rollout.engine, unwrap(policy), tokenizer, share_prompts=cfg_train.share_prompts,
                           gpu_memory_utilization=config.rollout.vllm_gpu_memory_utilization)
    params = SamplingParams(max_new_tokens, config.rollout.temperature, config.rollout.top_p)
    sampler = create_sampler(config, engine, reference, tokenizer, max_new_tokens)

    # --- run folder, resume ---------------------------------------------------------------------
    run_dir = Path(resume) if resume else run_dir_for(config)
    ckpt_dir = run_dir / "checkpoints"
    state = {"step": 0, "samples": 0, "trained": 0, "elapsed_s": 0.0, "processes": world}
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    if resume:
        last = ckpt.latest_checkpoint(ckpt_dir)
        if last is not None:
            state, sampler_state = ckpt.load_checkpoint(last, model=policy, optimizer=optimizer, scheduler=scheduler,
                                                        reference_model=reference.model if reference else None)
            sampler.load_state(sampler_state)
    log = MetricsLog(run_dir, tensorboard=config.output.tensorboard) if accelerator.is_main_process else None
    if log:
        log.truncate_after(state["step"])

    def evaluate_all(step: int) -> dict:
        out = {}
        for t, key in [(task, "eval/accuracy")] + [(t, f"eval/{t.name}/accuracy") for t in eval_tasks]:
            # every process evaluates the same prompts; only the main one logs
            out[key] = evaluate(engine, t, n=cfg_train.eval_n, seed=cfg_train.seed)["accuracy"]
        return out

    def save(step: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ckpt.save_checkpoint(ckpt_dir, step, model=policy, optimizer=optimizer, scheduler=scheduler,
                                 trainer_state=state, keep=cfg_train.keep_checkpoints,
                                 reference_state=reference.state_dict() if reference and cfg_obj.ref_sync_steps else None,
                                 sampler_state=sampler.state())
        accelerator.wait_for_everyone()

    if state["step"] == 0 and log:
        log.log({"step": 0, "samples": 0, "time_s": 0.0, **evaluate_all(0)})

    bar = tqdm(total=cfg_train.max_steps, initial=state["step"], desc="gvpo",
               disable=not (config.output.progress and accelerator.is_main_process))
    start = time.perf_counter() - state["elapsed_s"]
    while state["step"] < cfg_train.max_steps:
        step = state["step"]
        # 1. sample: this process's share of the step's prompts, whole groups only
        rows = step_rows(task.train, step, cfg_train.prompts_per_step, cfg_train.seed)
        share = cfg_train.prompts_per_step // world
        groups = sampler.sample(rows[rank * share : (rank + 1) * share], step, params)

        # 2. score: given rewards (offline, replay) or the task's reward functions; None drops a completion
        generated = sum(src in ("policy", "reference") for g in groups for src in g.sources)
        rewards, dropped = score(groups, reward_fn, state)
        batch = build_batch(groups, rewards, tokenizer, accelerator.device)

        # 3. reference log-probs (fixed reference), or at the first update (rollout reference)
        if reference is not None:
            batch.ref_token_logps = sampler.reference_token_logps(groups, batch, reference, cfg_train.micro_batch_size)
            if batch.ref_token_logps is None:
                with reference.scoring(unwrap(policy)) as ref_model:
                    batch.ref_token_logps = all_token_logps(ref_model, batch, cfg_train.micro_batch_size,
                                                            cfg_train.share_prompts)

        # 4. update on whole-group statistics
        for _ in range(cfg_train.updates_per_batch):
            stats = update(policy, optimizer, batch, objective, cfg_train.micro_batch_size, accelerator, config)
        scheduler.step()
        engine.sync_weights(unwrap(policy))  # vLLM: push the new weights; HF: shares the policy, no-op
        sampler.after_update(groups, rewards, step)
        if reference is not None and cfg_obj.ref_sync_steps and (step + 1) % cfg_obj.ref_sync_steps == 0:
            reference.sync(policy)

        # 5. log
        totals = accelerator.reduce(torch.tensor([float(generated), float(dropped), float(len(batch))],
                                                 device=accelerator.device), "sum")
        state["samples"] += int(totals[0].item())
        state["trained"] += int(totals[2].item())
        state["step"] = step + 1
        state["elapsed_s"] = time.perf_counter() - start
        row = {"step": step + 1, "samples": state["samples"], "completions_trained": state["trained"],
               **gather_stats(stats, batch, accelerator),
               "reward_none": int(totals[1].item()), "lr": scheduler.get_last_lr()[0], "time_s": state["elapsed_s"]}
        if cfg_train.eval_every and (step + 1) % cfg_train.eval_every == 0 or step + 1 == cfg_train.max_steps:
            row.update(evaluate_all(step + 1))
        if log:
            log.log(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=row.get("eval/accuracy", ""), kl=f"{row['kl']:.3f}")

        # 6. checkpoint
        if cfg_train.checkpoint_every and (step + 1) % cfg_train.checkpoint_every == 0:
            save(step + 1)
    bar.close()

    if not (cfg_train.checkpoint_every and state["step"] % cfg_train.checkpoint_every == 0):
        save(state["step"])
    if accelerator.is_main_process:
        save_pretrained(policy, tokenizer, run_dir / "final")
        if config.output.plots:
            plot_metrics(read_metrics(run_dir / "metrics.jsonl"), run_dir / "plots.png", title=run_dir.name)
        log.close()
    accelerator.wait_for_everyone()
    return run_dir


def score(groups, reward_fn, state: dict | None = None) -> tuple[list[list[float]], int]:
    """Rewards per group: given ones kept, the rest from ``reward_fn`` (called with TRL's keywords, see
    :mod:`gvpo.rewards`; ``state`` is the trainer state); ``None`` removes a completion."""
    todo = [(g, i) for g in groups for i in range(len(g.texts)) if g.rewards is None or g.rewards[i] is None]
    columns = {key: [g.row.get(key) for g, _ in todo] for key in (todo[0][0].row if todo else {}) if key != "prompt"}
    values = reward_fn(prompts=[g.row["prompt"] for g, _ in todo], completions=[g.texts[i] for g, i in todo],
                       completion_ids=[g.completion_ids[i] if g.completion_ids else None for g, i in todo],
                       trainer_state=state, **columns) if todo else []
    scored = {(id(g), i): v for (g, i), v in zip(todo, values)}
    for (g, i), v in zip(todo, values):
        if v is not None and not math.isfinite(v):
            raise NonFiniteError(f"reward {v} for completion {g.texts[i]!r} of prompt {g.row['prompt']!r}: rewards "
                                 "must be finite numbers or None (None drops the completion)")
    out, dropped = [], 0
    for g in groups:
        rs = [scored[(id(g), i)] if (id(g), i) in scored else g.rewards[i] for i in range(len(g.texts))]
        keep = [i for i, r in enumerate(rs) if r is not None]
        dropped += len(rs) - len(keep)
        if len(keep) < len(rs):
            for name in ("completion_ids", "texts", "sources", "born_step", "offline_index"):
                values_of = getattr(g, name)
                if values_of:
                    setattr(g, name, [values_of[i] for i in keep])
        g.rewards = [float(rs[i]) for i in keep]
        out.append(g.rewards)
    return out, dropped


def update(policy, optimizer, batch: Batch, objective, micro_batch_size: int, accelerator, config) -> dict:
    """One optimizer step on ``batch``: whole-batch statistics first, then micro-batched backward."""
    n = len(batch)
    size = micro_batch_size or n
    slices = [slice(s, s + size) for s in range(0, n, size)]
    share = config.train.share_prompts
    if len(slices) == 1:  # one forward serves both the statistics and the gradient
        token_logps = token_logps_for(policy, batch, slices[0], share)
        current = token_logps.detach()
    else:
        token_logps = None
        current = all_token_logps(policy, batch, micro_batch_size, share)
    fill_rollout_logps(batch, current)
    prepared = objective.prepare(batch, current)
    norm = accelerator.reduce(torch.tensor([prepared.norm, prepared.loss_sum], device=accelerator.device,
                                           dtype=torch.float64), "sum")
    global_norm, loss_value = float(norm[0]), float(norm[1] / norm[0]) if norm[0] > 0 else 0.0
    scale = accelerator.num_processes / global_norm if global_norm > 0 else 0.0
    for i, sl in enumerate(slices):
        last = i == len(slices) - 1
        with accelerator.no_sync(policy) if not last else contextlib.nullcontext():
            tl = token_logps if token_logps is not None else token_logps_for(policy, batch, sl, share)
            loss = objective.micro_loss(tl, batch, sl, prepared) * scale
            if not torch.isfinite(loss):
                raise NonFiniteError(f"non-finite loss ({loss.item()}) at a micro-batch of rows {sl.start}:{sl.stop}; "
                                     "stopping with the last checkpoint intact")
            accelerator.backward(loss)
    max_norm = config.optim.max_grad_norm
    params = [p for p in policy.parameters() if p.requires_grad]
    grad_norm = float(accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
    if not math.isfinite(grad_norm):
        raise NonFiniteError(f"non-finite gradient norm ({grad_norm}); stopping with the last checkpoint intact")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_value, "grad_norm": grad_norm, "logps": current, **prepared.stats}


def fill_rollout_logps(batch: Batch, token_logps: torch.Tensor) -> None:
    """First update on a batch: the current policy's log-probs are pi_old, and pi_ref for ``reference: rollout``."""
    if batch.old_token_logps is None:
        batch.old_token_logps = token_logps
    if batch.ref_token_logps is None:
        batch.ref_token_logps = token_logps


def gather_stats(stats: dict, batch: Batch, accelerator) -> dict:
    """Step metrics averaged over all processes' completions."""
    from .logprobs import sequence_logps

    logps = sequence_logps(stats.pop("logps"), batch.completion_mask)
    log_ratio = logps - batch.ref_logps
    lengths = batch.completion_mask.sum(-1).float()
    sums = torch.stack([batch.rewards.sum(), (batch.rewards**2).sum(), log_ratio.sum(), lengths.sum(),
                        torch.tensor(float(len(batch)), device=batch.rewards.device)]).double()
    sums = accelerator.reduce(sums.to(accelerator.device), "sum")
    n = max(float(sums[4]), 1.0)
    mean = float(sums[0]) / n
    corr = within_group_correlation(log_ratio, batch.rewards, batch.group_ids)
    out = {"reward_mean": mean, "reward_std": math.sqrt(max(float(sums[1]) / n - mean**2, 0.0)),
           "kl": float(sums[2]) / n, "completion_len": float(sums[3]) / n, "implicit_reward_corr": corr}
    out.update({k: v for k, v in stats.items() if isinstance(v, (int, float))})
    sources = {}
    for s in batch.sources:
        sources[s] = sources.get(s, 0) + 1
    if len(sources) > 1 or "policy" not in sources:
        out.update({f"source/{k}": v / len(batch) for k, v in sources.items()})
    return out

