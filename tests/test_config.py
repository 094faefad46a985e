"""Config loading: every cross-field check of ``validate`` refuses a bad value and names the key."""

from __future__ import annotations

import pytest

from gvpo.config import ConfigError, RunConfig, load_config


@pytest.mark.parametrize("overrides, key", [
    (["rollout.k=0"], "rollout.k"),
    (["train.prompts_per_step=0"], "train.prompts_per_step"),
    (["train.updates_per_batch=0"], "train.updates_per_batch"),
    (["rollout.k=1"], "rollout.k"),
    (["objective.beta=0"], "objective.beta"),
    (["optim.lr=-1e-4"], "optim.lr"),
    (["rollout.top_p=0"], "rollout.top_p"),
    (["rollout.top_p=1.5"], "rollout.top_p"),
    (["rollout.temperature=0"], "rollout.temperature"),
    (["train.max_steps=-1"], "train.max_steps"),
    (["sampler.source=offline"], "sampler.offline_path"),
    (["sampler.source=mixture"], "sampler.offline_path"),
    (["sampler.source=replay", "sampler.replay_historical=8"], "sampler.replay_historical"),
    (["sampler.source=replay", "sampler.replay_historical=-1"], "sampler.replay_historical"),
    (["sampler.source=replay", "sampler.replay_revisit=1.0"], "sampler.replay_revisit"),
    (["sampler.source=replay", "sampler.replay_revisit=-0.1"], "sampler.replay_revisit"),
    (["task.rewards=[a, b]", "task.reward_weights=[1.0]"], "task.reward_weights"),
    (["sampler.source=replya"], "sampler.source"),
    (["train.max_step=3"], "train.max_step"),
    (["rollout.max_new_tokens=-3"], "rollout.max_new_tokens"),
    (["train.eval_n=-1"], "train.eval_n"),
    (["train.checkpoint_every=-1"], "train.checkpoint_every"),
    (["train.eval_every=-2"], "train.eval_every"),
    (["train.keep_checkpoints=-1"], "train.keep_checkpoints"),
    (["task.reward_timeout_s=-5"], "task.reward_timeout_s"),
])
def test_bad_values_are_refused_with_the_key_named(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_boundary_values_are_accepted():
    config = load_config(None, ["rollout.k=2", "rollout.top_p=1", "sampler.source=replay",
                                "sampler.replay_historical=0", "sampler.replay_revisit=0", "train.max_steps=0"])
    assert (config.rollout.k, config.sampler.replay_historical, config.train.max_steps) == (2, 0, 0)
    assert load_config(None, ["sampler.source=replay", "sampler.replay_revisit=0.99"]).sampler.replay_revisit == 0.99
    assert load_config(None, []) == RunConfig()


def test_string_fields_take_override_text_as_written():
    """Names and paths are strings: ``007`` stays ``007`` (YAML would read 7), ``#`` is not a comment, and a
    quoted value is read by YAML; numbers and lists in other fields are still YAML."""
    config = load_config(None, ["output.name=007", "output.dir=exp #1", "sampler.offline_path='a b.jsonl'",
                                "train.max_steps=007", "task.rewards=[a, b]"])
    assert (config.output.name, config.output.dir, config.sampler.offline_path) == ("007", "exp #1", "a b.jsonl")
    assert config.train.max_steps == 7 and config.task.rewards == ["a", "b"]
    assert load_config(None, [("output.name", "x y")]).output.name == "x y"  # (key, value) pairs pass as they are
