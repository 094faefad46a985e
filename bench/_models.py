"""Shared pieces of the benchmarks: models built from a config (no download), a character tokenizer,
the float32 matmul roofline, peak RSS, running one configuration in its own subprocess, and the run
folder and figure handling of the sweeps.

Models are Llamas shaped like the embedded arithmetic model (``scripts/make_default_model.py``:
character tokenizer of 100 tokens, untied embeddings, MLP 4x hidden), randomly initialised:

========  ======  ======  =====  ====  =============
preset    hidden  layers  heads  MLP   parameters
========  ======  ======  =====  ====  =============
``1m``    128     4       4      512   1.07M
``30m``   512     7       8      2048  29.5M
``34m``   512     8       8      2048  33.7M
========  ======  ======  =====  ====  =============

For the GPU comparison, ``QWEN2_PRESETS`` are Qwen2-shaped (grouped-query attention, q/k/v biases, tied
embeddings) with the character tokenizer padded to Qwen2's vocabulary, so the logits cost what they cost
in the real model: ``qwen2-0.5b`` has Qwen2.5-0.5B's shape (494M parameters); ``qwen2-tiny`` is the same
code path small enough for a CPU dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHARS = ["\n"] + [chr(i) for i in range(32, 127)]
VOCAB = len(SPECIAL_TOKENS) + len(CHARS)  # 100
NEVER_EOS = "<never>"
"""With ``unreachable_eos``, the tokenizer's EOS is this token, whose id (``VOCAB``) lies outside the
model's output vocabulary: no sampler can produce it, so every completion has exactly the length budget."""

PRESETS = {
    "1m": dict(hidden=128, layers=4, heads=4, intermediate=512),
    "30m": dict(hidden=512, layers=7, heads=8, intermediate=2048),
    "34m": dict(hidden=512, layers=8, heads=8, intermediate=2048),
}

QWEN2_PRESETS = {
    "qwen2-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936),
    "qwen2-tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024),
}

RESULT_PREFIX = "BENCH_RESULT "
REPO = Path(__file__).resolve().parent.parent


def build_tokenizer(*, unreachable_eos: bool = False, size: int = VOCAB):
    """One token per character (printable ASCII and newline) after ``<pad> <s> </s> <unk>``; prepends ``<s>``.
    ``size > 100``: filler tokens ``<x100>``, ... up to ``size`` ids, so that every id a model of that vocabulary
    samples decodes (the unreachable EOS then has id ``size``)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    vocab.update({f"<x{i}>": i for i in range(VOCAB, size)})
    specials = list(SPECIAL_TOKENS)
    if unreachable_eos:
        vocab[NEVER_EOS] = size
        specials.append(NEVER_EOS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                  eos_token=NEVER_EOS if unreachable_eos else "</s>", unk_token="<unk>",
                                  clean_up_tokenization_spaces=False, padding_side="left", model_max_length=128)


def make_llama(path: str | Path, preset: str, *, seed: int = 0, unreachable_eos: bool = False) -> Path:
    """Save a randomly initialised Llama of ``preset`` and the character tokenizer to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = PRESETS[preset]
    eos = VOCAB if unreachable_eos else EOS_ID
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["heads"], max_position_embeddings=128, pad_token_id=PAD_ID,
                         bos_token_id=BOS_ID, eos_token_id=eos, tie_word_embeddings=False)
    return _save_random(path, LlamaForCausalLM, config, seed=seed, eos=eos,
                        tokenizer=build_tokenizer(unreachable_eos=unreachable_eos))


def _save_random(path, model_class, config, *, seed: int, eos: int, tokenizer) -> Path:
    """A randomly initialised ``model_class(config)`` (seeded) saved with ``tokenizer`` to ``path``."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_qwen2(path: str | Path, preset: str, *, seed: int = 0, unreachable_eos: bool = False) -> Path:
    """Save a randomly initialised Qwen2 of ``QWEN2_PRESETS[preset]`` and the padded character tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = QWEN2_PRESETS[preset]
    eos = shape["vocab"] if unreachable_eos else EOS_ID
    config = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], max_position_embeddings=512, pad_token_id=PAD_ID,
                         bos_token_id=BOS_ID, eos_token_id=eos, tie_word_embeddings=True)
    return _save_random(path, Qwen2ForCausalLM, config, seed=seed, eos=eos,
                        tokenizer=build_tokenizer(unreachable_eos=unreachable_eos, size=shape["vocab"]))


