"""Built-in tasks: prompts with the columns their rewards need, train and held-out splits.

A task is picked by name (``task.name: arithmetic``) through the ``TASKS`` registry; each entry is a
factory ``(**options) -> Task``. ``dataset`` (:mod:`gvpo.tasks.dataset`) trains on the user's own data
with their own rewards, configured by options alone.
"""

from __future__ import annotations

import inspect

from ..config import ConfigError
from .base import TASKS, Task

__all__ = ["TASKS", "Task", "get_task"]


def get_task(name: str, **options) -> Task:
    """Build the task registered as ``name`` (or a dotted path to a factory) with ``options``; an option the
    factory does not take is a :class:`~gvpo.config.ConfigError` naming it."""
    factory = TASKS.resolve(name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as err:
        raise ConfigError(f"task.options for task {name!r}: {err}") from None
    except ValueError:  # no signature to check (a builtin): let the call say
        pass
    return factory(**options)


def _register_builtins() -> None:
    from . import arithmetic  # noqa: F401  (registers itself)
    from . import calculator  # noqa: F401  (registers arithmetic_tool: chat questions with a calculator tool)
    from . import chat_arithmetic  # noqa: F401  (registers chat_arithmetic: questions in chat form)
    from . import dataset  # noqa: F401  (registers dataset: the user's own data)
    from . import math_tasks  # noqa: F401  (registers gsm8k, math500, aime24)


_register_builtins()
