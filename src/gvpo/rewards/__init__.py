"""Reward functions, called exactly as TRL's ``GRPOTrainer`` calls them.

A reward is a callable that receives keyword arguments and returns one value per completion::

    reward(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_extra=..., log_metric=...,
           **dataset_columns) -> list[float | None]

* ``prompts``: the rows' prompts, strings or conversations (lists of ``{"role", "content"}`` messages);
* ``completions``: strings for string prompts; for conversational prompts, conversational completions
  ``[{"role": "assistant", "content": text}]`` (TRL's format);
* ``completion_ids``: one list of token ids per completion (EOS included when generated);
* every other column of the task's rows, by name (``answer=[...]``, ``solution=[...]``);
* ``trainer_state``: a :class:`TrainerState` (``global_step``, ``step``, ``samples``);
* ``log_extra(column, values)`` / ``log_metric(name, value)``: TRL's logging hooks; what they receive in
  the latest call is kept on the combined reward's ``logged`` dict (``{"extra": ..., "metrics": ...}``).

So a function written for TRL -- ``def reward(completions, **kwargs)``, ``def reward(prompts,
completions, answer, **kwargs)``, an ``async def``, a callable object -- works unchanged. A function
without ``**kwargs`` gets only the arguments it names (TRL would fail on it). ``None`` for an item
means "cannot score this completion": the trainer drops it from its group and counts it in the
metrics. ``async def`` rewards run concurrently in one event loop, under the same timeout. Pick
rewards by registry name or dotted import path with :func:`resolve`.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any, Callable, Sequence

from ..reward_checks import call_checked, check_values
from .base import REWARDS, RewardFn, TrainerState, completion_text, is_conversational, resolve

__all__ = ["REWARDS", "RewardFn", "TrainerState", "call_with_timeout", "combine", "completion_text",
           "is_conversational", "resolve"]


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def reward_arguments(fn: RewardFn, name: str, kwargs: dict) -> dict:
    """The keyword arguments ``fn`` accepts out of ``kwargs``: all of them when it takes ``**kwargs``,
    else the ones it names. Raises ``TypeError`` naming the reward and what is missing.

    >>> reward_arguments(lambda completions, answer: [], "r", {"prompts": [], "completions": [], "answer": []})
    {'completions': [], 'answer': []}
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return kwargs
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [p.name for p in params if p.default is p.empty and p.kind is not p.VAR_POSITIONAL
               and (p.name not in kwargs or p.kind is p.POSITIONAL_ONLY)]
    if missing:
        raise TypeError(f"reward {name!r} needs {missing}, which the trainer does not pass by that name; rewards "
                        f"receive keyword arguments: {', '.join(sorted(kwargs))}")
    return {k: v for k, v in kwargs.items() if k in named}


def call_with_timeout(fn: Callable[[], Any], name: str, timeout_s: float, *, thread: bool = False) -> Any:
    """``fn()`` in a daemon thread; raise ``TimeoutError`` naming ``name`` if it takes over ``timeout_s``.
    ``timeout_s == 0`` means no limit (then ``fn`` runs in the caller's thread unless ``thread``).

    >>> call_with_timeout(lambda: [1.0], "one", 5)
    [1.0]
    """
    if not timeout_s and not thread:
        return fn()
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            result["error"] = err

    worker = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
    worker.start()
    worker.join(timeout_s or None)
    if worker.is_alive():
        raise TimeoutError(f"reward {name} did not return within {timeout_s} s (task.reward_timeout_s); "
                           "the run stops here and its last checkpoint is intact")
    if "error" in result:
        raise result["error"]
    return result["value"]


def combine(names: Sequence[str | RewardFn], weights: Sequence[float] | None = None, timeout_s: float = 0) -> RewardFn:
    """One reward that is the weighted sum of several; ``None`` from any of them gives ``None``.

    The combined reward takes keywords only, as TRL passes them (see the module docstring), and wraps
    string completions of conversational prompts as ``[{"role": "assistant", "content": text}]``.
    Synchronous rewards run one after another, each under ``timeout_s``; ``async`` ones run together
    in one event loop under one ``timeout_s``.

    >>> f = combine(["exact_match", "exact_match"], [1.0, 0.5])
    >>> f(prompts=["Q", "Q"], completions=[" 4\\n", " 5"], answer=["4", "4"])
    [1.5, 0.0]
    """
    fns = [resolve(n) for n in names]
    labels = [n if isinstance(n, str) else getattr(n, "__name__", type(n).__name__) for n in names]
    weights = list(weights) if weights is not None else [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ValueError(f"reward_weights has {len(weights)} values for {len(fns)} rewards {labels}")
    logged: dict = {"extra": {}, "metrics": {}}

    def log_extra(column: str, values: list) -> None:
        logged["extra"].setdefault(column, []).extend(values)

    def log_metric(name: str, value: float) -> None:
        logged["metrics"].setdefault(name, []).append(value)

    def combined(*, prompts: list, completions: list, completion_ids: list | None = None, trainer_state: Any = None,
                 **columns) -> list:
        n = len(completions)
        logged["extra"], logged["metrics"] = {}, {}  # this call's logs only
        if prompts and is_conversational(prompts[0]):
            completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]
        kwargs = {**columns, "prompts": prompts, "completions": completions,
                  "completion_ids": completion_ids if completion_ids is not None else [None] * n,
                  "trainer_state": TrainerState.of(trainer_state), "log_extra": log_extra, "log_metric": log_metric}
        values: list = [None] * len(fns)
        coroutines = []
        for i, (fn, label) in enumerate(zip(fns, labels)):
            args = reward_arguments(fn, label, kwargs)
            if _is_async(fn):
                coroutines.append((i, fn, args))
                continue
            out = call_checked(call_with_timeout, label, lambda: fn(**args), repr(label), timeout_s)
            if inspect.isawaitable(out):  # a sync callable that returned a coroutine
                coroutines.append((i, None, out))
                continue
            values[i] = check_values(label, out, n)
        if coroutines:
            async def gather():
                return await asyncio.gather(*(fn(**args) if fn is not None else args for _, fn, args in coroutines))

            which = ", ".join(repr(labels[i]) for i, _, _ in coroutines)
            for (i, _, _), out in zip(coroutines, call_checked(call_with_timeout, which, lambda: asyncio.run(gather()),
                                                               which, timeout_s, thread=True)):
                values[i] = check_values(labels[i], out, n)
        total: list = [0.0] * n
        for weight, vs in zip(weights, values):
            total = [None if (t is None or v is None) else t + weight * float(v) for t, v in zip(total, vs)]
        return total

    combined.logged = logged  # type: ignore[attr-defined]
    return combined


from . import basic  # noqa: E402,F401  (registers the built-in rewards)
from . import math  # noqa: E402,F401  (registers math, format)
from . import numbers  # noqa: E402,F401  (registers number_match)
