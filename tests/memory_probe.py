"""Run by tests/test_memory.py in a fresh process: resident memory around one part of the trainer, printed as
one JSON line. Linux only (``/proc/self/status``; writing 5 to ``/proc/self/clear_refs`` resets the peak).

    python memory_probe.py load MODEL_DIR         RSS growth of load_policy, then of the frozen reference copy
    python memory_probe.py load-twice MODEL_DIR   the same with a loader that holds the weights twice (the
                                                  control: the loaded tensors kept beside their copies)
    python memory_probe.py checkpoint MODEL_DIR   peak RSS growth of one save_checkpoint (after an AdamW step)
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

MiB = 2**20


def status(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def probe_load(model_dir: str) -> dict:
    import torch

    from gvpo.config import ModelConfig
    from gvpo.model.loading import Reference, load_policy

    warm, _ = load_policy(ModelConfig(name_or_path=model_dir, dtype="float32"), "cpu")  # imports, first-call caches
    del warm
    torch.manual_seed(0)
    before = status("VmRSS")
    policy, _ = load_policy(ModelConfig(name_or_path=model_dir, dtype="float32"), "cpu")
    loaded = status("VmRSS")
    reference = Reference(policy, lora=False)
    with_reference = status("VmRSS")
    assert reference.model is not None
    return {"param_bytes": param_bytes(policy), "load_growth": loaded - before,
            "reference_growth": with_reference - loaded}


def hold_weights_twice() -> None:
    """Make ``load_policy`` keep every loaded tensor alive beside a fresh copy (what ``own_aligned_memory``
    would do if it cloned while the loaded storage stayed referenced)."""
    import gvpo.model.loading

    kept = []

    def copy_and_keep(model) -> None:
        for tensor in [*model.parameters(), *model.buffers()]:
            kept.append(tensor.data)
            tensor.data = tensor.data.clone()

    gvpo.model.loading.own_aligned_memory = copy_and_keep


def probe_checkpoint(model_dir: str, file_bytes: int) -> dict:
    import torch
    from accelerate import Accelerator

    from gvpo.config import ModelConfig
    from gvpo.model.loading import load_policy
    from gvpo.run import checkpoint as ckpt

    ckpt.FILE_BYTES = file_bytes
    policy, _ = load_policy(ModelConfig(name_or_path=model_dir, dtype="float32"), "cpu")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    policy(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()  # AdamW's state exists now: weights + 2 moments = 3x the parameter bytes
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    accelerator = Accelerator(cpu=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save_checkpoint(Path(tmp), 1, accelerator=accelerator, policy=policy, optimizer=optimizer,
                             scheduler=scheduler, trainer_state={"step": 1})  # warm-up: imports, first-call caches
        before = status("VmRSS")
        reset_peak()
        path = ckpt.save_checkpoint(Path(tmp), 2, accelerator=accelerator, policy=policy, optimizer=optimizer,
                                    scheduler=scheduler, trainer_state={"step": 2})
        peak = status("VmHWM")
        files = sorted(p.stat().st_size for p in (path / ckpt.SHARDS).glob("*.safetensors"))
    return {"param_bytes": param_bytes(policy), "save_growth": peak - before, "files": files}


if __name__ == "__main__":
    kind, model_dir = sys.argv[1], sys.argv[2]
    if kind == "load-twice":
        hold_weights_twice()
    result = probe_load(model_dir) if kind.startswith("load") else probe_checkpoint(model_dir, int(sys.argv[3]))
    print(json.dumps(result))
