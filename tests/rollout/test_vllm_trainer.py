"""The trainer with a CPU stand-in for ``vllm.LLM``: one engine per run, weights synced before the
first rollout and after every optimizer step, equal to the policy (LoRA merged)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from .test_vllm_engine import EOS, FakeCompletion, FakeRequestOutput, model_dir  # noqa: F401 (fixture)


class HFBackedLLM:
    """A CPU stand-in for ``vllm.LLM``: its own copy of the checkpoint, plain sampling, ``load_weights``
    copying by transformers names (tied ``lm_head`` skipped, as vLLM does)."""

    instances: list = []

    def __init__(self, model, tokenizer=None, dtype="auto", gpu_memory_utilization=0.9, seed=0, **kwargs):
        self.kwargs = dict(model=model, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, **kwargs)
        self.hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.loads = 0
        runner = SimpleNamespace(model=self)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            model_runner=runner)))
        HFBackedLLM.instances.append(self)

    def load_weights(self, weights):
        params = dict(self.hf.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
        self.loads += 1

    def reset_prefix_cache(self):
        pass

    @torch.no_grad()
    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        outs = []
        for request, sp in zip(prompts, sampling_params):
            ids = torch.tensor([request["prompt_token_ids"]])
            g = torch.Generator().manual_seed(sp["seed"] or 0)
            new = []
            for _ in range(sp["max_tokens"]):
                logits = self.hf(ids).logits[0, -1]
                if sp["temperature"] == 0:
                    tok = int(logits.argmax())
                else:
                    tok = int(torch.multinomial(torch.softmax(logits / sp["temperature"], -1), 1, generator=g))
                new.append(tok)
                ids = torch.cat([ids, torch.tensor([[tok]])], 1)
                if tok in sp.get("stop_token_ids", []):
                    break
            outs.append(FakeRequestOutput([FakeCompletion(new, "stop" if new[-1] == EOS else "length")]))
        return outs


@pytest.mark.parametrize("lora", [False, True])
def test_trainer_with_vllm_engine_keeps_vllm_weights_equal_to_the_policy(monkeypatch, model_dir, tmp_path,
                                                                         one_thread, lora):
    from safetensors.torch import load_file

    from gvpo.config import load_config
    from gvpo.trainer import train

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=HFBackedLLM, SamplingParams=lambda **kw: kw))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    HFBackedLLM.instances.clear()
    config = load_config(None, {
        "model.name_or_path": str(model_dir), "task.name": "tiny.tiny_add", "task.rewards": ["tiny.digit_reward"],
        "rollout.engine": "vllm", "rollout.vllm_gpu_memory_utilization": 0.2, "rollout.k": 2,
        "train.max_steps": 3, "train.prompts_per_step": 2, "train.eval_every": 0, "train.eval_n": 2,
        "train.checkpoint_every": 0, "optim.lr": 5e-2, "output.dir": str(tmp_path), "output.name": "v",
        "output.progress": False, "output.report_to": [], "output.plots": False,
        "model.lora": lora, "model.lora_r": 4, "model.lora_alpha": 8})
    run = train(config)
    assert len(HFBackedLLM.instances) == 1  # one engine for the whole run
    llm = HFBackedLLM.instances[0]
    assert llm.kwargs["model"] == str(model_dir) and llm.kwargs["gpu_memory_utilization"] == 0.2
    assert llm.loads == 1 + 3  # before the first rollout, then after each of the 3 optimizer steps
    final = load_file(str(run / "final" / "model.safetensors"))
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    moved = False
    for name, p in llm.hf.named_parameters():  # final/ holds the policy with LoRA merged by peft
        torch.testing.assert_close(p, final[name], rtol=0, atol=1e-6 if lora else 0, msg=name)
        moved |= not torch.equal(p, dict(start.named_parameters())[name])
    assert moved, "training should have changed the weights vLLM samples from"


