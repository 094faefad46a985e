"""A small random-init policy for offline GVPO on a rated-completions file, built with no download,
and the scoring of a policy trained on it (implicit rewards against the file's rewards).

``scripts/build_offline_model.py`` is the command line; ``bench/offline_real.py`` and
``tests/test_offline_real.py`` use the functions.

What :func:`build_offline_model` writes to ``out_dir``, loadable with plain
``AutoTokenizer.from_pretrained`` / ``AutoModelForCausalLM.from_pretrained``:

* a byte-level BPE tokenizer trained locally with ``tokenizers`` on the file's prompts and
  completions (``vocab_size``, default 2048), specials ``<pad>`` (0) ``<s>`` (1) ``</s>`` (2),
  ``<s>`` prepended to every encoded text (``add_special_tokens=True``), and a minimal chat
  template (``<|role|>\\ncontent\\n`` per message, ``<|assistant|>\\n`` as the generation prompt) so
  chat-message prompts such as the rm8 file's ``[system, user]`` work;
* a ``LlamaForCausalLM`` from a ``LlamaConfig`` (random init, ``hidden``/``layers``/``heads``,
  tied embeddings, ``max_position_embeddings`` = ``max_positions``), saved as safetensors. Why the
  default size (hidden 64, 2 layers, MLP 128, vocab 2048: 0.21M parameters) and not a larger one:
  measured in bench/README.md, section "`offline_real.py` (issue 4)";
* ``build_info.json``: the settings and the token lengths of the file's prompts and completions
  (completions counted as the trainer counts them: ``add_special_tokens=False`` plus EOS), so a
  ``rollout.max_new_tokens`` can be picked and the ``on_too_long=skip`` losses predicted.

Why a Llama config: transformers 5.x maps some model types (e.g. ``qwen2``) to their own tokenizer
class, which then rebuilt a different tokenizer from this folder; this Llama folder reloads as the
generic tokenizers-backed class from ``tokenizer.json`` and encodes, decodes and templates exactly as
built (checked by :func:`check_round_trip` on every build).

Also here: :func:`split_offline_file` (train / held-out jsonl splits by prompt), :func:`load_groups`,
:func:`implicit_reward_correlation` (within-group Pearson correlation of
``beta * log(pi_theta / pi_ref)`` with the given rewards, scored exactly as the trainer scores) and
:func:`attainable_correlation` (its ceiling when a group repeats a completion with different rewards).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""Minimal chat template: each message as ``<|role|>`` on its own line, then its content."""

DEFAULT_OUT = {"qwen25_math_rm8": "runs/offline-models/rm8", "gsm8k_model_solutions": "runs/offline-models/gsm8k"}
"""Where the command writes by default (the recipes in ``configs/`` point there)."""
DEFAULT_FILES = {
    "qwen25_math_rm8": ("qwen25_math_rm8", "math_cot_100.jsonl"),
    "gsm8k_model_solutions": ("gsm8k_model_solutions", "example_model_solutions.head300.jsonl"),
}
"""Per preset, the rated file's path inside a data folder (the repository keeps them in ``tests/data``)."""


# --------------------------------------------------------------------------------------------------
# Tokenizer and model


