"""The vLLM engine without vLLM: parameter mapping, outputs -> Generation, weight sync (LoRA merged),
the import guard. Fake vLLM objects mimic the public shapes (``RequestOutput.outputs[0].token_ids``,
``LLM.generate``, the in-process ``model.load_weights``)."""

from __future__ import annotations

import copy
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny
from gvpo.rollout import SamplingParams, completion_mask_from_ids, create_engine
from gvpo.rollout import vllm as vllm_engine
from gvpo.rollout.hf import HFEngine, encode_prompts
from gvpo.rollout.vllm import (VLLMEngine, build_generation, iter_vllm_weights, prompt_token_lists,
                               state_dict_for_vllm, to_vllm_sampling_params, vllm_param_name)

EOS, PAD = 2, 0


# --- fakes ---------------------------------------------------------------------------------------


@dataclass
class FakeCompletion:  # vllm.outputs.CompletionOutput
    token_ids: list[int]
    finish_reason: str | None = "length"
    stop_reason: int | str | None = None
    text: str = ""


@dataclass
class FakeRequestOutput:  # vllm.outputs.RequestOutput
    outputs: list[FakeCompletion]
    prompt_token_ids: list[int] = field(default_factory=list)


class FakeVLLMModel:
    """Stands in for vLLM's model: ``load_weights`` records what it got."""

    def __init__(self):
        self.loaded: dict[str, torch.Tensor] = {}
        self.calls = 0

    def load_weights(self, weights):
        self.calls += 1
        seen = set()
        for name, tensor in weights:
            assert name not in seen, f"{name} loaded twice in one sync"
            seen.add(name)
            self.loaded[name] = tensor.detach().clone()
        return set(self.loaded)


class FakeLLM:
    """``vllm.LLM`` with the in-process model where vLLM keeps it; ``generate`` replays scripted outputs."""

    def __init__(self, completions: list[list[int]] | None = None, in_process: bool = True):
        self.model = FakeVLLMModel()
        if in_process:
            runner = SimpleNamespace(model=self.model)
            self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
                driver_worker=SimpleNamespace(worker=SimpleNamespace(model_runner=runner))))
        self.completions = completions or []
        self.requests, self.sampling, self.events = [], [], []

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.events.append("generate")
        self.requests.append(prompts)
        self.sampling.append(sampling_params)
        return [FakeRequestOutput([FakeCompletion(c, "stop" if c and c[-1] == EOS else "length")], p["prompt_token_ids"])
                for c, p in zip(self.completions, prompts)]

    def sleep(self, level=1):
        self.events.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.events.append("wake_up")


class ApplyModelLLM:
    """A vLLM whose model lives in another process: only ``apply_model`` reaches it."""

    def __init__(self):
        self.model = FakeVLLMModel()
        self.events = []

    def apply_model(self, func):
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.fixture
def lora_model(model):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; make the adapters do something
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return peft


# --- sampling parameters -------------------------------------------------------------------------


def test_sampling_params_map_one_to_one():
    kw = to_vllm_sampling_params(SamplingParams(max_new_tokens=17, temperature=0.6, top_p=0.85), seed=1234,
                                 stop_token_ids=[2, 7], vllm_module=False)
    assert kw == {"n": 1, "max_tokens": 17, "temperature": 0.6, "top_p": 0.85, "seed": 1234, "stop_token_ids": [2, 7]}


