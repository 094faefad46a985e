"""Rollouts with vLLM, colocated with the trainer (same process, same GPU), synced after each update.

Install with ``pip install 'gvpo[vllm]'``. Importing this module never needs vLLM; constructing
:class:`VLLMEngine` without it raises an ImportError that says what to install.

How it maps onto gvpo's :class:`~gvpo.rollout.Engine`:

- Sampling parameters map one to one (:func:`to_vllm_sampling_params`): ``temperature``,
  ``top_p``, ``max_new_tokens -> max_tokens``, ``greedy -> temperature 0``, the row's seed ->
  vLLM's per-request ``seed``, and the policy's EOS ids -> ``stop_token_ids`` (the HF engine stops
  on the same ids). One request per completion (``n=1``), so row i's randomness depends on
  ``seeds[i]`` only, as in the HF engine. The streams differ from the HF engine's Gumbel noise: the
  same seed gives a different (equally distributed) sample on the two engines. vLLM promises
  reproducibility per seed only up to floating-point differences between batch shapes ("best
  effort"), unlike the HF engine's exact invariance.
- Prompts are tokenised by gvpo (the same left-padded ids as the HF engine, chat templates
  included) and handed to vLLM as token ids, so the trainer scores exactly the tokens vLLM saw; a
  prompt given as token ids (an episode's next turn) goes in as it is (token in, token out), and
  ``SamplingParams.stop`` strings map to vLLM's ``stop`` (kept in the output). Written for the
  episodes of :mod:`gvpo.episodes`; not run here (no GPU on the development machine).
- Completions become a :class:`~gvpo.rollout.Generation` with the HF engine's padding and
  ``completion_mask`` (:func:`build_generation`).
- Weights: vLLM holds its own copy. :meth:`VLLMEngine.sync_weights` streams the policy's weights
  into it with the model's ``load_weights`` (:func:`iter_vllm_weights`): wrapper prefixes (DDP
  ``module.``, FSDP, activation checkpointing, ``torch.compile``, peft ``base_model.model.``) are
  stripped, and LoRA adapters are merged into the base weights one layer at a time
  (``W + scale * B @ A``, peft's own ``get_delta_weight``) without touching the training model;
  the LoRA tensors themselves are never sent. The first ``generate`` syncs too, so a resumed run
  never samples from the weights on disk, and so does a ``generate`` inside or after peft's
  ``disable_adapter()`` (sampling from the base model as reference) when the adapters' on/off state
  differs from what vLLM holds.
- dtype: vLLM samples in bfloat16 unless the policy is float16 (:func:`vllm_dtype`), also when the
  trainer keeps float32 master weights; ``dtype=`` in the options overrides it.

Why a numerics mismatch between vLLM and the trainer is harmless here: GVPO may sample from any
pi_s (Corollary 3.2) and the trainer recomputes every log-prob itself (``reference: rollout`` uses
the trainer's log-probs of the pre-update policy, never vLLM's), so a bf16 vLLM sampling a slightly
different distribution changes pi_s only and needs no importance weights.

Where this reaches past vLLM's documented ``LLM`` API: pushing weights into a running engine has no
stable public call. :func:`find_vllm_model` looks the in-process model up where vLLM keeps it
(``llm.llm_engine.model_executor.driver_worker[.worker].model_runner.model``, the path TRL and verl
use); the engine sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` so the model lives in this process. If
the path is missing, the weights go through ``llm.apply_model`` (one pickled copy per sync: slow).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .base import Generation, SamplingParams, completion_mask_from_ids

INSTALL_HINT = "vLLM is not installed: `pip install 'gvpo[vllm]'` (needs a CUDA GPU) or set rollout.engine=hf"

# Name segments that wrappers insert in parameter names; vLLM knows the plain transformers names.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
LEADING_PREFIXES = ("module.", "base_model.model.")


def import_vllm():
    """The ``vllm`` module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as err:  # pragma: no cover - exercised through monkeypatching in tests
        raise ImportError(INSTALL_HINT) from err
    return vllm


# --- sampling parameters -------------------------------------------------------------------------


def vllm_seed(seed: int) -> int:
    """A row seed as vLLM takes it (a non-negative 63-bit int).

    >>> vllm_seed(-1) == 2**63 - 1, vllm_seed(5)
    (True, 5)
    """
    return int(seed) & 0x7FFFFFFFFFFFFFFF


