"""The HF engine: a row depends on its seed only, greedy is ``generate(do_sample=False)``, the Gumbel
noise is an exact sampler of the (temperature, top-p) warped softmax, and masks stop at the first EOS."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

import tiny
from gvpo.rollout import SamplingParams, completion_mask_from_ids
from gvpo.rollout.hf import HFEngine, SeededGumbelNoise, eos_ids

EOS, PAD = 2, 0
PROMPTS = ["Q: 1+2= A:", "Q: 37+45= A:", "Q:", "Q: 9+9= A: 1", "QA", "Q: 12+3= A:"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def engine(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return HFEngine(model, AutoTokenizer.from_pretrained(model_dir))


def row(gen, i: int) -> list[int]:
    """Row i's completion tokens under its mask."""
    return gen.completion_ids[i][gen.completion_mask[i].bool()].tolist()


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12, temperature=1.3),
                                    SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.8)])
def test_row_depends_only_on_its_seed(engine, params):
    seeds = [101, 7, 55, 9001, 3, 42]
    batch = engine.generate(PROMPTS, seeds, params)
    for i, (prompt, seed) in enumerate(zip(PROMPTS, seeds)):
        alone = engine.generate([prompt], [seed], params)
        assert row(alone, 0) == row(batch, i), (prompt, seed)
    # the same prompt and seed in another position of another batch
    shuffled = engine.generate([PROMPTS[2], PROMPTS[0], PROMPTS[5]], [seeds[2], seeds[0], seeds[5]], params)
    assert [row(shuffled, j) for j in range(3)] == [row(batch, 2), row(batch, 0), row(batch, 5)]


def test_different_seeds_give_different_completions(engine):
    params = SamplingParams(max_new_tokens=12, temperature=1.5)
    gen = engine.generate([PROMPTS[0]] * 8, list(range(8)), params)
    distinct = {tuple(row(gen, i)) for i in range(8)}
    assert len(distinct) >= 6


def test_greedy_equals_generate_without_sampling(engine):
    params = SamplingParams(max_new_tokens=10, temperature=0.3, top_p=0.5, greedy=True)
    gen = engine.generate(PROMPTS, [1, 2, 3, 4, 5, 6], params)
    model, tok = engine.model, engine.tokenizer
    for i, prompt in enumerate(PROMPTS):
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD)
        expected = out[0, enc["input_ids"].shape[1]:].tolist()
        if EOS in expected:
            expected = expected[: expected.index(EOS) + 1]
        assert row(gen, i) == expected, prompt
    again = engine.generate(PROMPTS, [9, 9, 9, 9, 9, 9], params)  # greedy ignores seeds
    assert torch.equal(again.completion_ids, gen.completion_ids)


def test_completion_mask_stops_after_the_first_eos(engine):
    # make EOS likely so several rows end early
    model = engine.model
    with torch.no_grad():
        saved = model.lm_head.weight[EOS].clone()
        model.lm_head.weight[EOS] += 0.3 * model.lm_head.weight.mean(0)
    try:
        gen = engine.generate(PROMPTS * 4, list(range(24)), SamplingParams(max_new_tokens=12, temperature=2.0))
    finally:
        with torch.no_grad():
            model.lm_head.weight[EOS] = saved
    ended = 0
    width = gen.completion_ids.shape[1]
    for ids, mask in zip(gen.completion_ids.tolist(), gen.completion_mask.tolist()):
        n = sum(mask)
        assert n >= 1 and mask == [1] * n + [0] * (width - n)  # a prefix
        assert EOS not in ids[: n - 1]  # no EOS before the last kept token
        if n < 12:
            assert ids[n - 1] == EOS  # a row shorter than the budget ended on EOS, which is kept
        assert all(t == PAD for t in ids[n:])  # after the mask: padding
        ended += ids[n - 1] == EOS
    assert ended >= 3, "the test needs rows that end on EOS"
    assert gen.completion_ids.shape[1] == max(sum(m) for m in gen.completion_mask.tolist())


def test_completion_mask_from_ids_cases():
    ids = torch.tensor([[EOS, 5, EOS], [5, 6, 7], [5, 9, EOS], [9, 5, 6]])
    assert completion_mask_from_ids(ids, [EOS]).tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert completion_mask_from_ids(ids, [EOS, 9]).tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]]


