"""Scoring completions on SmolLM2-135M-Instruct: the reference forward (no grad) and the update's forward and
backward, as gvpo did before issue 19 and with each of its two changes, against TRL 1.16's scoring for scale:

- ``before``: one padded pass, the LM head on materialised ``(B, C + 1, V)`` logits;
- ``fused``: the LM head on the hidden states of the scored tokens only (:mod:`gvpo.lm_head`);
- ``buckets``: rows in buckets of similar completion length, each pass trimmed to its longest (:mod:`gvpo.buckets`);
- ``after``: both (gvpo's default now);
- ``trl``: TRL's ``add_fused_lm_head`` (which on CPU scores every position of prompt and completion).

The batch is a step's shape in ``vs_trl.py --smollm2``: 4 chat prompts (left-padded, the template's system
message included) x k=8 completions, right-padded to 64 tokens, with lengths drawn like the model's own
(about a third end early at EOS; mean 53). gvpo's variants share each group's prompt (the default); the
tokens are random, since the cost does not depend on them. Every variant runs in its own process, in
alternating order over ``--rounds``; it reports the seconds of each phase (median over ``--repeats``) and
the peak extra RSS of the forward+backward over what the model and inputs hold (``/proc/self/clear_refs``).

    python bench/smol_scoring.py --model-path $(gvpo model get smollm2-135m-instruct)
    python bench/smol_scoring.py --variants before,after --rounds 2 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _chat_task as smol  # noqa: E402
import _models  # noqa: E402

LENGTHS = [14, 17, 17, 19, 21, 38, 41, 44, 46, 54, 56, 59, 9, 22, 24, 28, 28, 39, 42, 46, 47, 48, 55, 57, 63, 63]
"""Completion lengths of SmolLM2 on these prompts that ended before 64 tokens (2 steps of 32 measured here,
the other 38 of 64 reached 64); the batch below cycles through them with 64s in between."""


def status_gib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def make_batch(tokenizer, prompts: int, k: int, width: int, seed: int):
    """``(input_ids, attention_mask, completion_mask)`` of ``prompts`` x ``k`` rows as gvpo's ``build_batch`` lays
    them out: left-padded chat prompts, right-padded completions of the lengths in ``LENGTHS`` and ``width``."""
    import torch

    from gvpo.rollout.hf import encode_prompts

    rows = smol.chat_rows(prompts, seed)
    enc = encode_prompts(tokenizer, [r["prompt"] for r in rows for _ in range(k)])
    g = torch.Generator().manual_seed(seed)
    n = prompts * k
    lengths = [width if i % 5 < 3 else min(LENGTHS[i % len(LENGTHS)], width) for i in range(n)]
    completion_ids = torch.randint(3, tokenizer.vocab_size, (n, width), generator=g)
    completion_mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    return (torch.cat([enc["input_ids"], completion_ids], 1), torch.cat([enc["attention_mask"], completion_mask], 1),
            completion_mask)


def child(spec: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gvpo.logprobs as logprobs

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    ids, attention, completion = make_batch(tokenizer, spec["prompts"], spec["k"], spec["tokens"], seed=0)
    variant = spec["variant"]
    if variant in ("before", "buckets"):
        logprobs.fused_head = lambda model, base: None
    if variant in ("before", "fused"):
        logprobs.PASS_COST = 10**9  # never worth a second pass: one bucket
    if variant == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
        width = completion.shape[1]

        def score():
            labels = ids.masked_fill(attention == 0, -100)
            labels[:, :-width] = -100
            out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
            return out.log_probs[:, -width:]
    else:
        def score():
            return logprobs.completion_token_logps(model, ids, attention, completion)

    model.train()
    times = {"forward (no grad)": [], "forward (grad)": [], "backward": []}
    peak = 0.0
    for _ in range(spec["repeats"]):
        with torch.no_grad():
            start = time.perf_counter()
            score()
            times["forward (no grad)"].append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        base = status_gib("VmRSS")
        reset_peak()
        start = time.perf_counter()
        out = score()
        times["forward (grad)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        (out * completion).sum().backward()
        times["backward"].append(time.perf_counter() - start)
        peak = max(peak, status_gib("VmHWM") - base)
        del out
    _models.report({"seconds": {k: statistics.median(v) for k, v in times.items()}, "peak_extra_gib": peak,
                    "load": _models.load_average()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model-path", help=f"SmolLM2-135M-Instruct folder (default ${smol.MODEL_ENV})")
    p.add_argument("--variants", default="before,fused,buckets,after,trl",
                   help="before, fused, buckets, after, trl (default all)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternating the order (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="measurements per run, median kept (default 2)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="completion width (default 64)")
    p.add_argument("--threads", type=int, default=2)
    parsed = _models.parse_args(p, argv, child)
    if parsed is None:
        return 0
    args, omp = parsed
    model = smol.model_path(args.model_path)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    print(f"{args.prompts} prompts x k={args.k} x {args.tokens} completion tokens, {args.threads} threads, "
          f"OMP_WAIT_POLICY {omp}, load {_models.load_average():.2f}", flush=True)
    results = {v: [] for v in variants}
    for rnd in range(args.rounds):
        for variant in variants if rnd % 2 == 0 else variants[::-1]:
            spec = {"variant": variant, "model": str(model), "prompts": args.prompts, "k": args.k,
                    "tokens": args.tokens, "threads": args.threads, "repeats": args.repeats}
            r = _models.run_child(__file__, spec)
            results[variant].append(r)
            print(f"  {variant:6s} round {rnd + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items())
                  + f"; peak extra (forward+backward) {r['peak_extra_gib']:.2f} GiB; load {r['load']:.1f}", flush=True)
    print("\nmedian over rounds")
    for variant, runs in results.items():
        phases = {k: statistics.median(r["seconds"][k] for r in runs) for k in runs[0]["seconds"]}
        print(f"  {variant:6s} " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())
              + f"; peak extra {statistics.median(r['peak_extra_gib'] for r in runs):.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
