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
