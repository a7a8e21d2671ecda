#!/usr/bin/env bash
# The Lightning loop at 512 px, batch 64 (docs/BENCHMARKS.md, eleventh session, "Next GPU run" 1), for one lent call:
# profiled (where its 2.6% below the bare step go), then with one EMA pass every 10 steps. On a cold H100 (twelfth
# session) the first run's first step took 193 s and a 280 s limit killed it after its rows (rc 137); the second run,
# from inductor's cache, took under 200 s.
#   scripts/plans/lightning-ema.sh [OUT]
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${1:-runs/lightning-ema}
mkdir -p "$OUT"
common=(--latent 64 --batch 64 --compile --steps 40 --warmup 15)
timeout -s KILL 330 $PY scripts/bench_train.py "${common[@]}" --profile-steps 5 --out "$OUT/loop.jsonl" \
  > "$OUT/loop.log" 2>&1
echo "profiled: rc=$?"
timeout -s KILL 200 $PY scripts/bench_train.py "${common[@]}" --override train.ema_every_n_steps=10 \
  --out "$OUT/loop.jsonl" > "$OUT/loop-ema10.log" 2>&1
echo "EMA every 10 steps: rc=$?"
grep -h '"train_e2e_img_per_s"\|"train_e2e_profile"' "$OUT/loop.jsonl" | cut -c1-300
