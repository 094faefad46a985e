"""Prefix sharing (``train.share_prompts``): time and peak memory of scoring a batch of groups with each
group's prompt run once, against every row running prompt + completion, in the same run.

A random Llama of the given shape scores ``--prompts`` groups of ``--k`` completions (``--prompt-len``
tokens of left-padded prompt, ``--completion-len`` of completion) with
:func:`gvpo.model.logprobs.completion_token_logps`, without grad (the reference) and with forward+backward
(the update). Best of ``--repeats`` after one warm-up; on a GPU also CUDA's allocator peak (on CPU the
process's peak RSS never goes down between configurations, so no memory is reported there).

    python bench/share_prompts.py                                     # CPU, small model
    python bench/share_prompts.py --device cuda --dtype bfloat16 --hidden 1024 --layers 12 \\
        --prompt-len 325 --completion-len 128                         # the H100 row in bench/README.md
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from gvpo.model.logprobs import completion_token_logps



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--hidden", type=int, default=256, help="hidden size (MLP 4x, heads of 64)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8, help="groups (distinct prompts)")
    p.add_argument("--k", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompt-len", type=int, default=128, help="longest prompt; prompt i is 20*i tokens shorter (left padding)")
    p.add_argument("--completion-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=4)
    return p.parse_args(argv)


def make_batch(args, device):
    g = torch.Generator().manual_seed(0)
    U, k, P, C = args.prompts, args.k, args.prompt_len, args.completion_len
    prompts = torch.randint(3, 100, (U, P), generator=g)
    mask = torch.ones(U, P, dtype=torch.long)
    for u in range(U):
        pad = min(20 * u, P - 1)
        prompts[u, :pad], mask[u, :pad] = 0, 0
    ids = torch.cat([prompts.repeat_interleave(k, 0), torch.randint(3, 100, (U * k, C), generator=g)], 1)
    attention = torch.cat([mask.repeat_interleave(k, 0), torch.ones(U * k, C, dtype=torch.long)], 1)
    return ids.to(device), attention.to(device), torch.ones(U * k, C, dtype=torch.long, device=device)


def measure(model, batch, share: bool, grad: bool, repeats: int, device: str) -> tuple[float, float]:
    """(best seconds, CUDA peak bytes or 0 on CPU) of scoring ``batch``."""
    cuda = device.startswith("cuda")
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.set_grad_enabled(grad):
            out = completion_token_logps(model, *batch, share_prompts=share)
            if grad:
                out.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if cuda else 0.0
    return min(times[1:]), peak


def main(argv=None) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    args = parse_args(argv)
    torch.manual_seed(0)
    heads = max(args.hidden // 64, 1)
    config = LlamaConfig(vocab_size=100, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=args.prompt_len + args.completion_len + 8, pad_token_id=0)
    model = LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype))
    batch = make_batch(args, args.device)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.device} {args.dtype}; "
          f"{args.prompts} prompts x k={args.k}, prompt <= {args.prompt_len} + completion {args.completion_len} tokens")
    rows = {}
    for grad in (False, True):
        for share in (True, False):
            rows[grad, share] = measure(model, batch, share, grad, args.repeats, args.device)
            seconds, peak = rows[grad, share]
            memory = f"  peak {peak / 2**30:.2f} GiB" if peak else ""
            print(f"  {'fwd+bwd' if grad else 'no grad':8s} shared={share!s:5s}: {seconds * 1e3:8.1f} ms{memory}")
    for grad in (False, True):
        (s_t, s_m), (p_t, p_m) = rows[grad, True], rows[grad, False]
        mem = f", memory {s_m / p_m:.2f}x" if p_m else ""
        print(f"{'fwd+bwd' if grad else 'no grad'}: shared is {p_t / s_t:.2f}x as fast{mem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
