"""Asynchronous rollouts (``train.async_lag``, :mod:`gvpo.generation`): exact, reproducible, resumable.

The in-process backend (weight snapshots) is the definition of lag mode written out; the process backend
(a spawned generator with its own model) must give the same weights bit for bit on the same thread count.
Runs use the tiny model of ``tests/tiny.py`` and one thread per process.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import gvpo.trainer as trainer
from gvpo import generation
from gvpo.batch import Batch, Group, build_batch
from gvpo.config import ConfigError, ObjectiveConfig, load_config
from gvpo.generation import base as generation_base
from gvpo.model.checks import load_checked
from gvpo.objectives import OBJECTIVES, create_objective
from gvpo.objectives.grpo import grpo_advantages
from gvpo.run.metrics import read_metrics
from gvpo.update import update

import tiny

TESTS = Path(__file__).resolve().parent
TIMING = ("time_s", "gen_wait_s", "train_wait_s")
LAG_KEYS = ("staleness_mean", "staleness_max", "gen_wait_s", "train_wait_s")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def overrides(model_dir: Path, out: Path, name: str, **extra) -> dict:
    base = {"model.name_or_path": str(model_dir), "task.name": "tiny.tiny_add", "task.rewards": ["tiny.digit_reward"],
            "train.max_steps": 5, "train.prompts_per_step": 4, "rollout.k": 4, "output.dir": str(out),
            "output.name": name, "train.eval_every": 0, "train.eval_n": 4, "train.checkpoint_every": 0,
            "output.progress": False, "output.report_to": [], "output.plots": False, "optim.lr": 1e-2,
            "optim.warmup_steps": 0, "train.async_threads": 1}
    base.update(extra)
    return base


def run(model_dir, out, name, **extra) -> Path:
    return trainer.train(load_config(None, overrides(model_dir, out, name, **extra)))


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def rows(run_dir: Path, drop=TIMING) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(run_dir / "metrics.jsonl")]


def test_lag_zero_through_the_generator_is_the_synchronous_loop(model_dir, tmp_path, monkeypatch, one_thread):
    """``train.async_lag=0`` is the loop without any generator: no lag metrics. The same loop with the in-process
    generator forced in at lag 0 (snapshots, a copy of the policy sampling, the reference's log-probs computed by
    the generator) gives the same weights bit for bit and the same metrics rows."""
    plain = run(model_dir, tmp_path, "plain")
    assert not any(key in r for r in read_metrics(plain / "metrics.jsonl") for key in LAG_KEYS)

    def lag_zero(config, sampler, **parts):
        return generation.build(config, sampler, lag=0, backend="inprocess", **parts)

    monkeypatch.setattr(trainer, "lagged", lag_zero)
    forced = run(model_dir, tmp_path, "forced")
    assert_identical(weights(plain), weights(forced))
    assert rows(plain) == rows(forced, drop=TIMING + LAG_KEYS)
    assert {r["staleness_max"] for r in read_metrics(forced / "metrics.jsonl")[1:]} == {0}


def test_process_backend_matches_the_inprocess_backend(model_dir, tmp_path, one_thread):
    """Lag 2, GRPO with the sampler's ratio and a k3 penalty, so the generator computes both the sampler's and the
    fixed reference's log-probs: the spawned generator and the snapshots give the same weights and metrics."""
    grpo = {"objective.name": "grpo", "objective.kl_coef": 0.1, "train.async_lag": 2}
    inproc = run(model_dir, tmp_path, "inproc", **grpo, **{"train.async_backend": "inprocess"})
    proc = run(model_dir, tmp_path, "proc", **grpo, **{"train.async_backend": "process"})
    assert_identical(weights(inproc), weights(proc))
    assert rows(inproc) == rows(proc)
    assert max(r.get("clip_fraction", 0) for r in rows(proc)) > 0  # the ratio to the sampler is not 1


