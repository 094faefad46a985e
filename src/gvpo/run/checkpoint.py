"""Atomic checkpoints that every process writes its own part of, and exact resume from them.

``checkpoints/step-N`` is one folder per step, first written as ``checkpoints/.tmp-step-N`` and renamed by
the main process once every process has finished its files, so a crash mid-write leaves the previous
checkpoint intact. The main process seals it with ``manifest.json`` (every file's size and SHA-256,
:mod:`gvpo.run.checkpoint_manifest`, written last) before the rename; a resume uses the newest checkpoint that
matches its manifest, and older checkpoints are deleted only once the new one checks out. Its files:

- ``shards/``: the trainable weights (``model.*``) and the AdamW state (``optim.*``) through
  ``torch.distributed.checkpoint`` with its safetensors writer: process R writes
  ``shard-<R+1>-model-00001-of-00001.safetensors`` with only what it holds (its FSDP2 shards; under DDP or
  one process the replicated tensors are written once). Each file's header records the tensors' global
  offsets, so a run with another number of processes reshards them when it loads.
- ``rng-R.pt`` and ``sampler-R.json``: process R's RNG states and sampler state (the replay buffer holds
  that process's groups).
- ``state.pt``: scheduler and the optimizer's hyper-parameters (``param_groups``); ``reference.safetensors``
  when the reference moves (``objective.ref_sync_steps``); ``trainer_state.json``, last. Main process only.
- DeepSpeed (UNVERIFIED, no GPU here): ``deepspeed/`` holds the engine's own per-process checkpoint instead
  of ``shards/`` (its ``save_checkpoint``, what accelerate's ``save_state`` calls).

Why not accelerate's ``save_state``: on CPU processes accelerate never runs as FSDP (its distributed type is
MULTI_CPU, see :mod:`gvpo.model.sharding`), so its ``save_state`` would write the main process's shards only.
``torch.distributed.checkpoint`` handles one process, DDP, torch's ``fully_shard`` and accelerate's FSDP2
alike. Tensors go through safetensors; ``.pt`` files are read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from accelerate import DistributedType
from accelerate.utils import extract_model_from_parallel
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..model.loading import save_pretrained
from . import checkpoint_manifest as manifest
from .folder import share_like_umask
from .write_errors import RunWriteError, reason, writing

SHARDS = "shards"
DEEPSPEED = "deepspeed"
FILE_BYTES = 64 * 2**20
"""Tensor bytes per checkpoint file (a larger tensor gets a file of its own). ``torch.distributed.checkpoint``'s
safetensors writer serializes a whole file in memory before writing it (about twice its size, briefly), so the
files are kept small: in one file, the 33.6M-parameter model's weights and AdamW state (403 MB) raised the run's
peak RSS by 635 MiB at the final checkpoint (bench/README.md, "Peak memory")."""


class CheckpointWriteError(RunWriteError):
    """A checkpoint could not be written (disk full, read-only, ...); the previous one is untouched."""


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def _tensor_state(policy, optimizer) -> tuple[dict, list]:
    """``{"model": trainable weights, "optim": AdamW state}`` keyed by parameter names, as this process holds
    them (DTensor shards under FSDP2), and the optimizer's ``param_groups`` (hyper-parameters, parameter
    names). Tied weights appear once (``named_parameters`` drops duplicates)."""
    model = extract_model_from_parallel(policy)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in get_model_state_dict(model).items() if k in names}
    optim = get_optimizer_state_dict(model, _torch_optimizer(optimizer))
    return {"model": weights, "optim": optim["state"]}, optim["param_groups"]


def _flat(tree: dict, prefix: str = "") -> dict:
    """The tensors of a nested dict under dotted keys (``optim.<parameter>.exp_avg``), the keys
    ``torch.distributed.checkpoint`` gives them itself; the same tensor objects, so a load fills ``tree``.

    >>> _flat({"model": {"w": 1}, "optim": {"w": {"step": 2, "exp_avg": 3}}})
    {'model.w': 1, 'optim.w.step': 2, 'optim.w.exp_avg': 3}
    """
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _file_numbers(flat: dict, limit: int | None = None) -> dict[str, int]:
    """Each entry's checkpoint file, 1, 2, ...: consecutive tensors share a file up to ``limit`` bytes
    (default :data:`FILE_BYTES`). Sizes are global (a DTensor's ``numel`` is the whole tensor's), so every
    process numbers the files alike.

    >>> import torch
    >>> _file_numbers({"a": torch.zeros(4), "b": torch.zeros(4), "c": torch.zeros(8), "d": torch.zeros(1)}, limit=32)
    {'a': 1, 'b': 1, 'c': 2, 'd': 3}
    """
    limit = FILE_BYTES if limit is None else limit
    numbers, number, used = {}, 1, 0
    for key, value in flat.items():
        size = value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
        if used and used + size > limit:
            number, used = number + 1, 0
        numbers[key], used = number, used + size
    return numbers


SINGLE_PROCESS_WARNING = ".*torch.distributed is disabled, unavailable or uninitialized.*"
"""What torch.distributed.checkpoint warns on every call without a process group (one process: intended)."""


def save_checkpoint(ckpt_dir: Path, step: int, *, accelerator, policy, optimizer, scheduler, trainer_state: dict,
                    reference_model=None, sampler_state: dict | None = None, keep: int = 2) -> Path:
    """Write ``ckpt_dir/step-<step>`` atomically, sealed by a manifest, and keep the newest ``keep`` intact ones
    (0 = all); returns its path.

    A collective: every process calls it, writes its own files, and returns once the folder is renamed.
    ``reference_model``: a moving reference (``ref_sync_steps``), saved by the main process. A write that
    fails on any process raises ``CheckpointWriteError`` on every process (naming the folder and what failed
    where it failed) and leaves every earlier checkpoint as it was."""
    rank, main = accelerator.process_index, accelerator.is_main_process
    final, tmp = ckpt_dir / f"step-{step:06d}", ckpt_dir / f".tmp-step-{step:06d}"
    error = _attempt(lambda: _fresh_folder(tmp)) if main else None
    _raise_if_any(accelerator, error, ckpt_dir, tmp)
    if not tmp.is_dir():  # several nodes: every process must see the folder the main process made
        raise RuntimeError(f"process {rank} cannot see {tmp}, which the main process created: with several nodes "
                           "output.dir must be on storage every node shares (NFS, Lustre, ...)")
    param_groups = []

    def write_own_part():
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            policy.save_checkpoint(str(tmp / DEEPSPEED), tag="engine")  # every rank its partitions
        else:
            tensors, groups = _tensor_state(policy, optimizer)
            param_groups.append(groups)
            flat = _flat(tensors)
            writer = dcp.HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True,
                                                  fqn_to_index_mapping=_file_numbers(flat))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
                dcp.save(flat, storage_writer=writer)
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        (tmp / f"sampler-{rank}.json").write_text(json.dumps(sampler_state or {}))
        _fsync_files(tmp, [f"rng-{rank}.pt", f"sampler-{rank}.json"])

    _raise_if_any(accelerator, _attempt(write_own_part), ckpt_dir, tmp)

    def seal():
        torch.save({"scheduler": scheduler.state_dict(), "param_groups": param_groups[0] if param_groups else None},
                   tmp / "state.pt")
        if reference_model is not None:  # save_model stores tied weights once (save_file refuses shared tensors)
            save_model(reference_model, str(tmp / "reference.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
        _fsync_files(tmp, ["state.pt", "reference.safetensors", "trainer_state.json"])
        manifest.write_manifest(tmp)
        share_like_umask(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)

    _raise_if_any(accelerator, _attempt(seal) if main else None, ckpt_dir, tmp)
    if main and manifest.problem(final, hashes=False) is None:  # only a verified new checkpoint retires older ones
        rotate(ckpt_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _fresh_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _attempt(write) -> Exception | None:
    try:
        write()
    except dcp.api.CheckpointException as err:  # a BaseException: the first failing process's own error inside
        return next(iter(err.failures.values()))[0] if err.failures else RuntimeError(str(err))
    except Exception as err:  # reported on every process by _raise_if_any
        return err
    return None


def _raise_if_any(accelerator, error: Exception | None, ckpt_dir: Path, tmp: Path) -> None:
    """Stop every process when any one failed to write (the others would wait at the next barrier forever);
    the temporary folder goes, earlier checkpoints stay."""
    failed = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device), "sum")
    if float(failed[0]) == 0:
        return
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    last, _ = manifest.newest_intact(ckpt_dir, hashes=False)
    kept = f"the last intact checkpoint {last} is kept" if last else "no earlier checkpoint exists"
    what = reason(error) if error is not None else "another process failed to write its part"
    raise CheckpointWriteError(f"could not write checkpoint {tmp}: {what}; {kept}; resume with: gvpo train "
                               f"--resume {ckpt_dir.parent}") from error


def save_final(model, tokenizer, run_dir: Path, state_dict: dict | None = None) -> Path:
    """``run_dir/final``: the weights as a plain transformers folder (:func:`gvpo.model.loading.save_pretrained`),
    written as ``.tmp-final`` and renamed, so it is whole or absent. A failed write removes the temporary
    folder and raises :class:`gvpo.run.write_errors.RunWriteError` naming the last intact checkpoint."""
    final, tmp = run_dir / "final", run_dir / ".tmp-final"
    with writing(f"the final weights {final}", run_dir, partial=tmp):
        _fresh_folder(tmp)
        save_pretrained(model, tokenizer, tmp, state_dict=state_dict)
        share_like_umask(tmp)  # safetensors writes 0600
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final


def rotate(ckpt_dir: Path, keep: int) -> None:
    """Delete the checkpoints older than the ``keep``-th newest intact one (by sizes against the manifest)."""
    if keep <= 0:
        return
    found = manifest.checkpoints(ckpt_dir)
    intact = [p for p in found if manifest.problem(p, hashes=False) is None]
    if len(intact) > keep:
        cutoff = intact[-keep]
        for old in found:
            if old < cutoff:
                shutil.rmtree(old, ignore_errors=True)


def _fsync_files(folder: Path, names: list[str]) -> None:
    for name in names:
        if (folder / name).is_file():
            with open(folder / name, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that matches its manifest (see :func:`gvpo.run.checkpoint_manifest.newest_intact`)."""
    return manifest.newest_intact(ckpt_dir)[0]


