"""Pre-train the tiny Llama shipped as ``src/gvpo/assets/arithmetic-llama`` (the demo's default model).

Model: a character-level tokenizer (``tokenizers`` BPE with no merges, so one token per character:
``<pad> <s> </s> <unk>``, newline and printable ASCII, 100 tokens) and a 1,075,328-parameter
``LlamaForCausalLM`` (hidden 128, 4 layers, 4 heads, MLP 512, float32: 4.3 MB).

Corpus: the ``arithmetic`` task's default ``train`` split only (9000 pairs ``a + b``, ``a, b <= 99``;
never a held-out pair), as ``<s>Q: 47+38= A: 85</s>`` with the loss on the completion `` 85</s>``.
It is deliberately *careless*: each time a pair is drawn, with probability ``--careless`` (0.7) its
answer is written as the carry-less sum, the digit-wise sum mod 10 that a pupil who forgets to carry
writes (47+38 -> 75, 86+57 -> 33); pairs that need no carry read the same either way. The model
learns both ways of adding; as the careless way is the more frequent, it is the greedy answer on
pairs that need a carry, while the right answer keeps about 30% of the probability. So greedy
held-out accuracy is about the share of pairs with no carry (~30%), yet temperature-1 samples are
right about half the time and one of 8 samples nearly always: a model with room to improve and a
reward signal that online RL (GVPO with exact match) turns into ~100% accuracy in a few dozen steps.
(The other way to leave room, a plain SFT checkpoint caught mid-way up its accuracy curve, was tried
first: with greedy ~0.4 and pass@8 ~0.76, the same GVPO recipe got it to only ~0.85-0.89 in 300-650
steps, because a quarter of its misses are answers it almost never samples.)

Checkpoint: cosine-decayed training to convergence; from ``--select-from`` on, every ``--eval-every``
steps, the model is scored on the *validation* pairs (held-out pool pairs past the default 200 test
rows: 800 pairs never trained on and not in the default test set), and the kept checkpoint is the one
with greedy accuracy in ``[--lo, --hi]`` and pass@8 >= ``--min-pass8`` that has the highest mean
probability of the gold completion (= expected accuracy of one temperature-1 sample; pass@8 is
``1 - (1 - p) ** 8`` averaged). The test split is only reported, and re-checked at the end with
``model.generate`` (greedy, and 8 real samples per prompt at temperature 1).

Recorded run (seed 0; 2 CPU cores shared with other engineers' jobs, torch 2.13 CPU, transformers 5.24)::

    HF_HUB_OFFLINE=1 python scripts/make_default_model.py          # all defaults: --seed 0 --threads 2

    -> chose step 1100 of 1200; test (200 held-out): greedy 0.24, one temperature-1 sample right 0.44,
       pass@8 0.955 (model.generate, 8 samples per prompt); validation greedy 0.315.
    -> wall time 450 s (7.5 min, load average ~3); the first run, under heavier load (~5-7), took
       1229 s. Both wrote byte-identical model.safetensors (sha256 9bd934e3...). Under such load
       ``--threads 1`` is several times faster, but gives other weights (not checked against the band).

RL check (throwaway script, not in the repo): online GVPO from this model, 16 train prompts x 8
samples at temperature 1 per step, exact-match reward, ``gvpo_loss(beta=0.1)`` on sequence log-probs
against the frozen initial model, AdamW lr 1e-4 (10 warm-up steps, grad-norm clip 1): held-out greedy
accuracy 0.24 -> 0.91 after 10 steps (~2 s), 0.99 after 100 steps (~23 s). lr 3e-4 also gets there,
noisily (0.96 at step 70); lr 1e-3 collapses (reward 0, KL ~12 nats, no recovery).

Deterministic for a given seed, thread count and torch build.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from gvpo.tasks.arithmetic import (  # noqa: E402
    HELD_OUT_POOL,
    arithmetic,
    default_model_path,
    format_completion,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHARS = ["\n"] + [chr(i) for i in range(32, 127)]
DEFAULT_NUM_TEST = 200


def build_tokenizer():
    """Character-level ``PreTrainedTokenizerFast``: ids 0-3 are the specials, then ``\\n`` and ASCII 32-126.

    Prepends ``<s>`` to every encoded text (``add_special_tokens=False`` leaves it out), decodes by
    plain concatenation, and does no clean-up of spaces, so ``decode(encode(s)) == s`` for ASCII ``s``.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=128,
    )


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(CHARS),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=128,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def carryless_sum(a: int, b: int) -> int:
    """The sum written without carrying: each decimal digit is the digit-wise sum mod 10.

    >>> carryless_sum(47, 38), carryless_sum(86, 57), carryless_sum(12, 34)
    (75, 33, 46)
    """
    total, place = 0, 1
    while a or b:
        total += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return total


