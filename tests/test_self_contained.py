"""The project needs nothing outside the repository: no source or test names a folder beside it, the
shipped evaluation sets and the rated test data match the checksums in their SOURCE.md, and a wheel
built from the source carries the evaluation sets."""

from __future__ import annotations

import gzip
import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUTSIDE = [".." + "/shared", "shared" + "/data", "GVPO_" + "DATA_DIR"]
"""Spelled in pieces so that this file does not match itself."""


def test_no_source_or_test_reaches_outside_the_repository():
    """Files of the repository only: build outputs (``*.egg-info``, ``__pycache__``) are not its text."""
    offenders = []
    for root in ("src", "tests", "configs", "scripts", "bench", "docs", "README.md", "Makefile"):
        for path in [REPO / root] if (REPO / root).is_file() else (REPO / root).rglob("*"):
            built = any(part.endswith(".egg-info") or part in ("__pycache__", "out") for part in path.parts)
            if path.is_file() and not built and path.suffix in (".py", ".md", ".yaml", ".yml", ".json", ".toml", ".txt", ".cfg", ""):
                text = path.read_text(encoding="utf-8", errors="replace")
                offenders += [f"{path.relative_to(REPO)}: {word}" for word in OUTSIDE if word in text]
    assert offenders == []


def _listed_checksums(source_md: Path) -> dict[str, str]:
    """``{file name: sha256}`` from the ``### `name``` sections of a SOURCE.md."""
    out, name = {}, None
    for line in source_md.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"### `([^`]+)`", line):
            name = m.group(1)
        elif (m := re.match(r"- sha256: `([0-9a-f]{64})`", line)) and name:
            out[name] = m.group(1)
    return out


@pytest.mark.parametrize("folder", ["src/gvpo/assets/data/gsm8k", "src/gvpo/assets/data/math500",
                                    "src/gvpo/assets/data/aime24", "tests/data/qwen25_math_rm8",
                                    "tests/data/gsm8k_model_solutions"])
def test_data_matches_its_source_note(folder):
    folder = REPO / folder
    listed = _listed_checksums(folder / "SOURCE.md")
    assert listed and "License" in (folder / "SOURCE.md").read_text(encoding="utf-8")
    for name, sha in listed.items():
        plain, packed = folder / name, folder / (name + ".gz")
        data = plain.read_bytes() if plain.is_file() else gzip.decompress(packed.read_bytes())
        assert hashlib.sha256(data).hexdigest() == sha, name
    shipped = {p.name.removesuffix(".gz") for p in folder.iterdir() if p.name != "SOURCE.md"}
    assert shipped == set(listed)


def test_the_wheel_carries_the_evaluation_sets(tmp_path):
    """Build from a copy of the source (the build writes build/ and egg-info next to it)."""
    pytest.importorskip("setuptools")
    import shutil

    src = tmp_path / "src-copy"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("gvpo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for need in ("gsm8k/train.jsonl.gz", "gsm8k/test.jsonl.gz", "math500/test.jsonl.gz", "aime24/test.jsonl.gz",
                 "gsm8k/SOURCE.md", "math500/SOURCE.md", "aime24/SOURCE.md"):
        assert f"gvpo/assets/data/{need}" in names
