"""Build a small random-init policy (byte-level BPE tokenizer + tiny Llama, safetensors) for offline GVPO
on a rated-completions file, with no download, and print its token-length report.

The command line of :mod:`gvpo.offline_model` (what it writes and why: see that module).

Usage::

    python scripts/build_offline_model.py --preset qwen25_math_rm8          # -> runs/offline-models/rm8
    python scripts/build_offline_model.py --preset gsm8k_model_solutions    # -> runs/offline-models/gsm8k
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from gvpo.offline_model import DEFAULT_FILES, DEFAULT_OUT, build_offline_model  # noqa: E402


def default_data(preset: str) -> Path:
    """The preset's rated file in ``<repo>/tests/data``; exits naming the preset if it has none."""
    if preset not in DEFAULT_FILES:
        raise SystemExit(f"no default file for preset {preset!r}; pass --data")
    return REPO / "tests" / "data" / Path(*DEFAULT_FILES[preset])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a byte-level BPE tokenizer on an offline rated-completions file and save it with a "
                    "small random-init Llama (safetensors) to a folder that AutoTokenizer / "
                    "AutoModelForCausalLM.from_pretrained load. Prints the token-length report.")
    p.add_argument("--preset", default="qwen25_math_rm8",
                   help="gvpo.data preset of the file (default qwen25_math_rm8; also gsm8k_model_solutions)")
    p.add_argument("--data", default=None,
                   help="the offline file; default: the preset's file in <repo>/tests/data")
    p.add_argument("--out", default=None, help="output folder (default runs/offline-models/rm8 for qwen25_math_rm8, "
                                               "runs/offline-models/gsm8k for gsm8k_model_solutions, else "
                                               "runs/offline-models/<preset>)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size incl. 3 specials (default 2048)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--intermediate", type=int, default=0, help="MLP size; 0 = 2 x hidden (default)")
    p.add_argument("--max-positions", type=int, default=4096,
                   help="max_position_embeddings (RoPE; no parameters); must cover prompt + completion (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder already holds a model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = Path(args.data) if args.data else default_data(args.preset)
    out = Path(args.out or DEFAULT_OUT.get(args.preset, f"runs/offline-models/{args.preset}"))
    if (out / "model.safetensors").exists() and not args.force:
        print(f"{out} already holds a model (use --force to rebuild)")
        info = json.loads((out / "build_info.json").read_text()) if (out / "build_info.json").exists() else {}
    else:
        info = build_offline_model(data, out, preset=args.preset, vocab_size=args.vocab_size, hidden=args.hidden,
                                   layers=args.layers, heads=args.heads, intermediate=args.intermediate,
                                   max_positions=args.max_positions, seed=args.seed)
        print(f"wrote {out}")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
