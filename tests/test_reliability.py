"""Nothing lost, nothing silent: run-folder refusal and lock, resume rules, damaged checkpoints, SIGTERM and
Ctrl-C, write failures, and one clear line (not a traceback) for each user mistake."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gvpo import cli
from gvpo.config import load_config
from gvpo.run.metrics import read_metrics
from gvpo.trainer import train

import tiny

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def settings(model_dir: Path, out: Path, name: str, **extra) -> dict:
    """The smallest run that exercises every part: 2 prompts x 2 completions, a few held-out prompts."""
    base = {"model.name_or_path": str(model_dir), "task.name": "tiny.tiny_add", "task.rewards": ["tiny.digit_reward"],
            "train.max_steps": 2, "train.prompts_per_step": 2, "rollout.k": 2, "output.dir": str(out),
            "output.name": name, "train.eval_every": 0, "train.eval_n": 2, "train.checkpoint_every": 1,
            "output.progress": False, "output.report_to": [], "output.plots": False, "optim.lr": 1e-2}
    base.update(extra)
    return base


def kv(d: dict) -> list[str]:
    return [f"{k}={v if not isinstance(v, list) else ','.join(v)}" for k, v in d.items()]


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2 (tests work on copies)."""
    return train(load_config(None, settings(model_dir, tmp_path_factory.mktemp("runs"), "done")))


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]


def gvpo(args: list[str], capsys) -> tuple[int, list[str]]:
    """``gvpo ARGS`` in this process: exit status and the non-empty stderr lines."""
    code = cli.main(args)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gvpo.cli", *args], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended early:\n{log.read_text()}"
        assert time.time() < deadline, log.read_text()
        time.sleep(0.05)


# ---------------------------------------------------------------- the run folder


def test_rerun_into_a_run_folder_is_refused_and_overwrite_replaces_it(model_dir, run_copy, capsys):
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    args = ["train", *kv(settings(model_dir, run_copy.parent, run_copy.name))]
    code, err = gvpo(args, capsys)
    assert code == 1 and len(err) == 1, err
    assert str(run_copy) in err[0] and "--resume" in err[0] and "output.name" in err[0] and "--overwrite" in err[0]
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()} == before  # nothing touched
    code, err = gvpo([*args, "train.max_steps=1", "--overwrite"], capsys)
    assert code == 0, err
    assert steps(run_copy) == [0, 1]
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["step-000001"]


def test_a_file_in_the_way_of_the_output_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "runs").write_text("not a folder")
    code, err = gvpo(["train", f"output.dir={tmp_path / 'runs'}", "output.name=x"], capsys)
    assert code == 1 and len(err) == 1
    assert f"{tmp_path / 'runs'} is a file" in err[0]
    with pytest.raises(Exception, match="is a file"):  # --debug: the exception itself, with its traceback
        cli.main(["--debug", "train", f"output.dir={tmp_path / 'runs'}", "output.name=x"])


def test_a_second_writer_is_refused_and_a_stale_lock_is_not_in_the_way(model_dir, run_copy, capsys):
    from gvpo.run.folder import RunLock

    lock = RunLock(run_copy).acquire()  # another open file: flock refuses it like another process
    try:
        code, err = gvpo(["train", "--resume", str(run_copy), "train.max_steps=3"], capsys)
    finally:
        lock.release()
    assert code == 1 and f"{run_copy} is in use by another run (pid {os.getpid()}" in err[0], err
    assert steps(run_copy) == [0, 1, 2]
    (run_copy / ".lock").write_text("pid 999999 on a-host-that-died\n")  # left by a killed run: not locked
    code, err = gvpo(["train", "--resume", str(run_copy), "train.max_steps=3"], capsys)
    assert code == 0, err
    assert steps(run_copy) == [0, 1, 2, 3]


# ---------------------------------------------------------------- resume


def test_resume_refuses_keys_that_define_the_run_and_keeps_config_yaml(run_copy, tmp_path, capsys):
    saved = (run_copy / "config.yaml").read_bytes()
    code, err = gvpo(["train", "--resume", str(run_copy), "rollout.k=8", "objective.beta=0.2"], capsys)
    assert code == 1, err
    assert "rollout.k: 2 -> 8" in err[0] and "objective.beta: 0.1 -> 0.2" in err[0]
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(saved), "optim": {"lr": 0.5}}))
    code, err = gvpo(["train", "--resume", str(run_copy), "--config", str(other)], capsys)
    assert code == 1 and "optim.lr: 0.01 -> 0.5" in err[0], err
    assert (run_copy / "config.yaml").read_bytes() == saved and steps(run_copy) == [0, 1, 2]