def _prompt_texts(prompt: str | list[dict]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    texts = []
    for m in prompt:
        texts.append(f"<|{m['role']}|>")
        texts.append(m["content"] if isinstance(m["content"], str) else json.dumps(m["content"]))
    return texts


def corpus_texts(groups: Iterable[Any]) -> Iterable[str]:
    """Prompt (message contents and role markers) and completion texts of offline groups."""
    for g in groups:
        yield from _prompt_texts(g.prompt)
        yield from g.completions


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, *, min_frequency: int = 2):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (see the module doc).

    Byte-level: any text encodes (no unknown token) and decodes back to itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 0,
                max_positions: int = 4096, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` (tied embeddings, no dropout); ``intermediate`` 0 = 2 x hidden."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, tie_word_embeddings=True, attention_dropout=0.0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    return model


def completion_lengths(tokenizer, groups: Sequence[Any]) -> list[list[int]]:
    """Tokens per completion as the trainer counts them: ``add_special_tokens=False`` plus EOS."""
    return [[len(ids) + 1 for ids in tokenizer(list(g.completions), add_special_tokens=False)["input_ids"]]
            for g in groups]


def prompt_lengths(tokenizer, groups: Sequence[Any]) -> list[int]:
    """Tokens per prompt as the trainer encodes it (chat template, then ``add_special_tokens=True``)."""
    texts = [tokenizer.apply_chat_template(g.prompt, tokenize=False, add_generation_prompt=True)
             if isinstance(g.prompt, list) else g.prompt for g in groups]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def _describe(values: list[int]) -> dict:
    s = sorted(values)
    q = lambda f: s[min(int(f * len(s)), len(s) - 1)]  # noqa: E731
    return {"n": len(s), "min": s[0], "median": statistics.median(s), "p90": q(0.9), "p99": q(0.99), "max": s[-1],
            "mean": round(sum(s) / len(s), 1)}


def length_report(tokenizer, groups: Sequence[Any], limits: Sequence[int] = (256, 512, 768, 1024, 1536, 2048)) -> dict:
    """Prompt and completion token lengths, and what ``on_too_long=skip`` drops at each ``max_new_tokens``.

    The trainer keeps completions of at most ``max_new_tokens - 1`` tokens before EOS, i.e. at most
    ``max_new_tokens`` counted with EOS, and drops a group left with fewer than 2 completions.
    """
    comp = completion_lengths(tokenizer, groups)
    flat = [n for g in comp for n in g]
    skips = {}
    for limit in limits:
        dropped = sum(n > limit for n in flat)
        groups_lost = sum(sum(n <= limit for n in g) < 2 for g in comp)
        skips[str(limit)] = {"completions_dropped": dropped, "groups_dropped": groups_lost}
    return {"prompt_tokens": _describe(prompt_lengths(tokenizer, groups)), "completion_tokens": _describe(flat),
            "skipped_at_max_new_tokens": skips}


def check_round_trip(out_dir: str | Path, tokenizer, model, texts: Sequence[str], chat: list[dict] | None = None) -> None:
    """Reload ``out_dir`` with the Auto classes and check it encodes, templates and predicts the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(out_dir)
    for t in texts:
        a, b = tokenizer(t)["input_ids"], tok2(t)["input_ids"]
        if a != b:
            raise RuntimeError(f"reloaded tokenizer ({type(tok2).__name__}) encodes differently: {a[:10]} vs {b[:10]}")
        if tok2.decode(tok2(t, add_special_tokens=False)["input_ids"]) != t:
            raise RuntimeError("reloaded tokenizer does not decode back to the text")
    if (tok2.pad_token_id, tok2.bos_token_id, tok2.eos_token_id) != (PAD_ID, BOS_ID, EOS_ID):
        raise RuntimeError(f"special ids changed: {(tok2.pad_token_id, tok2.bos_token_id, tok2.eos_token_id)}")
    if chat is not None and (tok2.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                             != tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)):
        raise RuntimeError("reloaded tokenizer renders the chat template differently")
    model2 = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    ids = torch.tensor([tokenizer(texts[0])["input_ids"][:64]])
    with torch.no_grad():
        if not torch.allclose(model.eval()(ids).logits, model2.eval()(ids).logits, atol=1e-5):
            raise RuntimeError("reloaded model gives different logits")


def build_offline_model(data: str | Path, out_dir: str | Path, *, preset: str | None = None, vocab_size: int = 2048,
                        hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 0,
                        max_positions: int = 4096, seed: int = 0, groups: Sequence[Any] | None = None,
                        check: bool = True) -> dict:
    """Train the tokenizer on ``data`` (or on ``groups`` when given), build the model, save both to
    ``out_dir`` with ``build_info.json``; returns that info (settings and token-length report)."""
    from .data import load_offline

    if groups is None:
        groups, _ = load_offline(data, preset=preset)
    tokenizer = train_tokenizer(corpus_texts(groups), vocab_size)
    model = build_model(len(tokenizer), hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                        max_positions=max_positions, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report = length_report(tokenizer, groups)
    longest = report["prompt_tokens"]["max"] + report["completion_tokens"]["max"]
    info = {"data": str(data), "preset": preset, "groups": len(groups), "vocab_size": len(tokenizer),
            "hidden": hidden, "layers": layers, "heads": heads, "intermediate": intermediate or 2 * hidden,
            "max_positions": max_positions, "seed": seed,
            "parameters": sum(p.numel() for p in model.parameters()), **report,
            "longest_prompt_plus_completion": longest}
    if longest > max_positions:
        info["warning"] = (f"the longest prompt + completion is {longest} tokens, over max_positions={max_positions}; "
                           "keep rollout.max_new_tokens + prompt below it")
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if check:
        first = groups[0]
        check_round_trip(out, tokenizer, model, [first.completions[0], *_prompt_texts(first.prompt)[-1:]],
                         first.prompt if isinstance(first.prompt, list) else None)
    return info


# --------------------------------------------------------------------------------------------------
# Splits and implicit-reward scoring


def split_offline_file(data: str | Path, out_dir: str | Path, *, held_out: int, limit: int | None = None,
                       seed: int = 0, select: Sequence[int] | None = None) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``held_out.jsonl`` under ``out_dir``: the raw lines of ``data`` (so
    presets still apply), split by prompt. ``select`` = the line indices to use (default: all, or the
    first ``limit``), shuffled with ``seed``; the first ``held_out`` of the shuffle are held out."""
    import random

    lines = [ln for ln in Path(data).read_text(encoding="utf-8").splitlines() if ln.strip()]
    index = list(select) if select is not None else list(range(len(lines) if limit is None else min(limit, len(lines))))
    random.Random(seed).shuffle(index)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_path, held_path = out / "train.jsonl", out / "held_out.jsonl"
    held_path.write_text("".join(lines[i] + "\n" for i in sorted(index[:held_out])), encoding="utf-8")
    train_path.write_text("".join(lines[i] + "\n" for i in sorted(index[held_out:])), encoding="utf-8")
    return train_path, held_path


def load_groups(path: str | Path, preset: str | None, tokenizer=None, max_new_tokens: int | None = None) -> list:
    """Offline groups as the trainer reads them (completions over ``max_new_tokens - 1`` tokens skipped)."""
    from .data import load_offline

    groups, _ = load_offline(path, preset=preset, tokenizer=tokenizer if max_new_tokens else None,
                             max_completion_tokens=max_new_tokens - 1 if max_new_tokens else None, on_too_long="skip")
    return groups


@torch.no_grad()
def sequence_logps_of(model, tokenizer, groups: Sequence[Any], *, groups_per_batch: int = 2) -> list[torch.Tensor]:
    """Per group, the sequence log-prob of each completion (EOS included), batched as the trainer batches."""
    from .batch import Group, build_batch
    from .model.logprobs import completion_token_logps, sequence_logps

    eos = tokenizer.eos_token_id
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(groups), groups_per_batch):
        chunk = groups[start : start + groups_per_batch]
        made = [Group(start + i, {"prompt": g.prompt},
                      [ids + [eos] for ids in tokenizer(list(g.completions), add_special_tokens=False)["input_ids"]],
                      list(g.completions), ["offline"] * g.k, rewards=list(g.rewards)) for i, g in enumerate(chunk)]
        batch = build_batch(made, tokenizer, device)
        seq = sequence_logps(completion_token_logps(model, batch.input_ids, batch.attention_mask,
                                                    batch.completion_mask), batch.completion_mask).double().cpu()
        offset = 0
        for g in chunk:
            out.append(seq[offset : offset + g.k])
            offset += g.k
    return out


def _load(model_dir: str | Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def implicit_reward_correlation(model_dir: str | Path, ref_dir: str | Path, groups: Sequence[Any], beta: float,
                                *, groups_per_batch: int = 2) -> dict:
    """Within-group Pearson correlation of ``beta * log(pi_theta(y|x) / pi_ref(y|x))`` with the rewards.

    ``model_dir``/``ref_dir``: saved policy and reference folders (the tokenizer is read from
    ``model_dir``); ``groups``: :class:`gvpo.data.OfflineGroup` s. Returns ``{"corr"`` (mean over
    groups where both vary, as :func:`gvpo.run.metrics.within_group_correlation`), ``"groups"``,
    ``"groups_scored"``, ``"loss"`` (the GVPO loss, Eq. 16), ``"loss_at_reference"`` (its value at
    ``pi_theta = pi_ref``), ``"implicit_std"`` (mean within-group std of the implicit rewards),
    ``"length_corr"`` (within-group correlation of the implicit rewards with completion length), and
    ``"ref_logp_corr"`` (within-group correlation of the rewards with ``log pi_ref``: what the
    untrained model alone predicts), ``"group_corrs"`` and ``"reward_std"`` (per group)}``.
    """
    from transformers import AutoTokenizer

    from .objectives import gvpo_loss
    from .run.metrics import within_group_correlation

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = _load(model_dir)
    logps = sequence_logps_of(policy, tokenizer, groups, groups_per_batch=groups_per_batch)
    del policy
    ref = sequence_logps_of(_load(ref_dir), tokenizer, groups, groups_per_batch=groups_per_batch)
    implicit = beta * (torch.cat(logps) - torch.cat(ref))
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float64)
    gids = torch.tensor([i for i, g in enumerate(groups) for _ in range(g.k)])
    lengths = torch.tensor([float(n) for g in completion_lengths(tokenizer, groups) for n in g], dtype=torch.float64)
    varies = [float(torch.tensor(g.rewards).std()) > 1e-6 and g.k > 1 for g in groups]
    stds = [float(x.std()) for x in torch.split(implicit, [g.k for g in groups]) if x.numel() > 1]
    per_group = []
    for imp, g in zip(torch.split(implicit, [g.k for g in groups]), groups):
        r = torch.tensor(g.rewards, dtype=torch.float64)
        ok = g.k > 1 and float(imp.std()) > 1e-9 and float(r.std()) > 1e-9
        per_group.append(float(torch.corrcoef(torch.stack([imp, r]))[0, 1]) if ok else float("nan"))
    return {
        "corr": within_group_correlation(implicit, rewards, gids),
        "groups": len(groups),
        "groups_scored": int(sum(varies)),
        "loss": float(gvpo_loss(implicit / beta, torch.zeros_like(implicit), rewards, gids, beta=beta)),
        "loss_at_reference": float(gvpo_loss(torch.zeros_like(implicit), torch.zeros_like(implicit), rewards, gids,
                                             beta=beta)),
        "implicit_std": sum(stds) / max(len(stds), 1),
        "length_corr": within_group_correlation(implicit, lengths, gids),
        "ref_logp_corr": within_group_correlation(torch.cat(ref), rewards, gids),
        "group_corrs": per_group,
        "reward_std": [float(torch.tensor(g.rewards).std()) if g.k > 1 else 0.0 for g in groups],
    }


def attainable_correlation(groups: Sequence[Any]) -> dict:
    """The best within-group correlation any policy can reach on ``groups``, and the GVPO loss floor.

    Identical completions of one prompt have identical implicit rewards, so where a group repeats a
    text with different rewards (the rm8 file does: the RM scored copies of one response slightly
    differently), the best implicit rewards are the mean reward of each distinct text (the
    least-squares optimum of Eq. 16 within the group). Returns ``{"corr"`` (mean over groups where
    rewards vary, as :func:`gvpo.run.metrics.within_group_correlation`), ``"loss_floor"``,
    ``"groups_with_repeats"``, ``"groups_with_conflicting_repeats"}``.
    """
    from .objectives import gvpo_loss
    from .run.metrics import within_group_correlation

    best, rewards, gids, repeats, conflicts = [], [], [], 0, 0
    for i, g in enumerate(groups):
        by_text: dict[str, list[float]] = {}
        for text, r in zip(g.completions, g.rewards):
            by_text.setdefault(text, []).append(float(r))
        repeats += len(by_text) < g.k
        conflicts += any(max(v) - min(v) > 0 for v in by_text.values())
        best += [sum(by_text[t]) / len(by_text[t]) for t in g.completions]
        rewards += [float(r) for r in g.rewards]
        gids += [i] * g.k
    best_t, rewards_t, gids_t = (torch.tensor(best, dtype=torch.float64), torch.tensor(rewards, dtype=torch.float64),
                                 torch.tensor(gids))
    return {"corr": within_group_correlation(best_t, rewards_t, gids_t),
            "loss_floor": float(gvpo_loss(best_t, torch.zeros_like(best_t), rewards_t, gids_t, beta=1.0)),
            "groups_with_repeats": repeats, "groups_with_conflicting_repeats": conflicts}
