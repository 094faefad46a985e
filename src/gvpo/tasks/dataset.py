"""The ``dataset`` task: the user's own prompts and rewards, configured without writing Python.

::

    gvpo train task.name=dataset task.options.path=prompts.jsonl task.options.rewards=[my_rewards.correct]

Source. ``path`` is anything :func:`gvpo.data_paths.read_splits` reads: a ``.jsonl`` / ``.json`` /
``.parquet`` / ``.csv`` file, a ``datasets.save_to_disk`` folder, a folder of ``<split>.jsonl`` files,
a Hugging Face dataset id (``config`` names its configuration), or a mapping of ``datasets.load_dataset``
arguments.

Rows. ``prompt_column`` (default ``"prompt"``) holds the prompt: a string, or a conversation (a list
of ``{"role", "content"}`` messages, TRL's conversational format) that goes through the tokenizer's
chat template; rewards then receive conversational completions. The prompt column becomes the row's
``"prompt"``; every other column is kept and passed to the rewards by name, as TRL does.

Splits. ``train_split`` (default ``"train"``) is trained on; a one-split source (a single file) is
that split whatever its name. Held-out rows come from ``test_path`` (its ``test_split``), else from
the source's ``test_split`` (default ``"test"``) when it has one, else ``test_size`` rows (a count, or
a fraction of the train rows) are held out of the train split by a fixed shuffle, so train and test
never share a row. Either split option may be a list of split names, concatenated.

Rewards. ``rewards``: registry names or dotted paths (``my_module.my_reward``), summed with
``reward_weights``; ``accuracy_reward`` (default the first) is the one whose value >= 1 counts as
correct in held-out evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Sequence

from ..data_paths import pick_split, read_splits
from ..rewards import is_conversational
from .base import TASKS, Task, subsample

HOLD_OUT_SEED = 0
"""Seed of the shuffle that picks the ``test_size`` held-out rows (independent of ``seed``)."""


def check_prompt(prompt: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``prompt`` is a string or a list of role/content messages."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{where}: the prompt is empty")
        return
    if isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and "content" in m for m in prompt):
        return
    raise ValueError(f"{where}: a prompt must be a string or a list of {{'role': ..., 'content': ...}} messages, "
                     f"got {type(prompt).__name__}: {str(prompt)[:80]!r}")


def task_rows(raw: list[dict], prompt_column: str, described: str) -> list[dict]:
    """``{"prompt": row[prompt_column], **other columns}`` for each row, checked.

    >>> task_rows([{"question": "1+1=", "answer": "2"}], "question", "x.jsonl")
    [{'prompt': '1+1=', 'answer': '2'}]
    """
    rows = []
    for i, r in enumerate(raw):
        where = f"{described} row {i}"
        if prompt_column not in r:
            raise KeyError(f"{where} has no column {prompt_column!r} (task.options.prompt_column); columns: {sorted(r)}")
        if prompt_column != "prompt" and "prompt" in r:
            raise ValueError(f"{where} has both {prompt_column!r} (task.options.prompt_column) and 'prompt'; rename "
                             "one: rewards receive the prompt as `prompts` and every other column by name")
        prompt = r[prompt_column]
        if isinstance(prompt, (list, tuple)):
            prompt = [dict(m) for m in prompt]
        check_prompt(prompt, where)
        rows.append({"prompt": prompt, **{k: v for k, v in r.items() if k != prompt_column}})
    return rows


def hold_out(rows: list[dict], test_size: int | float) -> tuple[list[dict], list[dict]]:
    """``(train, test)``: ``test_size`` rows (a count, or a fraction in (0, 1)) picked by a fixed shuffle.

    >>> train, test = hold_out([{"i": i} for i in range(10)], 0.2)
    >>> len(train), len(test), sorted(r["i"] for r in train + test) == list(range(10))
    (8, 2, True)
    """
    n = round(len(rows) * test_size) if isinstance(test_size, float) and 0 < test_size < 1 else int(test_size)
    if not 0 <= n < len(rows):
        raise ValueError(f"task.options.test_size={test_size} holds out {n} of {len(rows)} rows; leave at least one "
                         "to train on, or give test_path / test_split")
    order = list(range(len(rows)))
    random.Random(HOLD_OUT_SEED).shuffle(order)
    held = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


@TASKS.register("dataset")
def dataset(
    *,
    path: Any = None,
    rewards: Sequence[str] = (),
    reward_weights: Sequence[float] | None = None,
    accuracy_reward: str | None = None,
    prompt_column: str = "prompt",
    config: str | None = None,
    train_split: str | Sequence[str] = "train",
    test_split: str | Sequence[str] = "test",
    test_path: Any = None,
    test_size: int | float = 0.1,
    num_train: int | None = None,
    num_test: int | None = None,
    seed: int | None = None,
    max_new_tokens: int = 256,
    name: str = "dataset",
) -> Task:
    """Prompts from any data source, scored by the rewards named in ``rewards``; see the module docstring.

    ``seed`` shuffles the train rows (then ``num_train`` keeps the first); ``num_test`` keeps the first
    held-out rows; ``name`` names the task in logs and run folders.
    """
    if path is None:
        raise ValueError("task 'dataset' needs task.options.path: a data file, a folder, or a Hugging Face dataset id")
    if isinstance(rewards, str):
        rewards = [rewards]
    if not rewards:
        raise ValueError("task 'dataset' needs task.options.rewards: a list of reward names or dotted paths to your "
                         "functions, e.g. [my_rewards.correct] (task.rewards, when set, replaces them in training only)")
    if reward_weights is not None and len(reward_weights) != len(rewards):
        raise ValueError(f"task.options.reward_weights has {len(reward_weights)} values for {len(rewards)} rewards")
    if accuracy_reward is not None and accuracy_reward not in rewards:
        raise ValueError(f"task.options.accuracy_reward {accuracy_reward!r} is not one of the rewards {list(rewards)}")

    found, described = read_splits(path, config=config)
    train = task_rows(pick_split(found, train_split, described, "task.options.train_split"), prompt_column, described)
    test_names = [test_split] if isinstance(test_split, str) else list(test_split)
    if test_path is not None:
        test_found, test_described = read_splits(test_path, config=config)
        test = task_rows(pick_split(test_found, test_split, test_described, "task.options.test_split"), prompt_column, test_described)
        held_out = f"{test_described}"
    elif len(found) > 1 and all(n in found for n in test_names):
        test = task_rows(pick_split(found, test_split, described, "task.options.test_split"), prompt_column, described)
        held_out = f"{described} [{', '.join(test_names)}]"
    else:
        train, test = hold_out(train, test_size)
        held_out = f"{len(test)} rows held out of the train split (test_size={test_size})"
    if not train:
        raise ValueError(f"{described}: no training rows")
    kinds = {is_conversational(r["prompt"]) for r in train + test}
    if len(kinds) > 1:
        raise ValueError(f"{described}: some prompts are strings and some are conversations; use one form")
    train, test = subsample(train, test, seed=seed, num_train=num_train, num_test=num_test)
    return Task(
        name=name,
        train=train,
        test=test,
        rewards=tuple(rewards),
        reward_weights=tuple(float(w) for w in reward_weights) if reward_weights is not None else None,
        accuracy_reward=accuracy_reward,
        max_new_tokens=max_new_tokens,
        extra={"sources": {"train": described, "test": held_out}, "prompt_column": prompt_column,
               "conversational": kinds == {True}},
    )
