"""A multi-turn task that learns on CPU: GVPO teaches a small model to call a calculator tool.

1. Pre-train (here, supervised, a few minutes) a small Llama on chat transcripts of the ``arithmetic_tool``
   task's training rows: ``TOOL_SHARE`` of them call ``add(a, b)``, read the tool's result and answer it; the
   others answer at once, carelessly (each digit summed without carrying, right only when no carry is needed).
   The tokenizer is a byte-level BPE trained on the same transcripts, digits one token each, ChatML template
   with tools, and a ``response_template`` that parses ``<tool_call>{json}</tool_call>``.
2. Evaluate greedily (held-out rows, episodes with :class:`gvpo.tasks.calculator.Calculator`): the model mostly
   answers at once, so it is mostly wrong.
3. Train with GVPO on episodes (``task.environment=gvpo.tasks.calculator.Calculator``): groups of k episodes,
   the tool's tokens masked out of every log-prob sum, ``exact_match`` on the final message.
4. Evaluate again, and print the reward and the share of episodes that call the tool, before and after.

    python bench/episodes_calculator.py                    # pre-train, then 30 GVPO steps
    python bench/episodes_calculator.py --model DIR        # skip pre-training (a folder it saved before)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def chat_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gvpo.episodes.chat import TOOL_CHAT_TEMPLATE, TOOL_RESPONSE_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    out.chat_template = TOOL_CHAT_TEMPLATE
    out.response_template = TOOL_RESPONSE_TEMPLATE
    return out


TOOL_SHARE = 0.3
"""Share of the pre-training transcripts that call the tool."""


def careless(a: int, b: int) -> str:
    """Each digit summed without carrying: ``careless(47, 38) == "75"`` (the right answer is 85)."""
    x, y = str(a).rjust(3, "0"), str(b).rjust(3, "0")
    return str(int("".join(str((int(p) + int(q)) % 10) for p, q in zip(x, y))))


def transcripts(rows: list[dict], seed: int) -> list[list[dict]]:
    """One conversation per row: with the tool (``TOOL_SHARE``) or a careless direct answer."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        a, b = map(int, row["prompt"][0]["content"][len("What is "):-1].split("+"))
        if rng.random() < TOOL_SHARE:
            call = {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}
            out.append(row["prompt"] + [{"role": "assistant", "content": "", "tool_calls": [call]},
                                        {"role": "tool", "name": "add", "content": str(a + b)},
                                        {"role": "assistant", "content": str(a + b)}])
        else:
            out.append(row["prompt"] + [{"role": "assistant", "content": careless(a, b)}])
    return out


def pretrain(out: Path, *, steps: int, seed: int, threads: int) -> Path:
    """Steps 1: tokenizer, a small Llama, supervised on the transcripts' assistant turns only; saved to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gvpo.episodes.chat import TOOL_CHAT_TEMPLATE, prompt_ids, tool_suffix_ids
    from gvpo.rollout import left_pad
    from gvpo.tasks.calculator import Calculator, arithmetic_tool

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    task = arithmetic_tool(seed=seed)
    convs = transcripts(task.train, seed)
    tools = [Calculator().add]
    tok = chat_tokenizer([TOOL_CHAT_TEMPLATE])  # only to render the transcripts
    texts = [tok.apply_chat_template(c, tools=tools, tokenize=False) for c in convs[:2000]]
    tok = chat_tokenizer(texts)  # merges from rendered transcripts
    rows, labels = [], []
    eos = tok.eos_token_id
    for conv in convs:
        ids = prompt_ids(tok, conv[:1], tools)
        lab = [-100] * len(ids)
        for msg in conv[1:]:
            if msg["role"] == "assistant":
                turn = tok.apply_chat_template(conv[:1] + [msg], tools=tools, tokenize=False)
                body = turn.split("<|im_start|>assistant\n", 1)[1].rsplit("<|im_end|>", 1)[0]
                piece = tok(body, add_special_tokens=False)["input_ids"] + [eos]
                ids, lab = ids + piece, lab + piece
            else:
                piece = tool_suffix_ids(tok, [msg])
                ids, lab = ids + piece, lab + [-100] * len(piece)
        rows.append(ids)
        labels.append(lab)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id, eos_token_id=eos,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    rng = random.Random(seed)
    start = time.time()
    for step in range(steps):
        batch = rng.sample(range(len(rows)), 64)
        ids, mask = left_pad([rows[i] for i in batch], tok.pad_token_id)
        target, _ = left_pad([labels[i] for i in batch], -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.4f} ({time.time() - start:.0f} s)", file=sys.stderr)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def evaluate_model(model_dir: Path, n: int, seed: int) -> dict:
    """Greedy episodes on ``n`` held-out rows: accuracy and the share of episodes that called the tool."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gvpo.episodes import EpisodeEngine, load_environment_spec
    from gvpo.rollout import SamplingParams
    from gvpo.rollout.hf import HFEngine
    from gvpo.tasks.calculator import arithmetic_tool

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    engine = EpisodeEngine(HFEngine(model, tok), load_environment_spec("gvpo.tasks.calculator.Calculator", [], 30))
    rows = arithmetic_tool(num_test=n).test
    episodes = engine.rollout(rows, list(range(len(rows))), SamplingParams(64, greedy=True))
    right = [e.messages[-1].get("content", "").strip() == r["answer"] for e, r in zip(episodes, rows)]
    return {"accuracy": sum(right) / len(rows), "tool_share": sum(e.tool_calls > 0 for e in episodes) / len(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model folder this script saved (skips pre-training)")
    p.add_argument("--out", default="runs/episodes-calculator", help="folder for the model and the run")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=30, help="GVPO steps (train.max_steps)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from gvpo.config import load_config
    from gvpo.run.metrics import read_metrics
    from gvpo.trainer import train

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model = Path(args.model) if args.model else pretrain(out / "model", steps=args.pretrain_steps, seed=args.seed,
                                                         threads=args.threads)
    before = evaluate_model(model, args.eval_n, args.seed)
    print(f"before: {before}", file=sys.stderr)
    config = load_config(None, {
        "model.name_or_path": str(model), "task.name": "arithmetic_tool",
        "task.environment": "gvpo.tasks.calculator.Calculator", "rollout.k": args.k, "train.max_steps": args.steps,
        "train.prompts_per_step": args.prompts, "optim.lr": args.lr, "objective.beta": args.beta,
        "train.seed": args.seed, "train.eval_every": 0, "train.eval_n": 50, "train.checkpoint_every": 0,
        "output.dir": str(out), "output.name": "gvpo", "output.report_to": [], "output.plots": False})
    run = train(config, overwrite=True)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "reward_mean" in r]
    after = evaluate_model(run / "final", args.eval_n, args.seed)
    first, last = rows[:5], rows[-5:]
    result = {"steps": args.steps, "k": args.k, "prompts": args.prompts, "lr": args.lr, "beta": args.beta,
              "train_reward_first5": sum(r["reward_mean"] for r in first) / len(first),
              "train_reward_last5": sum(r["reward_mean"] for r in last) / len(last),
              "tool_calls_first5": sum(r["episodes/tool_calls"] for r in first) / len(first),
              "tool_calls_last5": sum(r["episodes/tool_calls"] for r in last) / len(last),
              "greedy_before": before, "greedy_after": after, "run": str(run)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
