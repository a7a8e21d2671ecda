#!/usr/bin/env bash
# The Lightning loop against the bare compiled step at 512 px, batch 64, on one machine (docs/BENCHMARKS.md,
# thirteenth session): the bare step (bench.py, 4 steps back to back per repetition), the whole loop
# (bench_train.py: EMA, clipping, the guard, logging; profiled, to check that the clip's `_foreach_mul_` kernels
# are gone), then the loop with the EMA every 10 steps in what is left of TOTAL_S (from inductor's cache it needs
# ~100 s). Each of the first two compiles its own graphs (~120-170 s of first step cold on an H100; the profiled loop
# took ~225 s in all, thirteenth session).
#   scripts/plans/loop-vs-step.sh [OUT] [TOTAL_S]
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${1:-runs/loop-vs-step}
TOTAL_S=${2:-570}
mkdir -p "$OUT"
start=$SECONDS
timeout -s KILL 200 $PY scripts/bench.py --only train --skip-eager --train-cl --train-shapes 64x64 --train-impls "" \
  --compile-train --train-inner 4 --out "$OUT/step.jsonl" > "$OUT/step.log" 2>&1
echo "bare step: rc=$? after $((SECONDS - start)) s"
common=(--latent 64 --batch 64 --compile --steps 40 --warmup 15 --out "$OUT/loop.jsonl")
timeout -s KILL 260 $PY scripts/bench_train.py "${common[@]}" --profile-steps 5 > "$OUT/loop.log" 2>&1
echo "loop: rc=$? after $((SECONDS - start)) s"
left=$((TOTAL_S - (SECONDS - start)))
if [ "$left" -gt 90 ]; then
  timeout -s KILL "$left" $PY scripts/bench_train.py "${common[@]}" --override train.ema_every_n_steps=10 \
    > "$OUT/loop-ema10.log" 2>&1
  echo "loop, EMA every 10 steps: rc=$? after $((SECONDS - start)) s"
else
  echo "loop, EMA every 10 steps: skipped, ${left} s left of ${TOTAL_S}"
fi
grep -h '"train_step\|"train_e2e_img_per_s"\|"train_e2e_syncs' "$OUT"/*.jsonl | cut -c1-300
