"""GGUF files as a model source (``gvpo.model.gguf``): a tiny Llama with a byte-level BPE tokenizer is written
as GGUF in the test (``tests/gguf_tiny.py``, the ``gguf`` package), converted once into a cached plain folder,
trained and evaluated from; no download."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gguf_tiny import gguf, make_tiny_gguf  # noqa: F401  (skips the module without the gguf package)
from gvpo.cli import main
from gvpo.config import ModelConfig, load_config
from gvpo.model import gguf as gguf_model
from gvpo.model.checks import ModelError, load_checked
from gvpo.model.gguf import DONE_FILE, ModelSourceError, plain_folder
from gvpo.model.loading import resolve_model_path
from gvpo.trainer import train

TEXT = "<|im_start|>user\nWhat is 47 + 38?<|im_end|>\n<|im_start|>assistant\nThe answer is 85.<|im_end|>"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test converts into its own cache folder."""
    monkeypatch.setenv("GVPO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_float32_gguf_becomes_the_same_model_and_tokenizer_in_a_plain_folder(tmp_path, cache):
    path, model, tokenizer, _ = make_tiny_gguf(tmp_path / "m" / "tiny.gguf")
    folder = plain_folder(path, progress=False)
    assert folder.parent == cache / "gguf" and folder.name.startswith("tiny-")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert json.loads((folder / DONE_FILE).read_text())["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    stored = load_file(folder / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == torch.float32 and "lm_head.weight" not in stored  # tied: once
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    loaded = AutoTokenizer.from_pretrained(folder)
    original = model.state_dict()
    assert set(plain.state_dict()) == set(original)
    for key, value in plain.state_dict().items():  # every tensor in its place, q/k rope permutation undone
        assert torch.equal(value, original[key]), key
    ids = tokenizer(TEXT)["input_ids"]
    assert loaded(TEXT)["input_ids"] == ids and loaded.decode(ids) == TEXT
    assert loaded.convert_ids_to_tokens(ids).count("<|im_end|>") == 2  # special tokens stay whole
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|im_end|>")
    with torch.no_grad():
        assert torch.equal(plain(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits)


def test_a_4_bit_gguf_is_dequantised_as_the_gguf_package_does(tmp_path):
    """Q4_1 (the SmolLM2 file's type): each block of 32 is ``d * q + m``; the reference is ``gguf``'s numpy
    dequantiser on the stored blocks, un-permuted (``write_gguf``), independent of transformers' reader."""
    path, model, _, expected = make_tiny_gguf(tmp_path / "q" / "tiny.gguf", qtype=gguf.GGMLQuantizationType.Q4_1)
    plain = AutoModelForCausalLM.from_pretrained(plain_folder(path, progress=False)).state_dict()
    for key, value in expected.items():
        np.testing.assert_array_equal(plain[key].numpy(), value, err_msg=key)
    q = plain["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q, model.state_dict()["model.layers.0.self_attn.q_proj.weight"])  # really quantised


def test_the_conversion_runs_once_per_file_content(tmp_path, monkeypatch):
    path, *_ = make_tiny_gguf(tmp_path / "m" / "tiny.gguf")
    first = plain_folder(path, progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_model, "convert_gguf", refuse)
    assert plain_folder(path) == first  # found done
    make_tiny_gguf(path, seed=1)  # same name, other weights
    with pytest.raises(AssertionError, match="converted again"):
        plain_folder(path)


def test_two_processes_converting_at_once_convert_once(tmp_path, monkeypatch):
    """The second waits on the lock, then finds the folder done (threads hold separate lock descriptions)."""
    path, *_ = make_tiny_gguf(tmp_path / "m" / "tiny.gguf")
    calls = []
    real = gguf_model.convert_gguf

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)
        real(*args, **kwargs)

    monkeypatch.setattr(gguf_model, "convert_gguf", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(plain_folder(path, progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert [p.name for p in results[0].parent.iterdir() if ".tmp-" in p.name] == []


def test_a_crash_while_converting_leaves_no_folder_that_looks_done(tmp_path, monkeypatch):
    path, *_ = make_tiny_gguf(tmp_path / "m" / "tiny.gguf")
    real = gguf_model.convert_gguf

    def crash(gguf_path, out, progress=True):
        real(gguf_path, out, progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_model, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        plain_folder(path)
    assert [p for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(gguf_model, "convert_gguf", real)
    assert (plain_folder(path, progress=False) / DONE_FILE).is_file()


def test_train_from_a_gguf_file_and_from_a_folder_plus_gguf_file(tmp_path):
    path, *_ = make_tiny_gguf(tmp_path / "m" / "tiny.gguf")
    assert resolve_model_path(str(path.parent), "tiny.gguf") == resolve_model_path(str(path))
    overrides = {"model.name_or_path": str(path.parent), "model.gguf_file": "tiny.gguf",
                 "task.name": "chat_arithmetic", "task.options": {"num_test": 2, "num_train": 8},
                 "train.max_steps": 2, "train.prompts_per_step": 2, "rollout.k": 3, "rollout.max_new_tokens": 4,
                 "output.dir": str(tmp_path / "runs"), "output.name": "run", "train.eval_every": 0,
                 "train.checkpoint_every": 0, "output.progress": False, "output.report_to": [], "output.plots": False,
                 "optim.lr": 1e-2, "optim.warmup_steps": 0, "task.rewards": ["gguf_tiny.digit_count"]}
    run = train(load_config(None, overrides))
    config = json.loads((run / "final" / "config.json").read_text())
    assert "quantization_config" not in config
    assert sorted(p.name for p in (run / "final").glob("*.safetensors")) == ["model.safetensors"]
    final = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    start = AutoModelForCausalLM.from_pretrained(resolve_model_path(str(path))).state_dict()
    assert any(not torch.equal(final[k], start[k]) for k in start), "training changed no weight"
    assert AutoTokenizer.from_pretrained(run / "final").chat_template == AutoTokenizer.from_pretrained(
        resolve_model_path(str(path))).chat_template


def test_gvpo_eval_takes_a_gguf_file(tmp_path, capsys):
    path, *_ = make_tiny_gguf(tmp_path / "m" / "tiny.gguf")
    assert main(["eval", "--model", str(path), "--task", "chat_arithmetic", "--task-option", "num_test=3",
                 "--max-new-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "chat_arithmetic" and result["n"] == 3
    assert main(["eval", "--model", str(path.parent), "--gguf-file", "tiny.gguf", "--task", "chat_arithmetic",
                 "--task-option", "num_test=3", "--max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


@pytest.mark.parametrize("case", ["missing", "damaged", "no_gguf_package"])
def test_an_unusable_gguf_source_is_one_line_naming_the_flag(tmp_path, capsys, monkeypatch, case):
    path = tmp_path / "m" / "x.gguf"
    if case != "missing":
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + b"\0" * 64)
    if case == "no_gguf_package":
        monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    assert main(["eval", "--model", str(path), "--task", "chat_arithmetic"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"gvpo: error: --model={path}: ")
    expected = {"missing": "no such GGUF file", "damaged": "transformers cannot read it as a GGUF causal LM",
                "no_gguf_package": "pip install 'gvpo[gguf]'"}[case]
    assert expected in err
    with pytest.raises(ModelError, match="model.name_or_path="):
        load_checked(ModelConfig(name_or_path=str(path)), "cpu", progress=False)
    assert list((tmp_path / "cache" / "gguf").glob("x-*")) == []  # nothing that looks converted


def test_a_plain_folder_source_is_left_alone(tmp_path):
    assert resolve_model_path(str(tmp_path / "some" / "folder")) == str(tmp_path / "some" / "folder")
    with pytest.raises(ModelSourceError, match="no such GGUF file"):
        resolve_model_path(str(tmp_path), "absent.gguf")
