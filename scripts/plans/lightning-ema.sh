#!/usr/bin/env bash
# The Lightning loop at 512 px, batch 64 (docs/BENCHMARKS.md, eleventh session, "Next GPU run" 1), for one lent call:
# profiled (where its 2.6% below the bare step go), then with one EMA pass every 10 steps. About 200 s each on an
# H100 (the first step compiles for ~2 min; the second run reads inductor's cache).
#   scripts/plans/lightning-ema.sh [OUT]
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${1:-runs/lightning-ema}
mkdir -p "$OUT"
common=(--latent 64 --batch 64 --compile --steps 40 --warmup 15)
timeout -s KILL 280 $PY scripts/bench_train.py "${common[@]}" --profile-steps 5 --out "$OUT/loop.jsonl" \
  > "$OUT/loop.log" 2>&1
echo "profiled: rc=$?"
timeout -s KILL 200 $PY scripts/bench_train.py "${common[@]}" --override train.ema_every_n_steps=10 \
  --out "$OUT/loop.jsonl" > "$OUT/loop-ema10.log" 2>&1
echo "EMA every 10 steps: rc=$?"
grep -h '"train_e2e_img_per_s"\|"train_e2e_profile"' "$OUT/loop.jsonl" | cut -c1-300
