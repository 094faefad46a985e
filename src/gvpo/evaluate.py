"""Held-out evaluation: pass@1 with greedy decoding, avg@K (and pass@K) with sampling."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from .batch import Group
from .episodes import reward_keywords
from .rewards import combine
from .rollout import SamplingParams, hash_seed
from .tasks import Task


def is_correct(value) -> bool:
    return value is not None and float(value) >= 1.0 - 1e-6


def evaluate(engine, task: Task, *, n: int = 0, samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: int = 0, batch_size: int = 64, seed: int = 0, progress: bool = False,
             items_path: str | Path | None = None, trainer_state: dict | None = None) -> dict:
    """Score ``samples`` completions per held-out prompt (greedy when ``samples == 1``).

    Returns ``{"task", "n", "samples", "accuracy", "pass@K"}`` where accuracy is pass@1 (greedy) or
    avg@K (mean correctness over the K samples); per-item results go to ``items_path`` as jsonl. The
    reward is called as in training (TRL's keywords, :mod:`gvpo.rewards`) with ``trainer_state``. An engine that
    runs episodes (:func:`gvpo.episodes.with_episodes`) is evaluated on whole episodes.
    """
    rows = task.test[:n] if n else task.test
    reward = combine([task.accuracy_reward or task.rewards[0]])
    greedy = samples == 1
    params = SamplingParams(max_new_tokens=max_new_tokens or task.max_new_tokens, temperature=temperature,
                            top_p=top_p, greedy=greedy)
    flat = [(i, j) for i in range(len(rows)) for j in range(samples)]
    correct = [[False] * samples for _ in rows]
    items = []
    bar = tqdm(total=len(flat), desc=f"eval {task.name}", disable=not progress, leave=False)
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        chunk_rows = [rows[i] for i, _ in chunk]
        groups = generated(engine, chunk_rows, [hash_seed(seed, i, j) for i, j in chunk], params)
        texts = [g.texts[0] for g in groups]  # rewards get TRL's keywords, as in training (an episode's messages too)
        values = reward(**reward_keywords([(g, 0) for g in groups]), trainer_state=trainer_state)
        for (i, j), text, value in zip(chunk, texts, values):
            correct[i][j] = is_correct(value)
            items.append({"index": i, "sample": j, "completion": text, "reward": value, "correct": correct[i][j],
                          **{k: v for k, v in rows[i].items() if isinstance(v, (str, int, float))}})
        bar.update(len(chunk))
    bar.close()
    if items_path:
        Path(items_path).parent.mkdir(parents=True, exist_ok=True)
        with open(items_path, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
    total = max(len(rows), 1)
    result = {"task": task.name, "n": len(rows), "samples": samples,
              "accuracy": sum(sum(c) / samples for c in correct) / total}
    if samples > 1:
        result[f"pass@{samples}"] = sum(any(c) for c in correct) / total
    return result


def generated(engine, rows: list[dict], seeds: list[int], params: SamplingParams) -> list[Group]:
    """One completion per row as a :class:`Group`: an episode when the engine runs them (:mod:`gvpo.episodes`)."""
    if hasattr(engine, "rollout"):
        return [Group(n, row, [e.completion_ids], [e.text], ["eval"], episode=[e])
                for n, (row, e) in enumerate(zip(rows, engine.rollout(rows, seeds, params)))]
    gen = engine.generate([r["prompt"] for r in rows], seeds=seeds, params=params)
    return [Group(n, row, [gen.completion_ids[n][gen.completion_mask[n].bool()].tolist()], [gen.texts[n]], ["eval"])
            for n, row in enumerate(rows)]