def make_model(path: str | Path, preset: str, *, seed: int = 0, unreachable_eos: bool = False) -> Path:
    """``make_qwen2`` for a ``QWEN2_PRESETS`` name, else ``make_llama``."""
    make = make_qwen2 if preset in QWEN2_PRESETS else make_llama
    return make(path, preset, seed=seed, unreachable_eos=unreachable_eos)


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: all of them but the input embedding (a lookup)."""
    seen, total = set(), 0
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p is embedding and not tied:
            continue
        total += p.numel()
    return total


def count_params(path: str | Path) -> tuple[int, int]:
    """``(all parameters, matmul parameters)`` of the model saved at ``path``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return sum(p.numel() for p in model.parameters()), matmul_params(model)


def matmul_peak_flops(*, n: int = 2048, threads: int = 2, seconds: float = 2.0) -> float:
    """Best float32 ``torch.matmul`` rate (FLOP/s) of an ``n x n`` product on ``threads`` threads."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)  # warm-up
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            torch.matmul(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
        return best
    finally:
        torch.set_num_threads(old)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_average() -> float:
    return os.getloadavg()[0]


OMP_WAIT_POLICY: str | None = None
"""``OMP_WAIT_POLICY`` given to every child (``None``: inherit). ``PASSIVE`` makes idle OpenMP threads sleep
instead of spinning; on cores shared with other jobs, spinning made a 2-thread matmul 10-30x slower
(see README). It must be set before torch starts, hence in the children's environment."""


def child_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO / "bench"),
                                                         os.environ.get("PYTHONPATH", "")])))
    if OMP_WAIT_POLICY:
        env["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    return env


def parse_args(parser, argv, child):
    """Parse a subprocess benchmark's arguments, adding the options every one of them has (``--json``,
    ``--omp-wait-policy`` and the hidden ``--child SPEC``). In a child, run ``child(spec)`` and return
    ``None``; otherwise work offline, set the children's OpenMP wait policy and return ``(args, policy)``."""
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "inherit"],
                        help="OMP_WAIT_POLICY of every run (both sides) and of the matmul peak: passive (default) = "
                             "idle OpenMP threads sleep, 8x faster steps with 2 threads on cores shared with other "
                             "jobs; active = spin (OpenMP's default); inherit = leave the environment as it is")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    global OMP_WAIT_POLICY
    OMP_WAIT_POLICY = None if args.omp_wait_policy == "inherit" else args.omp_wait_policy.upper()
    return args, OMP_WAIT_POLICY or os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default)")


def measure_peak(*, n: int = 2048, threads: int = 2) -> float:
    """``matmul_peak_flops`` in a fresh process with the children's environment."""
    return run_child(__file__, {"peak_n": n, "threads": threads})["flops"]


def run_child(script: str | Path, spec: dict, *, timeout: float | None = None) -> dict:
    """Run ``python script --child '<json spec>'`` in a fresh process; return the dict it reports."""
    cmd = [sys.executable, str(script), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"benchmark child failed (exit {proc.returncode}) for {spec}:\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def report(result: dict) -> None:
    """Called by a child: print its result for ``run_child`` (the last such line wins)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def read_metrics(run_dir: str | Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def steady_state(rows: list[dict]) -> dict:
    """Steps 2..N of a gvpo run from its metrics rows: seconds, steps, completions generated and trained."""
    steps = sorted((r for r in rows if r.get("step", 0) >= 1 and "time_s" in r and "samples" in r),
                   key=lambda r: r["step"])
    # one row per step (an eval row at the same step merges keys in a single row in MetricsLog)
    by_step = {r["step"]: r for r in steps}
    first, last = by_step[1], by_step[max(by_step)]
    if last["step"] < 2:
        raise ValueError("need at least 2 steps: the first is a warm-up")
    return {"seconds": last["time_s"] - first["time_s"], "steps": last["step"] - 1,
            "completions": last["samples"] - first["samples"],
            "trained": last.get("completions_trained", 0) - first.get("completions_trained", 0),
            "rows": [by_step[s] for s in sorted(by_step) if s >= 2]}


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


if __name__ == "__main__":  # the matmul peak in a child: python _models.py --child '{"peak_n": 2048, "threads": 2}'
    spec = json.loads(sys.argv[sys.argv.index("--child") + 1])
    report({"flops": matmul_peak_flops(n=spec["peak_n"], threads=spec["threads"])})


def runs_folder(out: Path, fresh: bool) -> Path:
    """``out/runs``, created; emptied first when ``fresh`` (the sweeps reuse finished runs otherwise)."""
    import shutil

    runs_dir = Path(out) / "runs"
    if fresh and runs_dir.exists():
        shutil.rmtree(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    return runs_dir


def save_figure(fig, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