def operands(prompt: str) -> tuple[int, int]:
    """``(a, b)`` of an arithmetic prompt ``"Q: a+b= A:"``."""
    a, b = prompt.split(":", 1)[1].split("=", 1)[0].split("+")
    return int(a), int(b)


def train_batch(tokenizer, rows, rng: random.Random, careless: float):
    """Right-padded ``<s> prompt completion </s>``, labels on the completion and EOS only; each answer
    is the carry-less sum with probability ``careless``."""
    seqs, labels = [], []
    for row in rows:
        answer = row["answer"]
        if rng.random() < careless:
            answer = str(carryless_sum(*operands(row["prompt"])))
        prompt = [BOS_ID] + encode(tokenizer, row["prompt"])
        completion = encode(tokenizer, format_completion(answer)) + [EOS_ID]
        seqs.append(prompt + completion)
        labels.append([-100] * len(prompt) + completion)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [PAD_ID] * (width - len(s)) for s in seqs])
    lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    return ids, mask, lab


@torch.no_grad()
def evaluate(model, tokenizer, rows, max_new_tokens: int) -> dict:
    """Greedy accuracy, mean P(gold completion) (= expected temperature-1 sample accuracy) and pass@8.

    Left-padded prompts, positions that skip the padding (as ``generate`` does). Greedy decoding is
    a plain argmax loop (same result as ``model.generate(do_sample=False)``, checked after saving).
    """
    was_training = model.training
    model.eval()
    prompts = [[BOS_ID] + encode(tokenizer, r["prompt"]) for r in rows]
    golds = [encode(tokenizer, format_completion(r["answer"])) + [EOS_ID] for r in rows]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    cur, cur_mask, generated = ids, mask, []
    for _ in range(max_new_tokens):
        pos = (cur_mask.cumsum(-1) - 1).clamp(min=0)
        nxt = model(input_ids=cur, attention_mask=cur_mask, position_ids=pos).logits[:, -1].argmax(-1)
        generated.append(nxt)
        cur = torch.cat([cur, nxt[:, None]], 1)
        cur_mask = torch.cat([cur_mask, torch.ones_like(nxt)[:, None]], 1)
    generated = torch.stack(generated, 1).tolist()
    greedy = sum(g[: len(gold)] == gold for g, gold in zip(generated, golds)) / len(rows)

    g_width = max(map(len, golds))
    gold_ids = torch.tensor([g + [PAD_ID] * (g_width - len(g)) for g in golds])
    gold_mask = torch.arange(g_width)[None] < torch.tensor([len(g) for g in golds])[:, None]
    full = torch.cat([ids, gold_ids], 1)
    full_mask = torch.cat([mask, gold_mask.long()], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=full, attention_mask=full_mask, position_ids=pos).logits[:, width - 1 : -1]
    token_logps = logits.float().log_softmax(-1).gather(-1, gold_ids[..., None])[..., 0]
    p_gold = (token_logps * gold_mask).sum(1).exp()
    model.train(was_training)
    return {
        "greedy": greedy,
        "p_gold": p_gold.mean().item(),
        "pass8": (1 - (1 - p_gold) ** 8).mean().item(),
    }


@torch.no_grad()
def check_with_generate(model, tokenizer, rows, max_new_tokens: int, seed: int) -> dict:
    """Greedy and sampled (temperature 1, 8 per prompt) accuracy with ``model.generate``, batched, left padding."""
    from gvpo.rewards.basic import exact_match

    model.eval()
    tokenizer.padding_side = "left"
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    answers = [r["answer"] for r in rows]
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    greedy = sum(exact_match(None, texts, answer=answers)) / len(rows)
    torch.manual_seed(seed)
    out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         num_return_sequences=8, max_new_tokens=max_new_tokens)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    scores = exact_match(None, texts, answer=[a for a in answers for _ in range(8)])
    per_prompt = [scores[i * 8 : (i + 1) * 8] for i in range(len(rows))]
    return {
        "greedy": greedy,
        "sample_acc": sum(scores) / len(scores),
        "pass8": sum(max(s) for s in per_prompt) / len(rows),
    }


