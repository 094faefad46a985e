"""Where the shared data sets live (``shared/data`` beside the repository).

Layout: ``<dir>/gsm8k/{train,test}.jsonl``, ``<dir>/math500/test.jsonl``, ``<dir>/aime24/test.jsonl``,
each folder with a ``SOURCE.md`` describing its fields and origin.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "GVPO_DATA_DIR"


def _candidates() -> list[Path]:
    cwd = Path.cwd()
    out = [cwd.parent / "shared" / "data", cwd / "shared" / "data"]
    # the repository root and the folders above it: <checkout>/../shared/data in CI
    for parent in Path(__file__).resolve().parents:
        out.append(parent / "shared" / "data")
    seen, unique = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


def shared_data_dir() -> Path:
    """The shared data directory.

    Tried in order: ``$GVPO_DATA_DIR`` (when set it must exist: no silent fallback), then
    ``../shared/data`` and ``./shared/data`` relative to the working directory, then
    ``shared/data`` in each folder above this file (so ``<repo root>/../shared/data``).
    Raises ``FileNotFoundError`` listing every place it looked.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            return path.resolve()
        raise FileNotFoundError(f"${ENV_VAR} is set to {env!r}, which is not a directory")
    tried = _candidates()
    for path in tried:
        if path.is_dir():
            return path.resolve()
    raise FileNotFoundError(
        f"shared data directory not found; set ${ENV_VAR}, or put it at one of: " + ", ".join(str(p) for p in tried)
    )


def data_path(*parts: str) -> Path:
    """A path inside :func:`shared_data_dir`, e.g. ``data_path("gsm8k", "test.jsonl")`` (must exist)."""
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (shared data dir: {shared_data_dir()})")
    return path
