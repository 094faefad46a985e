"""Exactness of episodes by masking: a packed episode row scores each model turn exactly as that turn scored
alone (its context as the prompt), over the model-family matrix, in float32 and float64, with prefix sharing on
and off; the environment's tokens get exactly zero gradient; and every objective takes its loss tokens from
``action_mask``, never from ``completion_mask``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tiny
from gvpo.batch import Group, all_token_logps, build_batch, token_logps_for
from gvpo.config import ModelConfig
from gvpo.config import ObjectiveConfig
from gvpo.model.loading import load_policy
from gvpo.model.logprobs import sequence_logps
from gvpo.objectives import OBJECTIVES, create_objective

TOK = tiny.char_tokenizer()


def random_ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, tiny.VOCAB_SIZE, (n,), generator=g).tolist()


def episodes(seed: int = 0, groups: int = 2, k: int = 3):
    """``groups`` prompts of different lengths with ``k`` episodes each: turns ``(a_1, o_1, ..., a_T)`` of ragged
    lengths, T = 1..3. Returns ``[(prompt ids, [turn ids...], [is model turn...])]`` per group."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for gi in range(groups):
        prompt = random_ids(g, 6 - 2 * gi)
        eps = []
        for j in range(k):
            turns = 1 + (j + gi) % 3
            parts, model = [], []
            for t in range(turns):
                parts.append(random_ids(g, 2 + (t + j) % 3))  # the model's turn
                model.append(True)
                if t < turns - 1:
                    parts.append(random_ids(g, 1 + (t + 2 * j) % 4))  # the environment's observation
                    model.append(False)
            eps.append((parts, model))
        out.append((prompt, eps))
    return out


def packed_batch(data):
    groups = []
    for gid, (prompt, eps) in enumerate(data):
        ids = [[t for p in parts for t in p] for parts, _ in eps]
        masks = [[int(m) for p, m in zip(parts, model) for _ in p] for parts, model in eps]
        groups.append(Group(gid, {"prompt": "unused"}, ids, [""] * len(eps), ["policy"] * len(eps),
                            rewards=[float(j) for j in range(len(eps))], prompt_ids=[prompt] * len(eps),
                            action_mask=masks))
    return build_batch(groups, TOK, "cpu")


def per_turn_batch(data):
    """Every model turn as its own row: the prompt is its whole context (prompt, earlier turns, observations)."""
    groups, n = [], 0
    for prompt, eps in data:
        for parts, model in eps:
            context = list(prompt)
            for p, m in zip(parts, model):
                if m:
                    groups.append(Group(n, {"prompt": "unused"}, [p], [""], ["policy"], rewards=[0.0],
                                        prompt_ids=[list(context)]))
                    n += 1
                context += p
    return build_batch(groups, TOK, "cpu")


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family_model(request, tmp_path_factory):
    return request.param, tiny.make_tiny_family(tmp_path_factory.mktemp(request.param) / "model", request.param)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("float64", 1e-12)])
def test_a_packed_episode_scores_each_turn_as_that_turn_alone(family_model, dtype, tol, one_thread):
    """For every family: the masked sum of a packed row equals the sum of its turns' rows (each turn scored with
    its context as the prompt, so the observations condition it and are not scored), per episode; and each model
    token's log-prob is the same in both layouts. With prefix sharing on and off."""
    model, _ = load_policy(ModelConfig(name_or_path=str(family_model[1]), dtype=dtype))
    model.eval()
    if padding_gives_nan(model):
        pytest.skip(f"{family_model[0]} in {dtype}: transformers' own forward of a left-padded batch is NaN "
                    "(eager sliding-window attention), without gvpo code")
    data = episodes()
    packed, turns = packed_batch(data), per_turn_batch(data)
    for share in (True, False):
        with torch.no_grad():
            packed_tl = all_token_logps(model, packed, 0, share_prompts=share).double()
            turn_tl = all_token_logps(model, turns, 0, share_prompts=share).double()
        flat_packed = packed_tl[packed.action_mask.bool()]  # model tokens, row-major, in turn order
        flat_turns = turn_tl[turns.completion_mask.bool()]
        assert flat_packed.shape == flat_turns.shape
        torch.testing.assert_close(flat_packed, flat_turns, atol=tol, rtol=0)  # per model token
        sums = sequence_logps(packed_tl, packed.action_mask)
        per_turn = sequence_logps(turn_tl, turns.completion_mask)
        expected, row = [], 0
        for _, eps in data:
            for _, model_turns in eps:
                expected.append(per_turn[row : row + sum(model_turns)].sum())
                row += sum(model_turns)
        torch.testing.assert_close(sums, torch.stack(expected), atol=tol * 16, rtol=0)  # sums of <= 16 tokens
        assert bool((packed.attention_mask[:, -packed.action_mask.shape[1]:] >= packed.action_mask).all())


def padding_gives_nan(model) -> bool:
    """Whether a plain transformers forward of two rows, one left-padded, has NaN logits."""
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [4, 5, 6, 7, 8, 9]])
    mask = (ids != 0).long()
    with torch.no_grad():
        return bool(model(input_ids=ids, attention_mask=mask).logits.isnan().any())


