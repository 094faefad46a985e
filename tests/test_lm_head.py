"""The fused LM head (:mod:`gvpo.model.lm_head`): token log-probs from hidden states without a ``(..., V)`` logits
tensor, against a float64 ``log_softmax`` of the full logits (values and gradients), where it applies, and
that :func:`gvpo.model.logprobs.completion_token_logps` takes it for a plain Llama and gives what the logits path gives."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tiny
from gvpo.model.lm_head import fused_head, head_inputs, head_token_logps
from gvpo.model.logprobs import _base_model, completion_token_logps


def naive(hidden, head, labels, mask):
    """Reference: the full logits' log_softmax in float64, gathered at ``labels``, zero where ``mask`` is 0."""
    logits = head(hidden).double()
    return logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1) * mask.double()


def random_case(bias: bool, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(6, 11, bias=bias).to(dtype)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    hidden = torch.randn(3, 5, 6, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    return head, hidden, labels, mask


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 4, 256])
def test_values_and_gradients_equal_the_full_log_softmax(bias, chunk_rows):
    """float64: the value and the gradients w.r.t. hidden states, weight and bias equal autograd through the
    full logits (1e-12), for chunks of one row, of a few rows and of all; masked positions are 0 and get no
    gradient."""
    head, hidden, labels, mask = random_case(bias)
    upstream = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = head_token_logps(hidden, head, labels, mask, chunk_rows=chunk_rows)
    assert out.dtype == torch.float64 and out.shape == labels.shape
    (out * upstream).sum().backward()
    grads = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    expected = naive(hidden, head, labels, mask)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out[mask == 0].abs().sum() == 0 and hidden.grad[mask == 0].abs().sum() == 0
    for got, want in zip(grads, [hidden.grad] + [p.grad for p in head.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    """``torch.autograd.gradcheck`` of the custom backward (hidden states, weight and bias), float64, 4-row chunks."""
    from gvpo.model.lm_head import _HeadTokenLogps

    head, hidden, labels, mask = random_case(bias=True)
    keep = mask.bool()
    inputs = (hidden.detach()[keep].requires_grad_(), head.weight.detach().clone().requires_grad_(),
              head.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda h, w, b: _HeadTokenLogps.apply(h, w, b, labels[keep], 4), inputs)


def test_float32_and_bfloat16_heads_upcast_each_chunk():
    """float32 logps for float32 and bfloat16 heads, within each dtype's rounding of the float64 reference."""
    head, hidden, labels, mask = random_case(bias=False)
    expected = naive(hidden.detach(), head, labels, mask)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.15)):
        out = head_token_logps(hidden.detach().to(dtype), copy.deepcopy(head).to(dtype), labels, mask)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)


def test_no_scored_position_gives_zeros_still_connected():
    head, hidden, labels, _ = random_case(bias=False)
    out = head_token_logps(hidden, head, labels, torch.zeros_like(labels))
    assert out.abs().sum() == 0
    out.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def test_head_inputs_captures_and_restores():
    head = nn.Linear(4, 7)
    x = torch.randn(2, 3, 4)
    with head_inputs(head) as captured:
        assert head(x).shape == (2, 3, 0)
    assert captured[0] is x and "forward" not in head.__dict__
    torch.testing.assert_close(head(x), x @ head.weight.t() + head.bias)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    out = {}
    for family in ("llama", "gemma2", "granite"):
        path = tiny.make_tiny_family(tmp_path_factory.mktemp(family) / "model", family)
        out[family] = AutoModelForCausalLM.from_pretrained(path)
    return out


def test_fused_head_only_where_the_head_is_the_last_step(family_models):
    """A plain Llama's ``lm_head`` qualifies; Gemma 2's soft-capped and Granite's scaled logits do not, nor does a
    LoRA-wrapped head or a head whose forward is already replaced."""
    from peft import LoraConfig, get_peft_model

    llama = family_models["llama"]
    assert fused_head(llama, llama) is llama.lm_head
    assert fused_head(family_models["gemma2"], family_models["gemma2"]) is None
    assert fused_head(family_models["granite"], family_models["granite"]) is None
    peft = get_peft_model(copy.deepcopy(llama), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert fused_head(peft, _base_model(peft)) is None
    with head_inputs(llama.lm_head):
        assert fused_head(llama, llama) is None


@pytest.mark.parametrize("share", [True, False], ids=["shared", "plain"])
def test_completion_logps_take_the_fused_head_and_match_the_logits_path(family_models, monkeypatch, share):
    """On a Llama the model is called with its head captured (the logits it returns have no vocabulary), and the
    log-probs and their gradients equal those of the logits path (float64 model, 1e-10)."""
    import gvpo.model.logprobs as logprobs
    from test_model_families import grouped_batch

    model = copy.deepcopy(family_models["llama"]).double()
    batch = grouped_batch()
    widths = []
    hook = model.register_forward_hook(lambda m, args, out: widths.append(out.logits.shape[-1]))
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(logprobs, "fused_head", lambda model, base: None)
        model.zero_grad(set_to_none=True)
        out = completion_token_logps(model, *batch, share_prompts=share)
        (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    hook.remove()
    assert set(widths[: len(widths) // 2]) == {0} and set(widths[len(widths) // 2:]) == {tiny.VOCAB_SIZE}
    (fused_out, fused_grads), (plain_out, plain_grads) = results
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-10, atol=1e-10)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
