"""Offline grouped-response data: formats, layouts, validation messages, presets, CLI, ref-logp cache."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from gvpo.data import (
    PRESETS,
    DataError,
    OfflineColumns,
    OfflineGroup,
    RefLogpCache,
    check,
    fingerprint_file,
    fingerprint_model,
    format_summary,
    load_offline,
    main_check,
)

DATA_DIR = Path(__file__).resolve().parent / "data"  # the rated files, see each folder's SOURCE.md
GSM8K_SOLUTIONS = DATA_DIR / "gsm8k_model_solutions" / "example_model_solutions.head300.jsonl"
QWEN_RM8 = DATA_DIR / "qwen25_math_rm8" / "math_cot_100.jsonl"

GROUPED = [
    {"prompt": "1+1=", "completions": ["2", "3", "11"], "rewards": [1.0, 0.0, 0.0], "answer": "2"},
    {"prompt": "2+2=", "completions": ["4", "5"], "rewards": [1, 0], "answer": "4"},
    {"prompt": [{"role": "user", "content": "3+3="}], "completions": ["6", "7", "8", "9"],
     "rewards": [True, False, False, False]},
]


def write_jsonl(path: Path, rows) -> Path:
    """Rows are dicts (dumped) or raw str/bytes lines written as they are."""
    with open(path, "wb") as f:
        for r in rows:
            if isinstance(r, dict):
                r = json.dumps(r)
            f.write((r.encode() if isinstance(r, str) else r) + b"\n")
    return path


def problems_of(source, **kw) -> list[str]:
    with pytest.raises(DataError) as info:
        load_offline(source, **kw)
    return info.value.problems


def one_problem(source, **kw) -> str:
    problems = problems_of(source, **kw)
    assert len(problems) == 1, problems
    return problems[0]


# ------------------------------------------------------------------------------------------------
# Formats and layouts


def test_grouped_jsonl_variable_k(tmp_path):
    groups, s = load_offline(write_jsonl(tmp_path / "g.jsonl", GROUPED))
    assert [g.k for g in groups] == [3, 2, 4]
    assert isinstance(groups[0], OfflineGroup)
    assert groups[0].extra == {"answer": "2"} and groups[0].source == "line 1"
    assert groups[2].prompt == [{"role": "user", "content": "3+3="}]
    assert groups[2].rewards == [1.0, 0.0, 0.0, 0.0]  # bools read as 1.0 / 0.0
    assert (s.layout, s.file_format, s.rows, s.prompts, s.completions) == ("grouped", "jsonl", 3, 3, 9)
    assert s.k_histogram == {2: 1, 3: 1, 4: 1}
    assert (s.reward_min, s.reward_max) == (0.0, 1.0) and s.reward_mean == pytest.approx(3 / 9)
    assert s.skipped_groups == {} and s.constant_reward_groups == 0 and s.duplicate_prompts == 0
    _, s = load_offline(GROUPED + [{"prompt": "2+2=", "completions": ["4", "four"], "rewards": [1, 1]}])
    assert (s.prompts, s.duplicate_prompts, s.constant_reward_groups) == (4, 1, 1)
    assert "duplicate prompts: 1" in format_summary(s)


def test_json_parquet_dataset_list_and_disk_give_the_same_groups(tmp_path):
    import datasets

    rows = [dict(r) for r in GROUPED[:2]]  # parquet/arrow need one type per column
    expected, _ = load_offline(rows)
    (tmp_path / "g.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "g.parquet"))
    ds.save_to_disk(str(tmp_path / "g_ds"))
    for source, fmt in [(tmp_path / "g.json", "json"), (tmp_path / "g.parquet", "parquet"), (ds, "dataset"),
                        (tmp_path / "g_ds", "dataset"), (rows, "rows")]:
        groups, s = load_offline(source)
        assert s.file_format == fmt
        assert [(g.prompt, g.completions, g.rewards, g.extra) for g in groups] == \
               [(g.prompt, g.completions, g.rewards, g.extra) for g in expected], fmt


def test_file_format_override_and_jsonl_saved_as_json(tmp_path):
    write_jsonl(tmp_path / "rows.txt", GROUPED)
    assert "extension '.txt'" in one_problem(tmp_path / "rows.txt")
    assert check(tmp_path / "rows.txt", file_format="jsonl").prompts == 3
    write_jsonl(tmp_path / "rows.json", GROUPED)  # JSON lines under a .json name
    assert check(tmp_path / "rows.json").prompts == 3


def test_flat_rows_grouped_by_prompt_and_chat_prompt_canonical(tmp_path):
    rows = [
        {"prompt": "a", "completion": "x", "reward": 1, "id": 0},
        {"prompt": [{"role": "user", "content": "b"}], "completion": "p", "reward": 0.5, "id": 1},
        {"prompt": "a", "completion": "y", "reward": 0, "id": 2},
        {"prompt": [{"content": "b", "role": "user"}], "completion": "q", "reward": -0.5, "id": 3},  # same chat
        {"prompt": "lonely", "completion": "z", "reward": 1, "id": 4},
        {"prompt": "a", "completion": "w", "reward": 2, "id": 5},
    ]
    groups, s = load_offline(write_jsonl(tmp_path / "f.jsonl", rows))
    assert s.layout == "flat"
    assert [(g.completions, g.rewards) for g in groups] == [(["x", "y", "w"], [1.0, 0.0, 2.0]),
                                                           (["p", "q"], [0.5, -0.5])]
    assert groups[0].extra == {"id": [0, 2, 5]} and groups[0].source == "lines 1, 3, 6"
    assert s.skipped_groups == {"k=1": 1} and s.k_histogram == {2: 1, 3: 1}
    text = format_summary(s)
    assert "k=2: 1  k=3: 1" in text and "1  groups with k=1" in text


def test_layout_auto_and_forced(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", GROUPED)
    assert check(path, format="grouped").layout == "grouped"
    msg = problems_of(path, format="flat")[0]  # forcing flat on grouped rows says what is missing
    assert "missing field 'completion' (did you mean 'completions'?)" in msg and msg.startswith("all 3 rows")


def test_column_mapping_and_dotted_names(tmp_path):
    rows = [{"q": "1+1=", "outs": {"texts": ["2", "3"], "scores": [1, 0]}},
            {"q": "2+2=", "outs": {"texts": ["4", "5"], "scores": [1, 0]}}]
    cols = OfflineColumns(prompt="q", completions="outs.texts", rewards="outs.scores")
    groups, s = load_offline(write_jsonl(tmp_path / "m.jsonl", rows), columns=cols)
    assert s.layout == "grouped" and groups[1].completions == ["4", "5"] and groups[1].extra == {"outs": rows[1]["outs"]}
    flat = [{"question": "a", "sol": "x", "is_correct": True}, {"question": "a", "sol": "y", "is_correct": False}]
    g, s = load_offline(flat, columns=OfflineColumns(prompt="question", completion="sol", reward="is_correct"))
    assert s.layout == "flat" and g[0].rewards == [1.0, 0.0]


# ------------------------------------------------------------------------------------------------
# Validation: every problem, each naming its line/row and field


def test_invalid_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [GROUPED[0], '{"prompt": "x", "completions": [', GROUPED[1]])
    msg = one_problem(path)
    assert msg.startswith("line 2: invalid JSON")
    (tmp_path / "b.json").write_text('[\n{"prompt": "x"},\n{"prompt": }\n]')
    assert one_problem(tmp_path / "b.json").startswith("line 3: invalid JSON")


def test_non_object_rows(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [GROUPED[0], "[1, 2]", GROUPED[1]])
    assert one_problem(path) == "line 2: expected a JSON object, got list"
    (tmp_path / "b.json").write_text('{"prompt": "x"}')
    assert "expected a JSON list of row objects" in one_problem(tmp_path / "b.json")


def test_missing_field_suggests_closest(tmp_path):
    bad = {"prompt": "x", "completions": ["a", "b"], "reward": [1, 0]}
    path = write_jsonl(tmp_path / "b.jsonl", [GROUPED[0], GROUPED[1], bad])
    assert one_problem(path) == "line 3: missing field 'rewards' (did you mean 'reward'?)"
    bad = {"promt": "x", "completions": ["a", "b"], "rewards": [1, 0]}
    assert one_problem([GROUPED[0], bad]) == "row 1: missing field 'prompt' (did you mean 'promt'?)"


def test_field_missing_from_every_row_is_said_once_with_the_flag(tmp_path):
    rows = [{"prompt": f"p{i}", "completions": ["a", "b"], "reward": [1, 0]} for i in range(30)]
    msg = one_problem(write_jsonl(tmp_path / "b.jsonl", rows))
    assert msg.startswith("all 30 rows: missing field 'rewards' (did you mean 'reward'?)")
    assert "--rewards-column" in msg


@pytest.mark.parametrize(
    "rewards, expected",
    [
        ([1, None], "field 'rewards[1]' is null"),
        ([1, "0.5"], "field 'rewards[1]' must be a number, got str '0.5'"),
        ([1, float("nan")], "field 'rewards[1]' is NaN"),
        ([float("inf"), 0], "field 'rewards[0]' is infinite"),
        ([1, [0.5]], "field 'rewards[1]' must be a number, got list"),
        ("1,0", "field 'rewards' must be a list, got str"),
    ],
)
def test_bad_rewards(tmp_path, rewards, expected):
    bad = {"prompt": "x", "completions": ["a", "b"], "rewards": rewards}
    msg = one_problem(write_jsonl(tmp_path / "b.jsonl", [GROUPED[0], bad]))  # json.dumps writes NaN/Infinity
    assert msg.startswith(f"line 2: {expected}"), msg


def test_length_mismatch(tmp_path):
    bad = {"prompt": "x", "completions": ["a", "b", "c"], "rewards": [1, 0]}
    assert one_problem(write_jsonl(tmp_path / "b.jsonl", [bad, GROUPED[0]])) == (
        "line 1: fields 'completions' and 'rewards' have different lengths (3 completions, 2 rewards)")


def test_empty_prompt_and_completion(tmp_path):
    rows = [GROUPED[0],
            {"prompt": "  ", "completions": ["a", "b"], "rewards": [1, 0]},
            {"prompt": "y", "completions": ["a", ""], "rewards": [1, 0]},
            {"prompt": [], "completions": ["a", "b"], "rewards": [1, 0]},
            {"prompt": [{"role": "user", "content": ""}], "completions": ["a", "b"], "rewards": [1, 0]},
            {"prompt": [{"role": "user"}], "completions": ["a", "b"], "rewards": [1, 0]},
            {"prompt": "z", "completions": ["a", 3], "rewards": [1, 0]},
            {"prompt": "w", "completions": [], "rewards": []}]
    assert problems_of(write_jsonl(tmp_path / "b.jsonl", rows)) == [
        "line 2: field 'prompt' is empty",
        "line 3: field 'completions[1]' is empty",
        "line 4: field 'prompt' is empty (no messages)",
        "line 5: field 'prompt' is empty (every message has empty content)",
        "line 6: missing field 'prompt[0].content'",
        "line 7: field 'completions[1]' must be a string, got int",
        "line 8: field 'completions' is an empty list",
    ]


def test_non_utf8_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [GROUPED[0], b'{"prompt": "caf\xe9", "completions": ["a", "b"], '
                                              b'"rewards": [1, 0]}', GROUPED[1]])
    assert one_problem(path) == "line 2: not valid UTF-8 (byte 0xe9 at column 16)"
    (tmp_path / "b.json").write_bytes(b'[\n{"prompt": "ok"},\n{"prompt": "\xff"}\n]')
    assert one_problem(tmp_path / "b.json").startswith("line 3: not valid UTF-8")


def test_all_problems_collected_and_capped(tmp_path):
    rows = [{"prompt": f"p{i}", "completions": ["a", "b"], "rewards": [1, "x"]} for i in range(25)]
    rows.insert(3, "not json")
    with pytest.raises(DataError) as info:
        load_offline(write_jsonl(tmp_path / "b.jsonl", rows))
    err = info.value
    assert isinstance(err, ValueError) and err.total == 26 and len(err.problems) == 26
    assert "line 4: invalid JSON" in err.problems[3] and err.problems[4].startswith("line 5: field 'rewards[1]'")
    text = str(err)
    assert text.startswith("26 problems in b.jsonl:") and text.endswith("... and 6 more")
    assert text.count("\n  line ") == 20


def test_row_index_for_parquet_and_dataset(tmp_path):
    import datasets

    rows = [{"prompt": "a", "completions": ["x", "y"], "rewards": [1.0, 0.0]},
            {"prompt": "b", "completions": ["x", "y"], "rewards": [1.0, float("nan")]}]
    ds = datasets.Dataset.from_list(rows)
    assert one_problem(ds) == "row 1: field 'rewards[1]' is NaN"
    ds.to_parquet(str(tmp_path / "b.parquet"))
    assert one_problem(tmp_path / "b.parquet") == "row 1: field 'rewards[1]' is NaN"
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    assert one_problem(tmp_path / "junk.parquet").startswith("file: cannot read parquet")


def test_k1_groups_skipped_and_error_only_when_nothing_left(tmp_path):
    rows = GROUPED + [{"prompt": "solo", "completions": ["a"], "rewards": [1]}]
    groups, s = load_offline(rows)
    assert len(groups) == 3 and s.skipped_groups == {"k=1": 1}
    msg = one_problem([{"prompt": "solo", "completions": ["a"], "rewards": [1]}])
    assert "no group with k >= 2" in msg and "1 k=1" in msg
    flat = [{"prompt": f"p{i}", "completion": "c", "reward": 1} for i in range(3)]
    assert "grouped by the right prompt column" in one_problem(flat)


def test_missing_file_and_empty_file(tmp_path):
    assert "no such file" in one_problem(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    assert one_problem(tmp_path / "e.jsonl") == "no rows"


# ------------------------------------------------------------------------------------------------
# Length limits


class WordTokenizer:
    """One token per whitespace-separated word; enough to test the limits without a download."""

    def encode(self, text, add_special_tokens=False):
        return text.split()


def test_too_long_skipped_and_counted():
    rows = [{"prompt": "short prompt", "completions": ["one", "two words", "three words here"], "rewards": [1, 0, 0]},
            {"prompt": "a very long prompt indeed", "completions": ["a", "b"], "rewards": [1, 0]},
            {"prompt": "p", "completions": ["a b c", "d e f", "g"], "rewards": [1, 0, 0]},
            {"prompt": "q", "completions": ["a", "b"], "rewards": [1, 0]}]
    groups, s = load_offline(rows, tokenizer=WordTokenizer(), max_prompt_tokens=3, max_completion_tokens=2)
    assert [g.completions for g in groups] == [["one", "two words"], ["a", "b"]]
    assert s.skipped_groups == {"prompt_too_long": 1, "k<2_after_length_filter": 1}
    assert s.skipped_completions == {"completion_too_long": 3}
    assert "3  completions over max_completion_tokens" in format_summary(s)


def test_too_long_error_names_line_and_field(tmp_path):
    rows = [{"prompt": "a very long prompt indeed", "completions": ["a", "b"], "rewards": [1, 0]},
            {"prompt": "p", "completions": ["a", "b c d"], "rewards": [1, 0]}]
    problems = problems_of(write_jsonl(tmp_path / "l.jsonl", rows), tokenizer=WordTokenizer(),
                           max_prompt_tokens=3, max_completion_tokens=2, on_too_long="error")
    assert problems == ["line 1: field 'prompt' is 5 tokens, over max_prompt_tokens=3",
                        "line 2: field 'completions[1]' is 3 tokens, over max_completion_tokens=2"]
    flat = [{"prompt": "p", "completion": "a", "reward": 1}, {"prompt": "p", "completion": "b c d", "reward": 0}]
    assert problems_of(flat, tokenizer=WordTokenizer(), max_completion_tokens=2, on_too_long="error") == [
        "row 1: field 'completion' is 3 tokens, over max_completion_tokens=2"]
    with pytest.raises(ValueError, match="need a tokenizer"):
        load_offline(rows, max_completion_tokens=2)


# ------------------------------------------------------------------------------------------------
# Presets and the real files


def _need(path: Path) -> Path:
    assert path.is_file(), f"test data missing: {path}"
    return path


def test_real_qwen25_math_rm8():
    groups, s = load_offline(_need(QWEN_RM8), preset="qwen25_math_rm8")
    assert (s.rows, s.prompts, s.completions, s.k_histogram) == (100, 100, 800, {8: 100})
    assert s.reward_min == pytest.approx(-4.28125) and s.reward_max == pytest.approx(6.09375)
    assert s.constant_reward_groups == 0 and s.skipped_groups == {}
    g = groups[0]
    assert [m["role"] for m in g.prompt] == ["system", "user"] and g.rewards[0] == 3.546875
    assert g.extra["gt"] == "420"
    v = check(QWEN_RM8, preset="qwen25_math_rm8_verifier")
    assert (v.prompts, v.k_histogram, v.reward_min, v.reward_max) == (100, {8: 100}, 0.0, 1.0)
    assert v.reward_mean == pytest.approx(0.91) and v.constant_reward_groups == 90


def test_real_gsm8k_model_solutions():
    groups, s = load_offline(_need(GSM8K_SOLUTIONS), preset="gsm8k_model_solutions")
    assert (s.rows, s.prompts, s.completions, s.k_histogram) == (300, 300, 1200, {4: 300})
    assert (s.reward_min, s.reward_max) == (0.0, 1.0)
    correct = [int(sum(g.rewards)) for g in groups]  # SOURCE.md: 0->101, 1->59, 2->49, 3->49, 4->42
    assert [correct.count(i) for i in range(5)] == [101, 59, 49, 49, 42]
    assert s.constant_reward_groups == 101 + 42
    assert groups[0].rewards == [0.0, 0.0, 0.0, 1.0] and groups[0].prompt.startswith("Janet")


def test_preset_problems_name_the_raw_field(tmp_path):
    good = {"question": "q", "ground_truth": "A: 1",
            **{m: {"solution": "s", "is_correct": True}
               for m in ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")}}
    bad_missing = json.loads(json.dumps(good))
    bad_missing["175b_verification"] = {"solution": "s", "correct": True}
    bad_empty = json.loads(json.dumps(good))
    bad_empty["6b_verification"]["solution"] = ""
    path = write_jsonl(tmp_path / "gsm.jsonl", [good, bad_missing, bad_empty])
    assert problems_of(path, preset="gsm8k_model_solutions") == [
        "line 2: missing field '175b_verification.is_correct' (did you mean '175b_verification.correct'?)",
        "line 3: field '6b_verification.solution' is empty",
    ]
    qwen = {"query": "q", "system": "s", "response": ["a", "b"], "pred_score": [[1.0], ["x"]]}
    assert problems_of([qwen], preset="qwen25_math_rm8") == [
        "row 0: field 'pred_score[1][0]' must be a number, got str 'x'"]
    with pytest.raises(ValueError, match="unknown offline data preset 'nope'"):
        load_offline([qwen], preset="nope")
    with pytest.raises(DataError) as info:  # without the preset: a hint names it
        load_offline([good, good])
    assert "\nhint: these rows look like preset 'gsm8k_model_solutions'" in str(info.value)
    assert info.value.total == 3 and pickle.loads(pickle.dumps(info.value)).hint == info.value.hint
    assert set(PRESETS.names()) >= {"gsm8k_model_solutions", "qwen25_math_rm8", "qwen25_math_rm8_verifier"}


# ------------------------------------------------------------------------------------------------
# CLI entry (wired as `gvpo data check`)


def test_main_check_ok_and_errors(tmp_path, capsys):
    path = write_jsonl(tmp_path / "g.jsonl", GROUPED)
    assert main_check([str(path)]) == 0
    out = capsys.readouterr().out
    assert "prompts:      3" in out and "k=2: 1  k=3: 1  k=4: 1" in out and "min 0  max 1" in out

    renamed = [{"q": r["prompt"], "c": r["completions"], "r": r["rewards"]} for r in GROUPED]
    rpath = write_jsonl(tmp_path / "r.jsonl", renamed)
    assert main_check([str(rpath), "--prompt-column", "q", "--completions-column", "c", "--rewards-column", "r",
                       "--format", "grouped", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completions"] == 9

    bad = write_jsonl(tmp_path / "b.jsonl", [GROUPED[0], {"prompt": "x", "completions": ["a"], "reward": [1]}])
    assert main_check([str(bad)]) == 1
    err = capsys.readouterr().err
    assert "1 problem in b.jsonl" in err and "line 2: missing field 'rewards' (did you mean 'reward'?)" in err

    assert main_check(["--list-presets"]) == 0
    assert "qwen25_math_rm8:" in capsys.readouterr().out
    assert main_check([str(path), "--preset", "nope"]) == 1
    with pytest.raises(SystemExit):
        main_check(["--help"])
    assert "--max-completion-tokens" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Reference log-prob cache


def test_ref_logp_cache_hits_and_keys(tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, GROUPED)
    model = torch.nn.Linear(3, 2)
    torch.manual_seed(0)
    cache = RefLogpCache(tmp_path / "cache")
    parts = {"model": fingerprint_model(model), "data": fingerprint_file(data), "settings": {"max_len": 8}}
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(9)

    first = cache.get_or_compute(parts, compute)
    second = cache.get_or_compute(parts, compute)
    assert len(calls) == 1 and torch.equal(first, second) and (cache.hits, cache.misses) == (1, 1)
    assert RefLogpCache(tmp_path / "cache").get_or_compute(parts, compute).equal(first)  # fresh instance
    assert len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{cache.key(parts)}.safetensors"]

    other_model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        other_model.weight.copy_(model.weight)
        other_model.bias.copy_(model.bias)
    assert fingerprint_model(other_model) == parts["model"]
    with torch.no_grad():
        other_model.bias[0] += 1e-3
    write_jsonl(tmp_path / "d2.jsonl", GROUPED[:2])
    keys = {cache.key(parts),
            cache.key({**parts, "model": fingerprint_model(other_model)}),
            cache.key({**parts, "data": fingerprint_file(tmp_path / "d2.jsonl")}),
            cache.key({**parts, "settings": {"max_len": 16}})}
    assert len(keys) == 4
    assert cache.key({"b": 1, "a": [1, 2]}) == cache.key({"a": [1, 2], "b": 1})  # canonical JSON
    cache.get_or_compute({**parts, "model": fingerprint_model(other_model)}, compute)
    assert len(calls) == 2


def test_ref_logp_cache_corrupt_file_recomputed_and_bad_values(tmp_path):
    cache = RefLogpCache(tmp_path)
    parts = {"model": "m"}
    cache.path(parts).write_bytes(b"truncated")
    assert cache.get_or_compute(parts, lambda: torch.ones(2, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert cache.get(parts).dtype == torch.bfloat16 and cache.misses == 1
    with pytest.raises(TypeError, match="torch.Tensor"):
        cache.get_or_compute({"model": "n"}, lambda: [1.0])
    with pytest.raises(TypeError, match="fingerprint it first"):
        cache.key({"model": torch.nn.Linear(1, 1)})
    assert [p.suffix for p in tmp_path.iterdir()] == [".safetensors"]  # no temp files left behind


def test_fingerprint_model_dtypes_and_directory(tmp_path):
    from safetensors.torch import save_file

    m = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert fingerprint_model(m) != fingerprint_model(m.float())
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    a = fingerprint_model(tmp_path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    assert fingerprint_model(str(tmp_path)) != a
    assert not math.isnan(len(a)) and len(a) == 64


def test_offline_data_from_gzip_a_load_dataset_mapping_and_a_hub_id(tmp_path, monkeypatch):
    import gzip

    import datasets

    plain = write_jsonl(tmp_path / "g.jsonl", GROUPED)
    with gzip.open(tmp_path / "g.jsonl.gz", "wb") as f:
        f.write(plain.read_bytes())
    want = [(g.prompt, g.completions, g.rewards) for g in load_offline(plain)[0]]
    got_gz = [(g.prompt, g.completions, g.rewards) for g in load_offline(tmp_path / "g.jsonl.gz")[0]]
    got_map = [(g.prompt, g.completions, g.rewards)
               for g in load_offline({"path": "json", "data_files": str(plain)})[0]]
    assert got_gz == want and got_map == [(p, c, [float(x) for x in r]) for p, c, r in want]

    seen = []

    hub_rows = GROUPED[:2]

    def fake_load_dataset(**kwargs):
        seen.append(kwargs)
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(hub_rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    groups, summary = load_offline("someone/rated-completions")
    assert seen == [{"path": "someone/rated-completions"}] and summary.prompts == 2
    before = fingerprint_file("someone/rated-completions")  # of the rows: changes when they change
    hub_rows = GROUPED[:1]
    assert fingerprint_file("someone/rated-completions") != before
