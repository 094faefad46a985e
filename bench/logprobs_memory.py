"""Peak extra host memory of sequence log-probs: ``gvpo.token_logps_from_logits`` vs the naive
``logits.log_softmax(-1).gather(-1, labels)``, forward and backward.

Shape: batch 4 x 1,024 tokens x vocabulary 152,064 (Qwen2.5), float32 logits = 2.49 GB. Each method
runs in its own fresh subprocess, so neither sees the other's allocations. In the subprocess:

1. allocate the logits (a leaf that requires grad, as the LM head's output would) and the labels;
2. reset the kernel's peak-RSS counter (``/proc/self/clear_refs`` <- 5), read ``VmRSS`` = baseline;
3. forward: ``seq = fn(logits, labels).sum(-1)`` (sequence log-probs); peak extra = ``VmHWM - baseline``;
4. backward: ``seq.sum().backward()``; peak extra = ``VmHWM - baseline`` over forward + backward.

The gradient of the logits (2.49 GB) is part of both backward numbers: no method can avoid it.
Times are wall seconds of one forward and one backward (noisy on a shared machine).

    python bench/logprobs_memory.py                    # B=4, T=1024, V=152064, both methods
    python bench/logprobs_memory.py --batch 1 --vocab 32000   # smaller, quicker
    python bench/logprobs_memory.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

METHODS = ("naive", "gvpo")


def _status() -> dict[str, float]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024 / 2**30  # GiB
    return values


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(method: str, batch: int, tokens: int, vocab: int, dtype: str, chunk_rows: int) -> dict:
    import torch

    from gvpo import token_logps_from_logits

    torch.manual_seed(0)
    logits = torch.randn(batch, tokens, vocab, dtype=getattr(torch, dtype)).requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, tokens))
    if method == "naive":
        def fn(x, y):
            return x.float().log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    else:
        def fn(x, y):
            return token_logps_from_logits(x, y, chunk_rows=chunk_rows)

    _reset_peak()
    base = _status()["VmRSS"]
    t0 = time.perf_counter()
    seq = fn(logits, labels).sum(-1)  # (B,) sequence log-probs
    t1 = time.perf_counter()
    forward_peak = _status()["VmHWM"] - base
    seq.sum().backward()
    t2 = time.perf_counter()
    total_peak = _status()["VmHWM"] - base
    return {"method": method, "logits_gib": logits.numel() * logits.element_size() / 2**30,
            "forward_peak_extra_gib": forward_peak, "fwd_bwd_peak_extra_gib": total_peak,
            "forward_s": t1 - t0, "backward_s": t2 - t1, "seq_logps_sum": float(seq.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=152_064)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.tokens, args.vocab, args.dtype, args.chunk_rows)))
        return

    results = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--worker", method, "--batch", str(args.batch), "--tokens",
               str(args.tokens), "--vocab", str(args.vocab), "--dtype", args.dtype, "--chunk-rows", str(args.chunk_rows)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
    naive, ours = results["naive"], results["gvpo"]
    print(f"logits: batch {args.batch} x {args.tokens} tokens x vocab {args.vocab}, {args.dtype}: "
          f"{naive['logits_gib']:.2f} GiB; chunk_rows={args.chunk_rows}")
    print(f"{'method':8s} {'forward peak extra':>20s} {'fwd+bwd peak extra':>20s} {'forward s':>10s} {'backward s':>11s}")
    for r in (naive, ours):
        print(f"{r['method']:8s} {r['forward_peak_extra_gib']:17.2f} GiB {r['fwd_bwd_peak_extra_gib']:17.2f} GiB "
              f"{r['forward_s']:10.2f} {r['backward_s']:11.2f}")
    print(f"ratio gvpo/naive: forward {ours['forward_peak_extra_gib'] / naive['forward_peak_extra_gib']:.3f}x, "
          f"forward+backward {ours['fwd_bwd_peak_extra_gib'] / naive['fwd_bwd_peak_extra_gib']:.3f}x (goal <= 0.5x)")
    rel = abs(ours["seq_logps_sum"] - naive["seq_logps_sum"]) / abs(naive["seq_logps_sum"])
    print(f"same sequence log-probs: relative difference of their sums {rel:.1e}")


if __name__ == "__main__":
    main()
