"""Off-policy sampling distributions: replay buffer, offline rated data, and mixtures.

GVPO needs no importance weights for any of them (Corollary 3.2): every completion enters the
loss through its centred implicit and actual rewards only. A group may mix sources; each
completion keeps its tag (``policy``, ``replay``, ``offline``) and the trainer logs the mix.

- ``replay``: a buffer of past completions per prompt. A share ``replay_revisit`` of each step's
  prompts is drawn again from the buffer, and every prompt with history gets up to
  ``replay_historical`` stored completions (no older than ``replay_max_age`` steps) plus
  ``k - historical`` fresh ones, so a 4:4 group costs 4 generations instead of 8.
- ``offline``: groups read (and validated) by :func:`gvpo.data.load_offline`, in a seeded shuffle.
- ``mixture``: ``mixture_offline`` completions of an offline group plus ``k - mixture_offline``
  completions sampled from the policy for the same prompt, in one group.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .rollout import Engine, SamplingParams, hash_seed
from .sampling import Group, generate_groups


def prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def generate_by_count(engine: Engine, rows: list[tuple[int, dict]], counts: list[int], params: SamplingParams, *,
                      seed: int, step: int, first: list[int]) -> list[Group]:
    """Like ``generate_groups`` with a per-row number of completions (one generate call per count)."""
    out: list[Group | None] = [None] * len(rows)
    for count in sorted(set(counts)):
        idx = [i for i, c in enumerate(counts) if c == count]
        for offset in sorted({first[i] for i in idx}):
            sub = [i for i in idx if first[i] == offset]
            made = generate_groups(engine, [rows[i] for i in sub], count, params, seed=seed, step=step,
                                   source="policy", first_completion=offset)
            for i, group in zip(sub, made):
                out[i] = group
    return out  # type: ignore[return-value]


class ReplaySampler:
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
        counts = [self.k - len(h) for h in history]
        groups = generate_by_count(self.engine, rows, counts, params, seed=self.seed, step=step,
                                   first=[len(h) for h in history])
        for group, hist in zip(groups, history):
            fresh = len(group.texts)
            group.completion_ids = [it["ids"] for it in hist] + group.completion_ids
            group.texts = [it["text"] for it in hist] + group.texts
            group.sources = ["replay"] * len(hist) + group.sources
            group.born_step = [it["born"] for it in hist] + group.born_step
            group.rewards = [it["reward"] for it in hist] + [None] * fresh
        return groups

    def after_update(self, groups: list[Group], rewards: list[list[float]], step: int) -> None:
        """Store this step's fresh completions with their rewards; evict beyond capacity and age."""
        for group, group_rewards in zip(groups, rewards):
            key = prompt_key(group.row["prompt"])
            entry = self.buffer.pop(key, {"row": group.row, "items": []})
            for ids, text, r, src, born in zip(group.completion_ids, group.texts, group_rewards, group.sources,
                                               group.born_step):
                if src == "policy":
                    entry["items"].append({"ids": ids, "text": text, "reward": r, "born": born})
            entry["items"] = [it for it in entry["items"] if step - it["born"] < self.max_age][-self.k:]
            self.buffer[key] = entry
        while len(self.buffer) > self.capacity:
            self.buffer.popitem(last=False)

    def reference_token_logps(self, groups, batch, reference, micro_batch_size):
        """Stored completions are scored again by the reference each step (it is cheap next to generation)."""
        return None

    def state(self) -> dict:
        return {"buffer": list(self.buffer.items())}

    def load_state(self, state: dict) -> None:
        self.buffer = OrderedDict((k, v) for k, v in state.get("buffer", []))


