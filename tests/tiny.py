"""Tiny models and tasks built locally for tests (no download): a character tokenizer, a
2-layer Llama and 2-layer models of other families from their configs, plus a one-digit addition task."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gvpo.samplers import StatelessSampler
from gvpo.tasks import TASKS, Task

CHARS = list("0123456789+= QA:\n")
VOCAB_SIZE = 3 + len(CHARS)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``CHARS`` with ``<pad>``=0, ``<s>``=1, ``</s>``=2."""
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny(model, path: Path) -> Path:
    """Save ``model`` (built for the character vocabulary) with the character tokenizer to ``path``."""
    if getattr(model, "generation_config", None) is not None:  # masked LMs have none
        model.generation_config.eos_token_id = 2
        model.generation_config.pad_token_id = 0
    model.save_pretrained(path, safe_serialization=True)
    char_tokenizer().save_pretrained(path)
    return path


def make_tiny_model(path: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised tiny Llama and its character tokenizer to ``path``."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    return save_tiny(LlamaForCausalLM(config), path)


def _family_configs() -> dict:
    """``family -> (config class name, model class name, config kwargs)``: 2 layers, hidden 32, grouped-query
    attention where the family has it, and the family's own quirks switched on at small sizes (Gemma's
    sliding window shorter than a prompt and logit soft-capping, Granite's multipliers, Phi-3's fused
    projections, GPT-2's learned positions and dropout, OPT's dropout kept as float attributes; the
    Mixture-of-Experts families route each token to 2 of 4 experts in every layer, with their configs'
    router loss coefficient 0.001)."""
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    gemma = dict(llama_like, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                 layer_types=["sliding_attention", "full_attention"])
    return {
        "llama": ("LlamaConfig", "LlamaForCausalLM", llama_like),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", llama_like),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(llama_like, head_dim=8)),
        "mistral": ("MistralConfig", "MistralForCausalLM", llama_like),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(gemma, attn_logit_softcapping=50.0,
                                                              final_logit_softcapping=30.0)),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", gemma),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", llama_like),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", llama_like),
        "granite": ("GraniteConfig", "GraniteForCausalLM", dict(llama_like, embedding_multiplier=2.0, logits_scaling=2.0,
                                                                residual_multiplier=0.5, attention_multiplier=0.2)),
        "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                                    word_embed_proj_dim=32, max_position_embeddings=64)),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(llama_like, head_dim=8, moe_intermediate_size=16,
                                                                    num_experts=4, num_experts_per_tok=2)),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(llama_like, intermediate_size=16, num_local_experts=4,
                                                                num_experts_per_tok=2)),
    }


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "olmo2", "granite", "qwen3_moe",
            "mixtral")
"""The families the README lists as tested (``opt`` is also buildable: its dropout is float attributes)."""


def make_tiny_family(path: Path, family: str, *, seed: int = 0, **config_overrides) -> Path:
    """Save a randomly initialised 2-layer model of ``family`` (one of ``FAMILIES``) with the character
    tokenizer to ``path``; ``config_overrides`` go to the family's config (e.g. dropout rates)."""
    import transformers

    config_name, model_name, kwargs = _family_configs()[family]
    config = getattr(transformers, config_name)(vocab_size=VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                **{**kwargs, **config_overrides})
    torch.manual_seed(seed)
    return save_tiny(getattr(transformers, model_name)(config), path)


@TASKS.register("tiny_add")
def tiny_add(num_train: int = 40, num_test: int = 20) -> Task:
    """One-digit sums ``Q: a+b= A:`` -> `` c``; exact-match reward."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(pairs), generator=g).tolist()
    rows = [{"prompt": f"Q: {a}+{b}= A:", "answer": str(a + b)} for a, b in (pairs[i] for i in order)]
    return Task("tiny_add", rows[:num_train], rows[num_train:num_train + num_test], ("exact_match",), max_new_tokens=4)


def digit_reward(prompts, completions, **_) -> list[float]:
    """A dense reward for untrained tiny models: the share of digits among the first 3 characters."""
    return [sum(ch.isdigit() for ch in c[:3]) / 3 for c in completions]


class NanObjective:
    """A broken objective (for tests): its loss is NaN."""

    name = "nan"

    def prepare(self, batch, token_logps):
        from gvpo.batch import Prepared

        return Prepared(norm=1.0, loss_sum=0.0)

    def micro_loss(self, token_logps, batch, rows, prepared):
        return token_logps.sum() * float("nan")


def nan_objective(config) -> NanObjective:
    return NanObjective()


class CentredRewardNLL:
    """A custom objective written as a user would (README): ``-1/G sum_i (R_i - mean_g R) log pi(y_i|x)``,
    which is what the built-in ``dr_grpo`` computes (Eq. 9 with centred rewards)."""

    name = "centred_nll"

    def prepare(self, batch, token_logps):
        from gvpo.batch import Prepared
        from gvpo.groups import center, dense_index
        from gvpo.model.logprobs import sequence_logps

        index, groups = dense_index(batch.group_ids)
        coef = center(batch.rewards.double(), index, groups)
        logps = sequence_logps(token_logps, batch.action_mask).double()
        return Prepared(norm=float(groups), loss_sum=float(-(coef * logps).sum()), coef=coef.float())

    def micro_loss(self, token_logps, batch, rows, prepared):
        from gvpo.model.logprobs import sequence_logps

        return -(prepared.coef[rows] * sequence_logps(token_logps, batch.action_mask[rows])).sum()


def centred_nll(config) -> CentredRewardNLL:
    return CentredRewardNLL()


class AnswerSampler(StatelessSampler):
    """A custom sampler (for tests): each group is the row's right answer once and ``k - 1`` wrong ones,
    tagged ``custom``; it never generates."""

    def __init__(self, tokenizer, k):
        self.tokenizer, self.k = tokenizer, k

    def sample(self, rows, step, params):
        from gvpo.batch import Group

        groups = []
        for pos, row in rows:
            texts = [f" {row['answer']}"] + [f" {int(row['answer']) + j}" for j in range(1, self.k)]
            ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                   for t in texts]
            groups.append(Group(pos, row, ids, texts, ["custom"] * self.k))
        return groups


def answer_sampler(spec, *, engine, reference, tokenizer, k, seed, max_new_tokens, cache_dir) -> AnswerSampler:
    return AnswerSampler(tokenizer, k)


def slow_reward(prompts, completions, **_) -> list[float]:
    """A reward that hangs (for tests of the reward timeout)."""
    import time

    time.sleep(30)
    return [0.0] * len(completions)


def load_script(relative: str):
    """Import a repository script that is not a package module (``bench/...``, ``scripts/...``) by its path."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zero_reward(prompts, completions, **_) -> list[float]:
    """No signal: every completion gets 0."""
    return [0.0] * len(completions)


