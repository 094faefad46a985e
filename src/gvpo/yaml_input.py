"""The user's YAML (config files, ``key=value`` overrides) read with one line per syntax error, the config keys
renamed since the last release, and the warnings the command line prints as one line each.

A leaf module (``yaml`` and the standard library only): :mod:`gvpo.config` imports it.
"""

from __future__ import annotations

import warnings
from typing import Any

import yaml


class GvpoWarning(UserWarning):
    """Something the user should know that does not stop the run; ``gvpo`` prints it as ``gvpo: warning: ...``."""


class DeprecatedKeyWarning(GvpoWarning, FutureWarning):
    """A config key that still works for one release under its old name."""


def yaml_load(text: str, source: str, error: type[Exception]) -> Any:
    """``yaml.safe_load(text)``; a syntax error raises ``error`` with one line: ``source``, line, column and
    what the parser expected (lines and columns count from 1).

    >>> yaml_load("train: {max_steps: 2", "run.yaml", ValueError)
    Traceback (most recent call last):
    ...
    ValueError: run.yaml, line 1, column 21: expected ',' or '}', but got '<stream end>' (while parsing a flow mapping that starts at line 1, column 8)
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise error(yaml_problem(err, source)) from None


def yaml_problem(err: yaml.YAMLError, source: str) -> str:
    """One line for a PyYAML error: where it is, what is wrong, and where the construct it is in began."""
    mark = getattr(err, "problem_mark", None)
    where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
    what = " ".join((getattr(err, "problem", None) or str(err)).split())
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None:
        what += f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
    elif context:
        what += f" ({context})"
    return f"{where}: {what}"


def tensorboard_key(output, on: bool) -> None:
    """``output.tensorboard`` (before ``output.report_to``), accepted until the next release with a warning:
    true adds ``tensorboard`` to ``output.report_to`` (the default has it), false removes it."""
    warnings.warn("output.tensorboard is deprecated and will be removed in the next release; use "
                  f"output.report_to ({'[tensorboard]' if on else '[]'} here)", DeprecatedKeyWarning, stacklevel=3)
    others = [name for name in output.report_to if name != "tensorboard"]
    output.report_to = [*others, "tensorboard"] if on else others
