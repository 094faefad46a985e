"""Replay: on-policy groups topped up with stored completions of the same prompt (Corollary 3.2: no
importance weights needed).

A share ``replay_revisit`` of each step's prompts is drawn again from the buffer, and every prompt with
history gets up to ``replay_historical`` stored completions (no older than ``replay_max_age`` steps)
plus ``k - historical`` fresh ones, so a 4:4 group costs 4 generations instead of 8. Episodes
(:mod:`gvpo.episodes`) are stored with what training needs: their prompt ids, packed ids and action mask.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from ..batch import Group
from ..rollout import Engine, SamplingParams
from .base import SAMPLERS, StatelessSampler
from .policy import generate_by_count


def prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


class ReplaySampler(StatelessSampler):
    """On-policy groups topped up with stored completions of the same prompt (see module doc)."""

    def __init__(self, engine: Engine, k: int, seed: int, *, capacity: int, max_age: int, historical: int,
                 revisit: float):
        self.engine, self.k, self.seed = engine, k, seed
        self.capacity, self.max_age, self.historical, self.revisit = capacity, max_age, historical, revisit
        self.buffer: OrderedDict[str, dict] = OrderedDict()  # prompt key -> {"row", "items": [...]}

    def _history(self, key: str, step: int) -> list[dict]:
        entry = self.buffer.get(key)
        if entry is None:
            return []
        fresh_enough = [it for it in entry["items"] if step - it["born"] <= self.max_age]
        return fresh_enough[-self.historical:] if self.historical else []

    def _revisit_rows(self, rows: list[tuple[int, dict]], step: int) -> list[tuple[int, dict]]:
        """Replace the first ``revisit`` share of rows with the buffer's newest prompts that have history."""
        n = int(round(self.revisit * len(rows)))
        taken = {prompt_key(r["prompt"]) for _, r in rows}
        pool = [e["row"] for key, e in reversed(self.buffer.items())
                if key not in taken and len(self._history(key, step)) >= self.historical]
        rows = list(rows)
        for i, row in enumerate(pool[:n]):
            rows[i] = (rows[i][0], row)
        return rows

    def sample(self, rows: list[tuple[int, dict]], step: int, params: SamplingParams) -> list[Group]:
        rows = self._revisit_rows(rows, step)
        history = [self._history(prompt_key(r["prompt"]), step) for _, r in rows]
        fresh = generate_by_count(self.engine, rows, [self.k - len(h) for h in history], params, seed=self.seed,
                                  step=step, first=[len(h) for h in history])
        return [Group(new.group_id, new.row, [it["ids"] for it in hist], [it["text"] for it in hist],
                      ["replay"] * len(hist), rewards=[it["reward"] for it in hist],
                      born_step=[it["born"] for it in hist], action_mask=[it.get("action_mask") for it in hist],
                      prompt_ids=[it.get("prompt_ids") for it in hist]) + new
                for hist, new in zip(history, fresh)]

    def after_update(self, groups: list[Group], step: int) -> None:
        """Store this step's fresh completions with their rewards; evict beyond capacity and age."""
        for group in groups:
            key = prompt_key(group.row["prompt"])
            entry = self.buffer.pop(key, {"row": group.row, "items": []})
            for ids, text, r, src, born, action, prompt in zip(group.completion_ids, group.texts, group.rewards,
                                                               group.sources, group.born_step, group.action_mask,
                                                               group.prompt_ids):
                if src == "policy":  # an episode keeps its trained tokens: prompt ids and action mask
                    episode = {"action_mask": action, "prompt_ids": prompt} if prompt is not None else {}
                    entry["items"].append({"ids": ids, "text": text, "reward": r, "born": born, **episode})
            entry["items"] = [it for it in entry["items"] if step - it["born"] < self.max_age][-self.k:]
            self.buffer[key] = entry
        while len(self.buffer) > self.capacity:
            self.buffer.popitem(last=False)

    def state(self) -> dict:
        return {"buffer": list(self.buffer.items())}

    def load_state(self, state: dict) -> None:
        self.buffer = OrderedDict((k, v) for k, v in state.get("buffer", []))


@SAMPLERS.register("replay")
def replay(spec, *, engine, reference, tokenizer, k, seed, max_new_tokens, cache_dir) -> ReplaySampler:
    return ReplaySampler(engine, k, seed, capacity=spec.replay_capacity, max_age=spec.replay_max_age,
                         historical=spec.replay_historical, revisit=spec.replay_revisit)
