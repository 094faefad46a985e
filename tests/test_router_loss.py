"""The MoE router's load-balancing loss in gvpo's own trainer (``model.router_aux_loss_coef``).

TRL 1.16 adds ``coef * aux_loss / accumulation_steps`` to each micro-batch's loss, ``aux_loss`` being what the
model returns for that forward when asked for its router logits. ``update`` must do the same with its
micro-batches: one optimizer step on a float64 tiny Qwen3-MoE equals one SGD step on ``gvpo_loss + coef *
mean over micro-batches of aux_loss`` computed by plain forwards, whatever the micro-batch size and with
prefix sharing requested (the router loss needs full forwards, so the update turns sharing off). Then the
term's gradient against TRL's own, and the coefficient's default and errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

import tiny
from gvpo import cli, gvpo_loss
from gvpo.batch import Batch, token_logps_for
from gvpo.config import ConfigError, ModelConfig
from gvpo.model.loading import load_policy
from gvpo.model.logprobs import completion_token_logps
from gvpo.model.router_loss import RouterLoss, router_aux_loss_coef
from gvpo.objectives.weighted import GVPOObjective
from gvpo.update import update
from test_model_families import grouped_batch, per_row_logps, run_overrides

BETA = 0.1


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is faster and keeps BLAS on one code path."""


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_family(tmp_path_factory.mktemp("moe") / "model", "qwen3_moe")


def moe_batch(moe_dir: Path) -> Batch:
    """3 groups of 3 (left-padded prompts, ragged completions), varied rewards, and reference log-probs of
    another model (seed 1), so the GVPO weights carry implicit rewards as well as rewards."""
    ids, attention, completion = grouped_batch()
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 2.0, -1.0, 0.0, 0.0, 1.5], dtype=torch.float64)
    batch = Batch(ids, attention, completion, rewards, torch.arange(3).repeat_interleave(3))
    other = tiny.make_tiny_family(moe_dir.parent / "other", "qwen3_moe", seed=1)
    reference, _ = load_policy(ModelConfig(name_or_path=str(other), dtype="float64"))
    with torch.no_grad():
        batch.ref_token_logps = completion_token_logps(reference, ids, attention, completion, share_prompts=False)
    return batch


@pytest.mark.parametrize("micro_batch_size, buckets", [(0, False), (4, False), (0, True)])
def test_update_adds_trls_router_term_per_micro_batch(moe_dir, micro_batch_size, buckets, monkeypatch):
    """float64 (``load_policy`` picks transformers' eager experts: its grouped_mm kernel has no float64).
    Reference: per-row unpadded log-probs, ``gvpo_loss``, and ``aux_loss`` of a plain forward of each
    micro-batch's rows (9 rows: micro-batches of 4, 4, 1), averaged and weighted by the model's 0.001.
    transformers computes the router statistics in float32 even in a float64 model, so the router term is
    exact to float32 rounding; without it the step would differ by far more. ``buckets``: a pass costs
    nothing, so scoring would split the rows by completion length (6, 5, 4 tokens) into three passes; the
    router loss is still that of one forward over all rows."""
    if buckets:
        monkeypatch.setattr("gvpo.model.logprobs.PASS_COST", 0)
    batch = moe_batch(moe_dir)
    steps = {}
    for coef in (None, 0.0):
        policy, _ = load_policy(ModelConfig(name_or_path=str(moe_dir), dtype="float64"))
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        stats = update(policy, optimizer, batch, GVPOObjective(BETA), micro_batch_size=micro_batch_size,
                       share_prompts=True, max_grad_norm=0.0, accelerator=Accelerator(cpu=True), router_coef=coef)
        steps[coef] = ({k: v.detach().clone() for k, v in policy.state_dict().items()}, stats)

    policy, _ = load_policy(ModelConfig(name_or_path=str(moe_dir), dtype="float64"))
    initial = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    logps = per_row_logps_with_grad(policy, batch)
    size = micro_batch_size or len(batch)
    rows = [slice(s, s + size) for s in range(0, len(batch), size)]
    aux = torch.stack([policy(input_ids=batch.input_ids[sl], attention_mask=batch.attention_mask[sl],
                              output_router_logits=True).aux_loss for sl in rows])
    loss = gvpo_loss(logps, batch.ref_logps.double(), batch.rewards, batch.group_ids, beta=BETA) + 0.001 * aux.mean()
    names = [name for name, _ in policy.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss, list(policy.parameters()))))
    expected = {k: initial[k] - grads[k] if k in grads else initial[k] for k in initial}
    with_router, stats = steps[None]
    diff = max((with_router[k] - expected[k]).abs().max().item() for k in expected)
    effect = max((with_router[k] - steps[0.0][0][k]).abs().max().item() for k in expected)
    assert diff < 1e-8 < 1e-6 < effect
    assert stats["aux_loss"] == pytest.approx(aux.mean().item(), rel=1e-6)
    assert "aux_loss" not in steps[0.0][1]


