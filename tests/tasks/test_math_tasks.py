"""The ``gsm8k``, ``math500`` and ``aime24`` tasks on the data shipped in the package, and other sources."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from gvpo.data_paths import builtin_data_dir, builtin_file, read_jsonl
from gvpo.rewards import resolve
from gvpo.rewards.math import gold_answer
from gvpo.tasks import TASKS, Task, get_task
from gvpo.tasks.math_tasks import CHAT_TEMPLATE, GSM8K_TEMPLATE, MATH_TEMPLATE


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


TOY = [
    {"question": "What is 1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"},
    {"question": "What is 10*100?", "answer": "#### 1,000"},
]


# ------------------------------------------------------------------------------------------------
# The shipped data.
# ------------------------------------------------------------------------------------------------


def test_registered():
    for name in ("gsm8k", "math500", "aime24"):
        assert name in TASKS


def test_gsm8k_default_rows_match_the_files():
    task = get_task("gsm8k")
    assert isinstance(task, Task) and task.name == "gsm8k"
    raw_test = _jsonl(builtin_file("gsm8k", "test"))
    assert (len(task.train), len(task.test)) == (7473, 1319)
    assert all(set(r) == {"prompt", "answer"} for r in task.train + task.test)
    for row, raw in zip(task.test, raw_test):
        assert row["answer"] == raw["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert row["prompt"] == GSM8K_TEMPLATE.replace("{question}", raw["question"])
    assert all("####" not in r["answer"] and "," not in r["answer"] for r in task.train)
    assert task.rewards == ("math",) and task.accuracy_reward == "math"
    assert task.max_new_tokens == 512
    assert task.extra["eval_only"] is False
    assert task.extra["sources"]["test"].endswith("gsm8k/test.jsonl.gz")
    assert not {r["prompt"] for r in task.test} & {r["prompt"] for r in task.train}  # disjoint


def test_math500_and_aime24_are_eval_only():
    m = get_task("math500")
    raw = _jsonl(builtin_file("math500", "test"))
    assert (len(m.train), len(m.test), m.extra["eval_only"], m.max_new_tokens) == (0, 500, True, 1024)
    assert [r["answer"] for r in m.test] == [gold_answer(r["answer"]) for r in raw]
    # that is the data's answer field, less a "\\$" (e.g. "\\$18.90" -> "18.90") or thousands commas
    changed = [(r["answer"], t["answer"]) for r, t in zip(raw, m.test) if r["answer"] != t["answer"]]
    assert 0 < len(changed) < 10, changed
    assert all(t in (r.replace("\\$", "").strip(), r.replace(",", "")) for r, t in changed), changed
    assert m.test[0]["prompt"] == MATH_TEMPLATE.replace("{question}", raw[0]["problem"])

    a = get_task("aime24")
    raw = _jsonl(builtin_file("aime24", "test"))
    assert (len(a.train), len(a.test), a.extra["eval_only"], a.max_new_tokens) == (0, 30, True, 2048)
    assert [r["answer"] for r in a.test] == [str(int(r["answer"])) for r in raw]  # "025" -> "25"
    assert any(r["answer"].startswith("0") for r in raw)


def test_math500_gold_from_the_solution_column():
    by_answer = get_task("math500", num_test=50)
    by_solution = get_task("math500", num_test=50, answer_column="solution")
    n = 50
    scores = resolve("math")(
        ["Q"] * n, [rf"\boxed{{{r['answer']}}}" for r in by_solution.test], answer=[r["answer"] for r in by_answer.test]
    )
    assert scores == [1.0] * n


def test_rows_score_with_the_task_reward():
    task = get_task("gsm8k", num_test=20, num_train=0)
    reward = resolve(task.rewards[0])
    good = [f"Let me see.\n#### {r['answer']}" for r in task.test]
    bad = [f"\\boxed{{{int(r['answer']) + 1}}}" for r in task.test]
    assert reward([r["prompt"] for r in task.test], good, answer=[r["answer"] for r in task.test]) == [1.0] * 20
    assert reward([r["prompt"] for r in task.test], bad, answer=[r["answer"] for r in task.test]) == [0.0] * 20


# ------------------------------------------------------------------------------------------------
# Options: templates, chat mode, limits, sources.
# ------------------------------------------------------------------------------------------------


def test_chat_mode_builds_messages_with_a_boxed_instruction():
    task = get_task("math500", chat=True, num_test=2)
    prompt = task.test[0]["prompt"]
    assert isinstance(prompt, list) and [m["role"] for m in prompt] == ["user"]
    assert "\\boxed{}" in prompt[0]["content"] and prompt[0]["content"].startswith("Convert the point")
    assert prompt[0]["content"] == CHAT_TEMPLATE.replace(
        "{question}", _jsonl(builtin_file("math500", "test"))[0]["problem"]
    )
    task = get_task("gsm8k", chat=True, system_prompt="Be brief.", num_test=1, num_train=1)
    assert [m["role"] for m in task.test[0]["prompt"]] == ["system", "user"]
    assert task.test[0]["prompt"][0]["content"] == "Be brief."
    assert task.extra["chat"] is True


def test_custom_template_needs_no_brace_escaping():
    task = get_task("gsm8k", template="Q: {question}\nEnd with \\boxed{} please.\nA:", num_test=1, num_train=0)
    assert task.test[0]["prompt"].endswith("\nEnd with \\boxed{} please.\nA:")
    assert task.test[0]["prompt"].startswith("Q: Janet")
    with pytest.raises(ValueError, match="question"):
        get_task("gsm8k", template="no placeholder")


def test_limits_and_seed():
    a = get_task("gsm8k", num_train=5, num_test=3)
    assert (len(a.train), len(a.test)) == (5, 3)
    s1 = get_task("gsm8k", num_train=5, num_test=1, seed=1)
    s2 = get_task("gsm8k", num_train=5, num_test=1, seed=1)
    assert s1.train == s2.train != a.train
    assert s1.test == a.test[:1]  # the seed shuffles train only


def test_path_as_a_folder_a_file_a_dataset_and_a_dict(tmp_path):
    import datasets

    _write_jsonl(tmp_path / "d" / "train.jsonl", TOY)
    _write_jsonl(tmp_path / "d" / "test.jsonl", TOY[:1])
    task = get_task("gsm8k", path=str(tmp_path / "d"))
    assert [r["answer"] for r in task.train] == ["2", "1000"] and [r["answer"] for r in task.test] == ["2"]

    # a single file is the test split; the task is then eval-only unless train_path is given
    task = get_task("gsm8k", path=tmp_path / "d" / "train.jsonl")
    assert (len(task.train), len(task.test), task.extra["eval_only"]) == (0, 2, True)
    task = get_task("gsm8k", path=tmp_path / "d" / "test.jsonl", train_path=tmp_path / "d" / "train.jsonl")
    assert (len(task.train), len(task.test), task.extra["eval_only"]) == (2, 1, False)

    ds = datasets.Dataset.from_list(TOY)
    task = get_task("gsm8k", path=ds)
    assert [r["answer"] for r in task.test] == ["2", "1000"]
    task = get_task("gsm8k", path=datasets.DatasetDict({"train": ds, "test": ds.select([1])}))
    assert (len(task.train), [r["answer"] for r in task.test]) == (2, ["1000"])
    task = get_task("gsm8k", path={"train": TOY, "test": TOY})
    assert len(task.train) == len(task.test) == 2

    ds.to_parquet(str(tmp_path / "toy.parquet"))
    task = get_task("gsm8k", path=tmp_path / "toy.parquet")
    assert [r["answer"] for r in task.test] == ["2", "1000"]

    (tmp_path / "toy.json").write_text(json.dumps(TOY), encoding="utf-8")  # a JSON array
    assert len(get_task("gsm8k", path=tmp_path / "toy.json").test) == 2


def test_math500_with_a_train_path_and_custom_columns(tmp_path):
    rows = [{"q": "What is 1/2 as a decimal?", "sol": r"It is $\boxed{0.5}$."}]
    f = _write_jsonl(tmp_path / "custom.jsonl", rows)
    task = get_task("math500", path=f, train_path=f, question_column="q", answer_column="sol")
    assert task.train == task.test == [{"prompt": MATH_TEMPLATE.replace("{question}", rows[0]["q"]), "answer": "0.5"}]
    assert task.extra["eval_only"] is False


def test_bad_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        get_task("gsm8k", path=tmp_path / "missing.jsonl")
    _write_jsonl(tmp_path / "only-train" / "train.jsonl", TOY)
    with pytest.raises(KeyError, match=r"no split 'test' \(task.options.test_split\); its splits: train"):
        get_task("gsm8k", path=tmp_path / "only-train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        get_task("gsm8k", path=tmp_path / "empty")
    f = _write_jsonl(tmp_path / "x.jsonl", [{"problem": "p"}])
    with pytest.raises(KeyError, match="answer"):
        get_task("math500", path=f)
    f = _write_jsonl(tmp_path / "y.jsonl", [{"problem": "p", "answer": "  "}])
    with pytest.raises(ValueError, match="empty gold"):
        get_task("math500", path=f)


def test_format_weight_adds_the_format_reward():
    task = get_task("gsm8k", format_weight=0.1, num_test=1, num_train=0)
    assert task.rewards == ("math", "format") and task.reward_weights == (1.0, 0.1)
    assert task.accuracy_reward == "math"


# ------------------------------------------------------------------------------------------------
# The shipped files.
# ------------------------------------------------------------------------------------------------


def test_builtin_files_are_in_the_package():
    import gvpo

    d = builtin_data_dir()
    assert d.is_relative_to(Path(gvpo.__file__).parent)
    assert sorted(p.name for p in d.glob("*/*.jsonl.gz")) == ["test.jsonl.gz"] * 3 + ["train.jsonl.gz"]
    assert len(read_jsonl(builtin_file("gsm8k", "train"))) == 7473
    with pytest.raises(FileNotFoundError, match="shipped: \\['test.jsonl.gz'\\]"):
        builtin_file("math500", "train")


def test_also_train_on_appends_another_tasks_train_rows_in_the_same_prompt_format():
    """The authors' GSM8K + MATH mix: MATH rows (here MATH-500's file as the train source) then GSM8K's
    7,473 train rows, both as chat prompts, each with its own gold answer; held-out rows unchanged."""
    plain = get_task("math500", chat=True)
    mixed = get_task("math500", chat=True, train_path=str(builtin_file("math500", "test")), also_train_on=["gsm8k"])
    gsm8k = get_task("gsm8k", chat=True)
    assert len(mixed.train) == 500 + 7473 and mixed.test == plain.test
    assert mixed.train[500:] == gsm8k.train
    assert all(isinstance(r["prompt"], list) and r["answer"] for r in mixed.train)
    assert "gsm8k train" in mixed.extra["sources"]["train"]
