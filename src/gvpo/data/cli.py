"""``gvpo data check``: validate a file and print its summary, or every problem and exit status 1."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields

from .errors import DataError
from .fields import OfflineColumns
from .load import LAYOUTS, check
from .presets import PRESETS, _resolve_preset
from .readers import FILE_FORMATS
from .summary import format_summary

def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gvpo data check",
        description="Validate an offline file of rated completions and print a summary. Every problem "
                    "is listed with its line (jsonl/json) or row (parquet) and field; exit status 1 if any.",
    )
    p.add_argument("path", nargs="?", help="a .jsonl (.jsonl.gz), .json or .parquet file, a datasets.save_to_disk directory, or a Hugging Face dataset id")
    p.add_argument("--format", choices=LAYOUTS, default="auto",
                   help="row layout: 'grouped' (prompt, completions, rewards), 'flat' (prompt, completion, "
                        "reward; grouped by prompt) or 'auto' (grouped if the completions column exists)")
    p.add_argument("--file-format", choices=FILE_FORMATS, default=None,
                   help="file format; default: from the extension")
    p.add_argument("--preset", default=None,
                   help=f"read a known file shape: {', '.join(PRESETS.names())} (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    defaults = OfflineColumns()
    for f in fields(OfflineColumns):
        p.add_argument(f"--{f.name}-column", dest=f"{f.name}_column", default=None, metavar="NAME",
                       help=f"column holding the {f.name} (default '{getattr(defaults, f.name)}'; "
                            "dotted names reach into nested objects)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or path (transformers AutoTokenizer) for the length limits")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="drop groups whose prompt is longer")
    p.add_argument("--max-completion-tokens", type=int, default=None, help="drop completions that are longer")
    p.add_argument("--on-too-long", choices=("skip", "error"), default="skip",
                   help="what to do with over-long prompts/completions: skip and count them, or report errors")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    return p


def main_check(argv: list[str] | None = None) -> int:
    """``gvpo data check PATH [options]``: 0 and the summary on stdout, or 1 and the problems on stderr."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        for name in PRESETS.names():
            print(f"{name}: {PRESETS.resolve(name).description}")
        return 0
    if args.path is None:
        parser.error("the PATH argument is required")
    overrides = {f.name: getattr(args, f"{f.name}_column") for f in fields(OfflineColumns)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        pre = _resolve_preset(args.preset)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    columns = None
    if overrides:
        if pre is not None and pre.convert is not None:
            print(f"error: preset {pre.name!r} has its own converter; --*-column options do not apply",
                  file=sys.stderr)
            return 1
        base = pre.columns if pre is not None else OfflineColumns()
        columns = OfflineColumns(**{**asdict(base), **overrides})
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    try:
        summary = check(args.path, format=args.format, file_format=args.file_format, columns=columns, preset=pre,
                        tokenizer=tokenizer, max_prompt_tokens=args.max_prompt_tokens,
                        max_completion_tokens=args.max_completion_tokens, on_too_long=args.on_too_long)
    except DataError as err:
        print(str(err), file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary.to_dict(), indent=2) if args.json else format_summary(summary))
    return 0