def per_row_logps_with_grad(model, batch: Batch) -> torch.Tensor:
    """Sequence log-probs, each row alone without padding (as ``test_model_families.per_row_logps``, with grad)."""
    out = []
    for row in range(len(batch)):
        tokens = batch.input_ids[row][batch.attention_mask[row].bool()][None]
        clen = int(batch.completion_mask[row].sum())
        logits = model(input_ids=tokens).logits[0, -clen - 1:-1]
        out.append(torch.log_softmax(logits, -1).gather(1, tokens[0, -clen:, None]).sum())
    return torch.stack(out)


def test_router_term_gradient_equals_trls_for_the_same_rows(moe_dir, tmp_path):
    """The gradient of ``RouterLoss``'s term on a micro-batch equals that of TRL's ``coef * aux_loss`` from its
    own ``_get_per_token_logps_and_entropies`` (its fused head, labels and router request) on the same rows."""
    pytest.importorskip("trl")
    import trl_fixed

    grpo = trl_fixed.make_trainer(moe_dir, tmp_path, grpo=True, model_init_kwargs={"dtype": torch.float32})
    ids, attention, completion = grouped_batch()
    _, _, theirs = grpo._get_per_token_logps_and_entropies(grpo.model, ids, attention, completion.shape[1],
                                                          compute_aux_loss=True)
    policy, _ = load_policy(ModelConfig(name_or_path=str(moe_dir)))
    batch = Batch(ids, attention, completion, torch.zeros(9), torch.arange(3).repeat_interleave(3))
    router = RouterLoss(policy, None, micro_batches=1)
    router.forward(token_logps_for, policy, batch, slice(0, 9), False)
    ours = torch.autograd.grad(router.term(), list(policy.parameters()), allow_unused=True)
    trl = torch.autograd.grad(grpo.router_aux_loss_coef * theirs, list(grpo.model.parameters()), allow_unused=True)
    assert router.coef == grpo.router_aux_loss_coef == 0.001
    for a, b in zip(ours, trl):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-5)


def test_coefficient_follows_trls_rule_and_refuses_a_dense_model(moe_dir, tmp_path, capsys):
    """None = the MoE config's own (0.001 for Qwen3-MoE and Mixtral) or 0 for a dense model; an explicit value
    wins; a nonzero value for a dense model, or a negative one, stops ``gvpo train`` with one line naming it."""
    moe, _ = load_policy(ModelConfig(name_or_path=str(moe_dir)))
    dense_dir = tiny.make_tiny_model(tmp_path / "dense")
    dense, _ = load_policy(ModelConfig(name_or_path=str(dense_dir)))
    assert router_aux_loss_coef(moe, None) == 0.001 and router_aux_loss_coef(moe, 0.5) == 0.5
    assert router_aux_loss_coef(dense, None) == router_aux_loss_coef(dense, 0.0) == 0.0
    with pytest.raises(ConfigError, match="model.router_aux_loss_coef=0.1: LlamaForCausalLM is not a Mixture"):
        router_aux_loss_coef(dense, 0.1)
    for value, message in ((0.1, "is not a Mixture-of-Experts model"), (-1, "must be >= 0")):
        args = [f"{k}={v}" for k, v in run_overrides(dense_dir, tmp_path, "cli").items() if k != "task.rewards"]
        capsys.readouterr()
        assert cli.main(["train", *args, f"model.router_aux_loss_coef={value}"]) == 2
        err = capsys.readouterr().err.strip()
        assert "model.router_aux_loss_coef" in err and message in err and "\n" not in err


def test_a_float64_moe_loads_with_eager_experts_and_scores_exactly(moe_dir):
    """``model.dtype=float64`` on an MoE: transformers' default grouped_mm experts kernel refuses float64, so
    ``load_policy`` asks for the eager experts; prefix-shared rows then match the per-row reference to 1e-12."""
    policy, _ = load_policy(ModelConfig(name_or_path=str(moe_dir), dtype="float64"))
    batch = grouped_batch()
    with torch.no_grad():
        got = completion_token_logps(policy, *batch, share_prompts=True)
    torch.testing.assert_close(got, per_row_logps(policy, *batch), atol=1e-12, rtol=0)