def test_resume_with_allowed_changes_records_them_and_they_stay(run_copy, capsys):
    saved = (run_copy / "config.yaml").read_bytes()
    code, err = gvpo(["train", "--resume", str(run_copy), "train.max_steps=3", "train.eval_n=3"], capsys)
    assert code == 0, err
    assert (run_copy / "config.yaml").read_bytes() == saved
    record = json.loads((run_copy / "resumes.jsonl").read_text().splitlines()[-1])
    assert record["from_step"] == 2
    assert record["changed"] == {"train.max_steps": [2, 3], "train.eval_n": [2, 3]}
    code, err = gvpo(["train", "--resume", str(run_copy), "train.max_steps=4"], capsys)  # starts from 3, eval_n 3
    assert code == 0, err
    assert steps(run_copy) == [0, 1, 2, 3, 4]
    assert json.loads((run_copy / "resumes.jsonl").read_text().splitlines()[-1])["changed"] == {
        "train.max_steps": [3, 4]}


def test_resume_with_no_checkpoint_restarts_from_zero_without_duplicate_rows(run_copy, capsys):
    shutil.rmtree(run_copy / "checkpoints")
    shutil.rmtree(run_copy / "final")
    code, err = gvpo(["train", "--resume", str(run_copy)], capsys)
    assert code == 0, err
    assert any("restarts from step 0" in line for line in err)
    assert steps(run_copy) == [0, 1, 2]


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(run_copy, capsys):
    model = next((run_copy / "checkpoints" / "step-000002" / "shards").glob("*.safetensors"))
    model.write_bytes(model.read_bytes()[:100])  # truncated
    code, err = gvpo(["train", "--resume", str(run_copy), "train.max_steps=3"], capsys)
    assert code == 0, err
    warning = next(line for line in err if "damaged" in line)
    assert "step-000002" in warning and model.name in warning and "resuming from step-000001" in warning
    assert steps(run_copy) == [0, 1, 2, 3]
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


def test_rotation_keeps_older_intact_checkpoints_until_a_newer_one_checks_out(tmp_path):
    from gvpo.run.checkpoint import rotate
    from gvpo.run.checkpoint_manifest import newest_intact, problem, write_manifest

    for step in (1, 2, 3):
        folder = tmp_path / f"step-{step:06d}"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(bytes(range(step * 10)))
        (folder / "sub").mkdir()
        (folder / "sub" / "shard-0.bin").write_bytes(b"x" * step)  # nested files count too (sharded states)
        write_manifest(folder)
    (tmp_path / "step-000003" / "sub" / "shard-0.bin").write_bytes(b"yyy")  # same size, other bytes
    assert problem(tmp_path / "step-000003", hashes=False) is None
    assert "sub/shard-0.bin does not match" in problem(tmp_path / "step-000003")
    assert newest_intact(tmp_path)[0].name == "step-000002"
    (tmp_path / "step-000003" / "weights.bin").write_bytes(b"")  # now damaged by size as well
    rotate(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003"]  # step 2 is needed
    os.remove(tmp_path / "step-000002" / "manifest.json")
    assert "no manifest.json" in problem(tmp_path / "step-000002")


def test_a_failed_checkpoint_write_names_the_folder_and_keeps_the_last_one(run_copy, monkeypatch):
    import torch

    from gvpo.run import checkpoint as ckpt

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "x/state.pt")

    monkeypatch.setattr(ckpt.torch, "save", full)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    before = {p: p.read_bytes() for p in (run_copy / "checkpoints").rglob("*") if p.is_file()}
    from accelerate import Accelerator

    with pytest.raises(ckpt.CheckpointWriteError) as err:
        ckpt.save_checkpoint(run_copy / "checkpoints", 3, accelerator=Accelerator(cpu=True), policy=model,
                             optimizer=optimizer, scheduler=scheduler, trainer_state={"step": 3}, keep=1)
    assert ".tmp-step-000003: No space left on device" in str(err.value)
    assert "step-000002 is kept" in str(err.value)
    assert {p: p.read_bytes() for p in (run_copy / "checkpoints").rglob("*") if p.is_file()} == before


def test_saved_weights_follow_the_umask_not_0600(finished):
    mode = 0o666 & ~_umask()
    shards = sorted((finished / "checkpoints" / "step-000002" / "shards").glob("*.safetensors"))
    assert shards
    for path in [finished / "final" / "model.safetensors", *shards]:
        assert path.stat().st_mode & 0o777 == mode, path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- signals (real processes)


