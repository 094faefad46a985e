#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md, "The GPU check"): run it from the repository root on the GPU machine.
#   1. what is there: Python, torch, CUDA device, transformers, accelerate, TRL;
#   2. TRL and datasets from .whl/ (git-ignored, filled by scripts/fetch_gpu_wheels.sh) when they are missing;
#   3. the CUDA tests: tests/test_gpu.py, and the trainer, log-prob and HF-engine suites on the GPU, plus the
#      sharded-checkpoint tests (CPU processes) against that machine's torch;
#   4. gvpo against TRL's GRPOTrainer, bf16, Qwen2-shaped 0.5B (bench/vs_trl.py --gpu): completions/s and
#      peak GPU memory of both and their ratio, written into docs/gpu.md's numbers table.
# Everything goes to $OUT (default bench/out/gpu_check): tests.log, vs_trl.log, vs_trl.json, env.txt.
#
#   bash scripts/gpu_check.sh                # on the GPU machine
#   bash scripts/gpu_check.sh --cpu-dry-run  # anywhere: the same steps, CUDA tests skip themselves, a tiny model
#                                            # on the CPU, the table goes to a scratch copy of docs/gpu.md
#   SKIP_TESTS=1 bash scripts/gpu_check.sh   # only the comparison (e.g. a second call on a warm machine)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
[ "${1:-}" = "--cpu-dry-run" ] && DRY="--cpu-dry-run"
OUT=${OUT:-bench/out/gpu_check}
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }

step "1. environment"
$PY - <<'PYEOF' | tee "$OUT/env.txt"
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
for name in ("transformers", "accelerate", "peft", "trl", "datasets", "pyarrow", "pandas", "vllm", "deepspeed"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
PYEOF

step "2. TRL"
if ! $PY -c "import trl, datasets" 2>/dev/null; then
    links=()
    for d in .whl .whl/*/; do [ -d "$d" ] && links+=(--find-links "$d"); done
    if [ ${#links[@]} -gt 0 ]; then
        echo "installing trl and datasets from .whl/ (no network)"
        $PY -m pip install -q --no-index "${links[@]}" trl datasets || echo "pip could not install them from .whl/: see above"
    else
        echo "TRL is missing and there is no .whl/ folder: run scripts/fetch_gpu_wheels.sh where there is a network"
    fi
fi
TRL_SIDES="trl"
$PY -c "import trl, datasets" 2>/dev/null || { TRL_SIDES=""; echo "TRL unavailable: the comparison runs gvpo alone"; }

if [ -z "${SKIP_TESTS:-}" ]; then
    step "3. CUDA tests"
    $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_logprobs.py tests/rollout/test_hf_engine.py \
        tests/test_trainer.py tests/test_sharded.py 2>&1 | tee "$OUT/tests.log" | tail -15
fi

step "4. gvpo vs TRL"
DOC=docs/gpu.md
if [ -n "$DRY" ]; then DOC="$OUT/gpu.md"; cp docs/gpu.md "$DOC"; fi
$PY bench/vs_trl.py --gpu $DRY --trl "$TRL_SIDES" --json "$OUT/vs_trl.json" --doc "$DOC" 2>&1 | tee "$OUT/vs_trl.log" \
    | grep -v "^\[transformers\]"
status=${PIPESTATUS[0]}
step "done: table in $DOC (exit $status)"
exit "$status"