def to_vllm_sampling_params(params: SamplingParams, seed: int | None, *, stop_token_ids: list[int] | None = None,
                            vllm_module: Any | None = None):
    """gvpo's :class:`SamplingParams` for one row as vLLM sampling parameters.

    Returns ``vllm.SamplingParams(**kwargs)`` when vLLM (or ``vllm_module``) is available, else the
    plain ``kwargs`` dict, so the mapping can be checked without vLLM:

    >>> to_vllm_sampling_params(SamplingParams(32, temperature=0.7, top_p=0.9), seed=5, vllm_module=False)
    {'n': 1, 'max_tokens': 32, 'temperature': 0.7, 'top_p': 0.9, 'seed': 5}
    >>> to_vllm_sampling_params(SamplingParams(8, temperature=0.7, greedy=True), seed=5, stop_token_ids=[2],
    ...                         vllm_module=False)
    {'n': 1, 'max_tokens': 8, 'temperature': 0.0, 'top_p': 1.0, 'seed': None, 'stop_token_ids': [2]}
    >>> to_vllm_sampling_params(SamplingParams(8, greedy=True, stop=("</tool_call>",)), 1, vllm_module=False)["stop"]
    ['</tool_call>']
    """
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.greedy:  # vLLM decodes greedily at temperature 0 and ignores top_p and the seed
        kwargs = {"n": 1, "max_tokens": int(params.max_new_tokens), "temperature": 0.0, "top_p": 1.0, "seed": None}
    else:
        if params.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling (use greedy=True), got {params.temperature}")
        kwargs = {"n": 1, "max_tokens": int(params.max_new_tokens), "temperature": float(params.temperature),
                  "top_p": float(params.top_p), "seed": None if seed is None else vllm_seed(seed)}
    if stop_token_ids:
        kwargs["stop_token_ids"] = [int(t) for t in stop_token_ids]
    if params.stop:  # stop strings, kept in the output as the HF engine keeps them (token out = what was sampled)
        kwargs.update(stop=list(params.stop), include_stop_str_in_output=True)
    if vllm_module is None:
        try:
            import vllm as vllm_module
        except ImportError:
            vllm_module = False
    return vllm_module.SamplingParams(**kwargs) if vllm_module else kwargs


# --- outputs -> Generation -----------------------------------------------------------------------


def prompt_token_lists(prompt_ids: Tensor, prompt_mask: Tensor) -> list[list[int]]:
    """The unpadded token ids of each left-padded prompt row.

    >>> prompt_token_lists(torch.tensor([[0, 0, 5, 6], [7, 8, 9, 4]]), torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    [[5, 6], [7, 8, 9, 4]]
    """
    return [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask)]


def completion_token_ids(output: Any, eos_token_ids: list[int]) -> list[int]:
    """Token ids of a vLLM ``RequestOutput`` (its single completion ``outputs[0]``).

    vLLM keeps the stop token it ended on in ``token_ids``; should a version drop it, a completion that
    finished on EOS (``finish_reason == "stop"`` with no stop string) gets it back, so the mask
    includes the EOS exactly as with the HF engine.
    """
    completion = output.outputs[0]
    ids = [int(t) for t in completion.token_ids]
    finished_on_token = (getattr(completion, "finish_reason", None) == "stop"
                         and not isinstance(getattr(completion, "stop_reason", None), str))
    if finished_on_token and eos_token_ids and (not ids or ids[-1] not in eos_token_ids):
        stop = getattr(completion, "stop_reason", None)
        ids.append(int(stop) if isinstance(stop, int) and stop in eos_token_ids else int(eos_token_ids[0]))
    return ids


def build_generation(outputs: list, prompt_ids: Tensor, prompt_mask: Tensor, tokenizer, eos_token_ids: list[int],
                     pad_token_id: int) -> Generation:
    """vLLM request outputs (one per row, in row order) -> :class:`Generation`.

    Completions are right-padded with ``pad_token_id``; ``completion_mask`` is 1 up to and including
    the first EOS (:func:`completion_mask_from_ids`), tokens after it become padding, and the width
    is trimmed to the longest kept completion (at least 1), exactly as in the HF engine.
    """
    if len(outputs) != prompt_ids.shape[0]:
        raise ValueError(f"{len(outputs)} vLLM outputs for {prompt_ids.shape[0]} prompts")
    rows = [completion_token_ids(o, eos_token_ids) for o in outputs]
    width = max([len(r) for r in rows] + [1])
    completion_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        completion_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    in_row = (torch.arange(width)[None, :] < lengths[:, None]).long()
    mask = completion_mask_from_ids(completion_ids, eos_token_ids) * in_row
    completion_ids = completion_ids.masked_fill(mask == 0, pad_token_id)
    keep = max(int(mask.sum(-1).max().item()) if mask.numel() else 0, 1)
    completion_ids, mask = completion_ids[:, :keep], mask[:, :keep]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Generation(prompt_ids.cpu(), prompt_mask.cpu(), completion_ids, mask, texts)


# --- weights -> vLLM -----------------------------------------------------------------------------