@pytest.mark.parametrize("lag", [1, 3])
def test_every_trained_completion_has_the_version_the_lag_implies(model_dir, tmp_path, monkeypatch, lag, one_thread):
    """Two epochs of two mini-batches per step (4 optimizer steps): step s (from 0) trains only on completions of
    version 4 * max(0, s - lag), and logs staleness 4 * min(s, lag)."""
    seen = []

    def recording_update(policy, optimizer, batch, objective, **kw):
        seen.append((len(seen), list(batch.policy_versions)))
        return update(policy, optimizer, batch, objective, **kw)

    monkeypatch.setattr(trainer, "update", recording_update)
    out = run(model_dir, tmp_path, f"v{lag}", **{"train.async_lag": lag, "train.async_backend": "inprocess",
                                                 "train.updates_per_batch": 2, "train.mini_batches": 2})
    per_step = 4
    assert len(seen) == 5 * per_step
    for call, versions in seen:
        step = call // per_step
        assert versions == [per_step * max(0, step - lag)] * 8, (step, versions)
    logged = read_metrics(out / "metrics.jsonl")[1:]
    assert [r["staleness_mean"] for r in logged] == [float(per_step * min(s, lag)) for s in range(5)]
    assert [r["staleness_max"] for r in logged] == [per_step * min(s, lag) for s in range(5)]
    assert [r["optimizer_steps"] for r in logged] == [per_step * (s + 1) for s in range(5)]


def test_each_step_trains_on_what_the_weights_of_lag_steps_earlier_sample(model_dir, tmp_path, monkeypatch, one_thread):
    """Independently of :mod:`gvpo.generation`: record the weights at the start of every step and the completions
    each step trains on; then a fresh policy sampler on a fresh model holding the weights of the start of step
    max(0, s - 2) regenerates step s's rows: the same completions, token for token."""
    from gvpo.rollout import SamplingParams
    from gvpo.rollout.hf import HFEngine
    from gvpo.samplers import PolicySampler, step_rows

    starts, trained = [], []

    def recording_update(policy, optimizer, batch, objective, **kw):
        starts.append({k: v.detach().clone() for k, v in policy.state_dict().items()})
        trained.append([ids[mask.bool()].tolist() for ids, mask in
                        zip(batch.input_ids[:, -batch.completion_mask.shape[1]:], batch.completion_mask)])
        return update(policy, optimizer, batch, objective, **kw)

    monkeypatch.setattr(trainer, "update", recording_update)
    config = load_config(None, overrides(model_dir, tmp_path, "regen", **{"train.async_lag": 2,
                                                                          "train.async_backend": "inprocess"}))
    trainer.train(config)
    model, tokenizer = load_checked(config.model, "cpu")
    task = tiny.tiny_add()
    sampler = PolicySampler(HFEngine(model, tokenizer), k=4, seed=0)
    for step in range(5):
        model.load_state_dict(starts[max(0, step - 2)])
        groups = sampler.sample(step_rows(task.train, step, 4, 0), step, SamplingParams(task.max_new_tokens))
        assert [ids for g in groups for ids in g.completion_ids] == trained[step], step
    assert trained[3] != trained[4]  # the steps differ (a check that could not fail otherwise)


def test_permuting_or_replacing_the_versions_changes_no_update(model_dir, tmp_path, monkeypatch, one_thread):
    """No objective reads ``policy_version``: every registered objective gives the same loss and gradient, bit for
    bit, for a batch of mixed versions and for the same batch with the versions permuted; and a lagged run whose
    versions are replaced by arbitrary numbers trains to the same weights."""
    policy, tokenizer = load_checked(load_config(None, overrides(model_dir, tmp_path, "x")).model, "cpu")
    gen = torch.Generator().manual_seed(0)
    groups = [Group(g, {"prompt": f"Q: {g}+1= A:"}, [[5 + g, 6, 2], [7, 2], [8, 9, 10, 2]], ["a", "b", "c"],
                    ["policy"] * 3, rewards=[1.0, 0.0, 0.5], policy_version=[3 * g, 7, 1 + g],
                    sampler_token_logps=[-torch.rand(len(ids), generator=gen) for ids in ([5, 6, 2], [7, 2], [8, 9, 10, 2])])
              for g in range(2)]
    flipped = [Group(g.group_id, g.row, g.completion_ids, g.texts, g.sources, rewards=g.rewards,
                     policy_version=g.policy_version[::-1], sampler_token_logps=g.sampler_token_logps) for g in groups]
    accelerator = Accelerator(cpu=True)
    for name in OBJECTIVES.names():
        results = []
        for version_groups in (groups, flipped):
            model = copy.deepcopy(policy)
            batch = build_batch(version_groups, tokenizer, "cpu")
            batch.ref_token_logps = torch.zeros_like(batch.completion_mask, dtype=torch.float32)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            objective = create_objective(ObjectiveConfig(name=name), max_completion_length=8)
            stats = update(model, optimizer, batch, objective, micro_batch_size=0, share_prompts=True, max_grad_norm=0,
                           accelerator=accelerator)
            results.append((stats["loss"], stats["grad_norm"], [p.detach().clone() for p in model.parameters()]))
        assert results[0][0] == results[1][0] and results[0][1] == results[1][1], name
        assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2])), name

    lagged = {"train.async_lag": 1, "train.async_backend": "inprocess"}
    honest = run(model_dir, tmp_path, "honest", **lagged)
    stamp = generation_base._stamp
    monkeypatch.setattr(generation_base, "_stamp", lambda group, version: stamp(group, 1000 + 37 * group.group_id))
    replaced = run(model_dir, tmp_path, "replaced", **lagged)
    assert_identical(weights(honest), weights(replaced))
    assert rows(honest, drop=TIMING + LAG_KEYS) == rows(replaced, drop=TIMING + LAG_KEYS)


