"""Scoring completions on SmolLM2-135M-Instruct: the reference forward (no grad) and the update's forward and
backward, as gvpo did before issue 19 and with each of its two changes, against TRL 1.16's scoring for scale:

- ``before``: one padded pass, the LM head on materialised ``(B, C + 1, V)`` logits;
- ``fused``: the LM head on the hidden states of the scored tokens only (:mod:`gvpo.model.lm_head`);
- ``buckets``: rows in buckets of similar completion length, each pass trimmed to its longest (:mod:`gvpo.model.buckets`);
- ``after``: both (gvpo's default now);
- ``trl``: TRL's ``add_fused_lm_head`` (which on CPU scores every position of prompt and completion).

The batch is a step's shape in ``vs_trl.py --smollm2``: 4 chat prompts (left-padded, the template's system
message included) x k=8 completions, right-padded to 64 tokens, with lengths drawn like the model's own
(about a third end early at EOS; mean 53). gvpo's variants share each group's prompt (the default); the
tokens are random, since the cost does not depend on them. The timings come from one process that runs the
variants in turn, ``--repeats`` times in alternating order, so that the other jobs on the machine slow them
alike; each variant's memory (the peak extra RSS of a forward and backward over what the model and inputs
hold, via ``/proc/self/clear_refs``) from a process of its own. ``--generate`` also times ``HFEngine.generate``
on the step's rows with transformers' KV cache and with gvpo's in-place one (and checks the tokens agree).

    python bench/smol_scoring.py --model-path $(gvpo model get smollm2-135m-instruct)
    python bench/smol_scoring.py --variants before,after --repeats 5 --generate
"""

from __future__ import annotations

import argparse
import contextlib
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


@contextlib.contextmanager
def variant_settings(variant: str):
    """gvpo's scoring as in ``variant``: the logits path and/or one padded pass where the variant says so."""
    import gvpo.model.logprobs as logprobs

    saved = logprobs.fused_head, logprobs.PASS_COST
    if variant in ("before", "buckets"):
        logprobs.fused_head = lambda model, base: None
    if variant in ("before", "fused"):
        logprobs.PASS_COST = 10**9  # a second pass is never worth it: one bucket
    try:
        yield
    finally:
        logprobs.fused_head, logprobs.PASS_COST = saved


def scorer(variant: str, model, ids, attention, completion):
    """A function returning ``(B, C)`` completion log-probs as ``variant`` computes them."""
    from gvpo.model.logprobs import completion_token_logps

    if variant != "trl":
        def score():
            with variant_settings(variant):
                return completion_token_logps(model, ids, attention, completion)
        return score
    width = completion.shape[1]
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :-width] = -100

    def score():  # TRL's _get_per_token_logps_and_entropies on one batch
        return model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True).log_probs[:, -width:]
    return score


def child(spec: dict) -> None:
    """Time every variant of ``spec["variants"]`` in this one process, interleaved ``repeats`` times (a change of
    load hits them alike), and note the peak extra RSS of a forward and backward (meaningful for one variant);
    ``spec["generate"]``: :func:`generate_child`."""
    if spec.get("generate"):
        return generate_child(spec)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    ids, attention, completion = make_batch(tokenizer, spec["prompts"], spec["k"], spec["tokens"], seed=0)
    if "trl" in spec["variants"]:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)  # a no-op for calls without fused_lm_head=True
    model.train()
    scores = {v: scorer(v, model, ids, attention, completion) for v in spec["variants"]}
    times = {v: {"forward (no grad)": [], "forward (grad)": [], "backward": []} for v in scores}
    peak = 0.0
    for rep in range(spec["repeats"]):
        for variant in spec["variants"] if rep % 2 == 0 else spec["variants"][::-1]:
            with torch.no_grad():
                start = time.perf_counter()
                scores[variant]()
                times[variant]["forward (no grad)"].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
            base = status_gib("VmRSS")
            reset_peak()
            start = time.perf_counter()
            out = scores[variant]()
            times[variant]["forward (grad)"].append(time.perf_counter() - start)
            start = time.perf_counter()
            (out * completion).sum().backward()
            times[variant]["backward"].append(time.perf_counter() - start)
            peak = max(peak, status_gib("VmHWM") - base)
            del out
    _models.report({"times": times, "peak_extra_gib": peak, "load": _models.load_average()})


