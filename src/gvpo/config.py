"""Typed configuration: dataclasses grouped by concern, one docstring per field.

Loaded from YAML (``yaml.safe_load``) and ``key=value`` overrides with dotted keys
(``objective.beta=0.05``). Unknown keys and bad values raise ``ConfigError`` naming the key and the
valid choices. ``gvpo train --help`` prints every field with its doc and default, read from the
docstrings below (``field_docs``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config_checks import ConfigError, validate
from .yaml_input import tensorboard_key, yaml_load

@dataclass
class ModelConfig:
    name_or_path: str = "default"
    """Policy to train: a local folder or hub id of a transformers causal LM, or a ``.gguf`` file; ``default`` = the embedded arithmetic model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"
    """Parameter dtype; ``auto`` = float32 on CPU (no bf16 units here), bfloat16 on CUDA; float64 for exactness checks."""
    trust_remote_code: bool = False
    """Allow code from the model folder to run; off unless you trust the source."""
    disable_dropout: bool = True
    """Set every dropout rate of the policy and reference to 0 (as TRL does); false = keep the model's dropout in the gradient forward only, while all log-probs (statistics, pi_old, reference) are computed without it."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory for more time (measured in bench/README.md, section "Gradient checkpointing")."""
    lora: bool = False
    """Train LoRA adapters (peft) instead of all weights; the fixed reference is then the base model with adapters disabled, no second copy."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch; needs ``model.disable_dropout=false``."""
    lora_target_modules: str = "all-linear"
    """Modules that get adapters: ``all-linear`` or a comma-separated list of module names."""
    router_aux_loss_coef: float | None = None
    """Mixture-of-Experts models: weight of the router's load-balancing loss, added to every micro-batch's loss as TRL adds it (``coef * aux_loss / micro-batches``); None = the model config's ``router_aux_loss_coef`` when the model returns router logits (its config has ``output_router_logits``), else 0; 0 = off. While it is on, the update's forwards run as one plain pass per micro-batch: no prefix sharing, no length buckets (docs/trl.md)."""
    gguf_file: str = ""
    """A GGUF file inside the folder ``name_or_path`` (``name_or_path`` may also be a ``.gguf`` file itself): dequantised once into a cached plain folder (needs ``pip install 'gvpo[gguf]'``; README "A real chat model")."""


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    """Task: a built-in name (arithmetic, gsm8k, math500, aime24, dataset = your own data, see task.options) or a dotted path to a task factory."""
    options: dict = field(default_factory=dict)
    """Keyword options for the task factory, e.g. ``{path: data/train.jsonl, template: chat}``."""
    rewards: list = field(default_factory=list)
    """Reward names or dotted paths to use instead of the task's own; empty = the task's."""
    reward_weights: list = field(default_factory=list)
    """One weight per reward in ``rewards``; empty = all 1."""
    reward_timeout_s: float = 300.0
    """Stop the run with a clear error if a reward call takes longer than this (user code that hangs); 0 = no limit."""
    eval_tasks: list = field(default_factory=list)
    """Extra task names evaluated during training, logged as ``eval/<task>/accuracy``."""
    environment: str = ""
    """Multi-turn episodes: dotted path to an environment class in TRL's conventions (``reset(**row)``, public methods as tools, optional ``get_reward()``), one instance per completion; empty = none (see README, "Multi-turn episodes and tools")."""
    tools: list = field(default_factory=list)
    """Multi-turn episodes: dotted paths to tool functions (type hints and a docstring, as TRL's ``tools=``)."""
    env_timeout_s: float = 30.0
    """Time limit of one call into an environment or tool; a call that raises or hangs is counted per step (``episodes/...`` metrics) and the model gets an error message; 0 = no limit."""


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    """Generation engine: transformers ``generate`` or vLLM (GPU, optional extra)."""
    k: int = 8
    """Completions sampled per prompt (the group size)."""
    temperature: float = 1.0
    """Sampling temperature (changes pi_s only; log-probs are always at temperature 1)."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1 = off."""
    max_new_tokens: int = 0
    """Completion length limit in tokens; 0 = the task's default. Episodes: the whole episode after the prompt, model and environment tokens together (TRL's ``max_completion_length``)."""
    max_turns: int = 0
    """Episodes: most model turns per episode (the last one's tool calls are not run); 0 = until the model calls no tool or the budget is spent."""
    max_observation_tokens: int = 0
    """Episodes: cut a tool's result to this many tokens, marked ``[truncated]`` in it; 0 = no limit."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of GPU memory vLLM may take when colocated with the trainer."""
    mask_truncated: bool = False
    """Drop every generated completion that hits ``max_new_tokens`` without EOS from its group before scoring (TRL's ``mask_truncated_completions``); the group keeps the rest (Corollary 3.4's ``1/(k-1)`` with the remaining k) and the drops are logged as ``truncated``."""


