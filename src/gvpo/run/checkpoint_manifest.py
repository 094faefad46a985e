"""Checkpoint integrity: a ``manifest.json`` (size and SHA-256 of every file) written last, checked before use.

These functions look only at a checkpoint folder's files, whatever wrote them (our safetensors + torch.save
files today, accelerate's ``save_state`` shards later): :func:`write_manifest` after everything else is on
disk, :func:`problem` to check one folder, :func:`newest_intact` to pick the checkpoint to resume from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> Path:
    """Record every file under ``folder`` (relative path -> size, sha256) in ``folder/manifest.json``; call it
    after everything else is written and flushed, so that a manifest means a complete checkpoint."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(folder)}
    path = folder / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return path


def problem(folder: Path, hashes: bool = True) -> str | None:
    """What is wrong with the checkpoint in ``folder`` (a missing manifest, a missing, truncated or changed
    file), or ``None`` when it is intact. ``hashes=False`` checks sizes only (no file is read)."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (it is written last, so the checkpoint was not completed)"
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, want in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, the manifest says {want['size']}"
        if hashes and _sha256(path) != want["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """The ``step-*`` folders in ``ckpt_dir``, oldest first (temporary ``.tmp-*`` ones excluded)."""
    return sorted(p for p in Path(ckpt_dir).glob("step-*") if p.is_dir()) if Path(ckpt_dir).is_dir() else []


def newest_intact(ckpt_dir: Path, hashes: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint in ``ckpt_dir`` and the newer damaged ones passed over, with their problem."""
    damaged = []
    for path in reversed(checkpoints(ckpt_dir)):
        why = problem(path, hashes=hashes)
        if why is None:
            return path, damaged
        damaged.append((path, why))
    return None, damaged