def test_greedy_is_temperature_zero_without_seed():
    kw = to_vllm_sampling_params(SamplingParams(max_new_tokens=5, temperature=0.6, top_p=0.5, greedy=True), seed=9,
                                 vllm_module=False)
    assert kw == {"n": 1, "max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "seed": None}


def test_each_row_gets_its_own_seed_in_vllm_range():
    seeds = [0, 1, 2**63 - 1, 2**63 + 5, -3]
    got = [to_vllm_sampling_params(SamplingParams(4), s, vllm_module=False)["seed"] for s in seeds]
    assert got == [0, 1, 2**63 - 1, 5, 2**63 - 3]
    assert all(0 <= s < 2**63 for s in got)


def test_sampling_params_build_the_vllm_object_when_available():
    made = []
    fake_vllm = SimpleNamespace(SamplingParams=lambda **kw: made.append(kw) or ("SamplingParams", kw))
    out = to_vllm_sampling_params(SamplingParams(3, temperature=0.9), seed=4, vllm_module=fake_vllm)
    assert out == ("SamplingParams", made[0]) and made[0]["seed"] == 4 and made[0]["temperature"] == 0.9


def test_bad_sampling_params_raise():
    with pytest.raises(ValueError, match="max_new_tokens"):
        to_vllm_sampling_params(SamplingParams(0), seed=1, vllm_module=False)
    with pytest.raises(ValueError, match="temperature"):
        to_vllm_sampling_params(SamplingParams(4, temperature=0.0), seed=1, vllm_module=False)


# --- outputs -> Generation -----------------------------------------------------------------------


def test_build_generation_pads_masks_and_trims(tokenizer):
    prompt_ids = torch.tensor([[PAD, 5, 6], [7, 8, 9], [PAD, PAD, 4]])
    prompt_mask = (prompt_ids != PAD).long()
    outputs = [FakeRequestOutput([FakeCompletion([5, 6, EOS], "stop")]),
               FakeRequestOutput([FakeCompletion([EOS], "stop")]),
               FakeRequestOutput([FakeCompletion([7, 8, 9, 10], "length")])]
    gen = build_generation(outputs, prompt_ids, prompt_mask, tokenizer, [EOS], PAD)
    assert gen.completion_ids.tolist() == [[5, 6, EOS, PAD], [EOS, PAD, PAD, PAD], [7, 8, 9, 10]]
    assert gen.completion_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert torch.equal(gen.prompt_ids, prompt_ids) and torch.equal(gen.prompt_mask, prompt_mask)
    assert gen.texts == tokenizer.batch_decode(gen.completion_ids, skip_special_tokens=True)
    assert gen.completion_ids.dtype == torch.long and gen.completion_mask.dtype == torch.long


def test_build_generation_cuts_after_first_eos_and_restores_a_dropped_eos(tokenizer):
    prompt_ids, prompt_mask = torch.tensor([[4], [4], [4]]), torch.ones(3, 1, dtype=torch.long)
    outputs = [FakeRequestOutput([FakeCompletion([5, EOS, 6, EOS], "stop")]),  # tokens after the first EOS
               FakeRequestOutput([FakeCompletion([5, 6], "stop", stop_reason=None)]),  # EOS not in token_ids
               FakeRequestOutput([FakeCompletion([], "length")])]  # empty completion
    gen = build_generation(outputs, prompt_ids, prompt_mask, tokenizer, [EOS], PAD)
    assert gen.completion_ids.tolist() == [[5, EOS, PAD], [5, 6, EOS], [PAD, PAD, PAD]]
    assert gen.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="outputs"):
        build_generation(outputs[:2], prompt_ids, prompt_mask, tokenizer, [EOS], PAD)


def test_build_generation_equals_hf_engine_layout(model, tokenizer):
    """The same completions through vLLM-shaped outputs give the HF engine's Generation exactly."""
    prompts = ["Q: 1+2= A:", "Q: 33+4= A:", "Q: 5+6= A:", "Q:"]
    params = SamplingParams(max_new_tokens=10, temperature=1.5)
    hf = HFEngine(model, tokenizer).generate(prompts, [11, 12, 13, 14], params)
    outputs = []
    for ids, m in zip(hf.completion_ids, hf.completion_mask):
        toks = ids[m.bool()].tolist()
        outputs.append(FakeRequestOutput([FakeCompletion(toks, "stop" if toks and toks[-1] == EOS else "length")]))
    gen = build_generation(outputs, hf.prompt_ids, hf.prompt_mask, tokenizer, [EOS], PAD)
    for field_name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(getattr(gen, field_name), getattr(hf, field_name)), field_name
    assert gen.texts == hf.texts
    assert torch.equal(gen.completion_mask, completion_mask_from_ids(gen.completion_ids, [EOS]) * gen.completion_mask)


def test_prompts_reach_vllm_as_the_hf_engines_token_ids(model, tokenizer):
    prompts = ["Q: 1+2= A:", "Q: 33+44= A:"]
    enc = encode_prompts(tokenizer, prompts)
    rows = prompt_token_lists(enc["input_ids"], enc["attention_mask"])
    assert rows == [tokenizer(p)["input_ids"] for p in prompts]


# --- the engine with a fake LLM ------------------------------------------------------------------


def test_engine_generate_maps_rows_seeds_and_syncs_first(model, tokenizer):
    llm = FakeLLM(completions=[[5, EOS], [6, 7, 8]])
    engine = VLLMEngine(model, tokenizer, llm=llm)
    gen = engine.generate(["Q: 1+2= A:", "Q: 33+44= A:"], seeds=[101, 202],
                          params=SamplingParams(max_new_tokens=3, temperature=0.8, top_p=0.9))
    assert llm.events[:2] == ["reset_prefix_cache", "generate"]  # weights pushed before the first rollout
    assert llm.model.calls == 1 and llm.model.loaded.keys() == dict(model.named_parameters()).keys()
    enc = encode_prompts(tokenizer, ["Q: 1+2= A:", "Q: 33+44= A:"])
    assert llm.requests[0] == [{"prompt_token_ids": ids} for ids in prompt_token_lists(enc["input_ids"],
                                                                                        enc["attention_mask"])]
    sampling = llm.sampling[0]
    assert [s["seed"] for s in sampling] == [101, 202]
    assert all(s["max_tokens"] == 3 and s["temperature"] == 0.8 and s["top_p"] == 0.9 and s["n"] == 1
               and s["stop_token_ids"] == [EOS] for s in sampling)
    assert gen.completion_ids.tolist() == [[5, EOS, PAD], [6, 7, 8]]
    assert gen.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    engine.generate(["Q:"], seeds=[1], params=SamplingParams(max_new_tokens=2, greedy=True))
    assert llm.model.calls == 1  # no second sync without an update
    assert llm.sampling[1][0]["temperature"] == 0.0
    with pytest.raises(ValueError, match="seeds"):
        engine.generate(["Q:"], seeds=[1, 2], params=SamplingParams(2))