def generate_child(spec: dict) -> None:
    """``HFEngine.generate`` on a step's rows (4 chat prompts x k=8, the trainer's seeds), with transformers' own
    cache (``before``) and with the in-place one (``after``), interleaved ``repeats`` times; the tokens must agree."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gvpo.rollout.hf as hf
    from gvpo.rollout import SamplingParams, hash_seed

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    engine = hf.HFEngine(model, AutoTokenizer.from_pretrained(spec["model"]))
    rows = smol.chat_rows(spec["prompts"], seed=0)
    prompts = [r["prompt"] for r in rows for _ in range(spec["k"])]
    seeds = [hash_seed(0, i // spec["k"], i % spec["k"]) for i in range(len(prompts))]
    in_place, times, outputs = hf.in_place_cache, {"before": [], "after": []}, {}
    for rep in range(spec["repeats"]):
        for variant in ("before", "after") if rep % 2 == 0 else ("after", "before"):
            hf.in_place_cache = in_place if variant == "after" else (lambda model, cache_kwargs, n: cache_kwargs)
            start = time.perf_counter()
            gen = engine.generate(prompts, seeds, SamplingParams(max_new_tokens=spec["tokens"]))
            times[variant].append(time.perf_counter() - start)
            outputs.setdefault(variant, gen.completion_ids)
    hf.in_place_cache = in_place
    same = torch.equal(outputs["before"], outputs["after"])
    lengths = gen.completion_mask.sum(-1).float()
    _models.report({"times": times, "same_tokens": same, "mean_length": float(lengths.mean()),
                    "load": _models.load_average()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model-path", help=f"SmolLM2-135M-Instruct folder (default ${smol.MODEL_ENV})")
    p.add_argument("--variants", default="before,fused,buckets,after,trl",
                   help="before, fused, buckets, after, trl (default all)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved measurements of each variant (default 3)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="completion width (default 64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--generate", action="store_true",
                   help="also time generate with transformers' KV cache and with gvpo's in-place one")
    parsed = _models.parse_args(p, argv, child)
    if parsed is None:
        return 0
    args, omp = parsed
    model = smol.model_path(args.model_path)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    print(f"{args.prompts} prompts x k={args.k} x {args.tokens} completion tokens, {args.threads} threads, "
          f"OMP_WAIT_POLICY {omp}, load {_models.load_average():.2f}", flush=True)
    spec = {"model": str(model), "prompts": args.prompts, "k": args.k, "tokens": args.tokens, "threads": args.threads,
            "repeats": args.repeats}
    timed = _models.run_child(__file__, {**spec, "variants": variants})
    print(f"seconds, median (min) of {args.repeats} interleaved measurements; load {timed['load']:.1f} at the end")
    for variant, phases in timed["times"].items():
        print(f"  {variant:8s} " + ", ".join(f"{k} {statistics.median(v):.2f} ({min(v):.2f})" for k, v in phases.items())
              + f"; total {sum(statistics.median(v) for v in phases.values()):.2f}", flush=True)
    print("peak extra RSS of a forward and backward (each variant alone in a process, 1 repeat)")
    for variant in variants:
        r = _models.run_child(__file__, {**spec, "variants": [variant], "repeats": 1})
        print(f"  {variant:8s} {r['peak_extra_gib']:.2f} GiB", flush=True)
    if args.generate:
        r = _models.run_child(__file__, {**spec, "generate": True})
        print(f"generate, {args.prompts} x {args.k} rows, up to {args.tokens} new tokens (mean {r['mean_length']:.1f}); "
              f"seconds, median (min) of {args.repeats}; tokens identical: {r['same_tokens']}; load {r['load']:.1f}")
        for variant, values in r["times"].items():
            print(f"  {variant:8s} {statistics.median(values):.2f} ({min(values):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
