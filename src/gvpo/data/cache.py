"""Reference-model log-probs of fixed offline data, cached on disk (:class:`RefLogpCache`), and the
fingerprints that key them (:func:`fingerprint_file`, :func:`fingerprint_model`)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def fingerprint_file(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes (memoised per path, size and mtime within a process); for a Hugging Face
    dataset id, of its rows as canonical JSON."""
    if isinstance(path, str) and not Path(path).exists():
        from ..data_paths import looks_like_hub_id, read_splits

        if looks_like_hub_id(path):
            found, _ = read_splits(path)
            text = json.dumps(found, sort_keys=True, ensure_ascii=False, default=str)
            return hashlib.sha256(text.encode("utf-8")).hexdigest()
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = _sha256_file(p)
    return _FILE_HASHES[key]


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset"}


def fingerprint_model(model: Any) -> str:
    """sha256 hex identifying a model's weights.

    * an ``nn.Module``: every state-dict tensor's name, dtype, shape and bytes, plus the model class
      and its ``config`` (less path and version fields) -- exact, and costs one pass over the weights;
    * a directory path: ``config.json`` plus the sha256 of every ``*.safetensors``/``*.bin`` file --
      cheap for a checkpoint on disk that will be loaded unchanged.
    """
    h = hashlib.sha256()
    if isinstance(model, (str, os.PathLike)):
        d = Path(model)
        files = sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin"))
        if not files:
            raise ValueError(f"no *.safetensors or *.bin weight files in {d}")
        for extra in ("config.json", "generation_config.json"):
            if (d / extra).exists():
                h.update(f"{extra}:{_sha256_file(d / extra)}\n".encode())
        for f in files:
            h.update(f"{f.name}:{fingerprint_file(f)}\n".encode())
        return h.hexdigest()
    import torch

    h.update(f"class:{type(model).__module__}.{type(model).__qualname__}\n".encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    state = model.state_dict() if hasattr(model, "state_dict") else dict(model)
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        h.update(f"\n{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    try:
        import torch

        if isinstance(obj, (torch.dtype, torch.device)):
            return str(obj)
        if isinstance(obj, torch.Size):
            return list(obj)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"RefLogpCache key parts must be JSON values (str, number, list, dict), got "
                    f"{type(obj).__name__}; fingerprint it first (fingerprint_model / fingerprint_file)")


class RefLogpCache:
    """Reference-model log-probs of fixed offline data, computed once and stored on disk.

    The file is ``<dir>/<sha256 of canonical JSON of key_parts>.safetensors``; ``key_parts``
    should name everything the values depend on, e.g. ``{"model": fingerprint_model(ref),
    "data": fingerprint_file(path), "settings": {"max_completion_tokens": 512, "dtype": "bf16"}}``.
    Writes go to a temp file in the same directory and are renamed into place, so readers never see
    a half-written file and concurrent writers of one key are harmless.

    >>> import torch, tempfile
    >>> cache = RefLogpCache(tempfile.mkdtemp())
    >>> cache.get_or_compute({"model": "m", "data": "d"}, lambda: torch.tensor([-1.5, -2.0]))
    tensor([-1.5000, -2.0000])
    >>> cache.get_or_compute({"model": "m", "data": "d"}, lambda: 1 / 0)  # cached: not called
    tensor([-1.5000, -2.0000])
    >>> cache.hits, cache.misses
    (1, 1)
    """

    TENSOR_NAME = "ref_logps"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def canonical(key_parts: dict) -> str:
        return json.dumps(key_parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)

    def key(self, key_parts: dict) -> str:
        """The sha256 hex fingerprint of ``key_parts``."""
        return hashlib.sha256(self.canonical(key_parts).encode()).hexdigest()

    def path(self, key_parts: dict) -> Path:
        return self.directory / f"{self.key(key_parts)}.safetensors"

    def get(self, key_parts: dict, device: Any = None):
        """The stored tensor, or ``None`` when absent or unreadable (a corrupt file is recomputed)."""
        from safetensors import safe_open

        path = self.path(key_parts)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt", device=str(device) if device is not None else "cpu") as f:
                meta = f.metadata() or {}
                if meta.get("key_parts") not in (None, self.canonical(key_parts)):
                    return None
                return f.get_tensor(self.TENSOR_NAME)
        except Exception:  # noqa: BLE001 - truncated/corrupt file: treat as a miss
            return None

    def put(self, key_parts: dict, tensor) -> Path:
        """Store ``tensor`` atomically under ``key_parts``' fingerprint; returns the path."""
        import torch
        from safetensors.torch import save_file

        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"RefLogpCache stores a torch.Tensor, got {type(tensor).__name__}")
        path = self.path(key_parts)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.stem[:16]}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({self.TENSOR_NAME: tensor.detach().cpu().contiguous()}, tmp,
                      metadata={"key_parts": self.canonical(key_parts)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def get_or_compute(self, key_parts: dict, compute_fn: Callable[[], Any], device: Any = None):
        """The cached tensor for ``key_parts``, else ``compute_fn()`` stored and returned.

        A hit is loaded on ``device`` (default CPU); a miss returns ``compute_fn``'s tensor detached.
        """
        cached = self.get(key_parts, device=device)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        tensor = compute_fn()
        self.put(key_parts, tensor)
        return tensor.detach()
