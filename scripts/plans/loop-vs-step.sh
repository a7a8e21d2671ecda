#!/usr/bin/env bash
# The Lightning loop against the bare compiled step at 512 px, batch 64, on one machine (docs/BENCHMARKS.md,
# thirteenth session): the bare step (bench.py, 4 steps back to back per repetition), the whole loop
# (bench_train.py: EMA, clipping, the guard, logging; profiled: the fused AdamW kernel carries the clip, 10.4 ms a
# step on an H100), then the loop with the EMA every 10 steps in what is left of TOTAL_S (from inductor's cache it needs
# ~100 s). Each of the first two compiles its own graphs cold: the bare step took over 200 s on an H100 (cut there in
# the fourteenth session) and the profiled loop 255 s to its rows (170 s of first step), then its teardown. The whole
# plan needs about 600 s cold: give it a call of its own, or run the third part in the next call.
#   scripts/plans/loop-vs-step.sh [OUT] [TOTAL_S]
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${1:-runs/loop-vs-step}
TOTAL_S=${2:-590}
mkdir -p "$OUT"
start=$SECONDS
timeout -s KILL 270 $PY scripts/bench.py --only train --skip-eager --train-cl --train-shapes 64x64 --train-impls "" \
  --compile-train --train-inner 4 --out "$OUT/step.jsonl" > "$OUT/step.log" 2>&1
echo "bare step: rc=$? after $((SECONDS - start)) s"
common=(--latent 64 --batch 64 --compile --steps 40 --warmup 15 --out "$OUT/loop.jsonl")
timeout -s KILL 290 $PY scripts/bench_train.py "${common[@]}" --profile-steps 5 > "$OUT/loop.log" 2>&1
echo "loop: rc=$? after $((SECONDS - start)) s"
left=$((TOTAL_S - (SECONDS - start)))
if [ "$left" -gt 120 ]; then
  timeout -s KILL "$left" $PY scripts/bench_train.py "${common[@]}" --override train.ema_every_n_steps=10 \
    > "$OUT/loop-ema10.log" 2>&1
  echo "loop, EMA every 10 steps: rc=$? after $((SECONDS - start)) s"
else
  echo "loop, EMA every 10 steps: skipped, ${left} s left of ${TOTAL_S}"
fi
grep -h '"train_step\|"train_e2e_img_per_s"\|"train_e2e_syncs' "$OUT"/*.jsonl | cut -c1-300