def vllm_param_name(name: str, adapter: str | None = None) -> str:
    """A training parameter name as the plain transformers checkpoint name vLLM loads.

    ``adapter`` is the peft adapter whose ``modules_to_save`` copy is live.

    >>> vllm_param_name("module.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    >>> vllm_param_name("_orig_mod.model._fsdp_wrapped_module.embed_tokens.weight")
    'model.embed_tokens.weight'
    >>> vllm_param_name("base_model.model.lm_head.modules_to_save.default.weight", adapter="default")
    'lm_head.weight'
    """
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    changed = True
    while changed:
        changed = False
        for prefix in LEADING_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    name = name.replace(".base_layer.", ".")
    if adapter is not None:
        name = name.replace(f".modules_to_save.{adapter}.", ".")
    return name


def _full(t: Tensor) -> Tensor:
    """A plain tensor: DTensor shards (FSDP2) are gathered (a collective: every rank must call)."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _active_adapters(module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", None)
    if active is None:
        return []
    return [active] if isinstance(active, str) else list(active)


def _lora_owner(model: torch.nn.Module, name: str):
    """The peft LoRA layer that owns ``<owner>.base_layer.<param>``, or None."""
    if ".base_layer." not in name:
        return None
    owner_name = name.rsplit(".base_layer.", 1)[0]
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return None
    return owner if hasattr(owner, "get_delta_weight") and hasattr(owner, "base_layer") else None


@torch.no_grad()
def iter_vllm_weights(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs of ``model``'s weights as vLLM's ``load_weights`` expects them.

    Names are the plain transformers names (:func:`vllm_param_name`). With peft LoRA, each adapted
    base weight is yielded merged, ``W + sum over active adapters of get_delta_weight`` (``scale * B @
    A``, transposed for ``fan_in_fan_out`` layers), computed in float32 and cast back; LoRA
    tensors and the ``original_module`` copies of ``modules_to_save`` are skipped. Nothing in
    ``model`` is modified, and only one merged layer exists at a time.
    """
    model = getattr(model, "module", model)  # DDP / accelerate wrapper
    peft_config = getattr(model, "peft_config", None)
    default_adapter = None
    if isinstance(peft_config, dict) and peft_config:
        default_adapter = getattr(model, "active_adapter", None) or next(iter(peft_config))
        if not isinstance(default_adapter, str):
            default_adapter = list(default_adapter)[0]
    for name, param in model.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue  # LoRA factors are merged below; original_module is shadowed by modules_to_save
        if ".modules_to_save." in name and default_adapter is not None and \
                f".modules_to_save.{default_adapter}." not in name:
            continue  # another adapter's copy
        tensor = _full(param.detach())
        owner = _lora_owner(model, name) if name.endswith(".base_layer.weight") else None
        if owner is not None and not getattr(owner, "merged", False) and not getattr(owner, "disable_adapters", False):
            adapters = [a for a in _active_adapters(owner) if a in getattr(owner, "lora_A", {})
                        or a in getattr(owner, "lora_embedding_A", {})]
            for a in adapters:
                if getattr(owner, "use_dora", {}).get(a, False):
                    raise NotImplementedError("vLLM weight sync does not merge DoRA adapters; use plain LoRA")
            if adapters:
                merged = tensor.float()
                for a in adapters:
                    merged = merged + _full(owner.get_delta_weight(a)).float()
                tensor = merged.to(tensor.dtype)
        yield vllm_param_name(name, default_adapter), tensor


def state_dict_for_vllm(model: torch.nn.Module) -> dict[str, Tensor]:
    """All of :func:`iter_vllm_weights` as a dict (tests and small models; sync streams instead)."""
    return dict(iter_vllm_weights(model))


@contextlib.contextmanager
def gathered_parameters(model: torch.nn.Module):
    """Full parameters for the duration: FSDP1 ``summon_full_params`` or DeepSpeed ZeRO-3 gather.

    UNVERIFIED on GPUs (no GPU where this was written): FSDP2 needs nothing here (its DTensors are
    gathered one by one in :func:`iter_vllm_weights`).
    """
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed ZeRO-3 partitioned parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            yield
        return
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        FSDP = None
    if FSDP is not None and any(isinstance(m, FSDP) for m in model.modules()):
        with FSDP.summon_full_params(model, writeback=False, recurse=True):
            yield
        return
    yield