@dataclass
class SamplerConfig:
    source: str = "policy"
    """Sampling distribution pi_s of each group (Corollary 3.2): policy (on-policy), reference (the fixed reference), replay (a replay buffer), offline (a rated dataset), mixture (offline + policy), or a dotted path to a sampler factory (see ``gvpo.samplers.base``)."""
    replay_capacity: int = 256
    """Replay: groups kept in the buffer."""
    replay_max_age: int = 8
    """Replay: oldest usable group, in steps since it was generated."""
    replay_historical: int = 4
    """Replay: completions per group taken from the buffer (the rest are fresh), e.g. 4 of k=8 is the paper's 4:4."""
    replay_revisit: float = 0.5
    """Replay: share of each step's prompts drawn again from the buffer, in [0, 1) (prompts need history to be replayed; the rest are new)."""
    offline_path: str = ""
    """Offline/mixture: path of a grouped or flat rated-completions file (jsonl, json, parquet)."""
    offline_preset: str = ""
    """Offline: column preset for known files (e.g. qwen25_math_rm8, gsm8k_model_solutions); empty = plain columns."""
    offline_format: Literal["auto", "grouped", "flat"] = "auto"
    """Offline: row layout; auto = grouped when a ``completions`` column exists."""
    on_too_long: Literal["skip", "error"] = "skip"
    """Offline: what to do with completions longer than ``rollout.max_new_tokens``."""
    mixture_offline: int = 4
    """Mixture: completions per group taken from the offline dataset; the rest are sampled from the policy."""