def test_grpo_ratio_is_to_the_sampler_under_a_lag_unless_turned_off():
    """``objective.importance_sampling``: with the sampler's log-probs in the batch, GRPO's ratio is pi_theta / mu,
    PPO-clipped, as TRL's AsyncGRPOTrainer computes it (``coef_1 = exp(logp - old)``, ``-min(coef_1 A,
    clamp(coef_1) A)``, written out here in float64); off, or without sampler log-probs, the ratio is to pi_old."""
    torch.manual_seed(0)
    n, width = 4, 3
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    logps, old, sampler = (-torch.rand(n, width, dtype=torch.float64) for _ in range(3))
    rewards, group_ids = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64), torch.tensor([0, 0, 1, 1])

    def batch(with_sampler):
        return Batch(input_ids=torch.zeros(n, 5, dtype=torch.long), attention_mask=torch.ones(n, 5),
                             completion_mask=mask, rewards=rewards, group_ids=group_ids, old_token_logps=old,
                             sampler_token_logps=sampler if with_sampler else None)

    def trl_async(denominator):  # TRL's _compute_loss in async_grpo_trainer.py, loss_type "grpo" aggregation
        adv = grpo_advantages(rewards, group_ids)[:, None]
        coef_1 = torch.exp(logps - denominator)
        per_token = -torch.min(coef_1 * adv, torch.clamp(coef_1, 0.8, 1.2) * adv)
        return float(((per_token * mask).sum(-1) / mask.sum(-1)).mean())

    def value(importance_sampling, with_sampler):
        objective = create_objective(ObjectiveConfig(name="grpo", kl_coef=0.0, importance_sampling=importance_sampling))
        b = batch(with_sampler)
        prepared = objective.prepare(b, logps)
        return float(objective.micro_loss(logps, b, slice(None), prepared) / prepared.norm)

    assert value(True, True) == pytest.approx(trl_async(sampler), rel=1e-12)
    assert value(False, True) == pytest.approx(trl_async(old), rel=1e-12)
    assert value(True, False) == pytest.approx(trl_async(old), rel=1e-12)
    assert abs(trl_async(sampler) - trl_async(old)) > 1e-3


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gvpo.cli", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _kv(d: dict) -> list[str]:
    return [f"{k}={v if not isinstance(v, list) else ','.join(v)}" for k, v in d.items()]


def test_kill_minus_nine_and_resume_give_identical_weights(model_dir, tmp_path, one_thread):
    """Lag 2, process backend: SIGKILL the trainer after its step-4 checkpoint (which holds the groups of steps 5 and
    6, generated but not trained), resume: the same weights and metrics as an uninterrupted run. The killed trainer's
    generator process exits by itself. The uninterrupted and the resumed runs use the in-process backend (it gives
    the same weights, and a resume may change the backend), which keeps the test short."""
    lag = {"train.async_lag": 2, "train.max_steps": 7, "train.checkpoint_every": 2}
    straight = run(model_dir, tmp_path, "straight", **lag, **{"train.async_backend": "inprocess"})

    run_dir = tmp_path / "killed"
    victim = _cli(_kv(overrides(model_dir, tmp_path, "killed", **lag)))
    deadline, generators = time.time() + 300, set()
    while not (run_dir / "checkpoints" / "step-000004").exists():
        assert victim.poll() is None, "run finished before it could be killed: " + victim.stdout.read()
        assert time.time() < deadline
        generators |= set(_children(victim.pid))  # every child seen: the generator starts after spawn's helpers
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    pending = json.loads((run_dir / "checkpoints" / "step-000004" / "sampler-0.json").read_text())["pending"]
    assert sorted(pending) == ["4", "5"] and all(len(groups) == 4 for groups in pending.values())
    assert generators, "no generator process seen"
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
              for pid in generators):
        assert time.time() < deadline, "the generator outlived its killed trainer"
        time.sleep(0.1)

    resumed = _cli(["--resume", str(run_dir), "train.async_backend=inprocess"])
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert_identical(weights(straight), weights(run_dir))
    assert rows(straight, drop=TIMING) == rows(run_dir, drop=TIMING)


