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


def test_a_malformed_config_file_is_one_config_error_with_file_line_and_column(tmp_path):
    """The issue's file: an unclosed flow mapping on line 1 (column 8), so the parser meets ``beta:`` on line 2
    while it still expects ``,`` or ``}`` (line 2, column 10: the ``:`` after ``objective``'s child key)."""
    path = tmp_path / "run.yaml"
    path.write_text("train: {max_steps: 2\nobjective:\n  beta: [0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}, line 2, column 10: expected ',' or '}}', but got ':'"), message
    assert "flow mapping that starts at line 1, column 8" in message and "\n" not in message


def test_a_malformed_override_value_is_a_config_error_but_string_fields_take_any_text():
    with pytest.raises(ConfigError, match=r"override 'train.max_steps=\[1,', line 1, column 4"):
        load_config(None, ["train.max_steps=[1,"])
    assert load_config(None, ["output.name={x"]).output.name == "{x"  # a name, never parsed as YAML


@pytest.mark.parametrize("value, expected", [("true", ["tensorboard"]), ("false", [])])
def test_the_old_tensorboard_key_still_works_for_one_release_with_a_warning(value, expected, tmp_path):
    from gvpo.yaml_input import DeprecatedKeyWarning

    path = tmp_path / "old.yaml"
    path.write_text(f"output:\n  tensorboard: {value}\n")
    for source, overrides in ((path, None), (None, [f"output.tensorboard={value}"])):
        with pytest.warns(DeprecatedKeyWarning, match=r"output\.tensorboard is deprecated.*use output\.report_to"):
            assert load_config(source, overrides).output.report_to == expected
    with pytest.warns(DeprecatedKeyWarning):  # on top of other trackers: only tensorboard is added or removed
        config = load_config(None, ["output.report_to=[wandb]", f"output.tensorboard={value}"])
    assert config.output.report_to == ["wandb", *expected]
    with pytest.raises(ConfigError, match="output.tensorboard: expected true or false"):
        load_config(None, ["output.tensorboard=maybe"])
