"""Off-policy sources (Corollary 3.2): replay, offline, mixture; tags, sample counts, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gvpo.config import load_config
from gvpo.data import DataError
from gvpo.run.metrics import read_metrics
from gvpo.samplers import ReplaySampler
from gvpo.rollout import SamplingParams
from gvpo.batch import Group
from gvpo.trainer import train

import tiny
from test_trainer import assert_same_params, final_params, overrides


class CountingEngine:
    """Fake engine: completion text encodes (seed % 1000); counts generated completions."""

    def __init__(self):
        self.generated = 0

    def generate(self, prompts, seeds, params):
        from gvpo.rollout import Generation

        self.generated += len(prompts)
        n = len(prompts)
        ids = torch.tensor([[3 + s % 7, 2] for s in seeds])
        return Generation(torch.ones(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long), ids,
                          torch.ones_like(ids), [str(s % 1000) for s in seeds])


def rows(start: int, n: int) -> list[tuple[int, dict]]:
    return [(start + i, {"prompt": f"p{i}", "answer": "0"}) for i in range(n)]


def test_replay_mixes_history_into_groups_and_generates_only_the_rest():
    engine = CountingEngine()
    sampler = ReplaySampler(engine, k=8, seed=0, capacity=100, max_age=3, historical=4, revisit=0.0)
    params = SamplingParams(max_new_tokens=4)
    first = sampler.sample(rows(0, 2), step=0, params=params)
    assert engine.generated == 16 and all(g.sources == ["policy"] * 8 for g in first)
    sampler.after_update([g.with_rewards([float(i) for i in range(8)]) for g in first], step=0)

    second = sampler.sample(rows(2, 2), step=1, params=params)  # same prompts p0, p1: history available
    assert engine.generated == 16 + 2 * 4
    for old, new in zip(first, second):
        assert new.sources == ["replay"] * 4 + ["policy"] * 4
        assert new.texts[:4] == old.texts[-4:]  # the newest stored completions
        assert new.rewards[:4] == [4.0, 5.0, 6.0, 7.0] and new.rewards[4:] == [None] * 4
        assert new.born_step == [0] * 4 + [1] * 4


def test_replay_respects_max_age_and_capacity():
    engine = CountingEngine()
    sampler = ReplaySampler(engine, k=4, seed=0, capacity=1, max_age=1, historical=2, revisit=0.0)
    params = SamplingParams(max_new_tokens=4)
    g = sampler.sample(rows(0, 2), step=0, params=params)
    sampler.after_update([x.with_rewards([1.0] * 4) for x in g], step=0)
    assert list(sampler.buffer) == ["p1"]  # capacity 1: the older prompt was evicted
    assert sampler.sample(rows(0, 1), step=1, params=params)[0].sources == ["policy"] * 4  # p0 evicted
    assert sampler.sample([(5, {"prompt": "p1"})], step=1, params=params)[0].sources[:2] == ["replay"] * 2
    assert sampler.sample([(6, {"prompt": "p1"})], step=3, params=params)[0].sources == ["policy"] * 4  # too old


def test_replay_revisits_buffered_prompts():
    engine = CountingEngine()
    sampler = ReplaySampler(engine, k=4, seed=0, capacity=10, max_age=5, historical=2, revisit=0.5)
    params = SamplingParams(max_new_tokens=4)
    g = sampler.sample([(0, {"prompt": "a"}), (1, {"prompt": "b"})], step=0, params=params)
    sampler.after_update([x.with_rewards([1.0] * 4) for x in g], step=0)
    nxt = sampler.sample([(2, {"prompt": "c"}), (3, {"prompt": "d"})], step=1, params=params)
    assert nxt[0].row["prompt"] in ("a", "b") and nxt[0].sources[:2] == ["replay"] * 2
    assert nxt[1].row["prompt"] == "d" and nxt[1].sources == ["policy"] * 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_replay_run_counts_generated_samples_and_logs_the_mix(model_dir, tmp_path):
    run = train(load_config(None, overrides(model_dir, tmp_path, "replay", **{
        "sampler.source": "replay", "sampler.replay_historical": 2, "sampler.replay_revisit": 0.5})))
    rows_ = read_metrics(run / "metrics.jsonl")
    assert rows_[1]["samples"] == 16 and "source/replay" not in rows_[1]
    assert rows_[2]["source/replay"] == pytest.approx(2 * 2 / 16)  # 2 revisited prompts x 2 stored completions
    assert rows_[2]["samples"] == 16 + 16 - 4
    assert rows_[2]["completions_trained"] == 32


def test_resume_restores_the_replay_buffer_exactly(model_dir, tmp_path):
    replay = {"sampler.source": "replay", "sampler.replay_historical": 2, "train.checkpoint_every": 2}
    straight = train(load_config(None, overrides(model_dir, tmp_path, "straight", **replay, **{"train.max_steps": 4})))
    first = train(load_config(None, overrides(model_dir, tmp_path, "split", **replay, **{"train.max_steps": 2})))
    assert json.loads((first / "checkpoints" / "step-000002" / "sampler-0.json").read_text())["buffer"]
    shutil.rmtree(first / "final")
    resumed = train(load_config(first / "config.yaml", {"train.max_steps": 4}), resume=first)
    assert_same_params(final_params(straight), final_params(resumed), atol=1e-6)
    a = [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(straight / "metrics.jsonl")]
    b = [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(resumed / "metrics.jsonl")]
    assert a == b


def write_offline(path: Path) -> Path:
    """12 prompts x 3 rated completions; the ratings follow the completion's shape, so a tiny model can fit them."""
    rows_ = [{"prompt": f"Q: {a}+{b}= A:", "completions": [f" {a + b}", f" {a}{a}{a}", f" {b}+{b}"],
              "rewards": [1.0, 0.0, 0.25]} for a in range(4) for b in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows_))
    return path


