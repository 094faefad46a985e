"""The command line: help lists every config field, errors name the key, data check wiring."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gvpo import cli
from gvpo.config import RunConfig, field_docs


def test_train_help_lists_every_field_with_its_doc(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    config = RunConfig()
    for section in dataclasses.fields(RunConfig):
        obj = getattr(config, section.name)
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            assert f"{section.name}.{f.name} (" in out
            assert docs[f.name], f"{section.name}.{f.name} has no docstring"
            assert docs[f.name].split()[0] in out


def test_unknown_key_is_an_error_naming_the_key_and_choices(capsys):
    assert cli.main(["train", "objective.bta=0.1"]) == 2
    err = capsys.readouterr().err
    assert "objective.bta" in err and "did you mean 'objective.beta'" in err


def test_bad_choice_names_the_valid_ones(capsys):
    assert cli.main(["train", "objective.reference=latest"]) == 2
    assert "fixed, rollout" in capsys.readouterr().err


def test_data_check_options_in_any_order(tmp_path, capsys):
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "rewards": [1, 0]}) + "\n")
    assert cli.main(["data", "check", "--format", "grouped", str(good)]) == 0
    assert "prompts" in capsys.readouterr().out
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "p", "completions": ["a", "b"], "rewards": [1, NaN]}\n{oops\n')
    assert cli.main(["data", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "line 1" in err and "line 2" in err


def test_readme_config_reference_is_current():
    """The README's config reference is ``describe()`` verbatim, so it cannot drift from the code."""
    from pathlib import Path

    from gvpo.config import describe

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert describe() in readme


def test_scientific_notation_overrides_are_numbers():
    """YAML 1.1 reads ``3e-2`` as a string; float fields must still accept it."""
    from gvpo.config import ConfigError, load_config

    assert load_config(None, ["optim.lr=3e-2"]).optim.lr == 0.03
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"])


@pytest.mark.parametrize("args, flag, expected", [
    (["eval", "--n", "-5"], "--n", "expected an integer >= 0, got -5"),
    (["eval", "--samples", "0"], "--samples", "expected an integer >= 1, got 0"),
    (["eval", "--top-p", "1.5"], "--top-p", "expected a number in (0, 1], got 1.5"),
    (["train", "--max-steps", "-1"], "--max-steps", "expected an integer >= 0, got -1"),
])
def test_bad_flag_values_are_refused_naming_the_flag(args, flag, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2
    assert f"argument {flag}: {expected}" in capsys.readouterr().err


def _captured_config(monkeypatch, args):
    """The config ``gvpo train ARGS`` would train with (the trainer replaced by a recorder)."""
    from gvpo import trainer

    seen = {}
    monkeypatch.setattr(trainer, "train", lambda config, **kw: seen.setdefault("config", config) and "run")
    assert cli.main(args) == 0
    return seen["config"]


def test_flag_values_are_strings_and_overrides_may_follow_options(monkeypatch, capsys):
    config = _captured_config(monkeypatch, ["train", "train.seed=3", "--output-dir", "exp #1", "--max-steps", "2",
                                            "output.name=007", "rollout.k=4"])
    assert (config.output.dir, config.output.name) == ("exp #1", "007")
    assert (config.train.seed, config.train.max_steps, config.rollout.k) == (3, 2, 4)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a stray word is still an error
        cli.main(["train", "a.b=1", "--max-steps", "2", "oops"])
    assert "unrecognized arguments: oops" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--n", "2", "a=1"])  # eval takes no overrides
    assert "unrecognized arguments: a=1" in capsys.readouterr().err


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch, capsys):
    (tmp_path / "f").write_text("")
    args = ["train", f"output.dir={tmp_path / 'f'}"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "is a file" in err[0]
    with pytest.raises(RuntimeError, match="is a file"):
        cli.main([*args, "--debug"])
    monkeypatch.setenv("GVPO_DEBUG", "1")
    with pytest.raises(RuntimeError, match="is a file"):
        cli.main(args)