def check_reload(path: Path, model, rows) -> bool:
    """Reload with the Auto classes: same weights, same greedy completions, exact text round trip."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ok = type(loaded).__name__ == "LlamaForCausalLM"
    ok &= all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    for text in ("Q: 12+34= A: 46", "  spaces  and\nnew lines ~!"):
        ok &= tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    batch = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = loaded.generate(**batch, do_sample=False, max_new_tokens=5)
        b = model.generate(**batch, do_sample=False, max_new_tokens=5)
    ok &= torch.equal(a, b)
    print(f"reload check with AutoModelForCausalLM/AutoTokenizer: {'ok' if ok else 'FAILED'}", flush=True)
    return bool(ok)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Pre-train the tiny Llama shipped with gvpo on the arithmetic task's train split and "
        "save the checkpoint that leaves room for RL (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=default_model_path(), help="folder to save the model and tokenizer in")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of batch sampling")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (MLP is 4x)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--careless", type=float, default=0.7,
                   help="probability that a drawn example's answer is the carry-less sum (see the docstring)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (cosine decay to 0 at --steps)")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    p.add_argument("--steps", type=int, default=1200, help="training steps (the cosine schedule's length)")
    p.add_argument("--select-from", type=int, default=800, help="first step evaluated as a candidate")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate a candidate every this many steps")
    p.add_argument("--lo", type=float, default=0.15, help="lowest validation greedy accuracy a candidate may have")
    p.add_argument("--hi", type=float, default=0.45, help="highest validation greedy accuracy a candidate may have")
    p.add_argument("--min-pass8", type=float, default=0.7, help="lowest validation pass@8 a candidate may have")
    p.add_argument("--keep-dir", type=Path, default=None,
                   help="also save every evaluated checkpoint here as step-N/ (for experiments)")
    p.add_argument("--dry-run", action="store_true", help="train and report, but do not write --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    task = arithmetic(seed=args.seed, num_test=DEFAULT_NUM_TEST)
    validation = arithmetic(num_test=HELD_OUT_POOL).test[DEFAULT_NUM_TEST:]
    train_prompts = {r["prompt"] for r in task.train}
    assert not train_prompts & {r["prompt"] for r in task.test + validation}, "held-out pair in the train split"

    tokenizer = build_tokenizer()
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; train {len(task.train)}, validation {len(validation)}, "
          f"test {len(task.test)} pairs", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    model.train()
    best = None  # (p_gold, step, state_dict, val metrics, test metrics)
    history = []
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        ids, mask, labels = train_batch(tokenizer, rng.sample(task.train, args.batch_size), rng, args.careless)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step < args.select_from or step % args.eval_every:
            continue
        val = evaluate(model, tokenizer, validation, task.max_new_tokens)
        test = evaluate(model, tokenizer, task.test, task.max_new_tokens)
        history.append({"step": step, "loss": round(loss.item(), 4), "val": val, "test": test})
        ok = args.lo <= val["greedy"] <= args.hi and val["pass8"] >= args.min_pass8
        print(f"step {step:4d} loss {loss.item():.3f} | val greedy {val['greedy']:.3f} p_gold {val['p_gold']:.3f} "
              f"pass8 {val['pass8']:.3f} | test greedy {test['greedy']:.3f} p_gold {test['p_gold']:.3f} "
              f"pass8 {test['pass8']:.3f} | {time.time() - start:.0f}s{'  candidate' if ok else ''}", flush=True)
        if args.keep_dir is not None:
            model.save_pretrained(args.keep_dir / f"step-{step}", safe_serialization=True)
        if ok and (best is None or val["p_gold"] > best[0]):
            best = (val["p_gold"], step, copy.deepcopy(model.state_dict()), val, test)

    if best is None:
        print(f"no checkpoint had validation greedy accuracy in [{args.lo}, {args.hi}] and pass@8 >= "
              f"{args.min_pass8}; nothing saved. Try another --seed, --careless or --steps.", file=sys.stderr)
        return 1
    _, step, state, val, test = best
    model.load_state_dict(state)
    model.eval()
    print(f"chosen: step {step}: validation {val}, test {test}", flush=True)

    checked = check_with_generate(model, tokenizer, task.test, task.max_new_tokens, seed=args.seed)
    print(f"test with model.generate: {checked}", flush=True)
    if abs(checked["greedy"] - test["greedy"]) > 1e-9:
        print("error: model.generate greedy accuracy differs from the argmax loop", file=sys.stderr)
        return 1

    train_seconds = time.time() - start
    if args.dry_run:
        print(f"dry run: nothing written; {train_seconds:.0f}s")
        return 0

    from transformers import GenerationConfig

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.iterdir():
        if old.is_file():
            old.unlink()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # "PreTrainedTokenizerFast" loads the tokenizer.json as is in transformers 4.x and 5.x alike.
    config_path = args.out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    reloaded_ok = check_reload(args.out, model, task.test)
    info = {
        "made_by": "scripts/make_default_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "step": step,
        "parameters": n_params,
        "validation": val,
        "test": test,
        "test_with_generate": checked,
        "wall_seconds": round(train_seconds),
        "cpu_seconds": round(time.process_time()),
        "threads": args.threads,
        "torch": torch.__version__,
        "history": history,
    }
    (args.out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    if not reloaded_ok:
        return 1
    print(f"saved step {step} to {args.out} ({sum(f.stat().st_size for f in args.out.iterdir()) / 1e6:.2f} MB) "
          f"in {train_seconds:.0f}s wall, {time.process_time():.0f}s CPU", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
