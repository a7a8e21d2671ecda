#!/usr/bin/env bash
# The split Triton GroupNorm on a lent GPU, in one call: the U-Net CFG step A/B (scripts/plans/gn-kernel-ab.txt), then
# each SD-1.5 GroupNorm shape timed against inductor (both methods, a tile sweep), then the kernel's GPU tests.
#   scripts/plans/gn-kernel-split.sh [OUT]
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${1:-runs/gn-kernel}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
$PY scripts/bench_plan.py scripts/plans/gn-kernel-ab.txt --out "$OUT" --total-s 300
timeout -s KILL 150 $PY scripts/bench_group_norm.py --silu-only --out "$OUT/gn-shapes.jsonl" > "$OUT/gn-shapes.log" 2>&1
echo "bench_group_norm rc=$?"
timeout -s KILL 110 $PY -m pytest -m gpu -o addopts="" -p no:cacheprovider -q tests/test_group_norm_kernel.py 2>&1 \
  | tail -15 > "$OUT/gpu-tests.txt"
echo "tests rc=${PIPESTATUS[0]}" >> "$OUT/gpu-tests.txt"; tail -2 "$OUT/gpu-tests.txt"