def test_sync_pushes_exactly_the_policy_weights(model, tokenizer):
    llm = FakeLLM()
    engine = VLLMEngine(model, tokenizer, llm=llm)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)  # "an optimizer step"
    engine.sync_weights(model)
    policy = dict(model.named_parameters())
    assert llm.model.loaded.keys() == policy.keys()
    for name, p in policy.items():
        assert torch.equal(llm.model.loaded[name], p.detach()), name
    assert llm.events == ["reset_prefix_cache"]


def test_sync_strips_the_ddp_wrapper(model, tokenizer):
    wrapped = torch.nn.ModuleDict({"module": model})  # DDP / accelerate keep the model at `.module`
    llm = FakeLLM()
    VLLMEngine(model, tokenizer, llm=llm).sync_weights(wrapped)
    assert llm.model.loaded.keys() == dict(model.named_parameters()).keys()


def test_sync_through_apply_model_when_the_model_is_out_of_process(model, tokenizer):
    llm = ApplyModelLLM()
    VLLMEngine(model, tokenizer, llm=llm).sync_weights(model)
    assert llm.model.loaded.keys() == dict(model.named_parameters()).keys()
    assert llm.events == ["reset_prefix_cache"]


def test_sleep_mode_wakes_before_sync_and_generate(model, tokenizer):
    llm = FakeLLM(completions=[[5, EOS]])
    engine = VLLMEngine(model, tokenizer, llm=llm, enable_sleep_mode=True)
    engine.generate(["Q:"], [1], SamplingParams(2))
    assert llm.events[-1] == "sleep1"
    engine.sync_weights(model)
    assert llm.events[-2:] == ["wake_up", "reset_prefix_cache"]
    engine.generate(["Q:"], [1], SamplingParams(2))
    assert llm.events[-2:] == ["generate", "sleep1"]


def test_lora_is_merged_into_base_weights_without_touching_the_policy(lora_model, tokenizer):
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters()}
    llm = FakeLLM()
    VLLMEngine(lora_model, tokenizer, llm=llm).sync_weights(lora_model)
    loaded = llm.model.loaded
    base_names = {vllm_param_name(n) for n in before if "lora_" not in n}
    assert loaded.keys() == base_names and not any("lora" in n or "base_layer" in n for n in loaded)
    # merged = base + B @ A * (alpha / r), layer by layer, from the raw factors
    scale = 8 / 4
    n_merged = 0
    for name, p in before.items():
        if not name.endswith(".base_layer.weight"):
            continue
        owner = name.removesuffix(".base_layer.weight")
        a, b = before[f"{owner}.lora_A.default.weight"], before[f"{owner}.lora_B.default.weight"]
        expected = p + b @ a * scale
        torch.testing.assert_close(loaded[vllm_param_name(name)], expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(expected, p)
        n_merged += 1
    assert n_merged == 3 * 2  # q_proj, v_proj, down_proj in each of 2 layers
    for name, p in before.items():  # untouched weights pass through, and the policy is unchanged
        if "lora_" not in name and ".base_layer." not in name:
            assert torch.equal(loaded[vllm_param_name(name)], p)
    for name, p in lora_model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert not any(getattr(m, "merged", False) for m in lora_model.modules())


def test_lora_merge_matches_peft_merge_and_unload(lora_model):
    reference = copy.deepcopy(lora_model).merge_and_unload()
    ours = state_dict_for_vllm(lora_model)
    theirs = dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6)


def test_disabled_adapters_send_the_base_model(lora_model, model_dir):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with lora_model.disable_adapter():
        ours = state_dict_for_vllm(lora_model)
    for name, p in base.named_parameters():
        assert torch.equal(ours[name], p), name


