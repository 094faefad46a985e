"""Atomic checkpoints and exact resume: model, optimizer, scheduler, RNG states, data position, replay.

A checkpoint is written to ``checkpoints/.tmp-step-N``, sealed with a manifest of its files' sizes and hashes
(:mod:`gvpo.checkpoint_manifest`, written last) and renamed to ``checkpoints/step-N``, so a crash mid-write
leaves the previous checkpoint intact. Older checkpoints are deleted only once the new one checks out, and a
resume uses the newest checkpoint that matches its manifest. Tensors go through safetensors; everything else
through ``torch.save`` and is read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from safetensors.torch import load_file, save_file

from . import checkpoint_manifest as manifest
from .run_folder import share_like_umask


class CheckpointWriteError(RuntimeError):
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


def trainable_state(model: torch.nn.Module) -> dict:
    """Parameters that train (all weights, or only LoRA adapters), contiguous for safetensors."""
    model = extract_model_from_parallel(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items() if n in names}


def save_checkpoint(ckpt_dir: Path, step: int, *, model, optimizer, scheduler, trainer_state: dict,
                    reference_state: dict | None = None, sampler_state: dict | None = None, keep: int = 2) -> Path:
    """Write ``ckpt_dir/step-<step>`` atomically, sealed by a manifest; keep the newest ``keep`` intact ones
    (0 = all); return its path. A write that fails raises ``CheckpointWriteError`` naming the folder and what
    failed, and leaves every earlier checkpoint as it was."""
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-step-{step:06d}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(trainable_state(model), str(tmp / "model.safetensors"))
        if reference_state:
            save_file({k: v.contiguous().cpu() for k, v in reference_state.items()}, str(tmp / "reference.safetensors"))
        (tmp / "sampler.json").write_text(json.dumps(sampler_state or {}))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
        _fsync_files(tmp)
        manifest.write_manifest(tmp)
        share_like_umask(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_files(ckpt_dir)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        last, _ = manifest.newest_intact(ckpt_dir, hashes=False)
        kept = f"the last intact checkpoint {last} is kept" if last else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write checkpoint {tmp}: {_reason(err)}; {kept}") from err
    if manifest.problem(final, hashes=False) is None:  # only a verified new checkpoint retires older ones
        rotate(ckpt_dir, keep)
    return final


def _reason(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}" + (f" ({err.filename})" if err.filename else "")
    return str(err).splitlines()[0] if str(err) else type(err).__name__


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


def _fsync_files(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that matches its manifest (see :func:`gvpo.checkpoint_manifest.newest_intact`)."""
    return manifest.newest_intact(ckpt_dir)[0]


def load_checkpoint(path: Path, *, model, optimizer, scheduler, reference_model=None) -> tuple[dict, dict]:
    """Restore everything saved by ``save_checkpoint``; returns (trainer_state, sampler_state)."""
    extract_model_from_parallel(model).load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if reference_model is not None and (path / "reference.safetensors").exists():
        reference_model.load_state_dict(load_file(str(path / "reference.safetensors")))
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    sampler = json.loads((path / "sampler.json").read_text()) if (path / "sampler.json").exists() else {}
    return json.loads((path / "trainer_state.json").read_text()), sampler