def test_sigterm_checkpoints_the_finished_steps_and_a_second_writer_is_refused(model_dir, tmp_path, capsys):
    """SIGTERM mid-run: the run ends after its step with a checkpoint of it, exit 143 and the resume command;
    while it ran, a second run into its folder was refused; the resume continues without a gap."""
    run_dir = tmp_path / "long"
    log = tmp_path / "log.txt"
    proc = spawn(["train", *kv(settings(model_dir, tmp_path, "long", **{
        "train.max_steps": 500, "train.checkpoint_every": 0}))], log)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(steps(run_dir)) >= 3, proc, log)
        code, err = gvpo(["train", "--resume", str(run_dir)], capsys)  # the live run holds the lock
        assert code == 1 and "is in use by another run (pid" in err[0], err
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    out = log.read_text()
    done = steps(run_dir)[-1]
    checkpoint = run_dir / "checkpoints" / f"step-{done:06d}"
    assert f"stopped by SIGTERM after step {done}; the last checkpoint is {checkpoint}" in out, out
    assert f"resume with: gvpo train --resume {run_dir}" in out and "Traceback" not in out
    assert "%|" not in out, out  # output.progress=false: no bar at all, the weight-loading ones included
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == done
    code, err = gvpo(["train", "--resume", str(run_dir), f"train.max_steps={done + 1}"], capsys)
    assert code == 0, err
    assert steps(run_dir) == list(range(done + 2))


def test_a_second_ctrl_c_stops_at_once(model_dir, tmp_path):
    """The first Ctrl-C asks to finish the step, which waits on a reward that sleeps 30 s; the second one
    ends the run at once, pointing at what is kept."""
    run_dir = tmp_path / "slow"
    log = tmp_path / "log.txt"
    proc = spawn(["train", *kv(settings(model_dir, tmp_path, "slow", **{
        "task.rewards": ["tiny.slow_reward"], "task.reward_timeout_s": 120}))], log)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists(), proc, log)  # step 0 logged: in the loop
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "SIGINT received" in log.read_text(), proc, log, timeout=20)
        start = time.time()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 128 + signal.SIGINT
        assert time.time() - start < 10
    finally:
        proc.kill()
    out = log.read_text()
    assert "stopped at once in step 1; no checkpoint was written yet" in out and "Traceback" not in out, out
    assert f"resume with: gvpo train --resume {run_dir}" in out


# ---------------------------------------------------------------- one clear line per mistake


def _expect_one_line(code: int, err: list[str], *parts: str) -> None:
    assert code != 0 and len(err) == 1 and "Traceback" not in err[0], err
    for part in parts:
        assert part in err[0], (part, err)


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing", "no such folder"),
    (lambda d: d.mkdir() or d, "the folder is empty"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")) and d, "config.json but no weights"),
])
def test_an_unusable_model_folder_is_one_line(make, expected, tmp_path, capsys):
    path = make(tmp_path / "model")
    code, err = gvpo(["train", f"model.name_or_path={path}", f"output.dir={tmp_path}", "output.name=r"], capsys)
    _expect_one_line(code, err, f"model.name_or_path={path}", expected)


def test_a_seq2seq_model_is_one_line(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    path = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_ff=16, num_layers=1, num_heads=2,
                                        d_kv=4)).save_pretrained(path)
    code, err = gvpo(["train", f"model.name_or_path={path}", f"output.dir={tmp_path}", "output.name=r"], capsys)
    _expect_one_line(code, err, f"model.name_or_path={path}", "encoder-decoder")  # load_policy's own check


def test_whatever_load_policy_raises_becomes_one_line(tmp_path, monkeypatch, capsys):
    from gvpo.model import loading as models

    def refuse(config, device):
        raise ValueError("model_type 'bert' is a masked LM, not a causal LM\nmore detail")

    monkeypatch.setattr(models, "load_policy", refuse)
    code, err = gvpo(["train", f"output.dir={tmp_path}", "output.name=r"], capsys)
    _expect_one_line(code, err, "model.name_or_path=default", "ValueError: model_type 'bert' is a masked LM")


