#!/usr/bin/env bash
# Fifteenth session, first GPU call: every GPU test (with the guard's fused-clip test, fixed in 0c25874 and not yet
# run on a GPU), then the Lightning loop at 512 px, batch 64, replayed from CUDA graphs (cold compile).
#   scripts/plans/fifteenth-1.sh OUT
set -uo pipefail
OUT=${1:?OUT}
mkdir -p "$OUT"
start=$SECONDS
GPU_TESTS_LIMIT_S=250 scripts/plans/gpu-tests.sh "$OUT"
echo "gpu tests: rc=$? after $((SECONDS - start)) s"
timeout -s KILL 320 python3 scripts/bench_train.py --latent 64 --batch 64 --compile --steps 40 --warmup 15 \
  --override train.compile_mode=reduce-overhead --out "$OUT/loop-ro.jsonl" > "$OUT/loop-ro.log" 2>&1
echo "loop reduce-overhead: rc=$? after $((SECONDS - start)) s"
grep -h '"train_e2e_img_per_s"\|"train_e2e_syncs' "$OUT"/*.jsonl | cut -c1-300
tail -5 "$OUT/loop-ro.log"
