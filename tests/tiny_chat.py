"""Test helpers for multi-turn episodes (no download): a small byte-level BPE tokenizer with a ChatML chat
template that renders tools and tool messages and a ``response_template`` that parses tool calls, tiny models
on its vocabulary, a scripted engine, and environments and tools written as TRL's users write them."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from gvpo.episodes.chat import TOOL_CHAT_TEMPLATE, TOOL_RESPONSE_TEMPLATE
from gvpo.rollout import Generation, left_pad

CHAT_TEMPLATE, RESPONSE_TEMPLATE = TOOL_CHAT_TEMPLATE, TOOL_RESPONSE_TEMPLATE

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 12, \"b\": 34}}</tool_call>",
    "<tool_call>{\"name\": \"multiply\", \"arguments\": {\"a\": 3, \"b\": 4}}</tool_call>",
    "system\ntools: add multiply\nuser\nWhat is 12+34? The answer is 46.\nassistant\ntool\n",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 {}[]():;,.!?\"'+-*/=<>_|\n",
    "the answer is 46 and 12 plus 34 is 46; 3 times 4 is 12. error: not found. truncated",
]


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (a few hundred tokens) trained on :data:`CORPUS`: merges such as ``"12"`` and ``"name"``
    mean that text concatenated from separately generated pieces re-tokenises differently."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    out.chat_template = CHAT_TEMPLATE
    out.response_template = RESPONSE_TEMPLATE
    return out


def make_chat_model(path: Path, family: str = "llama", *, seed: int = 0, **config_overrides) -> Path:
    """A random 2-layer ``family`` model on :func:`chat_tokenizer`'s vocabulary, saved with it to ``path``."""
    import tiny
    import transformers

    tokenizer = chat_tokenizer()
    config_name, model_name, kwargs = tiny._family_configs()[family]
    positions = {"n_positions": 256} if family == "gpt2" else {"max_position_embeddings": 256}
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.pad_token_id, **{**kwargs, **positions, **config_overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def piecewise(tokenizer, text: str) -> list[int]:
    """``text`` tokenised one character at a time: a valid but non-canonical tokenisation (what a sampler
    may produce), which ``encode(decode(...))`` does not give back."""
    return [t for ch in text for t in encode(tokenizer, ch)]


class ScriptedEngine:
    """An engine whose "model" answers by a script: ``script(context_ids, seed, turn) -> token ids`` of the next
    turn; it records every call's inputs (token in) and outputs (token out)."""

    def __init__(self, tokenizer, script, model=None):
        self.tokenizer, self.script, self.model = tokenizer, script, model
        self.calls: list[dict] = []

    def sync_weights(self, model) -> None:
        self.model = model

    def generate(self, prompts, seeds, params) -> Generation:
        from gvpo.rollout.hf import encode_prompts

        enc = encode_prompts(self.tokenizer, prompts)
        contexts = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
        outs = [list(self.script(c, s))[: params.max_new_tokens] for c, s in zip(contexts, seeds)]
        self.calls.append({"prompts": contexts, "seeds": list(seeds), "outputs": outs})
        width = max([len(o) for o in outs] + [1])
        ids = torch.full((len(outs), width), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(outs), width), dtype=torch.long)
        for i, o in enumerate(outs):
            ids[i, : len(o)] = torch.tensor(o, dtype=torch.long)
            mask[i, : len(o)] = 1
        prompt_ids, prompt_mask = left_pad(contexts, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode([o for o in outs], skip_special_tokens=True)
        return Generation(prompt_ids, prompt_mask, ids, mask, texts)


# ------------------------------------------------------------------------------------------------
# Environments and tools as a TRL user writes them (trl's docs: environment_factory, tools=)


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


class CalculatorEnv:
    """A TRL-style environment: ``reset`` takes the dataset row, ``add`` is its tool, ``get_reward`` scores the
    episode from its own state (1 when the model added the row's operands)."""

    def __init__(self):
        self.sums: list[int] = []
        self.row: dict = {}

    def reset(self, **kwargs) -> str | None:
        self.row, self.sums = kwargs, []
        return None

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first number.
            b: The second number.
        """
        self.sums.append(a + b)
        return a + b

    def get_reward(self) -> float:
        return 1.0 if str(self.row.get("answer")) in map(str, self.sums) else 0.0


class GreetingEnv(CalculatorEnv):
    """``reset`` returns text appended to the prompt (TRL's rule)."""

    def reset(self, **kwargs) -> str | None:
        super().reset(**kwargs)
        return " Use the tools."


class NoToolEnv:
    """A degenerate environment: no tools, no observation, done after the first turn."""

    def reset(self, **kwargs):
        return None


class BadResetEnv(CalculatorEnv):
    """``reset`` returns a number (not text or None)."""

    def reset(self, **kwargs):
        super().reset(**kwargs)
        return 42


def raising(a: int) -> int:
    """Always fails.

    Args:
        a: Anything.
    """
    raise RuntimeError("tool broke")


def hanging(a: int) -> int:
    """Never returns in time.

    Args:
        a: Anything.
    """
    time.sleep(5)
    return a


def shouting(a: int) -> str:
    """A long result.

    Args:
        a: How many words.
    """
    return " ".join(["answer"] * a)


def add(a: int, b: int) -> int:
    """Add two integers (named like :meth:`CalculatorEnv.add`).

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def undocumented(a):
    return a


class NoReset:
    def add(self, a: int, b: int) -> int:
        """Add.

        Args:
            a: x.
            b: y.
        """
        return a + b


class BrokenInit(CalculatorEnv):
    def __init__(self):
        raise RuntimeError("no sandbox here")


class BadToolEnv(CalculatorEnv):
    def lookup(self, key):
        return key


# ------------------------------------------------------------------------------------------------
# A task and a model that call the calculator: the model is a random tiny Llama taught in a few seconds to
# answer every prompt of the task with one tool call and then the tool's result (so sampled episodes are
# multi-turn, with some going astray at temperature 1).

TOOL_PROMPTS = ["What is 1+2?", "Add 1 and 2.", "Compute 1+2.", "1+2=?"]


def tool_task(num_train: int = 4, num_test: int = 2):
    """Conversational prompts answered by ``add(1, 2)``; ``exact_match`` on the final message (3)."""
    from gvpo.tasks import Task

    rows = [{"prompt": [{"role": "user", "content": q}], "answer": "3"} for q in TOOL_PROMPTS]
    return Task("tiny_tool", rows[:num_train], rows[:num_test], ("exact_match",), max_new_tokens=64)


def tool_call_turns(tokenizer) -> tuple[list[int], list[int]]:
    """The taught turns: the call ``add(1, 2)`` and the answer, each ending in EOS."""
    eos = [tokenizer.eos_token_id]
    return encode(tokenizer, '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>') + eos, \
        encode(tokenizer, "3") + eos


def make_tool_caller(path: Path, *, steps: int = 120, seed: int = 0) -> Path:
    """:func:`make_chat_model`, then supervised on every :data:`TOOL_PROMPTS` episode (call, result, answer) with
    the loss on the model's turns only; saved to ``path``."""
    from transformers import AutoModelForCausalLM

    from gvpo.episodes.chat import prompt_ids, tool_suffix_ids

    make_chat_model(path, seed=seed, hidden_size=48, intermediate_size=96)
    tokenizer = chat_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(path)
    call, answer = tool_call_turns(tokenizer)
    suffix = tool_suffix_ids(tokenizer, [{"role": "tool", "name": "add", "content": "3"}])
    tools = [CalculatorEnv().add]
    rows, labels = [], []
    for q in TOOL_PROMPTS:
        prompt = prompt_ids(tokenizer, [{"role": "user", "content": q}], tools)
        rows.append(prompt + call + suffix + answer)
        labels.append([-100] * len(prompt) + call + [-100] * len(suffix) + answer)
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    target, _ = left_pad(labels, -100)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path, safe_serialization=True)
    return path