def test_eos_ids_come_from_the_generation_config(engine):
    assert eos_ids(engine.tokenizer, engine.model) == [EOS]


# --- the Gumbel sampler is exact -----------------------------------------------------------------

LOGITS = torch.tensor([2.0, 1.2, 0.9, 0.3, -0.2, -1.0, -2.5, 0.0])


def warped_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Reference: softmax(logits / T), then keep the smallest top set with mass >= top_p, renormalised."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(p, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    mass = 0.0
    for j in order.tolist():
        keep[j] = True
        mass += float(p[j])
        if mass >= top_p:
            break
    p = torch.where(keep, p, torch.zeros_like(p))
    return p / p.sum()


def gumbel_counts(n: int, temperature: float, top_p: float) -> torch.Tensor:
    scores = LOGITS.repeat(n, 1)
    input_ids = torch.zeros(n, 1, dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(input_ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(input_ids, scores)
    noisy = SeededGumbelNoise(list(range(10_000, 10_000 + n)))(input_ids, scores)
    return torch.bincount(noisy.argmax(-1), minlength=LOGITS.numel()).double()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.7, 1.0), (1.0, 0.8), (0.8, 0.6)])
def test_gumbel_argmax_samples_the_warped_softmax(temperature, top_p, one_thread):
    n = 6000
    counts = gumbel_counts(n, temperature, top_p)
    probs = warped_probs(LOGITS, temperature, top_p)
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the top-p nucleus was sampled"
    expected = n * probs[support]
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    assert chi2 < df + 4 * math.sqrt(2 * df), (chi2, df)  # 4-sigma for a chi-square with df degrees
    # and each probability within 4 binomial standard deviations
    sd = torch.sqrt(n * probs * (1 - probs))
    assert torch.all((counts - n * probs).abs() <= 4 * sd + 1e-9), (counts, n * probs)


def test_same_seed_same_noise_whatever_the_batch():
    scores = LOGITS.repeat(3, 1)
    ids = torch.zeros(3, 1, dtype=torch.long)
    a = SeededGumbelNoise([5, 6, 7])(ids, scores)
    b = SeededGumbelNoise([7])(ids[:1], scores[:1])
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12, temperature=1.3),
                                    SamplingParams(max_new_tokens=12, greedy=True)])
def test_shared_prompts_generate_the_same_tokens_and_run_fewer(engine, params):
    """Groups as the trainer sends them (k rows per prompt, consecutive; prompts of different lengths):
    prefilling each prompt once and reusing its cache gives the same completions as prefilling every
    row, and the prefill sees 3 prompts instead of 12 rows."""
    prompts = [p for p in PROMPTS[:3] for _ in range(4)]
    seeds = list(range(100, 112))
    rows_seen = []
    hook = engine.model.model.register_forward_pre_hook(
        lambda m, args, kwargs: rows_seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        shared = engine.generate(prompts, seeds, params)
        first_shared = list(rows_seen)
        rows_seen.clear()
        plain = HFEngine(engine.model, engine.tokenizer, share_prompts=False).generate(prompts, seeds, params)
    finally:
        hook.remove()
    assert shared.texts == plain.texts and torch.equal(shared.completion_ids, plain.completion_ids)
    width = plain.prompt_ids.shape[1]
    assert first_shared[0] == (3, width - 1) and first_shared[1] == (12, 1)  # 3 prompts, then the last token
    assert rows_seen[0] == (12, width)  # plain: every row's whole prompt
    assert len({tuple(row(shared, i)) for i in range(12)}) > 3 or params.greedy


def test_chat_prompts_get_one_bos_whatever_the_template(tmp_path):
    """A tokenizer that adds BOS itself: a template that writes BOS too ("<s>" + content, as Llama 3's
    does) and one that does not both give exactly one BOS, then the content's tokens."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from gvpo.rollout.hf import encode_prompts

    tiny.make_tiny_model(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    chat = [{"role": "user", "content": "1+2="}]
    plain = encode_prompts(tok, ["1+2="])["input_ids"][0].tolist()
    assert plain[0] == tok.bos_token_id and plain.count(tok.bos_token_id) == 1
    for template in ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
                     "{% for m in messages %}{{ m['content'] }}{% endfor %}"):
        tok.chat_template = template
        assert encode_prompts(tok, [chat])["input_ids"][0].tolist() == plain, template
