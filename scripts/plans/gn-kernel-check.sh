#!/usr/bin/env bash
# The one-kernel Triton GroupNorm on a lent GPU: its GPU tests (and the training tests' CUDA-graph replay count), then
# each SD-1.5 GroupNorm shape timed against inductor's lowering, with the kernel's tile sweep. Results under OUT:
#   scripts/plans/gn-kernel-check.sh [OUT]
# Then the U-Net step A/B: python scripts/bench_plan.py scripts/plans/gn-kernel-ab.txt --out "$OUT" --total-s 560
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${1:-runs/gn-kernel}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
timeout -s KILL 300 $PY -m pytest -m gpu -o addopts="" -p no:cacheprovider -q \
  tests/test_group_norm_kernel.py tests/test_train_diffusion.py 2>&1 | tail -25 > "$OUT/gpu-tests.txt"
echo "tests rc=${PIPESTATUS[0]}" >> "$OUT/gpu-tests.txt"; tail -3 "$OUT/gpu-tests.txt"
timeout -s KILL 220 $PY scripts/bench_group_norm.py --silu-only --out "$OUT/gn-shapes.jsonl" > "$OUT/gn-shapes.log" 2>&1
echo "bench_group_norm rc=$?"; tail -3 "$OUT/gn-shapes.log"