def test_offline_training_fits_the_rewards_and_caches_reference_logps(model_dir, tmp_path):
    data = write_offline(tmp_path / "offline.jsonl")
    opts = {"sampler.source": "offline", "sampler.offline_path": str(data), "train.max_steps": 30,
            "train.eval_every": 0, "optim.lr": 3e-3, "objective.beta": 1.0, "rollout.max_new_tokens": 8}
    run = train(load_config(None, overrides(model_dir, tmp_path, "offline", **opts)))
    rows_ = read_metrics(run / "metrics.jsonl")
    assert all(r["samples"] == 0 for r in rows_)  # nothing generated
    assert rows_[1]["source/offline"] == 1.0
    assert rows_[-1]["loss"] < 0.2 * rows_[1]["loss"]
    assert rows_[-1]["implicit_reward_corr"] > 0.9
    cache = list((tmp_path / ".ref_cache").glob("*.safetensors"))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    train(load_config(None, overrides(model_dir, tmp_path, "offline2", **{**opts, "train.max_steps": 1})))
    assert [p.stat().st_mtime_ns for p in (tmp_path / ".ref_cache").glob("*.safetensors")] == [stamp]


def test_offline_reference_scores_in_length_chunks_equal_scoring_each_row_alone(model_dir):
    """Chunks of similar length pad less; every row's token log-probs must be those of the row alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gvpo.data import OfflineGroup
    from gvpo.model.logprobs import completion_token_logps
    from gvpo.batch import build_batch
    from gvpo.samplers import OfflineSampler

    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    groups = [OfflineGroup("Q: 1+2= A:", [" 3", " 33333", " 1+1+1+1"], [1.0, 0.0, 0.5]),
              OfflineGroup("Q: 12+345+6789= A:", [" 7146", " 1"], [1.0, 0.0]),
              OfflineGroup("Q: 4= A:", [" 4", " 44", " 444", " 4444"], [1.0, 0.0, 0.0, 0.0])]
    sampler = OfflineSampler(groups, tok, seed=0)
    with torch.no_grad():
        table = sampler._score_all(model, chunk=2)
        assert table.shape == (9, max(len(c) for ids in sampler.ids for c in ids))
        for i, g in enumerate(groups):
            for j, ids in enumerate(sampler.ids[i]):
                alone = build_batch([Group(0, {"prompt": g.prompt}, [ids], [""], ["offline"], rewards=[0.0])], tok, "cpu")
                expected = completion_token_logps(model, *alone.rows(slice(None)))[0]
                row = table[sampler.offsets[i] + j]
                torch.testing.assert_close(row[: len(ids)], expected, rtol=1e-7, atol=1e-7)  # float64 model: float64 table
                assert row[len(ids):].eq(0).all() and row[: len(ids)].ne(0).all()


def test_mixture_puts_offline_and_policy_completions_in_one_group(model_dir, tmp_path):
    data = write_offline(tmp_path / "offline.jsonl")
    run = train(load_config(None, overrides(model_dir, tmp_path, "mix", **{
        "sampler.source": "mixture", "sampler.offline_path": str(data), "sampler.mixture_offline": 2,
        "rollout.max_new_tokens": 8})))
    row = read_metrics(run / "metrics.jsonl")[1]
    assert row["source/offline"] == 0.5 and row["source/policy"] == 0.5
    assert row["samples"] == 4 * 2


def test_bad_offline_file_fails_before_training(model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "completions": ["a", "b"], "rewards": [1, "x"]}\n')
    with pytest.raises(DataError, match="line 1"):
        train(load_config(None, overrides(model_dir, tmp_path, "bad", **{
            "sampler.source": "offline", "sampler.offline_path": str(bad)})))
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_reference_sampling_draws_from_the_frozen_initial_policy(model_dir, tmp_path):
    from gvpo.rollout import SamplingParams as SP
    from gvpo.samplers import PolicySampler

    run = train(load_config(None, overrides(model_dir, tmp_path, "refs", **{"sampler.source": "reference"})))
    assert all(r["source/reference"] == 1.0 for r in read_metrics(run / "metrics.jsonl")[1:])

    class Ref:
        lora = False

        def __init__(self, model):
            self.model = model

    from gvpo.config import ModelConfig
    from gvpo.model.loading import load_policy
    from gvpo.rollout.hf import HFEngine

    policy, tok = load_policy(ModelConfig(name_or_path=str(model_dir)))
    initial, _ = load_policy(ModelConfig(name_or_path=str(model_dir)))
    sampler = PolicySampler(HFEngine(policy, tok), k=4, seed=0, source="reference", reference=Ref(initial))
    before = sampler.sample(rows(0, 2), 0, SP(max_new_tokens=4))
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(-3.0)  # the policy moves; samples must not
    after = sampler.sample(rows(0, 2), 0, SP(max_new_tokens=4))
    assert [g.texts for g in before] == [g.texts for g in after]