def test_environment_tokens_get_zero_gradient_and_holes_do_not_change_log_probs(one_thread, tmp_path, monkeypatch):
    """Observations are attended to (attention_mask 1) but get exactly zero gradient from every objective, and
    the per-token log-probs do not depend on ``action_mask`` (the holes are a loss mask, never an attention
    mask, TRL #4974); GVPO's parameter gradient on packed rows equals GVPO's on per-turn sums to 1e-12 (float64).

    transformers' ``LlamaRMSNorm`` computes in float32 even in a float64 model, which puts ~1e-8 of noise into
    the two layouts' gradients (their values agree to 1e-12); it is replaced here by the same norm in float64."""
    from transformers.models.llama import modeling_llama

    def rms_norm(self, hidden):
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    model, _ = load_policy(ModelConfig(name_or_path=str(tiny.make_tiny_model(tmp_path / "m")), dtype="float64"))
    data = episodes(seed=1)
    packed = packed_batch(data)
    holes = packed.action_mask == 0
    assert bool(holes.any()) and bool((packed.completion_mask.bool() & holes).any())
    dense = dataclasses.replace(packed, action_mask=packed.completion_mask)
    with torch.no_grad():
        assert torch.equal(token_logps_for(model, packed, slice(None)), token_logps_for(model, dense, slice(None)))
    for name in OBJECTIVES.names():
        objective = create_objective(ObjectiveConfig(name=name, kl_coef=0.1), max_completion_length=64)
        batch = dataclasses.replace(packed)
        with torch.no_grad():
            current = all_token_logps(model, batch, 0)
        batch.ref_token_logps, batch.old_token_logps = current - 0.01, current + 0.02
        tl = current.clone().requires_grad_(True)
        objective.micro_loss(tl, batch, slice(None), objective.prepare(batch, current)).backward()
        assert bool((tl.grad[holes] == 0).all()), name
        assert bool((tl.grad[packed.action_mask.bool()] != 0).any()), name

    turns = per_turn_batch(data)
    beta = 0.5
    from gvpo.objectives import gvpo_loss

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    with torch.no_grad():
        ref_packed = sequence_logps(all_token_logps(model, packed, 0), packed.action_mask) - 0.3
    g_packed = grads(gvpo_loss(sequence_logps(token_logps_for(model, packed, slice(None)), packed.action_mask),
                               ref_packed, packed.rewards.double(), packed.group_ids, beta=beta))
    turn_sums = sequence_logps(token_logps_for(model, turns, slice(None)), turns.completion_mask)
    counts = [sum(m) for _, eps in data for _, m in eps]
    episode_sums = torch.stack([s.sum() for s in torch.split(turn_sums, counts)])
    g_turns = grads(gvpo_loss(episode_sums, ref_packed, packed.rewards.double(), packed.group_ids, beta=beta))
    torch.testing.assert_close(g_packed, g_turns, atol=1e-12, rtol=0)
    assert float(g_packed.abs().max()) > 1e-3


class Tripwire:
    """Stands in for ``completion_mask``: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"an objective read completion_mask (.{name})")

    def __getitem__(self, item):
        raise AssertionError("an objective read completion_mask[...]")


@pytest.mark.parametrize("name, aggregation", [(n, "grpo") for n in ("gvpo", "dr_grpo", "rs", "sft", "dpo")] +
                         [("grpo", a) for a in ("grpo", "dapo", "bnpo", "dr_grpo")])
def test_objectives_take_loss_tokens_from_action_mask_only(name, aggregation):
    """Each objective on packed rows with holes, whose ``completion_mask`` is a tripwire, gives the loss, norm and
    per-token gradient it gives on the same rows with the observations cut out (where the two masks agree):
    token aggregations count the model's tokens only."""
    g = torch.Generator().manual_seed(3)
    n, width = 6, 9
    action = (torch.rand(n, width, generator=g) > 0.35).long()
    action[:, 0] = 1
    lengths = torch.tensor([9, 7, 9, 5, 8, 6])
    in_row = (torch.arange(width)[None] < lengths[:, None]).long()
    action *= in_row
    token_logps = -torch.rand(n, width, generator=g, dtype=torch.float64) * in_row
    ref, old = token_logps - 0.1 * torch.rand(n, width, generator=g), token_logps + 0.05
    common = dict(rewards=torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.0]), group_ids=torch.tensor([0, 0, 0, 1, 1, 1]))
    packed = build_like(in_row, action, **common)
    packed.ref_token_logps, packed.old_token_logps = ref, old
    packed.completion_mask = Tripwire()
    keep = [row.nonzero().squeeze(-1) for row in action]
    cw = max(len(k) for k in keep)

    def compact(t):
        out = torch.zeros(n, cw, dtype=t.dtype)
        for i, k in enumerate(keep):
            out[i, : len(k)] = t[i, k]
        return out

    cmask = compact(action)
    short = build_like(cmask, cmask, **common)
    short.ref_token_logps, short.old_token_logps = compact(ref), compact(old)
    config = ObjectiveConfig(name=name, loss_aggregation=aggregation, kl_coef=0.1)
    results = []
    for batch, tl in ((packed, token_logps), (short, compact(token_logps))):
        objective = create_objective(config, max_completion_length=16)
        prepared = objective.prepare(batch, tl)
        leaf = tl.clone().requires_grad_(True)
        objective.micro_loss(leaf, batch, slice(None), prepared).backward()
        results.append((prepared.norm, prepared.loss_sum, leaf.grad))
    (n1, l1, g1), (n2, l2, g2) = results
    assert n1 == pytest.approx(n2, abs=1e-12) and l1 == pytest.approx(l2, abs=1e-12)
    torch.testing.assert_close(compact(g1), g2, atol=1e-12, rtol=0)
    assert bool((g1[action == 0] == 0).all())


def build_like(completion_mask, action_mask, **fields):
    from gvpo.batch import Batch

    n, width = completion_mask.shape
    return Batch(input_ids=torch.zeros(n, 2 + width, dtype=torch.long), attention_mask=torch.ones(n, 2 + width),
                 completion_mask=completion_mask, action_mask=action_mask, **fields)
