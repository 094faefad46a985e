"""CUDA paths: prefix-shared log-probs in float32 and bf16, and a bf16 training run (fused AdamW on CUDA).

Skipped where no GPU is present (CI has none); run on a GPU machine with ``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from gvpo import completion_token_logps
from gvpo.config import load_config
from gvpo.run.metrics import read_metrics
from gvpo.trainer import train

import tiny
from test_logprobs import make_group_batch
from test_trainer import overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config).to("cuda", dtype).eval()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_shared_prompts_match_the_plain_path_on_cuda(dtype, tol):
    """Same log-probs and gradients with and without prefix sharing, on the GPU, in float32 and bf16
    (bf16 tolerance: both paths round activations to 8 mantissa bits, in different orders)."""
    model = _llama(dtype)
    _, _, input_ids, attention_mask, completion_mask = (t.cuda() if torch.is_tensor(t) else t for t in make_group_batch())
    outs, grads = [], []
    for share in (True, False):
        model.zero_grad()
        out = completion_token_logps(model, input_ids, attention_mask, completion_mask, share_prompts=share)
        out.sum().backward()
        outs.append(out.detach().float())
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters()]))
    assert outs[0].dtype == torch.float32 and torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
    scale = grads[1].abs().max()
    assert (grads[0] - grads[1]).abs().max() <= tol * scale


def test_bf16_training_on_cuda_stays_finite_and_saves_bf16(tmp_path):
    model_dir = tiny.make_tiny_model(tmp_path / "model")
    run = train(load_config(None, overrides(model_dir, tmp_path, "gpu", **{"model.dtype": "bfloat16",
                                                                             "train.max_steps": 6})))
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 7 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows[1:])
    from safetensors.torch import load_file

    weights = load_file(str(run / "final" / "model.safetensors"))
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
