"""Tiny models and tasks built locally for tests (no download): a character tokenizer and a
2-layer Llama from a config, plus a one-digit addition task."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gvpo.tasks import TASKS, Task

CHARS = list("0123456789+= QA:\n")


def make_tiny_model(path: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised tiny Llama and its character tokenizer to ``path``."""
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@TASKS.register("tiny_add")
def tiny_add(num_train: int = 40, num_test: int = 20) -> Task:
    """One-digit sums ``Q: a+b= A:`` -> `` c``; exact-match reward."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(pairs), generator=g).tolist()
    rows = [{"prompt": f"Q: {a}+{b}= A:", "answer": str(a + b)} for a, b in (pairs[i] for i in order)]
    return Task("tiny_add", rows[:num_train], rows[num_train:num_train + num_test], ("exact_match",), max_new_tokens=4)


def digit_reward(prompts, completions, **_) -> list[float]:
    """A dense reward for untrained tiny models: the share of digits among the first 3 characters."""
    return [sum(ch.isdigit() for ch in c[:3]) / 3 for c in completions]


def nan_scheme(logps, ref_logps, rewards, group_ids, *, beta):
    """A broken weight scheme (for tests): NaN weights, so the loss is not finite."""
    return torch.full_like(rewards, float("nan"))


def slow_reward(prompts, completions, **_) -> list[float]:
    """A reward that hangs (for tests of the reward timeout)."""
    import time

    time.sleep(30)
    return [0.0] * len(completions)


def load_script(relative: str):
    """Import a repository script that is not a package module (``bench/...``, ``scripts/...``) by its path."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