class OfflineSampler:
    """Groups from a rated-completions file, in a seeded shuffle per epoch; optionally mixed with
    ``k - offline_per_group`` fresh policy completions (``mixture``)."""

    def __init__(self, groups, tokenizer, seed: int, *, engine: Engine | None = None, k: int = 0,
                 offline_per_group: int | None = None, cache_key: dict | None = None, cache_dir=None):
        self.groups, self.tokenizer, self.seed = groups, tokenizer, seed
        self.engine, self.k, self.offline_per_group = engine, k, offline_per_group
        eos = tokenizer.eos_token_id
        self.ids = [[tokenizer(c, add_special_tokens=False)["input_ids"] + [eos] for c in g.completions]
                    for g in groups]
        self.offsets = [0]
        for g in groups:
            self.offsets.append(self.offsets[-1] + g.k)
        self.cache_key, self.cache_dir = cache_key, cache_dir
        self._ref: torch.Tensor | None = None  # (total completions, max length) reference token log-probs

    def reference_token_logps(self, groups: list[Group], batch, reference, micro_batch_size: int):
        """Reference log-probs of ``batch`` from a per-dataset cache, computed once (and kept on disk,
        keyed by model and data fingerprints); ``None`` when some rows are not offline data."""
        index = [ix for g in groups for ix in g.offline_index]
        if reference is None or any(ix is None for ix in index):
            return None
        if self._ref is None:
            self._ref = self._all_reference_logps(reference, micro_batch_size)
        rows = torch.tensor([self.offsets[i] + j for i, j in index])
        width = batch.completion_mask.shape[1]
        ref = self._ref[rows][:, :width]
        return ref.to(batch.completion_mask.device) * batch.completion_mask

    def _all_reference_logps(self, reference, micro_batch_size: int) -> torch.Tensor:
        from .data import RefLogpCache, fingerprint_model

        def compute():
            with reference.scoring(self.engine_model) as ref_model:
                return self._score_all(ref_model, micro_batch_size or 16)

        if self.cache_dir is None:
            return compute()
        with reference.scoring(self.engine_model) as ref_model:
            key = {**self.cache_key, "model": fingerprint_model(ref_model)}
        return RefLogpCache(self.cache_dir).get_or_compute(key, compute).cpu()

    def _score_all(self, model, chunk: int) -> torch.Tensor:
        """(total completions, longest completion) token log-probs of every completion under ``model``.

        Rows are scored in chunks of similar length (sorted by prompt characters + completion tokens),
        so a chunk pads to its own longest row rather than the dataset's.
        """
        from .sampling import build_batch
        from .update import all_token_logps

        rows = [(i, j) for i, g in enumerate(self.groups) for j in range(g.k)]
        rows.sort(key=lambda ij: (len(prompt_key(self.groups[ij[0]].prompt)), len(self.ids[ij[0]][ij[1]])))
        width = max(len(c) for ids in self.ids for c in ids)
        weight = next(model.parameters())
        out = torch.zeros(self.offsets[-1], width, dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32)
        device = weight.device
        for start in tqdm(range(0, len(rows), chunk), desc="reference log-probs", unit="chunk", leave=False):
            part = rows[start : start + chunk]
            groups = [Group(n, {"prompt": self.groups[i].prompt}, [self.ids[i][j]], [""], ["offline"])
                      for n, (i, j) in enumerate(part)]
            batch = build_batch(groups, [[0.0]] * len(part), self.tokenizer, device)
            logps = all_token_logps(model, batch, 0).cpu()
            out[[self.offsets[i] + j for i, j in part], : logps.shape[1]] = logps
        return out

    def _group_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.groups))
        order = torch.randperm(len(self.groups), generator=torch.Generator().manual_seed(hash_seed(self.seed, epoch)))
        return int(order[offset])

    def sample(self, rows: list[tuple[int, dict]], step: int, params: SamplingParams) -> list[Group]:
        out = []
        for pos, _ in rows:
            i = self._group_at(pos)
            g = self.groups[i]
            take = range(g.k) if self.offline_per_group is None else range(min(self.offline_per_group, g.k))
            row = {"prompt": g.prompt, **{k: v for k, v in g.extra.items() if k != "prompt"}}
            out.append(Group(pos, row, [self.ids[i][j] for j in take], [g.completions[j] for j in take],
                             ["offline"] * len(take), rewards=[g.rewards[j] for j in take],
                             born_step=[-1] * len(take), offline_index=[(i, j) for j in take]))
        if self.offline_per_group is not None and self.engine is not None:
            fresh = generate_groups(self.engine, [(g.group_id, g.row) for g in out], self.k - self.offline_per_group,
                                    params, seed=self.seed, step=step, source="policy")
            for group, new in zip(out, fresh):
                group.completion_ids += new.completion_ids
                group.texts += new.texts
                group.sources += new.sources
                group.rewards += [None] * len(new.texts)
                group.born_step += new.born_step
                group.offline_index += [None] * len(new.texts)
        return out

    def after_update(self, groups, rewards, step) -> None:
        """The data does not change."""

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        """Position comes from the step; nothing else to restore."""


def create_offpolicy_sampler(config, engine: Engine, reference, tokenizer, max_new_tokens: int):
    s = config.sampler
    if s.source == "replay":
        return ReplaySampler(engine, config.rollout.k, config.train.seed, capacity=s.replay_capacity,
                             max_age=s.replay_max_age, historical=s.replay_historical, revisit=s.replay_revisit)
    from .data import load_offline

    groups, _ = load_offline(s.offline_path, format=s.offline_format, preset=s.offline_preset or None,
                             tokenizer=tokenizer, max_completion_tokens=max_new_tokens - 1,
                             on_too_long=s.on_too_long)
    from .data import fingerprint_file

    cache = {"data": fingerprint_file(s.offline_path), "preset": s.offline_preset, "format": s.offline_format,
             "max_new_tokens": max_new_tokens, "on_too_long": s.on_too_long, "tokenizer": len(tokenizer)}
    options = dict(cache_key=cache, cache_dir=Path(config.output.dir) / ".ref_cache")
    if s.source == "offline":
        sampler = OfflineSampler(groups, tokenizer, config.train.seed, **options)
    else:
        if not 0 < s.mixture_offline < config.rollout.k:
            raise ValueError(f"sampler.mixture_offline must be in [1, rollout.k), got {s.mixture_offline}")
        sampler = OfflineSampler(groups, tokenizer, config.train.seed, engine=engine, k=config.rollout.k,
                                 offline_per_group=s.mixture_offline, **options)
    sampler.engine_model = engine.model
    return sampler
