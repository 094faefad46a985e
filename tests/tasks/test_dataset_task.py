"""The ``dataset`` task and :func:`gvpo.data_paths.read_splits`: every source kind on local files (there is
no network here, so hub ids are tested through the same ``datasets.load_dataset`` call on local data
files, a stand-in ``load_dataset`` that checks the arguments, and the real offline error)."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from gvpo.data_paths import read_splits
from gvpo.tasks import get_task
from gvpo.tasks.dataset import hold_out

ROWS = [{"prompt": f"Q: {a}+1= A:", "answer": str(a + 1), "level": a % 3} for a in range(10)]
CHAT_ROWS = [{"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{a}+1"}],
              "answer": str(a + 1)} for a in range(4)]


def _jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_every_local_source_kind_gives_the_same_rows(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    sources = {
        "jsonl": _jsonl(tmp_path / "r.jsonl", ROWS),
        "jsonl.gz": _jsonl(tmp_path / "r.jsonl.gz", ROWS, gz=True),
        "json": tmp_path / "r.json",
        "parquet": tmp_path / "r.parquet",
        "saved": tmp_path / "saved",
        "list": ROWS,
        "Dataset": ds,
        "load_dataset mapping": {"path": "json", "data_files": str(tmp_path / "r.jsonl")},
    }
    sources["json"].write_text(json.dumps(ROWS), encoding="utf-8")
    ds.to_parquet(str(sources["parquet"]))
    ds.save_to_disk(str(sources["saved"]))
    for kind, source in sources.items():
        found, described = read_splits(source)
        assert found == {"train": ROWS}, kind
    # csv: every value is text unless it looks numeric; datasets infers the column types
    with open(tmp_path / "r.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "answer", "level"])
        w.writeheader()
        w.writerows(ROWS)
    found, _ = read_splits(tmp_path / "r.csv")
    assert [r["prompt"] for r in found["train"]] == [r["prompt"] for r in ROWS]
    assert [r["level"] for r in found["train"]] == [r["level"] for r in ROWS]


def test_split_sources(tmp_path):
    import datasets

    _jsonl(tmp_path / "folder" / "train.jsonl", ROWS[:8])
    _jsonl(tmp_path / "folder" / "test.jsonl.gz", ROWS[8:], gz=True)
    found, _ = read_splits(tmp_path / "folder")
    assert found == {"train": ROWS[:8], "test": ROWS[8:]}

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:8]),
                               "validation": datasets.Dataset.from_list(ROWS[8:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    for source in (dd, tmp_path / "dd"):
        found, _ = read_splits(source)
        assert found == {"train": ROWS[:8], "validation": ROWS[8:]}
    found, _ = read_splits({"path": "json", "data_files": {"train": str(tmp_path / "folder" / "train.jsonl")},
                            "split": "train"})
    assert found == {"train": ROWS[:8]}


def test_hub_ids_go_to_load_dataset_with_config_and_split(monkeypatch):
    import datasets

    seen = []

    def fake_load_dataset(**kwargs):
        seen.append(kwargs)
        rows = ROWS if kwargs["path"] != "someone/word-problems" else [
            {"question": r["prompt"], "answer": r["answer"]} for r in ROWS]
        dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]),
                                   "test": datasets.Dataset.from_list(rows[8:])})
        return dd[kwargs["split"]] if "split" in kwargs else dd

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    found, described = read_splits("EleutherAI/hendrycks_math", config="algebra")
    assert seen[-1] == {"path": "EleutherAI/hendrycks_math", "name": "algebra"}
    assert found == {"train": ROWS[:8], "test": ROWS[8:]} and "hendrycks_math" in described
    found, _ = read_splits({"path": "openai/gsm8k", "name": "main", "split": "test"})
    assert seen[-1] == {"path": "openai/gsm8k", "name": "main", "split": "test"} and found == {"test": ROWS[8:]}

    task = get_task("dataset", path="someone/adds", rewards=["exact_match"])  # train, and the hub's test split
    assert (task.train, task.test) == ([{"prompt": r["prompt"], "answer": r["answer"], "level": r["level"]}
                                        for r in ROWS[:8]], ROWS[8:])
    task = get_task("gsm8k", train_path="someone/word-problems", config="main")  # the hub's train split
    assert seen[-1] == {"path": "someone/word-problems", "name": "main"}
    assert [r["answer"] for r in task.train] == [r["answer"] for r in ROWS[:8]] and len(task.test) == 1319


def test_hub_id_without_network_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError) as err:
        read_splits("gvpo-tests/no-such-dataset", config="main")
    text = str(err.value)
    assert "datasets.load_dataset(path='gvpo-tests/no-such-dataset', name='main').save_to_disk('DIR')" in text
    assert "pass DIR as the path" in text
    with pytest.raises(FileNotFoundError, match="not a file, not a folder"):
        read_splits("no/such/file.jsonl")


def test_dataset_task_rows_columns_and_held_out(tmp_path):
    path = _jsonl(tmp_path / "r.jsonl", ROWS)
    task = get_task("dataset", path=str(path), rewards=["exact_match"])
    assert task.rewards == ("exact_match",) and task.accuracy_reward is None
    assert len(task.train) == 9 and len(task.test) == 1  # test_size=0.1 of 10, held out of the file
    assert sorted(r["prompt"] for r in task.train + task.test) == sorted(r["prompt"] for r in ROWS)
    assert all(set(r) == {"prompt", "answer", "level"} for r in task.train)

    _jsonl(tmp_path / "q.jsonl", [{"question": r["prompt"], "answer": r["answer"]} for r in ROWS])
    task = get_task("dataset", path=str(tmp_path / "q.jsonl"), prompt_column="question", rewards=["exact_match"],
                    test_path=str(tmp_path / "q.jsonl"), num_test=3, test_size=0, seed=1, reward_weights=[2.0])
    assert len(task.train) == 10 and task.test == [{"prompt": r["prompt"], "answer": r["answer"]} for r in ROWS[:3]]
    assert task.reward_weights == (2.0,) and sorted(r["prompt"] for r in task.train) == sorted(r["prompt"] for r in ROWS)
    assert [r["prompt"] for r in task.train] != [r["prompt"] for r in ROWS]  # seed shuffles train

    _jsonl(tmp_path / "s" / "train.jsonl", ROWS[:6])
    _jsonl(tmp_path / "s" / "validation.jsonl", ROWS[6:8])
    _jsonl(tmp_path / "s" / "extra.jsonl", ROWS[8:])
    task = get_task("dataset", path=str(tmp_path / "s"), train_split=["train", "extra"], test_split="validation",
                    rewards=["exact_match"])
    assert (task.train, task.test) == (ROWS[:6] + ROWS[8:], ROWS[6:8])


def test_conversational_prompts(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    task = get_task("dataset", path=str(path), prompt_column="messages", rewards=["exact_match"], test_size=1)
    assert task.extra["conversational"] is True
    assert all(r["prompt"][1]["role"] == "user" and set(r) == {"prompt", "answer"} for r in task.train + task.test)


def test_dataset_task_errors_name_the_option_and_row(tmp_path):
    path = _jsonl(tmp_path / "r.jsonl", ROWS)
    with pytest.raises(ValueError, match="task.options.rewards"):
        get_task("dataset", path=str(path))
    with pytest.raises(ValueError, match="task.options.path"):
        get_task("dataset", rewards=["exact_match"])
    with pytest.raises(KeyError, match=r"row 0 has no column 'question' \(task.options.prompt_column\)"):
        get_task("dataset", path=str(path), prompt_column="question", rewards=["exact_match"])
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": [{"content": "no role"}]}])
    with pytest.raises(ValueError, match="bad.jsonl row 1: a prompt must be a string or a list"):
        get_task("dataset", path=str(bad), rewards=["exact_match"], test_size=0)
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}])
    with pytest.raises(ValueError, match="some prompts are strings"):
        get_task("dataset", path=str(mixed), rewards=["exact_match"], test_size=0)
    _jsonl(tmp_path / "s" / "train.jsonl", ROWS)
    _jsonl(tmp_path / "s" / "dev.jsonl", ROWS)
    with pytest.raises(KeyError, match=r"no split 'training' \(task.options.train_split\); its splits: dev, train"):
        get_task("dataset", path=str(tmp_path / "s"), train_split="training", rewards=["exact_match"])
    with pytest.raises(ValueError, match="test_size=10 holds out 10 of 10"):
        hold_out(ROWS, 10)