def test_no_signal_no_update_in_lag_mode(model_dir, tmp_path, one_thread):
    """All rewards 0, fixed reference: the GVPO weights are exactly 0 only if the reference log-probs that the
    generator computed equal the trainer's policy log-probs bit for bit, and then three lagged steps leave the
    weights exactly as they were. The in-process backend runs here; the process backend's reference log-probs are
    the same bits (``test_process_backend_matches_the_inprocess_backend`` trains on them with a k3 penalty)."""
    out = run(model_dir, tmp_path, "zero", **{"task.rewards": ["tiny.zero_reward"], "train.max_steps": 3,
                                             "train.async_lag": 2, "train.async_backend": "inprocess"})
    logged = read_metrics(out / "metrics.jsonl")[1:]
    assert [(r["kl"], r["grad_norm"]) for r in logged] == [(0.0, 0.0)] * 3
    assert [r["staleness_max"] for r in logged] == [0, 1, 2]  # optimizer steps were taken, with zero gradients
    assert_identical(load_file(str(model_dir / "model.safetensors")), weights(out))


@pytest.mark.parametrize("source", ["reference", "replay", "offline", "mixture", "my_pkg.samplers.custom"])
def test_what_does_not_compose_is_refused_by_name(source):
    config = load_config(None, {"train.async_lag": 1, "sampler.source": source, "sampler.offline_path": "x.jsonl"}) \
        if "." not in source else load_config(None, {"train.async_lag": 1, "sampler.source": source})
    with pytest.raises(ConfigError, match=rf"train.async_lag=1 with sampler.source={source}: "):
        generation.check(config, world=1)


def test_more_than_one_process_is_refused_and_the_policy_sampler_accepted():
    with pytest.raises(ConfigError, match="train.async_lag=1 with 2 processes: not composed yet"):
        generation.check(load_config(None, {"train.async_lag": 1}), world=2)
    generation.check(load_config(None, {"train.async_lag": 1}), world=1)


@pytest.mark.parametrize("key, value", [("task.environment", "my_pkg.envs.Calculator"), ("task.tools", ["my_pkg.add"])])
def test_episodes_are_refused_by_name(key, value):
    """The generator process builds its own engine, without the episode runner: multi-turn rows would silently
    become single-turn ones, so the combination stops at start-up, naming both settings."""
    with pytest.raises(ConfigError, match=r"train.async_lag=1 with task.environment/task.tools: not composed yet"):
        generation.check(load_config(None, {"train.async_lag": 1, key: value}), world=1)


def test_a_tasks_own_environment_is_refused_too():
    """``arithmetic_tool`` brings its calculator without ``task.environment``: the engine then runs episodes, which
    the build sees (``episodes=True``) although the config names no environment."""
    config = load_config(None, {"train.async_lag": 1, "task.name": "arithmetic_tool"})
    generation.check(config, world=1)
    with pytest.raises(ConfigError, match=r"train.async_lag=1 with task.environment/task.tools: not composed yet"):
        generation.check(config, world=1, episodes=True)


def test_every_grpo_family_objective_gets_the_samplers_log_probs():
    """The generator computes the sampler's log-probs for the objectives in ``SAMPLER_RATIO``; every registered
    objective built on ``GRPOObjective`` (grpo, gspo, ...) must be one of them, or its ratio under a lag would
    silently fall back to pi_old (no importance sampling) while ``objective.importance_sampling`` says true."""
    from gvpo.generation.sampler import SAMPLER_RATIO
    from gvpo.objectives.grpo import GRPOObjective

    family = {name for name in OBJECTIVES.names()
              if isinstance(create_objective(ObjectiveConfig(name=name), max_completion_length=8), GRPOObjective)}
    assert family == set(SAMPLER_RATIO) and "gspo" in family
