"""``gvpo`` command line: train, eval, data check."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Idle OpenMP threads spin by default, which slows steps a lot on a busy CPU: measured in bench/README.md,
# section "OpenMP's default spinning on shared cores".
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import ConfigError, describe, load_config


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a policy (no arguments: the embedded arithmetic demo)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with GVPO (or another objective). Settings come from the defaults, then --config, "
                    "then key=value overrides (dotted keys, YAML values).",
        epilog="config keys (override with key=value):\n\n" + describe(),
    )
    p.add_argument("--config", help="YAML file with config sections (model, task, rollout, sampler, objective, optim, train, output)")
    p.add_argument("--output-dir", help="parent folder for the run folder (output.dir)")
    p.add_argument("--max-steps", type=int, help="number of optimizer steps (train.max_steps)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint, with its saved config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. objective.beta=0.05 rollout.k=4")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a task's held-out prompts; prints one JSON object")
    p.add_argument("--model", default="default", help="model folder, hub id (where a network allows), or 'default' (embedded model)")
    p.add_argument("--task", default="arithmetic", help="task name (arithmetic, gsm8k, math500, aime24, dataset) or dotted path")
    p.add_argument("--n", type=int, default=0, help="number of held-out prompts; 0 = all")
    p.add_argument("--samples", type=int, default=1, help="completions per prompt: 1 = greedy pass@1, K > 1 = sampled avg@K and pass@K")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature when --samples > 1")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold when --samples > 1")
    p.add_argument("--max-new-tokens", type=int, default=0, help="completion limit; 0 = the task's default")
    p.add_argument("--batch-size", type=int, default=64, help="prompts generated together")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="generation engine")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--items", help="write per-item results (completion, reward, correct) to this jsonl file")
    p.add_argument("--task-option", action="append", default=[], metavar="key=value", help="task factory option, repeatable (e.g. path=data.jsonl)")


def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="offline data tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    dsub.add_parser("check", help="validate a rated-completions file and print a summary "
                                  "(see gvpo data check --help)", add_help=False)


def _compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="train several objectives on the same task, seeds and sample budget; write comparison.md/.png",
        description="Train once per objective x seed from one shared config (defaults, --config, key=value "
                    "overrides; only objective.name and train.seed change), each in its own run folder, then write "
                    "comparison.md (a table), comparison.png (curves against completions generated) and "
                    "comparison.json in the output folder.",
    )
    p.add_argument("--config", help="YAML config shared by every run")
    p.add_argument("--objectives", default="gvpo,grpo,dr_grpo", help="comma-separated objective names (default: gvpo,grpo,dr_grpo)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per objective: train.seed, train.seed+1, ... (default 3)")
    p.add_argument("--output-dir", help="folder for the run folders and the comparison (default: <output.dir>/compare-<date>)")
    p.add_argument("--max-steps", type=int, help="optimizer steps of every run (train.max_steps)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides shared by every run")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["data", "check"]:  # its own parser, options in any order
        from .data import main_check

        return main_check(argv[2:])
    parser = argparse.ArgumentParser(prog="gvpo", description="GVPO post-training for language models")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _data_parser(sub)
    _compare_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "compare":
            from .compare import main_compare

            return main_compare(args)
    except ConfigError as err:
        print(f"gvpo: config error: {err}", file=sys.stderr)
        return 2
    return 1


def _train(args) -> int:
    from .trainer import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output.dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    config_path = args.config
    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.exists():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there (is it a run folder?)")
        config_path = config_path or saved
    config = load_config(config_path, overrides)
    run_dir = train(config, resume=args.resume)
    print(f"run folder: {run_dir}")
    return 0


def _eval(args) -> int:
    from .config import ModelConfig, parse_override
    from .evaluate import evaluate
    from .models import load_policy
    from .rollout import create_engine
    from .tasks import get_task

    task = get_task(args.task, **dict(parse_override(o) for o in args.task_option))
    model, tokenizer = load_policy(ModelConfig(name_or_path=args.model), "cuda" if _cuda() else "cpu")
    engine = create_engine(args.engine, model, tokenizer)
    result = evaluate(engine, task, n=args.n, samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                      progress=sys.stderr.isatty(), items_path=args.items)
    print(json.dumps(result))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