def adapters_disabled(model: torch.nn.Module) -> bool:
    """Whether ``model``'s LoRA adapters are switched off (peft ``disable_adapter()``), which changes
    the weights vLLM must hold (the base model) without any parameter changing."""
    model = getattr(model, "module", model)
    return any(getattr(m, "disable_adapters", False) for m in model.modules()
               if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer"))


def find_vllm_model(llm) -> torch.nn.Module | None:
    """The model inside an in-process vLLM engine, or None if this vLLM keeps it elsewhere."""
    executor = getattr(getattr(llm, "llm_engine", None), "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    for holder in (getattr(worker, "worker", None), worker):
        model = getattr(getattr(holder, "model_runner", None), "model", None)
        if model is not None and hasattr(model, "load_weights"):
            return model
    return None


def push_weights(llm, weights) -> None:
    """Load ``(name, tensor)`` pairs into a vLLM ``LLM``: in-process model if reachable, else ``apply_model``."""
    target = find_vllm_model(llm)
    if target is not None:
        target.load_weights(weights)
    elif hasattr(llm, "apply_model"):
        items = [(n, t.detach()) for n, t in weights]
        llm.apply_model(lambda m: m.load_weights(items) and None)
    else:
        raise RuntimeError("cannot reach the model inside this vLLM version to load new weights; "
                           "set VLLM_ENABLE_V1_MULTIPROCESSING=0 or upgrade vLLM")
    if hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights


# --- the engine ----------------------------------------------------------------------------------


def vllm_dtype(model: torch.nn.Module) -> str:
    """vLLM's dtype for ``model``: float16 for a float16 policy, else bfloat16.

    A float32 policy (float32 master weights, e.g. for lr 1e-6, which bf16 weights cannot resolve)
    still samples in bfloat16: that changes pi_s only, which GVPO allows (Corollary 3.2). Pass
    ``dtype="float32"`` in the engine options to sample in float32.
    """
    return "float16" if next(model.parameters()).dtype == torch.float16 else "bfloat16"


def _model_path(model: torch.nn.Module) -> str:
    model = getattr(model, "module", model)
    config = getattr(model, "config", None)
    path = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not path:
        raise ValueError("VLLMEngine needs the model's folder or hub id (model.config._name_or_path is empty)")
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMEngine:
    """A vLLM ``LLM`` colocated with the trainer; see the module docstring.

    ``model`` is the policy (plain transformers or peft model); vLLM loads the same checkpoint from
    ``model.config._name_or_path`` and gets the live weights at the first ``generate`` and at every
    :meth:`sync_weights`. ``options`` go to ``vllm.LLM`` (e.g. ``max_model_len``, ``enforce_eager``);
    ``enable_sleep_mode=True`` frees vLLM's weights and KV cache between rollouts (level 1 sleep).
    Under ``accelerate launch`` each process runs its own engine (``distributed_executor_backend=
    "external_launcher"``, tensor parallel size 1), as TRL's colocate mode does.
    """

    def __init__(self, model, tokenizer, *, gpu_memory_utilization: float = 0.3, enable_sleep_mode: bool = False,
                 llm=None, **options):
        self.model = model
        self.tokenizer = tokenizer
        self.sleep = enable_sleep_mode
        self._asleep = False
        self._synced = False
        self._pushed_adapters_off = False
        if llm is not None:  # an existing engine (tests, or a user-built LLM)
            self.vllm = None
            self.llm = llm
            return
        self.vllm = import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the model in this process
        world = int(os.environ.get("WORLD_SIZE", "1"))
        kwargs = {"model": _model_path(model), "tokenizer": _model_path(model), "dtype": vllm_dtype(model),
                  "gpu_memory_utilization": gpu_memory_utilization, "seed": 0}
        if world > 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            kwargs["distributed_executor_backend"] = "external_launcher"
            kwargs["tensor_parallel_size"] = 1
        if enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        kwargs.update(options)
        self.llm = self.vllm.LLM(**kwargs)

    # weights ------------------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def sync_weights(self, model) -> None:
        """Copy ``model``'s current weights (LoRA merged) into vLLM."""
        self.model = model
        self._wake()
        inner = getattr(model, "module", model)
        with gathered_parameters(inner):
            push_weights(self.llm, iter_vllm_weights(inner))
        self._synced = True
        self._pushed_adapters_off = adapters_disabled(inner)

    # generation ---------------------------------------------------------------------------------
    def eos_token_ids(self) -> list[int]:
        from .hf import eos_ids

        return eos_ids(self.tokenizer, getattr(self.model, "module", self.model))

    @torch.no_grad()
    def generate(self, prompts: list, seeds: list[int], params: SamplingParams) -> Generation:
        from .hf import encode_prompts

        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if not self._synced or self._pushed_adapters_off != adapters_disabled(self.model):
            # first rollout (weights may differ from the checkpoint on disk: resume), or LoRA adapters
            # switched off/on since the last push (sampling from the base model as reference)
            self.sync_weights(self.model)
        self._wake()
        enc = encode_prompts(self.tokenizer, prompts)
        prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
        eos = self.eos_token_ids()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        requests = [{"prompt_token_ids": ids} for ids in prompt_token_lists(prompt_ids, prompt_mask)]
        sampling = [to_vllm_sampling_params(params, s, stop_token_ids=eos, vllm_module=self.vllm)
                    for s in seeds]
        outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=1)
            self._asleep = True
        return build_generation(outputs, prompt_ids, prompt_mask, self.tokenizer, eos, pad)
