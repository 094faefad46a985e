"""Environments and tools in TRL 1.16's conventions, loaded and checked once at set-up.

- ``task.environment=pkg.mod.Class`` (TRL's ``environment_factory``): one instance per completion, made with
  ``Class()``; ``reset(**row)`` returns text appended to the prompt's last message, or ``None``; every public
  method (a function on the class whose name does not start with ``_``, other than ``reset`` and
  ``get_reward``) is a tool; an optional ``get_reward()`` returns the episode's reward, added to the task's
  rewards with weight 1 under the class's name.
- ``task.tools=[pkg.mod.fn, ...]`` (TRL's ``tools=``): stateless functions, shared by every episode.

A tool needs type hints and a Google-style docstring, which transformers' ``get_json_schema`` turns into the
schema the chat template renders (as TRL reads them). A class or tool that cannot be used is a
:class:`~gvpo.config.ConfigError` naming it, before any model is loaded.

User code runs with ``task.env_timeout_s`` (:func:`call_limited`): a call that raises or hangs becomes a
:class:`ToolFailure` the episode counts, never a crashed run. A call that hangs keeps running in its daemon
thread (Python cannot stop a thread); its result is ignored.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import ConfigError
from ..registry import Registry

RESERVED = ("reset", "get_reward")
"""Public methods of an environment class that are not tools (TRL's rule)."""


class ToolFailure(Exception):
    """A call into user code (tool, ``reset``, ``get_reward``) raised or timed out; ``kind`` says which."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class EnvironmentSpec:
    """What ``task.environment`` and ``task.tools`` name, checked: the class (or ``None``), the standalone tools,
    the names of the class's tool methods, and the call time limit."""

    environment: type | None = None
    """The environment class, or ``None`` (tools only)."""
    tools: list = field(default_factory=list)
    """Standalone tool functions (``task.tools``)."""
    methods: list = field(default_factory=list)
    """Names of the environment class's tool methods."""
    timeout_s: float = 0.0
    """``task.env_timeout_s``: limit of one call into user code; 0 = none."""

    @property
    def name(self) -> str:
        """The environment class's name (metrics, reward name), or ``tools``."""
        return self.environment.__name__ if self.environment is not None else "tools"

    @property
    def has_tools(self) -> bool:
        return bool(self.tools or self.methods)

    @property
    def has_reward(self) -> bool:
        return self.environment is not None and callable(getattr(self.environment, "get_reward", None))

    def make(self) -> Any:
        """A fresh environment instance (``None`` without a class)."""
        return self.environment() if self.environment is not None else None

    def tools_of(self, instance: Any) -> list[Callable]:
        """The tools an episode with ``instance`` may call: the standalone ones, then the instance's methods."""
        methods = [getattr(instance, name) for name in self.methods] if instance is not None else []
        return list(self.tools) + methods


def _resolve(key: str, path: str) -> Any:
    try:
        return Registry(key).resolve(path)
    except KeyError as err:
        raise ConfigError(f"{key}={path}: {err.args[0]}") from None


def tool_methods(cls: type) -> list[str]:
    """The tool method names of an environment class, as TRL lists them: functions on the class, public,
    not ``reset`` or ``get_reward`` (properties are not evaluated)."""
    return [name for name, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
            if name not in RESERVED and not name.startswith("_")]


def check_tool(key: str, label: str, fn: Callable) -> None:
    """ConfigError naming ``label`` unless transformers can write the tool's JSON schema (type hints and a
    Google-style docstring, as the chat template and TRL need)."""
    from transformers.utils import get_json_schema

    try:
        get_json_schema(fn)
    except Exception as err:  # DocstringParsingException, TypeHintParsingException, ...
        raise ConfigError(f"{key}: tool {label} cannot be described to the model: {err}") from None


def task_environment(task, environment: str, tools: list) -> str:
    """``task.environment`` as configured, else the task's own (``Task.extra["environment"]``: ``arithmetic_tool``
    brings its calculator) unless ``task.tools`` are set.

    >>> from gvpo.tasks import get_task
    >>> task = get_task("arithmetic_tool", num_test=1, num_train=1)
    >>> task_environment(task, "", []), task_environment(task, "my.Env", []), task_environment(task, "", ["my.f"])
    ('gvpo.tasks.calculator.Calculator', 'my.Env', '')
    """
    return environment or ("" if tools else task.extra.get("environment", ""))


def load_environment_spec(environment: str, tools: list, timeout_s: float) -> EnvironmentSpec | None:
    """The checked :class:`EnvironmentSpec` of ``task.environment`` / ``task.tools``, or ``None`` when neither is
    set (single-turn training, unchanged)."""
    if not environment and not tools:
        return None
    spec = EnvironmentSpec(timeout_s=timeout_s)
    for path in tools:
        fn = path if callable(path) else _resolve("task.tools", str(path))
        label = getattr(fn, "__name__", str(path))
        if not callable(fn):
            raise ConfigError(f"task.tools: {path} is a {type(fn).__name__}, not a function")
        check_tool("task.tools", label, fn)
        spec.tools.append(fn)
    if environment:
        cls = environment if isinstance(environment, type) else _resolve("task.environment", str(environment))
        label = getattr(cls, "__name__", str(environment))
        if not isinstance(cls, type):
            raise ConfigError(f"task.environment={environment}: {label} is a {type(cls).__name__}, not a class")
        if not callable(getattr(cls, "reset", None)):
            raise ConfigError(f"task.environment={environment}: class {label} has no reset method (TRL's environments "
                              "define reset(**row) -> str | None)")
        try:
            instance = cls()
        except Exception as err:
            raise ConfigError(f"task.environment={environment}: {label}() raised {type(err).__name__}: {err} (one "
                              "instance is made per completion, without arguments)") from None
        spec.environment, spec.methods = cls, tool_methods(cls)
        for name in spec.methods:
            check_tool("task.environment", f"{label}.{name}", getattr(instance, name))
    names = [getattr(t, "__name__", "") for t in spec.tools] + spec.methods
    if len(set(names)) < len(names):
        raise ConfigError(f"task.tools/task.environment: two tools share a name ({', '.join(sorted(names))}); the "
                          "model calls tools by name")
    return spec


def call_limited(fn: Callable, kwargs: dict, timeout_s: float, label: str) -> Any:
    """``fn(**kwargs)`` (awaited if it is a coroutine function) under ``timeout_s`` (0 = no limit); an exception
    or a timeout becomes a :class:`ToolFailure` (``kind`` ``error`` or ``timeout``) naming ``label``.

    >>> call_limited(lambda a: a + 1, {"a": 1}, 5, "inc")
    2
    >>> call_limited(lambda: 1 / 0, {}, 5, "div")
    Traceback (most recent call last):
    ...
    gvpo.episodes.environments.ToolFailure: div raised ZeroDivisionError: division by zero
    """
    def run():
        out = fn(**kwargs)
        return asyncio.run(out) if inspect.isawaitable(out) else out

    if not timeout_s:
        try:
            return run()
        except Exception as err:
            raise ToolFailure("error", f"{label} raised {type(err).__name__}: {err}") from err
    result: dict = {}

    def target():
        try:
            result["value"] = run()
        except Exception as err:  # reported in the caller's thread
            result["error"] = err

    worker = threading.Thread(target=target, name=f"gvpo-env-{label}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ToolFailure("timeout", f"{label} did not return within {timeout_s} s (task.env_timeout_s)")
    if "error" in result:
        err = result["error"]
        raise ToolFailure("error", f"{label} raised {type(err).__name__}: {err}") from err
    return result["value"]