def test_a_tokenizer_without_pad_or_eos_is_one_line(model_dir, tmp_path, capsys):
    path = Path(shutil.copytree(model_dir, tmp_path / "nopad"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    for key in ("pad_token", "eos_token"):
        cfg.pop(key, None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "special_tokens_map.json").unlink(missing_ok=True)
    code, err = gvpo(["train", *kv(settings(path, tmp_path, "r"))], capsys)
    _expect_one_line(code, err, f"model.name_or_path={path}", "neither a pad nor an EOS token")


def _drop_keys(path: Path, keys: dict) -> Path:
    """Remove ``keys[file]`` from each JSON file of the model folder ``path``."""
    for name, names in keys.items():
        data = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps({k: v for k, v in data.items() if k not in names}))
    return path


def test_a_tokenizer_without_pad_pads_with_eos_as_trl_does(model_dir, tmp_path):
    from gvpo.config import ModelConfig
    from gvpo.model.loading import load_policy

    path = _drop_keys(Path(shutil.copytree(model_dir, tmp_path / "nopad")), {"tokenizer_config.json": ["pad_token"]})
    _, tokenizer = load_policy(ModelConfig(name_or_path=str(path)))
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == tokenizer.eos_token_id == 2


def test_a_model_without_eos_trains_to_the_length_budget_with_one_warning(tmp_path, capsys):
    """The issue's case: the embedded model with eos removed from its tokenizer, config and generation config
    (transformers still finds its ``<pad>``). Completions cannot end early, so each has max_new_tokens tokens."""
    from gvpo.tasks.arithmetic import default_model_path

    path = _drop_keys(Path(shutil.copytree(default_model_path(), tmp_path / "noeos")), {
        "tokenizer_config.json": ["pad_token", "eos_token"], "config.json": ["pad_token_id", "eos_token_id"],
        "generation_config.json": ["pad_token_id", "eos_token_id"]})
    code, err = gvpo(["train", f"model.name_or_path={path}", f"output.dir={tmp_path}", "output.name=r",
                      "train.max_steps=1", "train.prompts_per_step=2", "rollout.k=2", "rollout.max_new_tokens=4",
                      "train.eval_n=2", "output.progress=false", "output.report_to=[]", "output.plots=false"], capsys)
    assert code == 0 and err == [f"gvpo: warning: model.name_or_path={path}: no EOS token (tokenizer, config.json, "
                                 "generation_config.json); every completion runs to rollout.max_new_tokens"], err
    assert read_metrics(tmp_path / "r" / "metrics.jsonl")[1]["completion_len"] == 4


def test_a_malformed_config_file_is_one_line_with_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("train: {max_steps: 2\nobjective:\n  beta: [0.1\n")
    code, err = gvpo(["train", "--config", str(path), f"output.dir={tmp_path}"], capsys)
    assert code == 2
    _expect_one_line(code, err, f"gvpo: config error: {path}, line 2, column 10: expected ',' or '}}'")


def test_the_old_tensorboard_key_is_one_warning_line_naming_report_to(model_dir, tmp_path, capsys):
    code, err = gvpo(["train", *kv(settings(model_dir, tmp_path, "old", **{"train.max_steps": 1})),
                      "output.tensorboard=false"], capsys)
    assert code == 0 and len(err) == 1 and err[0].startswith("gvpo: warning: output.tensorboard is deprecated"), err
    assert "use output.report_to" in err[0] and not (tmp_path / "old" / "tensorboard").exists()


def raising_reward(prompts, completions, **_):
    return [1 / 0 for _ in completions]


def string_reward(prompts, completions, **_):
    return ["good" for _ in completions]


def short_reward(prompts, completions, **_):
    return [1.0]


def none_reward(prompts, completions, **_):
    return [None for _ in completions]


@pytest.mark.parametrize("reward, expected", [
    ("raising_reward", "raised ZeroDivisionError: division by zero"),
    ("string_reward", "returned 'good' (a str) for completion 0; expected a number or None"),
    ("short_reward", "returned 1 values for 4 completions"),
])
def test_a_broken_reward_is_one_line_with_its_name_and_step(reward, expected, model_dir, tmp_path, capsys):
    code, err = gvpo(["train", *kv(settings(model_dir, tmp_path, "r", **{
        "task.rewards": [f"test_reliability.{reward}"]}))], capsys)
    _expect_one_line(code, err, f"step 1: reward 'test_reliability.{reward}' {expected}")


def test_a_step_where_every_reward_is_none_is_skipped_and_counted(model_dir, tmp_path, capsys):
    code, err = gvpo(["train", *kv(settings(model_dir, tmp_path, "r", **{
        "task.rewards": ["test_reliability.none_reward"]}))], capsys)
    assert code == 0, err
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["skipped_steps"] for r in rows[1:]] == [1, 2] and [r["reward_none"] for r in rows[1:]] == [4, 4]
    assert any("step 2: every reward was None (4 completions dropped)" in line for line in err)


def test_train_prints_the_data_check_report_for_a_bad_offline_file(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q: 1+1= A:", "completions": [" 2", " 3"], "rewards": [1, NaN]}\n{oops\n')
    assert cli.main(["data", "check", str(bad)]) == 1
    report = capsys.readouterr().err.strip().splitlines()
    code, err = gvpo(["train", *kv(settings(model_dir, tmp_path, "r", **{
        "sampler.source": "offline", "sampler.offline_path": str(bad)}))], capsys)
    assert code == 1 and err[:len(report)] == [f"gvpo: {report[0]}", *report[1:]], (report, err)