class ScriptedEngine:
    """A generation engine (for tests) that answers from a script instead of sampling: row ``i`` of a call, the
    completion ``i % k`` of group ``i // k`` of the call, gets ``script(i // k, i % k)`` (token ids, EOS
    included only where the script puts it)."""

    def __init__(self, tokenizer, k: int, script):
        self.tokenizer, self.k, self.script, self.model = tokenizer, k, script, None

    def generate(self, prompts, seeds, params):
        from gvpo.rollout import Generation
        from gvpo.rollout.hf import encode_prompts

        enc = encode_prompts(self.tokenizer, prompts)
        rows = [self.script(i // self.k, i % self.k) for i in range(len(prompts))]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return Generation(enc["input_ids"], enc["attention_mask"], ids, mask,
                          self.tokenizer.batch_decode(ids, skip_special_tokens=True))

    def sync_weights(self, model) -> None:
        """Nothing to sync: the script does not depend on the weights."""


def truncation_script(group: int, j: int) -> list[int]:
    """For ``rollout.max_new_tokens=4``, ``rollout.k=4`` (token 2 is EOS; 3-12 are the digits 0-9, 15 a space):
    even groups: ``j`` = 0 ends early with EOS, 1 hits the limit without EOS (truncated), 2 hits it with EOS as
    its 4th token (kept), 3 ends early; odd groups: only ``j`` = 0 ends with EOS, the others are truncated.
    The digits differ, so ``digit_reward`` differs within a group."""
    if group % 2 == 0:
        return [[3 + j, 15, 2], [4, 5, 6, 7], [15, 15, 8, 2], [15, 2]][j]
    return [[3, 4, 2], [15, 5, 15, 15], [6, 7, 8, 9], [15, 15, 15, 10]][j]


def scripted_sampler(spec, *, engine, reference, tokenizer, k, seed, max_new_tokens, cache_dir):
    """``sampler.source=tiny.scripted_sampler``: the built-in policy sampler on :func:`truncation_script`."""
    from gvpo.samplers import PolicySampler

    return PolicySampler(ScriptedEngine(tokenizer, k, truncation_script), k, seed)


def truncating_sampler(spec, *, engine, reference, tokenizer, k, seed, max_new_tokens, cache_dir):
    """``sampler.source=tiny.truncating_sampler``: every completion hits ``max_new_tokens`` without EOS."""
    from gvpo.samplers import PolicySampler

    return PolicySampler(ScriptedEngine(tokenizer, k, lambda g, j: [3 + j] * max_new_tokens), k, seed)


def kept_gvpo_loss_loop(logps, ref_logps, rewards, group_ids: list[int], kept: list[bool], beta: float):
    """Independent reference for masked completions, a plain loop: for each group, Eq. 16 over its kept
    completions only (``1/(k-1)`` with the remaining ``k``), averaged over the groups with at least 2 left;
    0 (with ``logps``' graph) when none has. ``logps`` may carry gradients; the rest are numbers."""
    total, groups = logps.sum() * 0.0, 0
    for g in dict.fromkeys(group_ids):
        idx = [i for i, (gid, keep) in enumerate(zip(group_ids, kept)) if gid == g and keep]
        if len(idx) < 2:
            continue
        groups += 1
        implicit = [beta * (logps[i] - float(ref_logps[i])) for i in idx]
        r = [float(rewards[i]) for i in idx]
        mean_implicit, mean_r = sum(implicit) / len(idx), sum(r) / len(idx)
        total = total + sum(0.5 * ((a - mean_implicit) - (b - mean_r)) ** 2 for a, b in zip(implicit, r)) / (len(idx) - 1)
    return total / groups if groups else total