def test_generate_follows_disabled_adapters(lora_model, tokenizer, model_dir):
    """Sampling from the base model (reference with LoRA) inside ``disable_adapter()`` re-syncs, twice."""
    llm = FakeLLM(completions=[[5, EOS]])
    engine = VLLMEngine(lora_model, tokenizer, llm=llm)
    params = SamplingParams(2)
    engine.generate(["Q:"], [1], params)
    merged = {n: t.clone() for n, t in llm.model.loaded.items()}
    engine.generate(["Q:"], [1], params)
    assert llm.model.calls == 1
    with lora_model.disable_adapter():
        engine.generate(["Q:"], [1], params)
    assert llm.model.calls == 2
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, p in base.named_parameters():
        assert torch.equal(llm.model.loaded[name], p), name
    engine.generate(["Q:"], [1], params)  # adapters back on: the merged weights again
    assert llm.model.calls == 3
    for name, t in merged.items():
        assert torch.equal(llm.model.loaded[name], t), name


def test_param_names():
    assert vllm_param_name("module.model.layers.1.mlp.up_proj.weight") == "model.layers.1.mlp.up_proj.weight"
    assert vllm_param_name("base_model.model.model.norm.weight") == "model.norm.weight"
    assert vllm_param_name("model._checkpoint_wrapped_module.layers.0.input_layernorm.weight") == \
        "model.layers.0.input_layernorm.weight"


# --- constructing the LLM ------------------------------------------------------------------------


class RecordingLLM(FakeLLM):
    made: list[dict] = []

    def __init__(self, **kwargs):
        super().__init__(completions=[[5, EOS]])
        RecordingLLM.made.append(kwargs)


@pytest.mark.parametrize("world", ["1", "8"])
def test_engine_builds_a_colocated_llm(monkeypatch, model, tokenizer, model_dir, world):
    fake_vllm = SimpleNamespace(LLM=RecordingLLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("WORLD_SIZE", world)
    RecordingLLM.made.clear()
    engine = VLLMEngine(model, tokenizer, gpu_memory_utilization=0.25, max_model_len=2048)
    kw = RecordingLLM.made[0]
    assert kw["model"] == str(model_dir) and kw["tokenizer"] == str(model_dir)
    assert kw["gpu_memory_utilization"] == 0.25 and kw["max_model_len"] == 2048
    assert kw["dtype"] == "bfloat16"  # a float32 policy samples in bf16 (pi_s only)
    assert "enable_sleep_mode" not in kw
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the model stays in this process
    if world == "8":
        assert kw["distributed_executor_backend"] == "external_launcher" and kw["tensor_parallel_size"] == 1
        assert os.environ["MASTER_PORT"]
    else:
        assert "distributed_executor_backend" not in kw
    gen = engine.generate(["Q:"], [3], SamplingParams(2))  # sampling params built by the (fake) vllm module
    assert engine.llm.sampling[0] == [{"n": 1, "max_tokens": 2, "temperature": 1.0, "top_p": 1.0, "seed": 3,
                                       "stop_token_ids": [EOS]}]
    assert gen.completion_ids.shape[0] == 1


def test_vllm_dtype(model):
    assert vllm_engine.vllm_dtype(model) == "bfloat16"
    assert vllm_engine.vllm_dtype(model.to(torch.float16)) == "float16"


# --- import guard --------------------------------------------------------------------------------


def test_import_guard_without_vllm(monkeypatch, model, tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    module = importlib.reload(vllm_engine)  # importing the module itself needs no vLLM
    try:
        with pytest.raises(ImportError, match=r"pip install 'gvpo\[vllm\]'"):
            module.VLLMEngine(model, tokenizer)
        with pytest.raises(ImportError, match=r"pip install 'gvpo\[vllm\]'"):
            create_engine("vllm", model, tokenizer, gpu_memory_utilization=0.3)
        assert isinstance(module.to_vllm_sampling_params(SamplingParams(2), 1), dict)
    finally:
        monkeypatch.undo()
        importlib.reload(vllm_engine)


def test_pyproject_declares_the_vllm_extra():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'vllm = ["vllm' in text


# --- real vLLM (GPU) -----------------------------------------------------------------------------


def test_real_vllm_generates_and_syncs(model_dir, tokenizer):
    """Needs vLLM and a CUDA GPU; skipped otherwise (make test never installs vLLM)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (optional extra `gvpo[vllm]`, GPU only); the CPU tests above cover the "
                    "mapping, conversion and sync logic with fakes")
    if not torch.cuda.is_available():
        pytest.skip("vLLM is installed but there is no CUDA GPU")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    engine = VLLMEngine(model, tokenizer, gpu_memory_utilization=0.2, enforce_eager=True)
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    a = engine.generate(["Q: 1+2= A:"] * 3, [1, 2, 1], params)
    assert a.completion_ids[0].tolist() == a.completion_ids[2].tolist()
    greedy = engine.generate(["Q: 1+2= A:"], [0], SamplingParams(max_new_tokens=6, greedy=True))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    engine.sync_weights(model)
    after = engine.generate(["Q: 1+2= A:"], [0], SamplingParams(max_new_tokens=6, greedy=True))
    assert after.completion_ids.tolist() != greedy.completion_ids.tolist()
