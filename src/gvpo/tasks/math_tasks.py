"""Math word-problem tasks scored by the ``math`` reward: ``gsm8k``, ``math500``, ``aime24``.

Rows are ``{"prompt": ..., "answer": <gold final answer>}``: ``answer`` is the final answer only
(``"72"``, ``"\\frac{14}{3}"``), taken from the data's answer column with
:func:`gvpo.rewards.math.gold_answer` (so GSM8K's ``... #### 72`` becomes ``"72"``).

Prompts. Plain mode (default): ``template`` with ``{question}`` replaced by the question; it is the
only placeholder, so LaTeX braces such as ``\\boxed{}`` need no escaping. Chat mode (``chat=True``):
``prompt`` is a message list ``[{"role": "user", "content": <template filled in>}]`` (after an
optional ``{"role": "system"}`` message), and the default template asks for the answer in
``\\boxed{}``; the trainer applies the tokenizer's chat template.

Data. ``path`` is any source :func:`gvpo.data_paths.read_splits` reads (default: the task's data shipped
in the package, :func:`gvpo.data_paths.builtin_data_dir`): a folder of ``train.jsonl`` / ``test.jsonl``, a
``datasets.save_to_disk`` folder, a ``DatasetDict`` or dict of splits, a Hugging Face dataset id
(``config`` names its configuration), a mapping of ``datasets.load_dataset`` arguments; a single file,
``datasets.Dataset`` or list of rows is the test split. ``train_split`` / ``test_split`` name the splits
to take. ``train_path`` / ``test_path`` override one split, e.g.
``train_path=EleutherAI/hendrycks_math config=algebra``.

Splits. ``gsm8k`` has its own ``train.jsonl`` (7473) and ``test.jsonl`` (1319). ``math500`` (500)
and ``aime24`` (30) are **evaluation-only**: they ship one test file, and their ``train`` is
**empty** (``extra["eval_only"] is True``) rather than a silent copy of the test set. Give
``train_path=`` (e.g. the MATH train set) to train on something else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data_paths import builtin_file, is_saved_dataset, pick_split, read_jsonl, read_splits
from ..rewards.math import gold_answer
from .base import TASKS, Task, subsample

GSM8K_TEMPLATE = "Question: {question}\nAnswer: Let's think step by step."
MATH_TEMPLATE = "Problem: {question}\nPut the final answer in \\boxed{}.\nSolution: Let's think step by step."
CHAT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."


def fill_template(template: str, question: str) -> str:
    """``template`` with ``{question}`` replaced; other braces stay as they are.

    >>> fill_template("Q: {question} in \\\\boxed{}", "1+1?")
    'Q: 1+1? in \\\\boxed{}'
    """
    return template.replace("{question}", question)


def _task_splits(path: Any, default_dir: str, splits: tuple[str, ...], config: str | None,
                 split_names: dict[str, str]) -> dict[str, tuple[list[dict], str]]:
    """Rows of each of ``splits`` in ``path`` as ``{split: (rows, description)}`` (see the module docstring)."""
    if path is None:
        out = {}
        for s in splits:
            file = builtin_file(default_dir, s)
            out[s] = (read_jsonl(file), str(file))
        return out
    found, described = read_splits(path, config=config)
    split_folder = isinstance(path, (str, Path)) and Path(path).expanduser().is_dir() and not is_saved_dataset(path)
    if len(found) == 1 and not split_folder:
        return {"test": (next(iter(found.values())), described)}  # one file / Dataset / list: the test split
    for s in splits:  # a folder of split files or a multi-split source: each split by its exact name
        if split_names[s] not in found:
            raise KeyError(f"{described} has no split {split_names[s]!r} (task.options.{s}_split); "
                           f"its splits: {', '.join(sorted(found))}")
    return {s: (found[split_names[s]], f"{described} [{split_names[s]}]") for s in splits}


def _one_split(source: Any, split: str, config: str | None) -> tuple[list[dict], str]:
    found, described = read_splits(source, config=config)
    return pick_split(found, split, described), described if len(found) == 1 else f"{described} [{split}]"


def build_math_task(
    name: str,
    *,
    default_dir: str,
    splits: tuple[str, ...],
    question_column: str,
    answer_column: str,
    template: str | None,
    default_template: str,
    chat: bool,
    system_prompt: str | None,
    path: Any,
    train_path: Any,
    test_path: Any,
    config: str | None,
    train_split: str,
    test_split: str,
    num_train: int | None,
    num_test: int | None,
    seed: int | None,
    max_new_tokens: int,
    format_weight: float,
    also_train_on: list | tuple = (),
    answer_transform=None,
) -> Task:
    """The shared builder behind ``gsm8k``/``math500``/``aime24``; usable for any question/answer data.
    ``template=None`` means ``default_template``, or the chat template when ``chat``."""
    if template is None:
        template = CHAT_TEMPLATE if chat else default_template
    if "{question}" not in template:
        raise ValueError(f"template must contain '{{question}}', got {template!r}")
    sources = _task_splits(path, default_dir, splits, config, {"train": train_split, "test": test_split})
    if train_path is not None:
        sources["train"] = _one_split(train_path, train_split, config)
    if test_path is not None:
        sources["test"] = _one_split(test_path, test_split, config)
    if "test" not in sources:
        raise ValueError(f"task {name!r}: no test split found in {path!r}")

    def make_rows(split: str) -> tuple[list[dict], str]:
        if split not in sources:
            return [], "none"
        raw, described = sources[split]
        rows = []
        for i, r in enumerate(raw):
            for col in (question_column, answer_column):
                if col not in r:
                    raise KeyError(f"{described} row {i} has no column {col!r} (columns: {sorted(r)})")
            gold = gold_answer(r[answer_column])
            if gold is None:
                raise ValueError(f"{described} row {i}: empty gold answer in column {answer_column!r}")
            if answer_transform is not None:
                gold = answer_transform(gold)
            content = fill_template(template, str(r[question_column]))
            if chat:
                messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
                prompt: Any = messages + [{"role": "user", "content": content}]
            else:
                prompt = content
            rows.append({"prompt": prompt, "answer": gold})
        return rows, described

    train, train_src = make_rows("train")
    for other in also_train_on:  # e.g. the authors' GSM8K + MATH training mix
        extra_task = TASKS.resolve(other)(chat=chat, system_prompt=system_prompt)
        train += extra_task.train
        train_src += f" + {other} train ({extra_task.extra['sources']['train']})"
    test, test_src = make_rows("test")
    train, test = subsample(train, test, seed=seed, num_train=num_train, num_test=num_test)
    rewards: tuple[str, ...] = ("math",)
    weights: tuple[float, ...] | None = None
    if format_weight:
        rewards, weights = ("math", "format"), (1.0, float(format_weight))
    return Task(
        name=name,
        train=train,
        test=test,
        rewards=rewards,
        reward_weights=weights,
        accuracy_reward="math",
        max_new_tokens=max_new_tokens,
        extra={
            "template": template,
            "chat": chat,
            "system_prompt": system_prompt,
            "question_column": question_column,
            "answer_column": answer_column,
            "sources": {"train": train_src, "test": test_src},
            "eval_only": "train" not in sources,
        },
    )


@TASKS.register("gsm8k")
def gsm8k(
    *,
    path: Any = None,
    train_path: Any = None,
    test_path: Any = None,
    config: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    chat: bool = False,
    template: str | None = None,
    system_prompt: str | None = None,
    num_train: int | None = None,
    num_test: int | None = None,
    seed: int | None = None,
    max_new_tokens: int = 512,
    question_column: str = "question",
    answer_column: str = "answer",
    format_weight: float = 0.0,
    also_train_on: list | tuple = (),
) -> Task:
    """GSM8K: 7473 train / 1319 test grade-school word problems with integer answers.

    ``answer_column`` may hold the whole solution (``... #### 72``); rows get ``"72"``.
    ``seed`` shuffles the train rows (before ``num_train`` keeps the first ones); test keeps file order.
    ``format_weight > 0`` adds the ``format`` reward with that weight. ``also_train_on`` (task names, e.g.
    ``[math500]`` with ``train_path`` set there) appends those tasks' train rows, built with the same
    ``chat`` and ``system_prompt``.

    >>> task = gsm8k(num_test=2, num_train=1)
    >>> task.test[0]["answer"], task.test[0]["prompt"].startswith("Question: Janet"), len(task.train)
    ('18', True, 1)
    """
    options = dict(locals())  # the parameters above, passed on unchanged
    return build_math_task("gsm8k", default_dir="gsm8k", splits=("train", "test"), default_template=GSM8K_TEMPLATE,
                           **options)


@TASKS.register("math500")
def math500(
    *,
    path: Any = None,
    train_path: Any = None,
    test_path: Any = None,
    config: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    chat: bool = False,
    template: str | None = None,
    system_prompt: str | None = None,
    num_train: int | None = None,
    num_test: int | None = None,
    seed: int | None = None,
    max_new_tokens: int = 1024,
    question_column: str = "problem",
    answer_column: str = "answer",
    format_weight: float = 0.0,
    also_train_on: list | tuple = (),
) -> Task:
    """MATH-500 (Lightman et al.): 500 competition problems with LaTeX answers. **Eval-only**: train is
    empty unless ``train_path`` is given. ``answer_column="solution"`` takes the gold from the
    solution's last ``\\boxed{}`` instead of the ``answer`` field. ``also_train_on: [gsm8k]`` appends
    GSM8K's train rows (the GVPO authors train on GSM8K + MATH).

    >>> task = math500(num_test=1)
    >>> task.test[0]["answer"], task.train, task.extra["eval_only"]
    ('\\\\left( 3, \\\\frac{\\\\pi}{2} \\\\right)', [], True)
    """
    options = dict(locals())  # the parameters above, passed on unchanged
    return build_math_task("math500", default_dir="math500", splits=("test",), default_template=MATH_TEMPLATE,
                           **options)


def _strip_leading_zeros(answer: str) -> str:
    """AIME answers are integers 0-999 written with leading zeros (``"025"``): ``"25"``."""
    return str(int(answer)) if answer.isdigit() else answer


@TASKS.register("aime24")
def aime24(
    *,
    path: Any = None,
    train_path: Any = None,
    test_path: Any = None,
    config: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    chat: bool = False,
    template: str | None = None,
    system_prompt: str | None = None,
    num_train: int | None = None,
    num_test: int | None = None,
    seed: int | None = None,
    max_new_tokens: int = 2048,
    question_column: str = "problem",
    answer_column: str = "answer",
    format_weight: float = 0.0,
    also_train_on: list | tuple = (),
) -> Task:
    """AIME 2024 I+II: 30 problems, integer answers 0-999 (``"025"`` becomes ``"25"``). **Eval-only**:
    train is empty unless ``train_path`` is given. ``max_new_tokens`` defaults to 2048: AIME solutions
    are long, and a cut-off completion has no final answer.

    >>> task = aime24()
    >>> len(task.test), task.test[0]["answer"], task.train
    (30, '204', [])
    """
    options = dict(locals())  # the parameters above, passed on unchanged
    return build_math_task("aime24", default_dir="aime24", splits=("test",), default_template=MATH_TEMPLATE,
                           answer_transform=_strip_leading_zeros, **options)