@dataclass
class ObjectiveConfig:
    name: str = "gvpo"
    """Objective: gvpo; grpo (PPO-clipped, as TRL/DeepSeekMath run it); gspo (grpo with importance_sampling_level=sequence); the paper's Eq. 9 family members dr_grpo (centred rewards, sequence-level: not the Dr. GRPO recipe), rs, sft, dpo; or a dotted path to an objective factory (see ``gvpo.objectives.base``)."""
    beta: float = 0.1
    """KL strength beta of Eq. 5; implicit reward = beta * log(pi_theta / pi_ref)."""
    reference: Literal["fixed", "rollout"] = "fixed"
    """pi_ref: ``fixed`` = the initial policy (the paper's theory); ``rollout`` = the policy that generated the group (the authors' released recipe)."""
    ref_sync_steps: int = 0
    """With a fixed reference: copy the policy into it every N steps; 0 = never."""
    clip_epsilon: float = 0.2
    """GRPO: PPO ratio clipping epsilon (TRL's ``epsilon``): the ratio is clipped to [1 - clip_epsilon, 1 + epsilon_high]."""
    epsilon_high: float | None = None
    """GRPO: upper clipping epsilon (DAPO's clip-higher, which recommends 0.28); None = clip_epsilon, as in TRL."""
    kl_coef: float = 0.04
    """GRPO: coefficient of the k3 KL penalty to the reference (TRL's ``beta``; 0 = no reference model needed)."""
    use_bias_correction_kl: bool = True
    """GRPO: multiply the k3 penalty by the importance ratio to pi_old, so its gradient is the unbiased reverse-KL gradient (TRL's default); false = plain k3."""
    loss_aggregation: Literal["grpo", "dapo", "bnpo", "dr_grpo"] = "grpo"
    """GRPO: per-token loss aggregation, TRL's ``loss_type``: grpo = mean per sequence then over sequences (DeepSeekMath); dapo = mean over the step's tokens (TRL's default); bnpo = token mean per process, averaged over processes (TRL's bnpo divides each micro-batch by its own tokens: the same only with one micro-batch per process and optimizer step); dr_grpo = token sum / (N * max_new_tokens), the generation budget."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """GRPO: advantages (R - group mean) divided by the group's reward std (group), the whole step's (batch), or not at all (none, Dr.GRPO); unbiased std + 1e-4, as in TRL."""
    importance_sampling: bool = True
    """GRPO under ``train.async_lag``: the ratio's denominator is the sampler's log-probs (importance sampling, clipped, as TRL's async GRPO); false = the policy at the batch's first update (stale samples treated as on-policy). No effect without a lag."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """GRPO: importance ratio to pi_old per token, or one per completion: exp of its mean token log-ratio (sequence = GSPO, TRL's option of this name). GSPO's paper pairs it with loss_aggregation=grpo and clip_epsilon=3e-4, epsilon_high=4e-4."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up, in optimizer steps."""
    scheduler: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up."""


@dataclass
class TrainConfig:
    max_steps: int = 40
    """Rollout steps (each: one batch of prompts x k completions, then ``updates_per_batch x mini_batches`` optimizer steps)."""
    prompts_per_step: int = 16
    """B: prompts per step, across all processes."""
    updates_per_batch: int = 1
    """Epochs over each generated batch (like verl's ppo_epochs): each epoch takes ``mini_batches`` optimizer steps; no importance weights needed (Corollary 3.2)."""
    mini_batches: int = 1
    """Optimizer steps per epoch over a generated batch, each on an equal share of whole groups, in order (the authors take 4, verl's ppo_mini_batch_size = prompts / 4). pi_old and the ``rollout`` reference stay the policy that generated the batch; the GVPO weights use the current parameters at each step. ``train.prompts_per_step`` must divide by mini_batches x processes."""
    micro_batch_size: int = 0
    """Completions per forward/backward; 0 = the whole batch. The update is the same for any value."""
    share_prompts: bool = True
    """Run each group's prompt once per forward and reuse its KV cache for the k completions (prefix sharing); off = every row runs prompt + completion. Same result up to float rounding."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    eval_every: int = 10
    """Greedy held-out evaluation every N steps (and at the start and end); 0 = only start and end."""
    eval_n: int = 200
    """Held-out prompts per evaluation; 0 = all."""
    checkpoint_every: int = 20
    """Atomic checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    fsdp: bool = False
    """Shard the policy over the processes with torch's FSDP2 (``fully_shard`` per decoder layer, then the root) when accelerate has not: CPU processes under ``torchrun``, or plain multi-GPU. Under accelerate's own FSDP config it is already sharded; DeepSpeed refuses it. Needs full weights (no ``model.lora``), and the ``policy`` sampler or another that generates on every process at every step (docs/gpu.md)."""
    async_lag: int = 0
    """Asynchronous rollouts: step s trains on groups sampled with the weights from before step s-L's update, generated while earlier steps train, with no importance weights (GVPO, Corollary 3.2); 0 = synchronous. README "Asynchronous rollouts"."""
    async_backend: Literal["process", "inprocess"] = "process"
    """With ``async_lag``: generate in a separate process (overlaps training) or in this one from weight snapshots (no overlap; the exact reference)."""
    async_threads: int = 0
    """Torch threads of the generator process; 0 = half of this process's threads, the trainer keeping the rest."""


@dataclass
class OutputConfig:
    dir: str = "runs"
    """Parent folder of run folders."""
    name: str = ""
    """Run folder name under ``dir``; empty = ``<task>-<objective>-<date>-<time>``."""
    report_to: list = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers, through accelerate: any of tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, trackio (each needs its package; set its offline mode, e.g. ``WANDB_MODE=offline``, without a network); ``[]`` or ``none`` = only ``metrics.jsonl``. Replaces ``output.tensorboard``, still accepted (true/false) with a warning until the next release."""
    plots: bool = True
    """Write ``plots.png`` (reward, accuracy, KL, implicit/actual reward correlation)."""
    progress: bool = True
    """Show a progress bar with live reward."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ----------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings (string literal right after a field) of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; ConfigError names ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not valid; choose one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-2 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys here: {', '.join(valid)}")


def _set(config: RunConfig, key: str, value: Any) -> None:
    parts = key.split(".")
    sections = [f.name for f in dataclasses.fields(RunConfig)]
    if parts[0] not in sections:
        raise _unknown(key, sections)
    section = getattr(config, parts[0])
    if len(parts) == 1:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {parts[0]} fields, got {value!r}")
        for sub, v in value.items():
            _set(config, f"{key}.{sub}", v)
        return
    names = [f.name for f in dataclasses.fields(section)]
    if key == "output.tensorboard":  # renamed to output.report_to: accepted, with a warning, for one release
        return tensorboard_key(section, _coerce(key, value, bool))
    if parts[1] == "options" and parts[0] == "task" and len(parts) > 2:  # task.options.path=...
        section.options[".".join(parts[2:])] = value
        return
    if len(parts) != 2 or parts[1] not in names:
        raise _unknown(key, [f"{parts[0]}.{n}" for n in names])
    tp = typing.get_type_hints(type(section))[parts[1]]
    setattr(section, parts[1], _coerce(key, value, tp))


def parse_override(text: str) -> tuple[str, Any]:
    """``"objective.beta=0.05"`` -> ``("objective.beta", 0.05)``; values parsed as YAML scalars.

    >>> parse_override("objective.beta=0.05"), parse_override("task.rewards=[a, b]")
    (('objective.beta', 0.05), ('task.rewards', ['a', 'b']))
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. objective.beta=0.05")
    key, raw = text.split("=", 1)
    return key.strip(), yaml_load(raw, f"override {text!r}", ConfigError) if raw.strip() else ""


def _field_type(key: str) -> Any:
    """The annotated type of a dotted ``section.field`` key, or None (unknown keys are reported by ``_set``)."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in {f.name for f in dataclasses.fields(RunConfig)}:
        return None
    return typing.get_type_hints(type(getattr(RunConfig(), parts[0]))).get(parts[1])


def override_item(text: str) -> tuple[str, Any]:
    """``key=value`` for a config key: the value is YAML (numbers, lists, booleans), except for string fields
    (paths, names), which take the text as written (``output.name=007`` is ``"007"``, ``output.dir=exp #1``
    keeps its ``#``); quote it (``'...'``) to have YAML read it.

    >>> override_item("output.name=007"), override_item("train.max_steps=007")
    (('output.name', '007'), ('train.max_steps', 7))
    """
    key, equals, raw = (part.strip() for part in text.partition("="))
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    if equals and _field_type(key) is str and not quoted:
        return key, raw  # never parsed: "output.name={x" is a name, not broken YAML
    return parse_override(text)


def load_config(path: str | Path | None = None, overrides: list | dict | None = None) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``: ``key=value`` strings (see
    :func:`override_item`), ``(key, value)`` pairs, or a dict."""
    config = RunConfig()
    if path:
        data = yaml_load(Path(path).read_text(encoding="utf-8"), str(path), ConfigError) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, task, ...), got {type(data).__name__}")
        for key, value in data.items():
            _set(config, key, value)
    items = overrides.items() if isinstance(overrides, dict) else [
        o if isinstance(o, tuple) else override_item(o) for o in overrides or []]
    for key, value in items:
        _set(config, key, value)
    return validate(config)


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def flat_dict(config: RunConfig) -> dict:
    """``{"section.key": value}`` for every key, as written in overrides."""
    return {f"{section}.{key}": value for section, fields in to_dict(config).items() for key, value in fields.items()}


def save_config(config: RunConfig, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)


def describe() -> str:
    """Every config key with its type, default and doc, for ``--help``."""
    lines = []
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        obj = getattr(defaults, section.name)
        docs = field_docs(type(obj))
        hints = typing.get_type_hints(type(obj))
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(obj):
            tp = hints[f.name]
            tname = ("|".join(map(str, typing.get_args(tp))) if typing.get_origin(tp) is Literal
                     else getattr(tp, "__name__", str(tp)))
            lines.append(f"  {section.name}.{f.name} ({tname}, default {getattr(obj, f.name)!r})")
            lines.append(textwrap.fill(docs.get(f.name, ""), width=96, initial_indent="      ",
                                       subsequent_indent="      "))
    return "\n".join(lines)