def load_checkpoint(path: Path, *, accelerator, policy, optimizer, scheduler, reference_model=None) -> tuple[dict, dict]:
    """Restore what :func:`save_checkpoint` wrote, on every process (a collective); returns (trainer_state,
    this process's sampler_state). Weights and optimizer state reshard to the current number of processes;
    a sampler state that is not empty (the replay buffer) needs the same number."""
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    saved, world, rank = trainer_state.get("processes", 1), accelerator.num_processes, accelerator.process_index
    if (path / "model.safetensors").exists() and not (path / SHARDS).exists():
        raise ValueError(f"{path} is a checkpoint of an older gvpo (one model.safetensors, no {SHARDS}/ folder); "
                         "resume it with the gvpo version that wrote it")
    samplers = [json.loads((path / f"sampler-{r}.json").read_text()) for r in range(saved)]
    if saved != world and any(samplers):
        raise ValueError(f"{path} was written by {saved} processes and this run has {world}: its sampler state "
                         "(the replay buffer) is kept per process and cannot be split or merged; resume with "
                         f"{saved} processes")
    state = torch.load(path / "state.pt", weights_only=True)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        policy.load_checkpoint(str(path / DEEPSPEED), tag="engine")
    else:
        tensors, _ = _tensor_state(policy, optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
            dcp.load(_flat(tensors), storage_reader=dcp.HuggingFaceStorageReader(str(path / SHARDS)))
        model = extract_model_from_parallel(policy)
        set_model_state_dict(model, tensors["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(model, _torch_optimizer(optimizer),
                                 {"state": tensors["optim"], "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    if reference_model is not None and (path / "reference.safetensors").exists():
        load_model(reference_model, str(path / "reference.safetensors"))
    if (path / f"rng-{rank}.pt").exists():  # a run that grew has no saved state for its new ranks: they keep the seed's
        set_rng_state(torch.load(path / f"rng-{rank}.pt", weights_only=True))
    return trainer_state, samplers[rank] if rank < saved else {}
