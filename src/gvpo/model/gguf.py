"""GGUF files as a model source: dequantised once into a cached plain transformers folder.

``model.name_or_path: path/to/model.gguf`` (or a folder plus ``model.gguf_file: model.gguf``; ``gvpo eval
--model path/to/model.gguf``) trains and evaluates a llama.cpp GGUF file. transformers reads GGUF through
the ``gguf`` package (``pip install 'gvpo[gguf]'``) and dequantises every tensor to float32 in Python,
which takes tens of seconds for a 135M model; and the model it returns cannot be saved
(``save_pretrained`` refuses a model "quantized with gguf"). So the first use converts the file into a
plain folder, which every later load (and every process of a multi-process run) reads as any other:

- ``config.json`` without ``quantization_config`` (a plain model of the same architecture),
- ``model.safetensors`` (float32, the dequantised weights; tied weights stored once),
- the tokenizer with its chat template, and ``generation_config.json``,
- ``gguf_source.json``: the GGUF's path, size and SHA-256, written last (a folder without it is incomplete).

The folder is ``<cache>/gguf/<file stem>-<first 16 hex digits of the file's SHA-256>``, where ``<cache>``
is ``$GVPO_CACHE_DIR``, else ``$XDG_CACHE_HOME/gvpo``, else ``~/.cache/gvpo``. A changed file gets a new
folder; two processes converting at once wait on one lock, and a crash leaves no folder that looks done.
Training writes ``final/`` from the plain model, so it is plain safetensors too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

DONE_FILE = "gguf_source.json"
"""Written last into a converted folder: where it came from (the source file's path, size and SHA-256)."""


class ModelSourceError(RuntimeError):
    """A GGUF file or a known model (:mod:`gvpo.model.fetch`) cannot be had; the message says which and why."""


def cache_root() -> Path:
    """gvpo's cache folder: ``$GVPO_CACHE_DIR``, else ``$XDG_CACHE_HOME/gvpo``, else ``~/.cache/gvpo``."""
    if os.environ.get("GVPO_CACHE_DIR"):
        return Path(os.environ["GVPO_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "gvpo"


def gguf_source(name_or_path: str, gguf_file: str = "") -> Path | None:
    """The GGUF file a model source names: ``folder`` + ``gguf_file``, or a path ending in ``.gguf``;
    ``None`` for any other source (a model folder, a hub id, ``default``).

    >>> gguf_source("runs/x/final") is None, gguf_source("m/SmolLM2.Q4_1.gguf"), gguf_source("m", "a.gguf")
    (True, PosixPath('m/SmolLM2.Q4_1.gguf'), PosixPath('m/a.gguf'))
    """
    if gguf_file:
        return Path(name_or_path).expanduser() / gguf_file
    if name_or_path.lower().endswith(".gguf"):
        return Path(name_or_path).expanduser()
    return None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plain_folder(gguf_path: Path | str, progress: bool = True) -> Path:
    """The plain transformers folder of ``gguf_path``, converted on first use (see the module docstring)."""
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ModelSourceError(f"{gguf_path}: no such GGUF file")
    stat = gguf_path.stat()
    digest = file_sha256(gguf_path)
    out = cache_root() / "gguf" / f"{gguf_path.stem}-{digest[:16]}"
    info = {"source": str(gguf_path.resolve()), "size": stat.st_size, "sha256": digest}
    return convert_once(out, lambda tmp: convert_gguf(gguf_path, tmp, progress=progress), info)


def convert_once(out: Path, convert, info: dict) -> Path:
    """``out`` once ``convert(folder)`` has filled it: done already (its ``DONE_FILE`` exists), or done now
    under a lock (another process converting the same thing waits, then finds it done) in a temporary folder
    that becomes ``out`` only when complete, with ``info`` written last into ``DONE_FILE``."""
    if (out / DONE_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / DONE_FILE).is_file():
            return out
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert(tmp)
            (tmp / DONE_FILE).write_text(json.dumps(info, indent=1) + "\n")
            shutil.rmtree(out, ignore_errors=True)  # an incomplete folder (no DONE_FILE) from a crash
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Dequantise ``gguf_path`` (model, tokenizer, chat template) with transformers and save a plain folder.

    transformers returns the dequantised model with a ``quantization_config`` that makes ``save_pretrained``
    refuse it; the same architecture built from the config without it takes the state dict as is.
    """
    try:
        import gguf  # noqa: F401  (transformers needs it; checked here for a clear message)
    except ImportError as err:
        raise ModelSourceError(f"{gguf_path}: reading GGUF files needs the gguf package: pip install 'gvpo[gguf]'") from err
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as err:  # a damaged file, an architecture transformers cannot read from GGUF, ...
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelSourceError(f"{gguf_path}: transformers cannot read it as a GGUF causal LM "
                        f"({type(err).__name__}: {why[:300]})") from err
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    config.architectures = [type(loaded).__name__]
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    out_dir.mkdir(parents=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
